"""Registering pyshim with containerd (packaging/containerd/register.sh) and what each mode gets from containerd.

containerd decides by the runtime NAME whether a checkpoint gets its full treatment (docs/registration.md): ctr and
nerdctl send CheckpointOptions, and the client skips writing a `containerd.io/checkpoint/...` image, only for
io.containerd.runc.v2; CRI sends CheckpointOptions (and so gets a top-level stats-dump in its archive) only to
io.containerd.runc.v2. The modes and what is shown here, on real containerd 1.6, 1.7 and 2.x:

- register/undo on a config that is missing, minimal, or an operator's own (a CRI section of its own, no final
  newline): the result loads (`containerd config dump`) with the handler and containerd's default runtime, the
  operator's settings intact; a second register changes no file; undo restores every file byte for byte and removes
  every file and directory it made; an operator's edit made after registration survives undo.
- The shipped snippets are what `register.sh print` writes, and each loads on its own: a containerd whose only CRI
  configuration is the snippet starts with its CRI plugin loaded.
- cri mode (the default): a containerd started with register.sh's output on a minimal config (CRI enabled, no
  runtime handlers) serves the `pyshim` handler: a pod and a container under it run under pyshim's binary, reported as
  runtime io.containerd.runc.v2 (1.6, which ignores runtime_path, gets name mode). On 2.x, CRI CheckpointContainer
  through it gives an archive with a top-level stats-dump on which `checkpointctl inspect --stats` and `show` work
  (under name mode's handler `inspect --stats` does not), and a CRI restore from it goes on from the checkpointed
  value.
- override mode (what the docs recommend for ctr): `ctr task checkpoint --image-path` twice within one second both
  succeed and leave no image in the content store; under the pyshim name, the same two leave an image and the second
  one fails "already exists". The override takes effect at containerd's restart, and its undo needs one.
- a Go client's per-task runtime_path on a runc v2 container gets the full treatment with no registration at all.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from conftest import track_containerd
from harness import processes
from harness.containerd import CRI_NAMESPACE, PYSHIM, RUNC_V2, Containerd
from harness.cri import STATE_NAMES, CriClient, container_config
from harness.environment import Environment, parse_env_text
from harness.grpc_client import ContainerdClient
from harness.image import TestImage, build_pause_image
from harness.registry import Registry
from harness.waiting import wait_until
from test_cri import (
    archive_members,
    checkpoint_counter,
    counter_path,
    read_counter,
    remove_pod,
    run_pod,
    runs_under,
    start_counter,
)

from shim.api.containerd.runc.options import oci_pb2

REPO = Path(__file__).resolve().parent.parent
SNIPPETS = REPO / "packaging" / "containerd"
REGISTER = SNIPPETS / "register.sh"
SHIM_NAME = "containerd-shim-pyshim-v2"
GO_SHIM_NAME = "containerd-shim-runc-v2"
FIXTURES_ENV = Path(os.environ.get("PYSHIM_FIXTURES_ENV_FILE") or "/opt/pyshim/fixtures.env")
# The shipped snippets: (mode, version given to `register.sh print`) -> (file, the versions it names).
SHIPPED = {("cri", "1.7"): ("cri-pyshim-v2.toml", ("1.7",)), ("cri", "2"): ("cri-pyshim-v3.toml", ("2",)),
           ("name", "1.7"): ("cri-pyshim-name-v2.toml", ("1.6", "1.7")),
           ("name", "2"): ("cri-pyshim-name-v3.toml", ("2",))}
COUNTER = "i=0; while :; do i=$((i+1)); printf '%08d\\n' $i 1<> /tmp/count; sleep 0.1; done"


# --- helpers -------------------------------------------------------------------------------------------------------

def cri_plugin(version: str) -> str:
    return "io.containerd.cri.v1.runtime" if version == "2" else "io.containerd.grpc.v1.cri"


def schema(version: str) -> int:
    return 3 if version == "2" else 2


def register(bin_dir: Path, config: Path, state: Path, *args: str, action: str = "register",
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """register.sh against config, its record under state, checked by that containerd binary."""
    argv = ["bash", str(REGISTER), action, "--config", str(config), "--state-dir", str(state),
            "--containerd", str(bin_dir / "containerd"), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def dump(bin_dir: Path, config: Path) -> dict:
    """The config as that containerd reads it, imports merged."""
    result = subprocess.run([str(bin_dir / "containerd"), "--config", str(config), "config", "dump"],
                            capture_output=True, text=True, timeout=30, check=True)
    return tomllib.loads(result.stdout)


def runtimes(dumped: dict, version: str) -> dict:
    section = dumped["plugins"][cri_plugin(version)]["containerd"]
    return {"default": section["default_runtime_name"], **section["runtimes"]}


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, bytes or link target, permission bits, mtime in ns)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            entries[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            entries[str(path)] = ("dir",)
        else:
            entries[str(path)] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_mtime_ns)
    return entries


def default_runtime_type(version: str) -> str:
    """What the default (cri) registration's handler reports: runc v2's type, but name mode's on 1.6."""
    return PYSHIM if version == "1.6" else RUNC_V2


