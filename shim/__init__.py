"""pyshim: a containerd shim v2 whose reason to exist is checkpoint/restore done right."""

__version__ = "0.1.0"
