"""What this node remembers: state in memory, written behind by a thread (memory), and
the state directory on disk, the only code that speaks SQL (disk)."""