def is_pyshim(pid: int) -> bool:
    """pyshim's binary is a Python script: the process is the interpreter (the Go shim is its own executable)."""
    return Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("python")


def pyshim_binary(containerd: Containerd) -> str:
    """The pyshim binary this harness's containerds run (first on their PATH), which registrations must name."""
    found = shutil.which(SHIM_NAME, path=containerd.env["PATH"])
    assert found, f"no {SHIM_NAME} on the test containerd's PATH {containerd.env['PATH']}"
    return found


def checkpointctl(environment: Environment) -> str | None:
    """checkpointctl from packaging/fixtures/checkpointctl.sh (recorded in the env file or fixtures.env)."""
    value = environment.values.get("PYSHIM_CHECKPOINTCTL")
    if value is None and FIXTURES_ENV.is_file():
        value = parse_env_text(FIXTURES_ENV.read_text()).get("PYSHIM_CHECKPOINTCTL")
    return value if value and os.access(value, os.X_OK) else None


OPERATOR_CONFIG = {
    # An operator's own CRI settings (which a 1.6/1.7 drop-in would wipe), and no final newline.
    "1.7": ('version = 2\n# the operator\'s comment\n[plugins."io.containerd.grpc.v1.cri"]\n'
            '  sandbox_image = "example.org/pause:7"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '  runtime_type = "io.containerd.runc.v2"\n'
            '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
            '    SystemdCgroup = true'),
    "2": ('version = 3\n# the operator\'s comment\n[plugins."io.containerd.cri.v1.images".pinned_images]\n'
          '  sandbox = "example.org/pause:7"\n'
          '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]\n'
          '  runtime_type = "io.containerd.runc.v2"\n'
          '  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]\n'
          '    SystemdCgroup = true'),
}
OPERATOR_CONFIG["1.6"] = OPERATOR_CONFIG["1.7"]


def write_config(kind: str, version: str, path: Path) -> None:
    if kind == "minimal":
        path.write_text(f"version = {schema(version)}\n")
    elif kind == "operator":
        path.write_text(OPERATOR_CONFIG[version])
        path.chmod(0o600)  # an unusual mode, which register must keep


