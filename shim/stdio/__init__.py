"""Stdio of container processes: pipes and fifos, log files, logging binaries and consoles.

  uri         parses containerd's stdio strings into targets
  fds         owns file descriptors: runtime pipes, client fifo ends, log files
  pump        copies one fd into another on the event loop, with backpressure
  console     the --console-socket and the pty master's window size
  logger      binary:// logging processes
  process_io  ProcessIO, the facade the task service uses
"""

from shim.stdio.errors import StdioError
from shim.stdio.process_io import ProcessIO, StdioConfig, open_process_io

__all__ = ["ProcessIO", "StdioConfig", "StdioError", "open_process_io"]
