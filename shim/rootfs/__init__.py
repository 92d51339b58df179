"""Mounting a container's rootfs from containerd's Mount list and unmounting it (`delete` uses the latter: ctypes
only)."""
