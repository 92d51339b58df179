"""Which cipher the migration's ssh asks for first (shim/tool/migrate/cipher.py): AES-GCM on a CPU with AES
instructions when nobody chose; the user's --ssh-option Ciphers= or ssh configuration otherwise."""

from __future__ import annotations

import shutil

import pytest

from shim.tool.migrate import cipher, transport
from shim.tool.migrate.dest import parse

DEFAULT = ["chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr", "aes128-gcm@openssh.com",
           "aes256-gcm@openssh.com"]


def test_aes_instructions_are_read_from_the_cpu_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    bare = tmp_path / "bare"
    bare.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes_like\n")
    assert cipher.has_aes_instructions(str(x86)) and cipher.has_aes_instructions(str(arm))
    assert not cipher.has_aes_instructions(str(bare))
    assert not cipher.has_aes_instructions(str(tmp_path / "missing"))


def test_aes_gcm_goes_first_only_when_the_default_applies():
    assert cipher.preferred_order(DEFAULT, DEFAULT) == ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                                                        "aes128-ctr", "aes256-ctr", "aes256-gcm@openssh.com"]
    assert cipher.preferred_order(DEFAULT, ["chacha20-poly1305@openssh.com"]) is None  # configured: left alone
    assert cipher.preferred_order(DEFAULT, None) is None  # ssh could not say
    assert cipher.preferred_order(["aes128-ctr"], ["aes128-ctr"]) is None  # no AES-GCM to prefer


def test_the_users_ciphers_option_or_a_cpu_without_aes_leaves_ssh_alone():
    assert cipher.preference(["ssh"], "h", ["IdentityFile=/k", "Ciphers=chacha20-poly1305@openssh.com"],
                             aes=True) is None
    assert cipher.preference(["ssh"], "h", ["ciphers aes256-ctr"], aes=True) is None
    assert cipher.preference(["ssh"], "h", [], aes=False) is None


def test_ssh_g_output_gives_the_cipher_list():
    assert cipher.ciphers_of("user root\nciphers a,b,c\nmacs x\n") == ["a", "b", "c"]
    assert cipher.ciphers_of("user root\n") is None


@pytest.mark.skipif(not shutil.which("ssh"), reason="ssh is not installed")
def test_with_no_configuration_the_real_ssh_gets_aes_gcm_first():
    chosen = cipher.preference(["ssh", "-F", "/dev/null"], "host-b", [], aes=True)
    assert chosen is not None and chosen.startswith(f"Ciphers={cipher.AES_GCM},")
    assert "chacha20-poly1305@openssh.com" in chosen  # the rest of ssh's default stays, for a server without GCM


def test_the_preference_comes_after_the_users_options_so_theirs_win():
    destination = parse("ssh://root@host-b/run/containerd.sock", default_namespace="default")
    argv = transport.ssh_argv(destination, ["IdentityFile=/k"], connect_timeout=30,
                              cipher_preference="Ciphers=aes128-gcm@openssh.com,aes128-ctr")
    assert argv.index("IdentityFile=/k") < argv.index("Ciphers=aes128-gcm@openssh.com,aes128-ctr") < argv.index("--")
