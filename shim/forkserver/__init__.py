"""A pre-warmed fork server ("zygote") that takes the server's imports off containerd's critical path.

`start` binds the shim's socket as before, then hands it to a fork server over a unix socket
(SCM_RIGHTS) together with what the server process needs: argv, cwd (the bundle), the environment
containerd gave, containerd's pid and the options read from stdin. The fork server has already
imported everything the shim server imports (asyncio, protobuf, the task service) but runs no event
loop; it forks twice, and the grandchild becomes the shim server exactly as the child `start` forks
would: new session, the bundle as cwd, containerd's environment, the cgroups of `start`, stdio on
/dev/null, /proc cmdline and environ those of `start`, then `shim.server.daemon.serve`.

When no fork server answers, `start` forks the server itself as before (the fallback: imports in the
child) and launches a fork server in the background for the next containers.

One fork server per (installed code, containerd process): the socket name is derived from a digest of
the interpreter, sys.path and the shim's source files (mtime and size), and from containerd's pid and
start time, so upgraded code or a restarted containerd never reach an old server. A fork server exits
when its containerd exits, when the code on disk no longer matches what it imported, and after an idle
period; it holds nothing of any container.

    wire    names, the digest, framing and descriptor passing (standard library only: `start` uses it)
    client  what `start` does: hand over, or launch a server (standard library only)
    server  the fork server and the child it turns into a shim server
    proctitle  /proc/PID/cmdline and environ of the forked shim (prctl PR_SET_MM_MAP)
"""
