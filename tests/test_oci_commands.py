from shim.oci import commands
from shim.oci.commands import RuntimeConfig

RT = RuntimeConfig("runc", root="/run/containerd/runc/ns", log="/b/log.json")


def test_global_flags_come_first():
    assert commands.start(RT, "c") == ["runc", "--root", "/run/containerd/runc/ns", "--log", "/b/log.json",
                                       "--log-format", "json", "start", "c"]


def test_create_with_console_and_no_pivot():
    argv = commands.create(RT, "c", bundle="/b", pid_file="/b/init.pid", console_socket="/s", no_pivot=True)
    assert argv[7:] == ["create", "--bundle", "/b", "--pid-file", "/b/init.pid", "--console-socket", "/s",
                        "--no-pivot", "c"]


def test_kill_all_and_delete_force():
    assert commands.kill(RT, "c", 9, all=True)[7:] == ["kill", "--all", "c", "9"]
    assert commands.delete(RT, "c", force=True)[7:] == ["delete", "--force", "c"]


def test_restore_as_the_go_shim_runs_it_plus_flags():
    argv = commands.restore(RT, "c", bundle="/b", pid_file="/b/init.pid", image_path="/i", work_path="/w",
                            console_socket="/s", flags=["--tcp-established"])
    assert argv[7:] == ["restore", "--detach", "--image-path", "/i", "--work-path", "/w", "--pid-file",
                        "/b/init.pid", "--bundle", "/b", "--console-socket", "/s", "--no-subreaper",
                        "--tcp-established", "c"]


def test_systemd_cgroup_flag():
    assert "--systemd-cgroup" in commands.state(RuntimeConfig("crun", systemd_cgroup=True), "c")