# --- 1. register, re-register, undo --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "minimal", "operator"])
@pytest.mark.parametrize("mode", ["default", "name"])
def test_register_twice_then_undo_restores_every_byte(containerd_version: str, environment: Environment,
                                                      tmp_path: Path, kind: str, mode: str):
    version, bin_dir = containerd_version, environment.containerd_bin_dir(containerd_version)
    etc = tmp_path / "etc"
    config, state, pyshim_etc = etc / "containerd" / "config.toml", tmp_path / "var" / "pyshim", etc / "pyshim"
    shim = tmp_path / "bin" / SHIM_NAME
    shim.parent.mkdir()
    shim.symlink_to("/bin/true")
    config.parent.mkdir(parents=True)
    write_config(kind, version, config)
    before = tree(tmp_path)
    args = (*(("--mode", mode) if mode != "default" else ()), "--shim", str(shim), "--etc-dir", str(pyshim_etc))
    if mode == "default" and version == "1.6":
        mode = "name"  # 1.6 ignores runtime_path for CRI pods: its default is name mode

    first = register(bin_dir, config, state, *args)
    registered = tree(tmp_path)
    assert registered != before
    found = runtimes(dump(bin_dir, config), version)
    handler = found["pyshim"]
    assert (handler["runtime_type"], handler["runtime_path"]) == (
        RUNC_V2 if mode == "default" else PYSHIM, str(shim))
    assert found["default"] == "runc" and found["runc"]["runtime_type"] == RUNC_V2, found
    if mode == "name":
        # the runc options file the handler names exists
        options_file = Path(handler["options"]["ConfigPath"])
        assert options_file.parent == pyshim_etc and 'BinaryName = "runc"' in options_file.read_text()
    if kind == "operator":
        # the operator's own settings are all still there
        dumped = dump(bin_dir, config)
        assert found["runc"]["options"]["SystemdCgroup"] is True
        images = dumped["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] if version == "2" \
            else dumped["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"]
        assert images == "example.org/pause:7"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # 1.6/1.7 merge into config.toml (an import replaces its whole CRI section); 2.x uses a drop-in
    assert ("merged the handler" in first.stdout) == (version != "2"), first.stdout

    again = register(bin_dir, config, state, *args)
    assert "nothing changed" in again.stdout, again.stdout
    assert tree(tmp_path) == registered

    register(bin_dir, config, state, action="undo")
    assert tree(tmp_path) == before
    # and undo again: nothing to do, nothing changes
    assert "nothing registered" in register(bin_dir, config, state, action="undo").stdout
    assert tree(tmp_path) == before


def test_cri_mode_is_refused_on_containerd_1_6(environment: Environment, tmp_path: Path):
    """1.6.20 accepts runtime_path but its CRI pods run under the Go shim all the same (test_registered_handler_serves
    _pods shows 1.7 and 2.x using it): refused, with the modes that work there named, and nothing changed."""
    config = tmp_path / "config.toml"
    write_config("minimal", "1.6", config)
    before = tree(tmp_path)
    result = register(environment.containerd_bin_dir("1.6"), config, tmp_path / "state", "--mode", "cri", "--shim",
                      "/bin/true", check=False)
    assert result.returncode == 1 and "--mode name" in result.stderr and "--mode override" in result.stderr
    assert tree(tmp_path) == before


def test_override_mode_links_and_unlinks(environment: Environment, tmp_path: Path):
    bin_dir = environment.containerd_bin_dir("2")
    config, state, override = tmp_path / "config.toml", tmp_path / "state", tmp_path / "override"
    write_config("minimal", "2", config)
    shim = shutil.which(SHIM_NAME, path=str(environment.venv / "bin")) or "/bin/true"
    before = tree(tmp_path)
    search = f"{override}:{bin_dir}:/usr/bin"
    register(bin_dir, config, state, "--mode", "override", "--shim", shim, "--override-dir", str(override),
             "--search-path", search)
    assert os.readlink(override / GO_SHIM_NAME) == shim
    assert config.read_bytes() == before[str(config)][1]  # no config change at all
    register(bin_dir, config, state, action="undo")
    assert tree(tmp_path) == before
    # a directory behind the Go shim on containerd's PATH would never be used: refused, nothing made
    refused = register(bin_dir, config, state, "--mode", "override", "--shim", shim, "--override-dir",
                       str(override), "--search-path", f"{bin_dir}:{override}", check=False)
    assert refused.returncode == 1 and f"{bin_dir}/{GO_SHIM_NAME} comes before {override}" in refused.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_undo_keeps_an_operator_edit_made_after_registration(environment: Environment, tmp_path: Path,
                                                             version: str):
    bin_dir = environment.containerd_bin_dir(version)
    config, state = tmp_path / "config.toml", tmp_path / "state"
    write_config("operator", version, config)
    original = config.read_text()
    register(bin_dir, config, state, "--shim", "/bin/true")
    edit = "\n[debug]\n  level = \"info\"\n"
    config.write_text(config.read_text() + edit)

    undone = register(bin_dir, config, state, action="undo")
    assert "changed since registration" in undone.stdout, undone.stdout
    text = config.read_text()
    assert edit in text and "pyshim" not in text
    dumped = dump(bin_dir, config)
    assert dumped["debug"]["level"] == "info" and "pyshim" not in runtimes(dumped, version)
    assert text.replace(edit, "").rstrip() == original.rstrip()


def test_a_state_dir_that_is_not_ours_is_refused(environment: Environment, tmp_path: Path):
    """undo removes what register recorded and nothing else; a state dir with other files is never taken over."""
    config, state = tmp_path / "config.toml", tmp_path / "state"
    write_config("minimal", "2", config)
    state.mkdir()
    (state / "someone-elses").write_text("keep me")
    before = tree(tmp_path)
    result = register(environment.containerd_bin_dir("2"), config, state, "--shim", "/bin/true", check=False)
    assert result.returncode == 1 and "not this script's" in result.stderr
    assert tree(tmp_path) == before


def test_a_result_that_does_not_load_is_put_back(environment: Environment, tmp_path: Path):
    """The runtimes written as an inline table, which TOML forbids extending: the merged config does not load, so
    register puts everything back and says why. A handler of the same name already there: refused up front."""
    bin_dir = environment.containerd_bin_dir("1.7")
    config, state = tmp_path / "config.toml", tmp_path / "state"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                      '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n')
    before = tree(tmp_path)
    result = register(bin_dir, config, state, "--shim", "/bin/true", check=False)
    assert result.returncode == 1 and "could not load the registered config" in result.stderr, result.stderr
    assert "nothing was changed" in result.stderr
    assert tree(tmp_path) == before

    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyshim]\n'
                      '  runtime_type = "io.containerd.runc.v2"\n')
    before = tree(tmp_path)
    result = register(bin_dir, config, state, "--shim", "/bin/true", check=False)
    assert result.returncode == 1 and "already defines a CRI runtime 'pyshim'" in result.stderr
    assert tree(tmp_path) == before


