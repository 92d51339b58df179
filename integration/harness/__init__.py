"""Integration test harness: private containerd instances, a locally built test image, runc helpers.

Everything here drives real binaries as root (containerd, ctr, runc, criu); nothing is mocked. Each module has one
job; the tests import what they need from the modules directly.
"""
