"""Fixtures of the pyshim command's unit tests."""

from __future__ import annotations

import os

import pytest

from shim.tool.migrate.channel import Channel


@pytest.fixture
def pair():
    """Two channels joined by two pipes, as the source and the receiver are through ssh."""
    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    a = Channel(a_read, a_write, peer="b").start()
    b = Channel(b_read, b_write, peer="a").start()
    yield a, b
    for channel in (a, b):
        channel.close_sending()
