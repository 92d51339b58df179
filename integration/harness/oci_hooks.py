"""An OCI createRuntime hook that networks a container as a CNI plugin would: a veth from a test host (a network
namespace the test made) into the container's own network namespace, an address on each end.

runc runs createRuntime (and prestart) hooks at `runc create` with the new container's pid, and at a restore at
CRIU's setup-namespaces notification with the pid of the restored tree's root: the namespace is new and empty
there (runc always dumps with an empty network namespace), and the same hook networks it again before any socket
is restored. The hook appends one line per run to a log: the pid, the OCI status runc gave and the links the
namespace held before the hook added its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOOK = r"""#!/bin/sh
# pyshim integration test OCI hook: a veth from a test host into the container's network namespace.
# usage: LOG HOST_NETNS HOST_IF CONTAINER_IF CONTAINER_CIDR HOST_CIDR, the OCI state JSON on stdin.
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
log=$1 host=$2 near=$3 far=$4 cidr=$5 host_cidr=$6
state=$(cat)
pid=$(printf '%s\n' "$state" | sed -n 's/.*[{,]"pid":\([0-9][0-9]*\).*/\1/p')
status=$(printf '%s\n' "$state" | sed -n 's/.*[{,]"status":"\([a-z]*\)".*/\1/p')
[ -n "$pid" ] || { echo "no pid in the OCI state: $state" >&2; exit 1; }
# The end left in the host namespace by an earlier run whose container namespace is not gone yet.
# What the namespace holds before the hook adds anything (a new one: lo only).
before=$(nsenter -t "$pid" -n ip -o link show | sed -n 's/^[0-9]*: \([^:@]*\)[:@].*/\1/p' | tr '\n' ',')
ip -n "$host" link del "$near" 2>/dev/null || true
ip -n "$host" link add "$near" type veth peer name "$far" netns "$pid"
ip -n "$host" addr add "$host_cidr" dev "$near"
ip -n "$host" link set "$near" up
nsenter -t "$pid" -n ip addr add "$cidr" dev "$far"
nsenter -t "$pid" -n ip link set "$far" up
echo "pid=$pid status=$status before=${before%,}" >> "$log"
"""


@dataclass(frozen=True)
class HookRun:
    pid: int
    status: str
    before: tuple[str, ...]  # the namespace's links when the hook ran


@dataclass(frozen=True)
class NetworkHook:
    path: Path
    log: Path
    host_netns: str  # a name in /var/run/netns
    host_ifname: str
    container_ifname: str
    container_cidr: str
    host_cidr: str
    timeout: int = 10

    @property
    def container_address(self) -> str:
        return self.container_cidr.split("/")[0]

    def spec_hooks(self) -> dict:
        """The OCI config's `hooks`: this hook at createRuntime."""
        return {"createRuntime": [{
            "path": str(self.path),
            "args": [self.path.name, str(self.log), self.host_netns, self.host_ifname, self.container_ifname,
                     self.container_cidr, self.host_cidr],
            "timeout": self.timeout,
        }]}

    def runs(self) -> list[HookRun]:
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text().splitlines():
            fields = dict(field.split("=", 1) for field in line.split())
            found.append(HookRun(int(fields["pid"]), fields["status"], tuple(fields["before"].split(","))))
        return found


def write_hook(directory: Path) -> Path:
    path = directory / "network-hook.sh"
    path.write_text(HOOK)
    os.chmod(path, 0o755)
    return path
