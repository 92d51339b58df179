"""The shim's server processes run asyncio without ssl (shim/server/notls.py): OpenSSL is never mapped into them."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import shim.server.daemon  # what a server imports first
import asyncio, os, socket
loaded = "ssl" in sys.modules or "_ssl" in sys.modules
libssl = any("libssl" in line for line in open("/proc/self/maps"))

async def echo_once():  # asyncio still serves a unix socket
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    b.sendall(b"ping\\n")
    line = await reader.readline()
    writer.close()
    b.close()
    return line

print(loaded, libssl, asyncio.run(echo_once()) == b"ping\\n")
import ssl  # what pyroute2 does later: ssl itself still works
print(ssl.OPENSSL_VERSION.startswith("OpenSSL"))
"""


def test_a_server_imports_asyncio_without_ssl_and_can_still_import_ssl_later():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True", "True"]
