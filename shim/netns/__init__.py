"""Network namespaces on pyroute2, for the shim and for the tests that build "hosts" out of them.

A namespace is named by a `NamespaceRef`: a name under /var/run/netns (as `ip netns` uses), an
absolute path to a namespace file (/proc/<pid>/ns/net, a CNI-made bind mount), or None for the
calling thread's own. Nothing here forks: namespaces are entered by short-lived threads (setns
is per thread), so the shim's reaper stays the only one calling waitpid.

Modules:
- refs: NamespaceRef -> path, opened without ever creating anything.
- syscalls: setns / unshare through libc.
- enter: entered() switches the calling thread; run_in() runs a function in a fresh thread inside a
  namespace; socket_in() makes a socket that lives in a namespace.
- named: create, list, remove named namespaces in /var/run/netns (pyroute2's netns module).
- rtnl: one pyroute2 IPRoute socket opened inside a namespace for one piece of work.
- links: veth pairs with an end moved into a namespace, links up, link names.
- addresses: adding addresses, and the global addresses a namespace holds.
- routes: adding routes.
- inodes: a process's namespaces (type -> inode) from its pid; a namespace file's inode.
"""
