"""log_excerpt: the lines of a CRIU log worth quoting, bounded."""

from shim.criu.log import excerpt, log_excerpt

LOG = """\
(00.000001) Version: 4.2.1 (gitid 0)
(00.000010) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.000020) Warn  (criu/seize.c:63): Failed to open /proc/999999/comm: No such file or directory
""" + "".join(f"({i:08.6f}) filler line {i}\n" for i in range(1000)) + """\
(00.900000) Error (compel/src/lib/infect.c:417): Unable to detach from 999999: No such process
(00.900001) Unseizing 999999 into 1
(00.900002) Error (compel/src/lib/infect.c:417): Unable to detach from 999999: No such process
(00.900003) Error (criu/cr-dump.c:1975): Dumping FAILED.
"""


def test_errors_warnings_and_tail_in_file_order(tmp_path):
    path = tmp_path / "dump.log"
    path.write_text(LOG)
    lines = log_excerpt(path, max_lines=3)
    assert lines[0].endswith("rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted")
    assert "Failed to open /proc/999999/comm" in lines[1]
    assert "filler line 5" not in " ".join(lines)  # the middle of the log is left out
    assert lines[-1].endswith("Dumping FAILED.")
    # the repeated error (different timestamps) is quoted once
    assert sum("Unable to detach" in line for line in lines) == 1
    assert "Unseizing 999999 into 1" in lines[-2]


def test_bounded_keeps_both_ends(tmp_path):
    text = "".join(f"(00.{i:06d}) Error (criu/x.c:{i}): failure number {i} " + "x" * 300 + "\n"
                   for i in range(100))
    lines = excerpt(text.encode().splitlines(), max_lines=10, max_chars=2000)
    assert sum(map(len, lines)) <= 2000 + 3
    assert "failure number 0 " in lines[0] and "failure number 99 " in lines[-1]
    assert "..." in lines


def test_long_lines_are_clipped_and_bad_bytes_survive():
    lines = excerpt([b"(00.1) Error (a.c:1): " + b"\xff" * 10 + b"y" * 5000])
    assert len(lines) == 1 and len(lines[0]) <= 400 and lines[0].endswith("...") and "\ufffd" in lines[0]


def test_missing_log_is_empty(tmp_path):
    assert log_excerpt(tmp_path / "never-written.log") == []
