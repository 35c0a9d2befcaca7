"""Commands an operator runs beside the daemon: explain and status (report), doctor."""
