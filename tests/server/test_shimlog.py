"""shim.server.shimlog: the server's lines in the Go shim's logrus shape, with its fields."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

import pytest

from shim.server import shimlog

# A line as containerd 1.7's Go runc shim wrote it (seen in a test containerd's log).
GO_SHIM_LINE = ('time="2026-12-04T13:23:19.906534149Z" level=debug msg="starting signal loop" namespace=pyshim-it-2f '
                'path=/tmp/psh17/state/io.containerd.runtime.v2.task/pyshim-it-2f/log-0d pid=18349 '
                'runtime=io.containerd.runc.v2')
LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def fields_of(line: str) -> dict[str, str]:
    return {key: value for key, value in LOGFMT.findall(line)}


def record(message: str, level: int = logging.INFO, created: float = 1_796_391_799.906534,
           **extra) -> logging.LogRecord:
    item = logging.LogRecord("shim", level, __file__, 1, message, (), None)
    item.created = created
    for key, value in extra.items():
        setattr(item, key, value)
    return item


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_line_has_the_go_shims_shape_and_field_names(utc):
    formatter = shimlog.LogrusFormatter({"runtime": shimlog.RUNTIME_TYPE, "namespace": "pyshim-it-2f", "pid": "42"})
    line = formatter.format(record("pyshim serving", fields={"path": "/tmp/b/log-0d"}))
    assert line == ('time="2026-12-04T13:43:19.906534000Z" level=info msg="pyshim serving" namespace=pyshim-it-2f '
                    'path=/tmp/b/log-0d pid=42 runtime=io.containerd.pyshim.v2')
    assert list(fields_of(line)) == list(fields_of(GO_SHIM_LINE))


def test_levels_are_logrus_names():
    formatter = shimlog.LogrusFormatter({})
    levels = [fields_of(formatter.format(record("m", level)))["level"]
              for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)]
    assert levels == ["debug", "info", "warning", "error", "error"]


def test_values_are_quoted_only_where_logfmt_needs_it():
    assert shimlog.quote("io.containerd.pyshim.v2") == "io.containerd.pyshim.v2"
    assert shimlog.quote("/run/a@b^c+d") == "/run/a@b^c+d"
    assert shimlog.quote("") == ""
    assert shimlog.quote("two words") == '"two words"'
    assert shimlog.quote('say "hi"\\\n\tthere\x01') == '"say \\"hi\\"\\\\\\n\\tthere\\x01"'


def test_an_exception_becomes_an_error_field():
    formatter = shimlog.LogrusFormatter({"runtime": shimlog.RUNTIME_TYPE})
    try:
        raise OSError("no such fifo")
    except OSError:
        item = logging.LogRecord("shim", logging.ERROR, __file__, 1, "shim failed", (), sys.exc_info())
    fields = fields_of(formatter.format(item))
    assert fields["error"] == '"no such fifo"'
    assert fields["msg"].startswith('"shim failed\\nTraceback')


def test_timestamp_carries_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        assert shimlog.timestamp(1_796_391_799.9999996) == "2026-12-04T08:43:20.000000000-05:00"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_setup_logging_writes_to_the_bundles_fifo(tmp_path):
    os.mkfifo(tmp_path / "log")
    reader = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        shimlog.setup_logging(str(tmp_path), debug=False, namespace="ns1")
        logging.getLogger("shim").debug("hidden")
        logging.getLogger("shim").info("shown")
        line = os.read(reader, 4096).decode()
    finally:
        for handler in root.handlers[len(handlers):]:
            root.removeHandler(handler)
            os.close(handler.fd)
        root.setLevel(level)
        os.close(reader)
    assert line.count("\n") == 1
    assert fields_of(line) | {"time": ""} == {"time": "", "level": "info", "msg": "shown", "namespace": "ns1",
                                              "pid": str(os.getpid()), "runtime": "io.containerd.pyshim.v2"}
