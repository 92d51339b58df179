"""`pyshim migrate CONTAINER DEST`: a running container moved to another host's containerd (docs/migrate.md).

The source side (`source.py`) checkpoints the container through its containerd and pyshim, and reaches the
destination only through ssh (`transport.py`), which runs the destination's `pyshim migrate-receive`
(`receiver.py`): the two speak a framed protocol (`frames.py`, `channel.py`) over ssh's stdin and stdout, and the
receiver talks to the destination's containerd. `--stream` carries CRIU's page-server connection in the same
protocol (`pagestream.py`), `--post-copy` its lazy pages (`postcopy.py`); `--pre-copy` plans its rounds in
`precopy.py`.
"""
