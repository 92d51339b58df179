import pytest

from shim import errors
from shim.api.containerd.runc.options.oci_pb2 import Options
from shim.api.containerd.runtimeoptions.v1.api_pb2 import Options as ConfigFileOptions
from shim.server.events import pack
from shim.task.convert import runtime_options


def test_runc_options_message():
    options = runtime_options(pack(Options(binary_name="crun", root="/r", systemd_cgroup=True, io_uid=7)))
    assert (options.binary_name, options.root, options.systemd_cgroup, options.io_uid) == ("crun", "/r", True, 7)


def test_no_options_means_runc_defaults():
    assert runtime_options(None).binary_name == "runc"


def test_config_file_options_in_either_spelling(tmp_path):
    path = tmp_path / "pyshim.toml"
    path.write_text('BinaryName = "crun"\nsystemd_cgroup = true\nRoot = "/run/x"\n')
    options = runtime_options(pack(ConfigFileOptions(config_path=str(path))))
    assert (options.binary_name, options.systemd_cgroup, options.root) == ("crun", True, "/run/x")


@pytest.mark.parametrize("content", ['Nonsense = 1\n', 'BinaryName = 3\n', 'not toml ['])
def test_bad_config_files_are_invalid_arguments(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(errors.InvalidArgument):
        runtime_options(pack(ConfigFileOptions(config_path=str(path))))


def test_missing_config_file_is_an_invalid_argument(tmp_path):
    with pytest.raises(errors.InvalidArgument, match="No such file"):
        runtime_options(pack(ConfigFileOptions(config_path=str(tmp_path / "none.toml"))))
