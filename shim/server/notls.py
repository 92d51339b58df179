"""asyncio without its TLS support, for the shim's server processes.

pyshim never speaks TLS, but asyncio imports `ssl` when it is first imported, and `ssl` maps OpenSSL into the
process: 4.2 MiB of RSS measured in the fork server (27.7 -> 23.4 MiB after its imports), carried by every server
it forks. Importing this module before anything imports asyncio makes asyncio take the path it takes in a Python
built without ssl (each of its modules binds `ssl = None`); `ssl` itself stays importable afterwards (pyroute2
imports it), asyncio just does not use it.
"""

import sys

if "asyncio" not in sys.modules and "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError while this is set
    try:
        import asyncio  # noqa: F401
        import asyncio.sslproto  # noqa: F401  # not imported by asyncio/__init__: bind its `ssl` now too
    finally:
        del sys.modules["ssl"]
