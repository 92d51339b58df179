#!/usr/bin/env python3
"""A stand-in OCI runtime for unit tests: enough of runc's command line to drive the task
service without root. The "container" is the bundle's config.json process.args, run as a
grandchild of the shim (so it re-parents to the shim, the subreaper, like runc's init)."""

import json
import os
import signal
import sys
import time


def fail(log, message):
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"level": "error", "msg": message}) + "\n")
    sys.exit(1)


def main(argv):
    root = log = ""
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag in ("--root", "--log", "--log-format"):
            value = argv.pop(0)
            root = value if flag == "--root" else root
            log = value if flag == "--log" else log
    command, *rest = argv
    opts, args = {}, []
    while rest:
        arg = rest.pop(0)
        if arg in ("--bundle", "--pid-file", "--console-socket", "--process", "--resources", "--format"):
            opts[arg] = rest.pop(0)
        elif arg.startswith("--"):
            opts[arg] = True
        else:
            args.append(arg)
    os.makedirs(root, exist_ok=True)
    cid = args[0]
    state_file = os.path.join(root, cid + ".json")
    started = os.path.join(root, cid + ".started")
    state = json.load(open(state_file)) if os.path.exists(state_file) else None

    def spawn(process_args, pid_file, gate):
        # posix_spawn, not Popen: a collected Popen may reap a child that exits at once, and the
        # shim (the subreaper, as with runc) must see every exit.
        script = 'while [ ! -e "$0" ]; do sleep 0.01; done; exec "$@"' if gate else 'exec "$@"'
        null = os.open(os.devnull, os.O_RDONLY)
        pid = os.posix_spawnp("sh", ["sh", "-c", script, gate or "-", *process_args], os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, null, 0)], setsid=True)
        with open(pid_file, "w") as f:
            f.write(str(pid))
        return pid

    if command == "create":
        if state:
            fail(log, f"container {cid} already exists")
        spec = json.load(open(os.path.join(opts["--bundle"], "config.json")))
        pid = spawn(spec["process"]["args"], opts["--pid-file"], started)
        json.dump({"pid": pid}, open(state_file, "w"))
    elif state is None:
        fail(log, f"container {cid} does not exist")
    elif command == "start":
        open(started, "w").close()
    elif command == "exec":
        spec = json.load(open(opts["--process"]))
        spawn(spec["args"], opts["--pid-file"], None)
    elif command == "kill":
        try:
            os.kill(state["pid"], int(args[1]))
        except ProcessLookupError:
            fail(log, "container not running")
    elif command in ("pause", "resume"):
        os.kill(state["pid"], signal.SIGSTOP if command == "pause" else signal.SIGCONT)
    elif command == "ps":
        print(json.dumps([state["pid"]]))
    elif command == "state":
        print(json.dumps({"id": cid, "pid": state["pid"]}))
    elif command == "update":
        json.load(open(opts["--resources"]))
    elif command == "delete":
        if opts.get("--force"):
            try:
                os.kill(state["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in (state_file, started):
            if os.path.exists(path):
                os.unlink(path)
    else:
        fail(log, f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
    time.sleep(0)
