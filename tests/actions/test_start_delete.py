import hashlib
import json
import os

from shim.actions.delete import encode_delete_response
from shim.actions.start import listen
from shim.api.containerd.task.v2.shim_pb2 import DeleteResponse
from shim.bundle.layout import group_id, socket_address


def test_delete_response_hand_encoding_matches_protobuf():
    for pid, status, when in [(0, 0, 0.0), (1, 137, 1764331200.5), (4194304, 255, 1.000000001)]:
        expected = DeleteResponse(pid=pid, exit_status=status)
        expected.exited_at.FromNanoseconds(int(when * 1e9))
        decoded = DeleteResponse.FromString(encode_delete_response(pid, status, when))
        assert decoded == expected


def test_socket_address_is_the_go_derivation():
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "default", "c1") == f"unix:///run/containerd/s/{digest}"


def test_group_id_from_annotations(tmp_path):
    assert group_id(str(tmp_path), "c1") == "c1"  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": "pod"}}))
    assert group_id(str(tmp_path), "c1") == "pod"
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.sandbox-id": "pod", "io.containerd.runc.v2.group": "grp"}}))
    assert group_id(str(tmp_path), "c1") == "grp"


def test_listen_reuses_a_live_socket_and_replaces_a_stale_one(tmp_path):
    path = str(tmp_path / "s" / "shim.sock")
    live = listen(path)
    assert live is not None and oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert listen(path) is None  # a live shim answers: join it
    live.close()
    again = listen(path)  # nobody answers any more: take the path over
    assert again is not None and again.fileno() >= 0
    again.close()


def test_delete_removes_a_dead_shims_socket_but_not_a_live_one(tmp_path):
    from shim.actions.delete import remove_dead_socket

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    path = str(tmp_path / "shim.sock")
    (bundle / "address").write_text(f"unix://{path}")
    live = listen(path)
    remove_dead_socket(str(bundle))
    assert os.path.exists(path)  # something listens: a shim serving other containers
    live.close()  # now nothing listens, but the file stays, as after kill -9
    assert os.path.exists(path)
    remove_dead_socket(str(bundle))
    assert not os.path.exists(path)


def test_version_and_info_actions():
    """`-v` prints the version; `-info` (containerd 2.x) answers a RuntimeInfo echoing the options."""
    import subprocess
    import sys

    from shim.api.containerd.runc.options.oci_pb2 import Options
    from shim.api.containerd.types.introspection_pb2 import RuntimeInfo
    from shim.server.events import pack

    version = subprocess.run([sys.executable, "-m", "shim", "-v"], capture_output=True, text=True, check=True)
    assert "io.containerd.pyshim.v2" in version.stdout and "Version:" in version.stdout
    options = pack(Options(binary_name="crun"))
    info = subprocess.run([sys.executable, "-m", "shim", "-info"], input=options.SerializeToString(),
                          capture_output=True, check=True)
    decoded = RuntimeInfo.FromString(info.stdout)
    assert decoded.name == "io.containerd.pyshim.v2" and decoded.version.version
    assert Options.FromString(decoded.options.value).binary_name == "crun"


def test_unknown_action_and_bad_flags_exit_2():
    import subprocess
    import sys

    assert subprocess.run([sys.executable, "-m", "shim", "frobnicate"], capture_output=True).returncode == 2
    assert subprocess.run([sys.executable, "-m", "shim", "-nope", "start"], capture_output=True).returncode == 2


def test_delete_runs_the_runtime_only_when_it_holds_state_for_the_container(tmp_path):
    import subprocess
    import sys

    from shim.bundle.layout import RUNTIME_FILE

    calls = tmp_path / "calls"
    runtime = tmp_path / "fake-runc"
    runtime.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    runtime.chmod(0o755)
    root = tmp_path / "root"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / RUNTIME_FILE).write_text(f"binary={runtime}\nroot={root}\n")
    argv = [sys.executable, "-m", "shim", "-namespace", "ns1", "-id", "c1", "-bundle", str(bundle), "delete"]

    first = subprocess.run(argv, capture_output=True, timeout=30)
    assert first.returncode == 0 and DeleteResponse.FromString(first.stdout).exit_status == 137
    assert not calls.exists()  # no <root>/ns1/c1: nothing for the runtime to delete

    (root / "ns1" / "c1").mkdir(parents=True)
    second = subprocess.run(argv, capture_output=True, timeout=30)
    assert second.returncode == 0 and DeleteResponse.FromString(second.stdout).exit_status == 137
    assert calls.read_text().split() == ["--root", f"{root}/ns1", "delete", "--force", "c1"]
