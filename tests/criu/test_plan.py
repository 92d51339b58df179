"""Option by option: the CRIU request and runtime flags pyshim builds, against what runc sets for the same
options (runc's criu_opts for `runc checkpoint` and `runc restore`; the table in docs/checkpoint.md)."""

import pycriu.rpc_pb2 as rpc
import pytest

from shim.criu.options import CheckpointOptions, OptionError, from_annotations, from_request, resolve
from shim.criu.plan import (
    ContainerFacts,
    dump_request,
    restore_config,
    runtime_checkpoint_args,
    runtime_restore_args,
)
from shim.criu.restore import read_user_criu_config

FACTS = ContainerFacts(rootfs="/run/b/rootfs", pid=4242)


def dump(**options):
    return dump_request(rpc, CheckpointOptions(**options).validate(), FACTS, images_dir_fd=7).opts


def test_what_runc_always_sets():
    opts = dump()
    assert (opts.images_dir_fd, opts.log_level, opts.log_file, opts.root, opts.pid) == (
        7, 4, "dump.log", "/run/b/rootfs", 4242)
    assert opts.manage_cgroups and opts.manage_cgroups_mode == rpc.DEFAULT
    assert opts.notify_scripts and opts.orphan_pts_master
    assert opts.config_file == "/etc/criu/runc.conf"
    assert not opts.HasField("work_dir_fd") and not opts.HasField("ps") and not opts.HasField("parent_img")


@pytest.mark.parametrize("option,field_name", [
    ("leave_running", "leave_running"), ("tcp_established", "tcp_established"), ("ext_unix_sk", "ext_unix_sk"),
    ("shell_job", "shell_job"), ("lazy_pages", "lazy_pages"), ("file_locks", "file_locks"),
    ("auto_dedup", "auto_dedup"), ("tcp_skip_in_flight", "tcp_skip_in_flight"), ("link_remap", "link_remap"),
])
def test_boolean_flags_map_one_to_one(option, field_name):
    assert getattr(dump(**{option: True}), field_name) is True
    off = {option: False} if option != "leave_running" else {"leave_running": False}
    assert getattr(dump(**off), field_name) is False


def test_work_path_page_server_parent_and_pre_dump():
    request = dump_request(rpc, CheckpointOptions(page_server="10.0.0.2:27", parent_path="../prev", pre_dump=True),
                           FACTS, images_dir_fd=7, work_dir_fd=9)
    assert request.type == rpc.PRE_DUMP
    assert request.opts.work_dir_fd == 9
    assert (request.opts.ps.address, request.opts.ps.port) == ("10.0.0.2", 27)
    assert (request.opts.parent_img, request.opts.track_mem) == ("../prev", True)
    assert request.opts.leave_running  # pre-dump never stops the task


@pytest.mark.parametrize("mode,value", [("", rpc.DEFAULT), ("soft", rpc.SOFT), ("full", rpc.FULL),
                                        ("strict", rpc.STRICT), ("ignore", rpc.IGNORE)])
def test_manage_cgroups_mode(mode, value):
    assert dump(manage_cgroups_mode=mode).manage_cgroups_mode == value


def test_empty_ns_network_is_clone_newnet_always_as_in_runc():
    assert dump(empty_ns=("network",)).empty_ns == 0x40000000
    assert dump().empty_ns == 0x40000000  # runc: "doesn't manage network devices and their configuration"
    with pytest.raises(OptionError):
        CheckpointOptions(empty_ns=("pid",)).validate()


