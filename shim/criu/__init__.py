"""CRIU, driven over its RPC protocol (`criu swrk`), for checkpoint and restore.

Modules:
- rpc: CriuRpc / run_criu: one request to a `criu swrk` child, its notifications answered
  through an async handler, a deadline, fds passed both ways; version(), feature_check(),
  check().
- errors: CriuError, CriuFailed, CriuMissing, CriuTimeout: what was asked, what CRIU said,
  the log lines that explain it.
- log: log_excerpt(): the Error/Warn lines and the tail of a CRIU log, bounded in size.
- plan: the mapping of checkpoint/restore options to criu_opts (written separately).
"""
