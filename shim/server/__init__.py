"""The long-lived shim server process: its composition root (daemon), log lines to containerd, the event
publisher, and asyncio without ssl."""