def test_container_facts_become_ext_mnt_external_and_freezer():
    facts = ContainerFacts(rootfs="/r", pid=1, bind_mounts=("/data",), cgroup_v1_binds=("/sys/fs/cgroup/cpu",),
                           masked_files=("/proc/kcore",), devices=("/dev/fuse",),
                           external_namespaces={"network": 4026532000, "pid": 4026532111},
                           freezer_cgroup="/sys/fs/cgroup/freezer/ns/c1", criu_config=None)
    opts = dump_request(rpc, CheckpointOptions(), facts, images_dir_fd=3).opts
    assert [(m.key, m.val) for m in opts.ext_mnt] == [
        ("/data", "/data"), ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu"), ("/proc/kcore", "/dev/null"),
        ("/dev/fuse", "/dev/fuse")]
    assert list(opts.external) == ["net[4026532000]:extRootNetNS", "pid[4026532111]:extRootPidNS"]
    assert opts.freeze_cgroup == "/sys/fs/cgroup/freezer/ns/c1"
    assert not opts.HasField("config_file")  # org.criu.config set to "" asks for none
    # a pre-dump carries no mount mappings (runc skips them too)
    pre = dump_request(rpc, CheckpointOptions(pre_dump=True), facts, images_dir_fd=3).opts
    assert len(pre.ext_mnt) == 0


def test_network_lock_method():
    assert dump(network_lock="nftables").network_lock == rpc.NFTABLES
    # no established TCP to keep consistent: no lock; with it, CRIU's default (iptables)
    assert dump().network_lock == rpc.SKIP
    assert dump(tcp_established=True).network_lock == rpc.IPTABLES


def test_runc_engine_flags():
    args = runtime_checkpoint_args(CheckpointOptions(
        leave_running=True, tcp_established=True, ext_unix_sk=True, shell_job=True, file_locks=True,
        auto_dedup=True, page_server="h:1", parent_path="p", manage_cgroups_mode="soft", empty_ns=("network",)),
        image_path="/i", work_path="/w")
    assert args == ["--image-path", "/i", "--work-path", "/w", "--leave-running", "--tcp-established",
                    "--ext-unix-sk", "--shell-job", "--file-locks", "--auto-dedup", "--parent-path", "p",
                    "--page-server", "h:1", "--manage-cgroups-mode", "soft", "--empty-ns", "network"]


