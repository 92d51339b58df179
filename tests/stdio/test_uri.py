import pytest

from shim.stdio.errors import StdioError
from shim.stdio.uri import Kind, Target, parse


@pytest.mark.parametrize("value, expected", [
    ("", Target(Kind.NONE)),
    ("/run/containerd/fifo/1/abc-stdout", Target(Kind.FIFO, "/run/containerd/fifo/1/abc-stdout")),
    ("fifo:///run/x/stdin", Target(Kind.FIFO, "/run/x/stdin")),
    ("file:///var/log/c/out.log", Target(Kind.FILE, "/var/log/c/out.log")),
    ("file:///var/log/with%20space.log", Target(Kind.FILE, "/var/log/with space.log")),
    ("binary:///usr/bin/logger", Target(Kind.BINARY, "/usr/bin/logger")),
    # each key is an argument followed by its first value (an empty value stays an argument)
    ("binary:///bin/logger?id=c1&flag&mode=a&mode=b",
     Target(Kind.BINARY, "/bin/logger", ("id", "c1", "flag", "", "mode", "a"))),
    # env.NAME parameters become the environment; CONTAINER_ID/NAMESPACE cannot be overridden
    ("binary:///bin/logger?env.LEVEL=debug&x=1&env.CONTAINER_ID=evil&env.EMPTY=",
     Target(Kind.BINARY, "/bin/logger", ("x", "1"), (("LEVEL", "debug"), ("EMPTY", "")))),
    ("binary:///bin/logger?path=%2Fvar%2Flog", Target(Kind.BINARY, "/bin/logger", ("path", "/var/log"))),
    ("binary-v2:///bin/logger", Target(Kind.BINARY, "/bin/logger", strict_ready=True)),
])
def test_parse(value, expected):
    assert parse(value, "stdout") == expected


@pytest.mark.parametrize("value, message", [
    ("npipe://./pipe/x", "unknown stdio scheme 'npipe'"),
    ("binary://relative/logger", "must name an absolute path"),
    ("file://", "must name an absolute path"),
    ("fifo://", "names no fifo path"),
])
def test_parse_errors_name_the_stream_and_value(value, message):
    with pytest.raises(StdioError, match=message) as caught:
        parse(value, "stderr")
    assert str(caught.value).startswith(f"stderr {value!r}")
