"""Fixtures for the integration suite: the installed environment, the test image, and started containerds.

The suite is skipped as a whole (with the reason in the header and the skip report) when not run as root or when
packaging/install-test.sh has not written /opt/pyshim/env. Every containerd a test starts is stopped in the fixture's
teardown; a session-wide fixture stops any left running after that (and harness.containerd registers the same
safety net with atexit). A failing test's report gets the tail of each of its containerds' debug logs. At the end of
the session, after every containerd is stopped, no network namespace, veth, iptables or nftables rule the tests made
may be left (harness.leftovers); what is left is printed and fails the session.

A test marked `cgroup_v2` runs once more, on containerd 2.x only, with its containerd in the cgroup v2 view of the
host (harness.cgroup2_view; test id `containerd-2-cgroup-v2`, the others `-host-cgroups`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import cgroup2_view, leftovers
from harness.containerd import GO_SHIM_SOCKET_DIR, Containerd, remove_go_shim_socket_dir, stop_all
from harness.environment import CONTAINERD_VERSIONS, Environment, load_environment, unavailable_reason
from harness.image import TestImage, build_test_image

HERE = Path(__file__).parent
_containerds_of_item = pytest.StashKey[list[Containerd]]()
# Read when pytest imports this conftest, before any test of the suite could have started a shim.
_RUN_DIR_EXISTED = GO_SHIM_SOCKET_DIR.parent.exists()
# The cgroup views a `cgroup_v2` test runs in; the v2 one on this containerd version only (CI time).
HOST_CGROUPS, CGROUP_V2 = "host-cgroups", "cgroup-v2"
CGROUP_V2_CONTAINERD = "2"
# The containerd versions of a two-host test not parametrized on them: "2", or SOURCE-to-DESTINATION ("1.7-to-2").
TWO_HOSTS_DEFAULT = "PYSHIM_TWO_HOSTS_CONTAINERD"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cgroup_v2: run the test on containerd 2.x in the cgroup v2 view of the host "
                                       "too (harness/cgroup2_view.py)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cgroup_view" in metafunc.fixturenames and metafunc.definition.get_closest_marker("cgroup_v2"):
        metafunc.parametrize("cgroup_view", [HOST_CGROUPS, CGROUP_V2], indirect=True)


def pytest_report_header(config: pytest.Config) -> str:
    reason = unavailable_reason()
    return f"integration: skipped: {reason}" if reason else "integration: enabled (root, /opt/pyshim/env present)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _deselect_cgroup_v2_on_other_versions(config, items)
    reason = unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)


def _deselect_cgroup_v2_on_other_versions(config: pytest.Config, items: list[pytest.Item]) -> None:
    def other_version_in_v2(item: pytest.Item) -> bool:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        return params.get("cgroup_view") == CGROUP_V2 and params.get("containerd_version") != CGROUP_V2_CONTAINERD

    deselected = [item for item in items if other_version_in_v2(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not other_version_in_v2(item)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for instance in item.stash.get(_containerds_of_item, []):
            report.sections.append(
                (f"containerd {instance.version} log tail ({instance.log_path})", instance.log_tail())
            )


def track_containerd(request: pytest.FixtureRequest, instance: Containerd) -> None:
    """Attach instance's log tail to the test's report if it fails (for fixtures that make their own containerd)."""
    request.node.stash.setdefault(_containerds_of_item, []).append(instance)


def two_host_versions(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(source, destination) containerd versions of a two-host fixture: its parameter ("1.7", or "1.7-to-2" for a
    host upgraded before the other), else $PYSHIM_TWO_HOSTS_CONTAINERD, else 2.x on both."""
    spec = getattr(request, "param", None) or os.environ.get(TWO_HOSTS_DEFAULT) or "2"
    source, _, destination = spec.partition("-to-")
    versions = (source, destination or source)
    unknown = [version for version in versions if version not in CONTAINERD_VERSIONS]
    if unknown:
        raise pytest.UsageError(f"two hosts {spec!r}: no containerd {unknown[0]!r} (one of {CONTAINERD_VERSIONS}, "
                                "or SOURCE-to-DESTINATION)")
    return versions


@contextlib.contextmanager
def two_containerds(request: pytest.FixtureRequest, environment: Environment, test_image: TestImage,
                    log_dir: Path) -> Iterator[list[Containerd]]:
    """A source and a destination containerd of two_host_versions(request), started, the test image imported into
    both; stopped afterwards."""
    instances: list[Containerd] = []
    try:
        for version in two_host_versions(request):
            instance = Containerd(version, environment, log_dir=log_dir)
            track_containerd(request, instance)
            instances.append(instance)
            instance.start()
            instance.import_image(test_image)
        yield instances
    finally:
        notes = [note for instance in instances for note in instance.stop()]
        if notes:
            print("teardown notes:", notes)  # shown with a failing test's output


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_on_the_network():
    """No network namespace, veth, iptables or nftables rule the tests made is left at the end of the session
    (harness.leftovers: a snapshot at the start, names noted as tests make them). Torn down after every containerd
    is stopped; what is left is printed and fails the session (an error at the last test's teardown)."""
    if unavailable_reason() is not None:
        yield
        return
    patch = pytest.MonkeyPatch()
    leftovers.watch(patch)
    start = leftovers.snapshot()
    try:
        yield
    finally:
        patch.undo()
    failures, notes = leftovers.left_behind(start, leftovers.snapshot())
    for note in notes:
        print(f"\nintegration: network note: {note}")
    if failures:
        listing = "\n".join(f"  {failure}" for failure in failures)
        print(f"\nintegration: left behind on the network by this session:\n{listing}")
        pytest.fail(f"the integration tests left {len(failures)} thing(s) behind on the network:\n{listing}",
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _stop_every_containerd(_nothing_left_on_the_network):
    yield
    for note in stop_all():
        print(f"\nintegration: stopped at session end: {note}")
    if not _RUN_DIR_EXISTED:
        # The Go shim creates /run/containerd/s for its sockets; leave the host as the session found it.
        remove_go_shim_socket_dir()


@pytest.fixture(scope="session")
def environment() -> Environment:
    return load_environment()


@pytest.fixture(scope="session")
def test_image(environment: Environment, tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    """The busybox test image tarball, built once per session."""
    return build_test_image(tmp_path_factory.mktemp("image-cache"), busybox=environment.busybox)


@pytest.fixture(scope="session")
def containerd_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where containerd debug logs are kept after their temp dirs are removed."""
    return tmp_path_factory.mktemp("containerd-logs")


@pytest.fixture(params=CONTAINERD_VERSIONS, ids=lambda v: f"containerd-{v}")
def containerd_version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cgroup_view(request: pytest.FixtureRequest) -> str:
    """The cgroups the test's containerd sees: the host's own, or (`cgroup_v2` tests) the cgroup v2 view."""
    return getattr(request, "param", HOST_CGROUPS)


@pytest.fixture
def containerd(request: pytest.FixtureRequest, containerd_version: str, cgroup_view: str, environment: Environment,
               test_image: TestImage, containerd_log_dir: Path):
    """A started private containerd of containerd_version with the test image imported, in the cgroup view asked
    for; stopped afterwards."""
    if cgroup_view == CGROUP_V2 and (reason := cgroup2_view.unavailable_reason()):
        pytest.skip(f"cgroup v2 view: {reason}")
    instance = Containerd(containerd_version, environment, log_dir=containerd_log_dir,
                          cgroup2=cgroup_view == CGROUP_V2)
    track_containerd(request, instance)
    with instance.serving(test_image):  # what the test itself did not clean up is printed with its output
        yield instance