# --- 2. the shipped snippets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode_line", sorted(SHIPPED), ids=lambda key: SHIPPED[key][0])
def test_shipped_snippet_is_register_output_and_loads_on_its_own(mode_line, environment: Environment,
                                                                 containerd_log_dir: Path,
                                                                 request: pytest.FixtureRequest):
    mode, line = mode_line
    name, versions = SHIPPED[mode_line]
    snippet = SNIPPETS / name
    printed = subprocess.run(["bash", str(REGISTER), "print", "--mode", mode, "--containerd-version", line],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    assert snippet.read_text() == printed, f"{snippet} differs from `register.sh print --mode {mode}`"

    for version in versions:
        instance = Containerd(version, environment, log_dir=containerd_log_dir)
        track_containerd(request, instance)

        def only_the_snippet(config: Path) -> None:
            # The harness's config with CRI no longer disabled and configured by nothing but the snippet.
            text = config.read_text()
            for plugin in ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images",
                           "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox"):
                text = text.replace(f'"{plugin}", ', "").replace(f', "{plugin}"', "")
            head, _, rest = text.partition("\n")
            config.write_text(f"{head}\nimports = [\"{snippet}\"]\n{rest}")

        try:
            instance.start(configure=only_the_snippet)
            plugins = instance.ctr("plugins", "ls", timeout=10).stdout
            cri_rows = [row.split() for row in plugins.splitlines()
                        if row.split()[:2] in (["io.containerd.grpc.v1", "cri"], ["io.containerd.cri.v1", "runtime"])]
            assert cri_rows and all(row[-1] == "ok" for row in cri_rows), plugins
        finally:
            instance.stop()


# --- 3. CRI through the registered handler -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pause_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    return build_pause_image(tmp_path_factory.mktemp("pause-image"), busybox=environment.busybox)


@pytest.fixture
def registered_cri(request: pytest.FixtureRequest, containerd_version: str, environment: Environment,
                   test_image: TestImage, pause_image: TestImage, containerd_log_dir: Path):
    """A CRI containerd on a minimal config (no runtime handlers) to which register.sh added, in cri mode, handler
    `pyshim`, and in name mode, handler `pyshim-name`: each runs the pyshim binary the harness provides."""
    instance = Containerd(containerd_version, environment, log_dir=containerd_log_dir,
                          cri_sandbox_image=pause_image.ref, cri_runtime_handlers=False)
    track_containerd(request, instance)

    def registration(config: Path) -> None:
        shim = pyshim_binary(instance)
        common = ("--shim", shim, "--runc-root", str(instance.runc_root), "--etc-dir", str(instance.tmp / "etc"))
        register(instance.bin_dir, config, instance.tmp / "state-cri", *common)
        register(instance.bin_dir, config, instance.tmp / "state-name", *common, "--mode", "name",
                 "--handler", "pyshim-name")

    try:
        instance.start(configure=registration)
        for image in (test_image, pause_image):
            instance.import_image(image, namespace=CRI_NAMESPACE)
        with CriClient(instance.address) as cri:
            for image in (test_image, pause_image):
                cri.wait_image(image.ref)
            yield instance, cri
    finally:
        for note in instance.stop():
            print(f"containerd {containerd_version} (registered CRI) teardown: {note}")


