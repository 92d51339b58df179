"""Container processes (the init and execs) and the states they move through."""
