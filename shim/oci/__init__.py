"""Driving the OCI runtime (runc, crun): argv rendering and the runner that executes it."""