def test_registered_handler_serves_pods(registered_cri, test_image: TestImage):
    containerd, cri = registered_cri
    sandbox_id, config = run_pod(cri, containerd, "reg", "pyshim")
    try:
        shim = runs_under(containerd, sandbox_id, "pyshim")  # the shim's command line is pyshim's binary
        status, info = cri.pod_sandbox_status(sandbox_id)
        container_id = start_counter(cri, containerd, test_image.ref, sandbox_id, config)
        _, container = cri.container_status(container_id)
        runtime_type = default_runtime_type(containerd.version)
        assert (status.runtime_handler, info.get("runtimeType"), container.get("runtimeType")) == \
            ("pyshim", runtime_type, runtime_type)
        assert is_pyshim(shim)
        assert processes.parent_pid(container["pid"]) == shim
        assert cri.state(container_id) == "RUNNING"
    finally:
        remove_pod(cri, sandbox_id)


def test_cri_checkpoint_archive_is_read_by_checkpointctl(registered_cri, test_image: TestImage,
                                                         environment: Environment):
    containerd, cri = registered_cri
    if containerd.version != "2":
        pytest.skip(f"containerd {containerd.version} answers CRI CheckpointContainer with Unimplemented for every "
                    "runtime (test_cri.py shows it); CRI checkpoints exist from 2.0")
    tool = checkpointctl(environment)
    if tool is None:
        pytest.skip(f"no checkpointctl: run packaging/fixtures/checkpointctl.sh (it records it in {FIXTURES_ENV})")

    def scenario(handler: str) -> dict:
        sandbox_id, config = run_pod(cri, containerd, "regckpt", handler)
        try:
            container_id = start_counter(cri, containerd, test_image.ref, sandbox_id, config)
            archive = containerd.tmp / f"{handler}-{uuid.uuid4().hex[:8]}.tar"
            cri.checkpoint_container(container_id, str(archive))
            members = archive_members(archive)
            inspect = subprocess.run([tool, "inspect", "--stats", str(archive)], capture_output=True, text=True,
                                     timeout=60)
            show = subprocess.run([tool, "show", str(archive)], capture_output=True, text=True, timeout=60)
            print(f"{handler}: checkpointctl inspect --stats -> {inspect.returncode}\n{inspect.stdout}"
                  f"{inspect.stderr}\ncheckpointctl show -> {show.returncode}\n{show.stdout}{show.stderr}")
            return {
                "top-level stats-dump": "stats-dump" in members,
                "inspect --stats": inspect.returncode == 0 and "CRIU dump statistics" in inspect.stdout,
                "freezing time shown": "Freezing time" in inspect.stdout,
                "show": show.returncode == 0 and container_id[:12] in show.stdout,
                "still running": cri.state(container_id) == "RUNNING",
            }
        finally:
            remove_pod(cri, sandbox_id)

    outcomes = {handler: scenario(handler) for handler in ("pyshim", "pyshim-name")}
    assert outcomes["pyshim"] == {"top-level stats-dump": True, "inspect --stats": True, "freezing time shown": True,
                                  "show": True, "still running": True}
    # Under pyshim's own runtime name CRI sends no CheckpointOptions: no top-level stats-dump, no statistics.
    assert outcomes["pyshim-name"]["top-level stats-dump"] is False
    assert outcomes["pyshim-name"]["inspect --stats"] is False