def test_restore_honours_the_checkpoint_options():
    options = CheckpointOptions(tcp_established=True, ext_unix_sk=True, shell_job=True, file_locks=True,
                                manage_cgroups_mode="ignore", empty_ns=("network",))
    assert runtime_restore_args(options) == ["--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                                             "--manage-cgroups-mode", "ignore", "--empty-ns", "network"]
    closing = CheckpointOptions(tcp_established=True, tcp_close=True, lazy_pages=True)
    assert runtime_restore_args(closing) == []  # tcp-close goes in the CRIU config; lazy restore is explicit


def test_restore_config_appends_to_the_users_file(tmp_path):
    user = tmp_path / "runc.conf"
    user.write_text("log-level 4\n")
    assert read_user_criu_config(str(user)) == "log-level 4\n"
    assert read_user_criu_config(str(tmp_path / "none")) == read_user_criu_config("") == ""
    text = restore_config(CheckpointOptions(tcp_close=True, network_lock="skip"),
                          user_config=read_user_criu_config(str(user)), action_script="/usr/lib/pyshim/criu-action")
    assert text.splitlines() == ["log-level 4", "# added by pyshim", "tcp-close", "network-lock skip",
                                 "action-script /usr/lib/pyshim/criu-action"]
    established = restore_config(CheckpointOptions(tcp_established=True), user_config="")
    assert established.splitlines() == ["# added by pyshim", "tcp-established", "network-lock iptables"]
    unterminated = restore_config(CheckpointOptions(tcp_established=True), user_config="log-level 4\n\nshell-job")
    assert unterminated.splitlines()[:4] == ["log-level 4", "", "shell-job", "# added by pyshim"]


@pytest.mark.parametrize("mode", ["soft", "full", "strict", "ignore"])
def test_restore_config_carries_the_cgroups_mode_runc_drops(mode):
    # runc 1.1 accepts `restore --manage-cgroups-mode` and never sends it: CRIU restored in soft
    # mode whatever the checkpoint said. The `key=value` form: CRIU's argument is optional.
    text = restore_config(CheckpointOptions(manage_cgroups_mode=mode), user_config="")
    assert f"manage-cgroups={mode}" in text.splitlines()
    assert "manage-cgroups" not in restore_config(CheckpointOptions(), user_config="")  # CRIU's default


def test_restore_config_names_the_new_containers_cgroup_v2_as_cgroup_root():
    # runc 1.1 gives CRIU cgroup roots on v1 only; ":" is the unified hierarchy (CRIU's controller "")
    text = restore_config(CheckpointOptions(), user_config="", cgroup_root="/k8s.io/c1")
    assert "cgroup-root :/k8s.io/c1" in text.splitlines()
    assert "cgroup-root" not in restore_config(CheckpointOptions(), user_config="")


def test_request_annotation_and_host_precedence():
    host = {"tcp_established": True, "manage_cgroups_mode": "soft", "engine": "runc"}
    annotations = from_annotations({"io.pyshim.checkpoint.manage-cgroups-mode": "full",
                                    "io.pyshim.checkpoint.file-locks": "true", "unrelated": "x"})
    request = from_request(exit=True, cgroups_mode="strict", image_path="/img")
    options = resolve(host, annotations, request)
    assert (options.manage_cgroups_mode, options.file_locks, options.tcp_established, options.engine) == (
        "strict", True, True, "runc")
    assert options.leave_running is False and options.image_path == "/img"
    # a request cannot switch an annotation's boolean off (proto3 has no "unset")
    assert resolve(annotations, from_request()).file_locks is True


def test_default_leaves_the_task_running_like_the_go_shim():
    assert resolve().leave_running is True
    assert resolve(from_request(exit=True)).leave_running is False


@pytest.mark.parametrize("layer,message", [
    ({"io.pyshim.checkpoint.no-such-option": "1"}, "unknown checkpoint option"),
    ({"io.pyshim.checkpoint.tcp-established": "perhaps"}, "not a boolean"),
    ({"io.pyshim.checkpoint.manage-cgroups-mode": "loose"}, "manage-cgroups-mode"),
    ({"io.pyshim.checkpoint.page-server": "nohost"}, "ADDRESS:PORT"),
    ({"io.pyshim.checkpoint.image-path": "relative/dir"}, "absolute"),
    ({"io.pyshim.checkpoint.engine": "podman"}, "engine"),
])
def test_bad_options_are_named_in_the_error(layer, message):
    with pytest.raises(OptionError, match=message):
        resolve(from_annotations(layer))


def test_facts_from_a_bundle(tmp_path):
    import json
    import os

    from shim.bundle.config import Bundle
    from shim.criu.plan import facts_from_bundle

    rootfs = tmp_path / "rootfs"
    (rootfs / "real" / "data").mkdir(parents=True)
    (rootfs / "link").symlink_to("/real")  # an absolute link, resolved inside the rootfs
    netns = tmp_path / "netns"
    netns.write_text("")
    config = {
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/link/data", "type": "bind", "source": "/srv", "options": ["rbind"]},
                   {"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"maskedPaths": ["/proc/uptime", "/proc/does-not-exist", "/proc/sys"],
                  "devices": [{"path": "/dev/fuse", "type": "c"}],
                  "namespaces": [{"type": "network", "path": str(netns)}, {"type": "pid"}, {"type": "cgroup"}]},
        "annotations": {"org.criu.config": "/etc/my-criu.conf"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    facts = facts_from_bundle(Bundle.read(str(tmp_path)), os.getpid())
    assert facts.rootfs == str(rootfs)
    assert facts.bind_mounts == ("/real/data",)
    assert facts.cgroup_v1_binds == ()  # no cgroup mount (and a cgroup namespace)
    assert facts.masked_files == ("/proc/uptime",)  # missing and directory entries are skipped
    assert facts.devices == ("/dev/fuse",)
    assert facts.external_namespaces == {"network": os.stat(netns).st_ino}
    assert facts.criu_config == "/etc/my-criu.conf"
