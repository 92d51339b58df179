"""The CRIU log lines an error quotes, against real logs of failed CRIU runs (CRIU 4.2.1 on this project's test
host; trimmed in the middle where long): the cause, not the rlimit error every run logs nor the FPU listing."""

from pathlib import Path

from shim.criu.errors import CriuFailed
from shim.criu.log import HEAD_BYTES, TAIL_BYTES, excerpt, log_excerpt, quote

LOGS = Path(__file__).parent / "criu_logs"


def quoted(name: str) -> str:
    return " | ".join(log_excerpt(LOGS / name))


def test_dump_refused_for_an_established_connection_quotes_the_socket_error():
    lines = log_excerpt(LOGS / "dump-established-tcp.log")
    assert "Connected TCP socket, consider using --tcp-established option." in lines[-2]
    assert "Dump files (pid: 8173) failed with -1" in lines[-1]
    assert "RLIMIT_NOFILE" not in " ".join(lines) and "Dumping FAILED" not in " ".join(lines)


def test_restore_without_inventory_quotes_what_criu_was_reading():
    assert quoted("restore-no-inventory.log") == ("(00.041219) No inventory.img image | (00.041220) Error "
                                                  "(criu/protobuf.c:72): Unexpected EOF on (empty-image)")


def test_restore_of_a_truncated_pstree_quotes_the_short_read():
    text = quoted("restore-truncated-pstree.log")
    assert "Read 8 bytes while 14 expected from" in text and "pstree.img" in text
    assert "RLIMIT_NOFILE" not in text and "fpu" not in text


def test_a_killed_criu_without_errors_is_quoted_where_it_stopped():
    # A restore from truncated pages: CRIU's restorer re-reads the missing pages for ever, then was killed.
    lines = log_excerpt(LOGS / "restore-truncated-pages-killed.log")
    assert len(lines) == 2 and all("pie: 11490:" in line for line in lines)
    assert any("Preadv 0x7f6576a00000:4096" in line for line in lines)


def test_errors_before_the_failed_mark_and_a_killed_run_ends_with_its_last_line():
    log = [b"(00.01) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
           b"(00.02) Warn  (criu/cr-restore.c:1050): Set CLONE_PARENT | CLONE_NEWPID but it might cause restore "
           b"problem,because not all kernels support such clone flags combinations!",
           *[b"(00.03) filler %d" % i for i in range(100)],
           b"(00.04) Error (criu/files-reg.c:2147): Can't open file tmp/x on restore: No such file",
           b"(00.05) Error (criu/files-reg.c:2147): Can't open file tmp/x on restore: No such file",
           b"(00.06) still going"]
    assert excerpt(log) == ["(00.03) filler 99", "(00.05) Error (criu/files-reg.c:2147): Can't open file tmp/x on "
                            "restore: No such file", "(00.06) still going"]
    failed = [*log, b"(00.07) Error (criu/cr-restore.c:2460): Restoring FAILED.", b"(00.08) Error (x.c:1): after"]
    # CRIU said it failed: its errors before that, and nothing after (cleanup), nor the last line
    assert excerpt(failed) == excerpt(log)[:2]


def test_at_most_four_causes_each_clipped():
    log = [b"(00.%02d) Error (criu/x.c:%d): failure %d " % (i, i, i) + b"x" * 500 for i in range(20)]
    lines = excerpt([*log, b"(00.99) Error (criu/cr-dump.c:1975): Dumping FAILED."])
    assert [line.split()[4] for line in lines] == ["16", "17", "18", "19"]
    assert all(len(line) <= 400 for line in lines) and "failure 19 " in lines[-1]


def test_a_huge_log_is_read_at_both_ends(tmp_path):
    path = tmp_path / "restore.log"
    with open(path, "wb") as f:
        f.write(b"(00.1) Error (criu/a.c:1): the cause\n")
        f.write(b"(00.2) pie: 7: Preadv 0x1000:4096... (1 iovs)\n" * ((HEAD_BYTES + TAIL_BYTES) // 40))
        f.write(b"(99.9) pie: 7: `- returned 0\n")
    lines = log_excerpt(path)
    assert "the cause" in lines[0] and lines[-1] == "(99.9) pie: 7: `- returned 0"


def test_one_quote_for_every_error():
    assert quote(LOGS / "restore-no-inventory.log").startswith(
        f". From the CRIU log {LOGS / 'restore-no-inventory.log'}: (00.041219) No inventory.img image | ")
    assert quote(None) == "" and quote(LOGS / "never-written.log") == ""
    error = CriuFailed("restore", cr_errmsg="rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
                       exit_status=1, log_path=str(LOGS / "restore-no-inventory.log"),
                       log_lines=log_excerpt(LOGS / "restore-no-inventory.log"))
    assert str(error) == ("criu restore failed: criu exited with status 1" + quote(LOGS / "restore-no-inventory.log"))