def test_cri_restore_through_registered_handler(registered_cri, test_image: TestImage):
    """containerd 2.1's CRI restore (CreateContainer from a CheckpointContainer archive) under the cri-mode handler:
    the restored counter goes on from its checkpointed value (test_cri.py says why the base image is served from a
    registry on 127.0.0.1)."""
    containerd, cri = registered_cri
    if containerd.version != "2":
        pytest.skip(f"containerd {containerd.version} has no CRI checkpoint or restore (from 2.0 and 2.1)")
    with Registry() as registry:
        registry.configure(containerd.registry_config_dir)
        image = registry.add(test_image, "pyshim-test/busybox")
        cri.pull_image(image)
        archive = containerd.tmp / "restore.tar"
        checkpointed, (low, high) = checkpoint_counter(cri, containerd, image, "pyshim", archive)
        assert checkpointed["error"] is None and "stats-dump" in checkpointed["archive holds"], checkpointed
        sandbox_id, config = run_pod(cri, containerd, "regrestore", "pyshim")
        try:
            shim = runs_under(containerd, sandbox_id, "pyshim")
            container_id = cri.create_container(sandbox_id, container_config("counter", str(archive)), config)
            cri.start_container(container_id)
            status, info = cri.container_status(container_id)
            path, seen = counter_path(containerd, container_id), []

            def advanced() -> bool:
                if (value := read_counter(path)) is not None:
                    seen.append(value)
                return len(seen) > 1 and seen[-1] >= seen[0] + 3
            wait_until(advanced, what="the restored counter to advance")
            outcome = (STATE_NAMES[status.state], status.annotations.get("restored"), info.get("runtimeType"),
                       is_pyshim(shim) and processes.parent_pid(info["pid"]) == shim,
                       low <= seen[0] <= high + 3 and min(seen) >= low)
        finally:
            remove_pod(cri, sandbox_id)
    assert outcome == ("RUNNING", "true", RUNC_V2, True, True), (outcome, seen, low, high)


# --- 4. ctr in override mode ------------------------------------------------------------------------------------------

def checkpoint_twice_in_one_second(containerd: Containerd, container_id: str, base: Path) -> dict:
    """`ctr task checkpoint --image-path` twice, both inside one wall-clock second (containerd's checkpoint image
    names carry the time to the second); retried (bounded) if the two straddle a second boundary."""
    base.mkdir()
    for attempt in range(5):
        now = time.time()
        time.sleep(1 - (now - int(now)) + 0.01)  # start just after a second begins
        started = time.time()
        results = [containerd.ctr("task", "checkpoint", "--image-path", str(base / f"{attempt}-{n}"), container_id,
                                  check=False, timeout=60) for n in (1, 2)]
        if int(time.time()) == int(started):
            break
    else:
        pytest.fail("two checkpoints never fitted in one second")
    return {
        "exit codes": [r.returncode for r in results],
        "errors": [r.stderr.strip() for r in results if r.returncode],
        "images written": [(base / f"{attempt}-{n}" / "inventory.img").is_file() for n in (1, 2)],
        "checkpoint images": [ref for ref in containerd.ctr("images", "ls", "-q", timeout=10).stdout.split()
                              if ref.startswith("containerd.io/checkpoint/")],
    }


def test_ctr_checkpoints_in_override_mode(containerd_version: str, environment: Environment,
                                          test_image: TestImage, containerd_log_dir: Path,
                                          request: pytest.FixtureRequest):
    instance = Containerd(containerd_version, environment, log_dir=containerd_log_dir)
    track_containerd(request, instance)
    override = instance.tmp / "override"
    # containerd looks for containerd-shim-runc-v2 on its PATH: the override directory first.
    instance.env["PATH"] = f"{override}:{instance.env['PATH']}"
    shim = pyshim_binary(instance)

    def registration(config: Path) -> None:
        register(instance.bin_dir, config, instance.tmp / "registration", "--mode", "override", "--shim", shim,
                 "--override-dir", str(override), "--search-path", instance.env["PATH"])

    try:
        instance.start(configure=registration)
        instance.import_image(test_image)
        outcomes = {}
        for runtime in (RUNC_V2, PYSHIM):
            container_id = instance.new_id("reg")
            instance.run(container_id, test_image, "sh", "-c", COUNTER, runtime=runtime)
            shim_pid = wait_until(lambda cid=container_id: instance.shim_pid(cid), what=f"the shim of {container_id}")
            before = checkpoint_twice_in_one_second(instance, container_id, instance.tmp / f"images-{runtime}")
            outcomes[runtime] = {
                "pyshim serves it": is_pyshim(shim_pid),
                **before,
            }
            instance.ctr("task", "rm", "-f", container_id, timeout=30)
            instance.ctr("containers", "rm", container_id, timeout=30)
            for ref in before["checkpoint images"]:
                instance.ctr("images", "rm", ref, check=False, timeout=30)
        print(outcomes)
    finally:
        for note in instance.stop():
            print(f"containerd {containerd_version} (override) teardown: {note}")

    assert outcomes[RUNC_V2] == {"pyshim serves it": True, "exit codes": [0, 0], "errors": [],
                                 "images written": [True, True], "checkpoint images": []}
    # Under pyshim's own name the client makes an image `containerd.io/checkpoint/<id>:<time to the second>` each
    # time, so the second checkpoint of that second fails after its dump. 1.6/1.7's ctr does not even send the
    # image path (nothing lands in it: the images go to the content store); 2.x's does.
    named = outcomes[PYSHIM]
    image_path_sent = containerd_version == "2"
    assert {key: named[key] for key in ("pyshim serves it", "exit codes", "images written")} == {
        "pyshim serves it": True, "exit codes": [0, 1], "images written": [image_path_sent, image_path_sent]}
    assert len(named["checkpoint images"]) == 1 and "already exists" in named["errors"][0], named


