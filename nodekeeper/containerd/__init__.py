"""containerd: the only code that talks to it (client), and what the node holds under a
name as its image events keep it (presence)."""
