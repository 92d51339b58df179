"""`pyshim restore` of archives containerd 2.x's CRI writes (Kubernetes' CheckpointContainer), on another containerd.

A counter (kept only in a shell's memory) runs in a pod of a CRI-enabled containerd 2.1 under each CRI handler:
pyshim, and the Go runc shim. CheckpointContainer writes the archive (container left running); the pod is removed;
`pyshim restore` brings the archive up as a new container under pyshim on a second, plain containerd (the test image
imported there): the counter goes on from its checkpointed value, the file the workload wrote before the checkpoint
is there (rootfs-diff.tar). checkpointctl (when installed) gives the same fields (container, statistics, sizes,
process tree) for the Go shim's CRI archive as for pyshim's export of the same counter run with `ctr run`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from harness.containerd import CRI_NAMESPACE, PYSHIM, Containerd
from harness.cri import CriClient, container_config, pod_config
from harness.image import TestImage, build_pause_image
from harness.tasks import remove, task_status
from harness.waiting import wait_until
from test_tool_migrate import checkpointctl_path, first_write, pyshim, read_counter, runtime_config

COUNTER = ("echo written-before-checkpoint > /root/marker; "
           "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done")


@pytest.fixture
def cri_and_plain(request, environment, test_image: TestImage, containerd_log_dir: Path, tmp_path_factory):
    from conftest import track_containerd

    pause = build_pause_image(tmp_path_factory.mktemp("pause-image"), busybox=environment.busybox)
    cri_host = Containerd("2", environment, log_dir=containerd_log_dir, cri_sandbox_image=pause.ref)
    plain = Containerd("2", environment, log_dir=containerd_log_dir)
    try:
        for instance in (cri_host, plain):
            track_containerd(request, instance)
            instance.start()
        for image in (test_image, pause):
            cri_host.import_image(image, namespace=CRI_NAMESPACE)
        plain.import_image(test_image)
        with CriClient(cri_host.address) as cri:
            for image in (test_image, pause):
                cri.wait_image(image.ref)
            yield cri_host, cri, plain
    finally:
        cri_host.stop()
        plain.stop()


@pytest.mark.parametrize("handler", ["pyshim", "runc"])
def test_a_cri_checkpoint_archive_restores_on_another_containerd(cri_and_plain, test_image: TestImage, tmp_path: Path,
                                                                 handler: str):
    cri_host, cri, plain = cri_and_plain
    config = pod_config(f"tool-{handler}", uuid.uuid4().hex, cgroup_parent=f"/{cri_host.namespace}")
    sandbox_id = cri.run_pod_sandbox(config, handler)
    archive = tmp_path / f"cri-{handler}.tar"
    restored = plain.new_id(f"from-cri-{handler}")
    try:
        container_id = cri.create_container(sandbox_id, container_config("counter", test_image.ref, "sh", "-c",
                                                                         COUNTER), config)
        cri.start_container(container_id)
        count = cri_host.bundle(container_id, CRI_NAMESPACE) / "rootfs/tmp/count"
        wait_until(lambda: (read := _value(count)) is not None and read >= 3, 15, "the counter to reach 3")
        before = _value(count)
        cri.checkpoint_container(container_id, str(archive))
        for call in (cri.stop_pod_sandbox, cri.remove_pod_sandbox):
            call(sandbox_id)
        sandbox_id = None

        copied = tmp_path / "other-host" / archive.name
        copied.parent.mkdir()
        shutil.copyfile(archive, copied)
        result = pyshim(plain, tmp_path / "store", "restore", str(copied), "--name", restored,
                        "--runtime-config", runtime_config(plain))
        assert result.returncode == 0, result.stderr
        assert task_status(plain, restored) == "RUNNING"
        assert first_write(plain, restored) > before
        assert (plain.bundle(restored) / "rootfs/root/marker").read_text() == "written-before-checkpoint\n"
        assert read_counter(plain, restored) is not None

        if handler != "runc":
            return
        # checkpointctl reads the Go shim's CRI archive and pyshim's export of the same workload (a counter under
        # pyshim on the plain containerd) with the same fields
        checkpointctl = checkpointctl_path()
        if checkpointctl is None:
            pytest.skip("checkpointctl is not installed (packaging/fixtures/checkpointctl.sh installs it): the "
                        "restore was checked, checkpointctl's comparison of the two archives was not")
        export = tmp_path / "pyshim-export.tar"
        same = plain.new_id("counter")
        plain.run(same, test_image, "sh", "-c", COUNTER, runtime=PYSHIM)
        try:
            wait_until(lambda: (read_counter(plain, same) or 0) >= 3, 15, "the counter to reach 3")
            result = pyshim(plain, tmp_path / "store", "checkpoint", "create", same, "--leave-running", "--export",
                            str(export))
        finally:
            remove(plain, same)
        assert result.returncode == 0, result.stderr
        fields = {}
        for name, path in (("cri", archive), ("pyshim", export)):
            shown = subprocess.run([str(checkpointctl), "inspect", "--stats", "--ps-tree", "--files", "--format",
                                    "json", str(path)], capture_output=True, text=True, timeout=120)
            assert shown.returncode == 0, shown.stderr
            document = json.loads(shown.stdout)
            entry = document[0] if isinstance(document, list) else document
            fields[name] = (sorted(entry), sorted(entry.get("statistics") or {}), sorted(entry["checkpoint_size"]),
                            entry["process_tree"]["command"], entry["engine"])
        assert fields["pyshim"] == fields["cri"]
    finally:
        if sandbox_id:
            for call in (cri.stop_pod_sandbox, cri.remove_pod_sandbox):
                try:
                    call(sandbox_id)
                except Exception:  # noqa: BLE001 - cleanup
                    pass
        remove(plain, restored)


def _value(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
