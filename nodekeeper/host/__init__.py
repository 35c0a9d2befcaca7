"""The daemon's host: its unix socket, systemd's notifications, the event loop's lag and
the view of the running daemon that `nodekeeper status` reads."""
