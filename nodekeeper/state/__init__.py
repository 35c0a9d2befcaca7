"""What this node remembers: state in memory, written behind by a thread (memory), the
state directory on disk (disk), and the typed records `status` and `explain` read of it
(view). disk and view are the only code that speaks SQL."""
