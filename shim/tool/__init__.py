"""The `pyshim` command: checkpoint workflows for containerd users on top of the shim (docs/cli.md).

Talks to containerd over its gRPC API (containerd_api.py) and never runs inside the shim: the shim binary's
start/delete hot path imports nothing from here.
"""
