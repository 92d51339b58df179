"""Checkpoint archives: the layout containerd 2.x's CRI and Podman write, as one tar (plain, gzip or zstd).

    checkpoint/        CRIU's images (and pyshim's record, pyshim-checkpoint.json)
    config.dump        the container: id, name, image, runtime, created (checkpointctl reads it)
    spec.dump          the container's OCI spec
    status.dump        the task's state when it was checkpointed
    rootfs-diff.tar    the container's changes to its image's filesystem (OCI whiteouts for deletions)
    stats-dump         CRIU's dump statistics
    dump.log           CRIU's dump log
    network.status     where known (Podman)

An archive is written to a hidden name beside its target and renamed into place only when complete, so a half-written
archive is never found where a checkpoint is expected. Reading one extracts it into a private directory and checks
it holds a checkpoint before anything uses it.
"""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import BinaryIO, cast

from shim.tool import tarsafe
from shim.tool.errors import ToolError, from_os

CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
STATUS_DUMP = "status.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
STATS_DUMP = "stats-dump"
DUMP_LOG = "dump.log"
NETWORK_STATUS = "network.status"
PYSHIM_RECORD = "pyshim-checkpoint.json"
SUFFIXES = {".tar": None, ".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd"}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_for(path: str) -> str | None:
    """The compression an archive name asks for; ToolError for a name that says none of ours."""
    for suffix, compression in SUFFIXES.items():
        if path.endswith(suffix):
            return compression
    raise ToolError(f"{path}: the archive name must end in .tar, .tar.gz or .tar.zst (it says which compression)")


def hidden_sibling(target: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.pyshim-{kind}-{secrets.token_hex(4)}")


class Progress:
    """Bytes written, on one rewritten line of a terminal; silent when stderr is not one."""

    def __init__(self, label: str, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.count = 0
        self._shown = 0.0

    def add(self, n: int) -> None:
        self.count += n
        if self.enabled and time.monotonic() - self._shown > 0.2:
            self._shown = time.monotonic()
            self.stream.write(f"\r{self.label}: {human_size(self.count)}   ")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write(f"\r{self.label}: {human_size(self.count)} done\n")
            self.stream.flush()


class _Counting:
    """A write-only file object that counts what passes through (tarfile's stream mode writes to it)."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self.raw = raw
        self.progress = progress

    def write(self, data) -> int:
        n = self.raw.write(data)
        self.progress.add(len(data))
        return n if n is not None else len(data)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()


def say(text: str) -> None:
    """A step of long work, on a terminal only (stdout stays for results)."""
    if sys.stderr.isatty():
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _entries(directory: str) -> list[str]:
    """What goes into the archive, in a stable order: the top-level files, then checkpoint/ (as Podman)."""
    top = sorted(os.listdir(directory))
    return [name for name in top if name != CHECKPOINT_DIR] + ([CHECKPOINT_DIR] if CHECKPOINT_DIR in top else [])


def write(directory: str, target: str, *, progress: Progress | None = None) -> int:
    """The checkpoint directory as one archive at target (compression from its name); its size in bytes."""
    compression = compression_for(target)
    partial = hidden_sibling(target, "partial")
    progress = progress or Progress(f"writing {target}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as raw:
            # _Counting has what tarfile's stream mode and the compressors use of a binary file: write, flush.
            counted = cast(BinaryIO, _Counting(raw, progress))
            stream: BinaryIO
            if compression == "gzip":
                stream = cast(BinaryIO, gzip.GzipFile(fileobj=counted, mode="wb", compresslevel=6, mtime=0))
            elif compression == "zstd":
                stream = _zstd().ZstdCompressor(level=3).stream_writer(counted, closefd=False)
            else:
                stream = counted
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name in _entries(directory):
                    tar.add(os.path.join(directory, name), arcname=name, filter=_owned_by_root)
            if stream is not counted:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(partial, target)
    except OSError as exc:
        _remove(partial)
        raise from_os(exc, f"writing the archive {target}") from None
    except BaseException:
        _remove(partial)
        raise
    progress.done()
    return os.path.getsize(target)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = info.gname = ""
    return info


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ToolError("zstd archives need the Python package zstandard: pip install 'pyshim[tool]' "
                        "(or use .tar or .tar.gz)") from None
    return zstandard


def _open_stream(path: str) -> BinaryIO:
    raw = open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(GZIP_MAGIC):
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))  # a binary file, as tarfile reads one
    if magic == ZSTD_MAGIC:
        return _zstd().ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def names(path: str) -> list[str]:
    """The entry names of an archive, in order (any of our compressions)."""
    with _open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        return [member.name for member in tar]


def extract(path: str, destination: str) -> None:
    """Unpack an archive (any of our compressions, told by its first bytes) into destination, which must be a
    new private directory. Entries that would land outside it, devices and links out are refused
    (tarfile's "data" filter)."""
    try:
        with _open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise ToolError(f"{path}: entry {member.name!r} points outside the archive; refusing it "
                                    "(a checkpoint archive holds relative names only)")
                tarsafe.extract(tar, member, destination, data=True)
    except ToolError:
        raise
    except tarsafe.REFUSED as exc:
        raise ToolError(f"{path} holds an entry a checkpoint archive cannot ({exc}); refusing it") from None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)) and exc.filename == path:
            raise from_os(exc, f"reading {path}") from None
        if exc.errno is not None and exc.filename is not None:
            raise from_os(exc, f"unpacking {path}") from None
        raise ToolError(f"{path} is corrupt or truncated ({exc}); copy or export it again") from None
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise ToolError(f"{path} is corrupt, truncated or not a tar archive ({exc}); copy or export it again") from None
    except Exception as exc:  # zstandard's ZstdError is no OSError
        if type(exc).__name__ == "ZstdError":
            raise ToolError(f"{path} is corrupt or truncated (zstd: {exc}); copy or export it again") from None
        raise


def check_layout(directory: str, source: str) -> None:
    """A checkpoint (pyshim's, containerd CRI's or Podman's) has CRIU's images under checkpoint/ and the
    container's spec: else it is someone else's archive."""
    if not os.path.isfile(os.path.join(directory, CHECKPOINT_DIR, "inventory.img")):
        raise ToolError(f"{source} is not a container checkpoint: it has no {CHECKPOINT_DIR}/inventory.img (an "
                        "archive from pyshim, containerd's CRI or Podman holds CRIU's images under checkpoint/)")
    if not os.path.isfile(os.path.join(directory, SPEC_DUMP)):
        raise ToolError(f"{source} has CRIU images but no {SPEC_DUMP} (the container's OCI spec): it cannot be "
                        "restored as a container; a bare CRIU image directory restores with `ctr` and CriuImagePath")


def private_dir_beside(target: str, kind: str) -> str:
    path = hidden_sibling(target, kind)
    os.mkdir(path, 0o700)
    return path


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
