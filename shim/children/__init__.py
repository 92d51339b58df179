"""Child processes: the reaper (the one owner of waitpid), starting children without racing it, and process
relations as /proc shows them."""
