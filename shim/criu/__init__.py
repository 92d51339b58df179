"""CRIU, driven over its RPC protocol (`criu swrk`), for checkpoint and restore.

Modules:
- access: CriuAccess, the server's Checkpointer and Restorer (shim.process.criu_seam), CRIU's code imported on
  first use.
- rpc: CriuRpc / run_criu: one request to a `criu swrk` child, its notifications answered
  through an async handler, a deadline, fds passed both ways; version(), feature_check(),
  check().
- errors: CriuError, CriuFailed, CriuMissing, CriuTimeout: what was asked, what CRIU said,
  the log lines that explain it.
- log: quote() / log_excerpt(): the lines of a CRIU log that say why it failed (the last errors before FAILED,
  known-harmless ones left out), one way for every error to quote them; keep(): a log copied out of a work dir.
- image_check: images a restore would hang or fail obscurely on (truncated pages, no inventory, a bad pstree).
- options: checkpoint options (runc's and pyshim's) and where each comes from.
- plan: from (container, options) to criu_opts or OCI runtime arguments (pure functions), and the one reader
  of a container those take their facts from (facts_from_bundle).
- images: image directories written aside, private, committed whole.
- checkpoint: checkpointing a container (preflight, dump, commit of the image); what it reads of the container
  and asks of CRIU is a Dumper (CriuDumper), one DumpJob per checkpoint.
- external_unix: a container's unix sockets whose peer is outside it; what a checkpoint does with them.
- restore: restoring a container through the OCI runtime's `restore`.
- stats: CRIU's stats-dump / stats-restore, read with pycriu.
- tcp: established TCP connections a checkpoint holds; a restore that would lose them refused.
- loopback: `lo` up in the network namespace a restore creates (the action script CRIU runs, served by the shim).
- lazy_images: a dump's lazy pages split out of the images a post-copy destination restores from; their index.
- page_protocol, page_server: CRIU's page-server protocol (sans-IO) and pyshim's page server answering a
  destination's lazy-pages daemon from the images (`python -m shim.criu.page_server`).
- lazy_daemon, missing_pages, page_client, uffd: pyshim's lazy-pages daemon (`python -m shim.criu.lazy_daemon`),
  which feeds a lazily restored container from a page server in place of `criu lazy-pages`; the pages each process
  still lacks; its side of the page-server protocol; the userfaultfd ABI.
- userfaultfd: a lazy restore's userfaultfds held by the shim, so that a daemon that dies cannot leave zeros.
- netlock: CRIU's network lock a dump left in a namespace (iptables-save / nft output, its log and
  inventory), removed when no restore will come there (failed dump, Delete, restore elsewhere), through a
  namespace's Firewall (NamespaceFirewall: iptables under nsenter, nftables over netlink).
"""
