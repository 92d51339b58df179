"""CRIU's statistics as the shim passes them on (shim.criu.stats)."""

from shim.criu.stats import summary, within


def test_a_time_longer_than_the_call_is_dropped_and_the_rest_kept():
    # what CRIU 4.2.1's lazy dump wrote for a dump of about a second: frozen_time counted from a start never set
    lazy = {"freezing_time": 0, "frozen_time": 3734026200, "memdump_time": 0, "memwrite_time": 0,
            "pages_scanned": 0, "pages_written": 0}
    kept = within(lazy, elapsed_us=1_200_000)
    assert kept == {"freezing_time": 0, "memdump_time": 0, "memwrite_time": 0, "pages_scanned": 0,
                    "pages_written": 0}
    assert "frozen" not in summary(kept)


def test_plausible_times_and_every_counter_are_kept():
    dump = {"freezing_time": 1200, "frozen_time": 58600, "memdump_time": 9000, "memwrite_time": 7000,
            "pages_scanned": 70000, "pages_written": 65536}  # pages are counts, never compared with time
    assert within(dump, elapsed_us=60_000) == dump
    assert summary(dump).startswith("freezing 1.2 ms, frozen 58.6 ms, memdump 9.0 ms, memwrite 7.0 ms")
