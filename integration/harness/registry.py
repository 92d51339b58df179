"""A read-only image registry on 127.0.0.1 serving the test images' own OCI layouts: for code that must pull.

containerd 2.1's CRI restore (CRImportCheckpoint) pulls the checkpoint's base image by the reference recorded at
checkpoint time even when that image is already in the local store (the pull is skipped for local images only from
containerd PR #12021, after 2.1). No registry is reachable from the test machines, so tests that restore through
CRI serve the image themselves: the OCI distribution API's read side (GET/HEAD of /v2/, manifests by tag or digest,
blobs by digest), plain HTTP on loopback (containerd's resolver uses HTTP for localhost and 127.0.0.1), from the
tarball harness.image built. Only this process talks to it; it stops with close().
"""

from __future__ import annotations

import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .image import MEDIA_MANIFEST, TestImage

PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")


class Registry:
    """Serves images under `<host>/<repository>`; use as a context manager."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, str]] = {}  # digest -> (data, media type)
        self.tags: dict[tuple[str, str], str] = {}  # (repository, tag) -> manifest digest
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                registry.requests.append(f"{self.command} {self.path}")
                if self.path.rstrip("/") == "/v2":
                    return self._send(200, b"{}", "application/json", body)
                match = PATH.match(self.path)
                if match is None:
                    return self._send(404, b"", "text/plain", body)
                reference = match["reference"]
                if match["kind"] == "manifests" and not reference.startswith("sha256:"):
                    reference = registry.tags.get((match["name"], reference), "")
                found = registry.blobs.get(reference)
                if found is None:
                    return self._send(404, b"", "text/plain", body)
                data, media_type = found
                self._send(200, data, media_type, body, reference)

            def _send(self, code: int, data: bytes, media_type: str, body: bool, digest: str = "") -> None:
                self.send_response(code)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(data)))
                if digest:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-registry", daemon=True)
        self.thread.start()

    def add(self, image: TestImage, repository: str, tag: str = "latest") -> str:
        """Serve image as <host>/<repository>:<tag>; returns that reference."""
        with tarfile.open(image.path) as tar:
            index = json.load(tar.extractfile("index.json"))
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("blobs/sha256/"):
                    digest = "sha256:" + member.name.rsplit("/", 1)[1]
                    self.blobs[digest] = (tar.extractfile(member).read(), "application/octet-stream")
        manifest = index["manifests"][0]["digest"]
        self.blobs[manifest] = (self.blobs[manifest][0], MEDIA_MANIFEST)
        self.tags[(repository, tag)] = manifest
        return f"{self.host}/{repository}:{tag}"

    def configure(self, registry_config_dir: Path) -> None:
        """Tell a containerd (its CRI registry config_path) to reach this registry over plain HTTP."""
        directory = registry_config_dir / self.host
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            f'server = "http://{self.host}"\n\n[host."http://{self.host}"]\n  capabilities = ["pull", "resolve"]\n')

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
