"""A restore's time bound comes from the host file or the restoring container, never from the checkpoint's record
(which stores the timeout the dump was given, 600 s by default, and would override the host's otherwise)."""

import json

from shim.bundle.config import Bundle
from shim.criu import restore


def setup(tmp_path, annotations):
    bundle, image = tmp_path / "bundle", tmp_path / "image"
    bundle.mkdir()
    image.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    (image / "pyshim-checkpoint.json").write_text(json.dumps(
        {"format": 1, "options": {"timeout": 600.0, "tcp_established": True}}))
    return Bundle.read(str(bundle)), str(image)


def test_the_host_bounds_a_restore_and_the_checkpoint_keeps_its_other_options(tmp_path, monkeypatch):
    monkeypatch.setattr(restore, "from_host_config", lambda: {"timeout": 30.0})
    options = restore.restore_options(*setup(tmp_path, {}))
    assert (options.timeout, options.tcp_established) == (30.0, True)


def test_the_restoring_container_bounds_it_tighter(tmp_path, monkeypatch):
    monkeypatch.setattr(restore, "from_host_config", lambda: {"timeout": 30.0})
    options = restore.restore_options(*setup(tmp_path, {"io.pyshim.checkpoint.timeout": "5"}))
    assert options.timeout == 5.0