@pytest.mark.parametrize("version", ["1.7", "2"])
def test_override_takes_effect_at_restart_and_its_undo_needs_one(version: str, environment: Environment,
                                                                 test_image: TestImage, containerd_log_dir: Path,
                                                                 request: pytest.FixtureRequest):
    """containerd caches where it found each shim binary (per binary name, for its lifetime): an override made
    while it runs moves nothing until it restarts, and once undone, new runc v2 containers fail until it restarts."""
    instance = Containerd(version, environment, log_dir=containerd_log_dir)
    track_containerd(request, instance)
    override = instance.tmp / "override"
    instance.env["PATH"] = f"{override}:{instance.env['PATH']}"
    args = ("--mode", "override", "--shim", pyshim_binary(instance), "--override-dir", str(override),
            "--search-path", instance.env["PATH"])

    def pyshim_runs_a_new_container() -> bool | str:
        container_id = instance.new_id("ovr")
        result = instance.run(container_id, test_image, "sleep", "600", runtime=RUNC_V2, check=False)
        if result.returncode:
            return result.stderr.strip().splitlines()[-1]
        return is_pyshim(wait_until(lambda: instance.shim_pid(container_id), what=f"the shim of {container_id}"))

    try:
        instance.start()
        instance.import_image(test_image)
        seen = {"before": pyshim_runs_a_new_container()}
        register(instance.bin_dir, instance.config_path, instance.tmp / "registration", *args)
        seen["registered"] = pyshim_runs_a_new_container()
        instance.restart()
        seen["registered, restarted"] = pyshim_runs_a_new_container()
        undone = register(instance.bin_dir, instance.config_path, instance.tmp / "registration", action="undo")
        seen["undone"] = pyshim_runs_a_new_container()
        instance.restart()
        seen["undone, restarted"] = pyshim_runs_a_new_container()
    finally:
        instance.stop()
    assert "WARNING" in undone.stdout
    assert {key: value for key, value in seen.items() if key != "undone"} == {
        "before": False, "registered": False, "registered, restarted": True, "undone, restarted": False}
    assert f"{override}/{GO_SHIM_NAME}: no such file or directory" in seen["undone"]


# --- 5. a Go client: runc v2's name, pyshim's binary per task ---------------------------------------------------------

def test_go_client_runtime_path_gets_the_full_treatment_without_registration(containerd: Containerd,
                                                                            test_image: TestImage):
    """What a Go client can do with no registration at all (containerd.WithRuntimePath, as CRI does with
    runtime_path): the container is named io.containerd.runc.v2 and its task is created with runtime_path = pyshim.
    Only that task runs under pyshim, and ctr's checkpoints of it get runc v2's full treatment."""
    container_id = containerd.new_id("gocl")
    # "--": ctr 1.6 would read the command's -c as its own --config
    containerd.ctr("containers", "create", "--runtime", RUNC_V2, "--", test_image.ref, container_id,
                   "sh", "-c", COUNTER)
    with ContainerdClient(containerd.address, containerd.namespace) as api:
        api.create_task(container_id, options=oci_pb2.Options(root=str(containerd.runc_root)),
                        runtime_path=pyshim_binary(containerd))
        api.start_task(container_id)
    shim_pid = wait_until(lambda: containerd.shim_pid(container_id), what=f"the shim of {container_id}")
    outcome = checkpoint_twice_in_one_second(containerd, container_id, containerd.tmp / "images")
    assert is_pyshim(shim_pid)
    assert outcome == {"exit codes": [0, 0], "errors": [], "images written": [True, True], "checkpoint images": []}
