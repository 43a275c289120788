"""CKKS key sets: files, permissions, what each party holds, fingerprints, the CLI."""

from __future__ import annotations

import stat

import pytest

from flwr_ext.cli import main
from flwr_ext.he import (
    SECRET_FILE,
    SERVER_FILE,
    KeyMismatchError,
    create_keys,
    get_profile,
    load_keys,
    read_key_header,
)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    create_keys(directory, "compact")
    return directory


def test_create_writes_secret_0600_server_context_and_fingerprint(key_dir):
    secret, server = key_dir / SECRET_FILE, key_dir / SERVER_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not stat.S_IMODE(server.stat().st_mode) & stat.S_IWOTH
    fingerprint = (key_dir / "fingerprint.txt").read_text().strip()
    assert read_key_header(secret)["fingerprint"] == fingerprint
    assert read_key_header(server)["fingerprint"] == fingerprint


def test_server_context_holds_no_key_of_any_kind(key_dir):
    server = load_keys(key_dir / SERVER_FILE)
    assert not server.context.is_private()
    assert server.context.is_public()
    assert not server.has_secret
    assert not server.context.has_relin_keys()
    assert not server.context.has_galois_keys()
    with pytest.raises(ValueError, match=r"secret-context\.ckks"):
        server.require_secret()


def test_secret_context_is_private_and_same_key_set(key_dir):
    secret = load_keys(key_dir / SECRET_FILE)
    server = load_keys(key_dir / SERVER_FILE)
    assert secret.context.is_private()
    assert secret.fingerprint == server.fingerprint
    assert secret.profile == server.profile == get_profile("compact")
    with pytest.raises(ValueError, match="server must never have it"):
        secret.require_no_secret()


def test_contexts_load_once_per_file_and_single_threaded(key_dir):
    assert load_keys(key_dir / SECRET_FILE) is load_keys(key_dir / SECRET_FILE)


def test_two_key_sets_have_different_fingerprints_and_mismatch_names_both(tmp_path):
    a = create_keys(tmp_path / "a", "default")
    b = create_keys(tmp_path / "b", "default")
    assert a.fingerprint != b.fingerprint
    keys = load_keys(a.secret)
    with pytest.raises(KeyMismatchError) as info:
        keys.check_matches("default", b.fingerprint, "the server's key")
    assert a.fingerprint in str(info.value) and b.fingerprint in str(info.value)


def test_refuses_to_overwrite_keys(key_dir):
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        create_keys(key_dir, "compact")


def test_unknown_profile_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown CKKS profile 'tiny'"):
        create_keys(tmp_path, "tiny")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda data: b"not a key file" + data, "not a flwr-ext CKKS key file"),
        (lambda data: data[:10], "truncated"),
        (lambda data: data[:20], "truncated"),
        (lambda data: data[: len(data) - 500], "truncated or corrupted"),
    ],
)
def test_corrupted_key_files_fail_clearly(key_dir, tmp_path, mutate, match):
    bad = tmp_path / "bad.ckks"
    bad.write_bytes(mutate((key_dir / SECRET_FILE).read_bytes()))
    with pytest.raises(ValueError, match=match):
        load_keys(bad)


def test_missing_key_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="keys create"):
        load_keys(tmp_path / "nope.ckks")


def test_cli_create_and_inspect(tmp_path, capsys):
    assert main(["keys", "create", "--out", str(tmp_path), "--profile", "default"]) == 0
    created = capsys.readouterr().out
    fingerprint = (tmp_path / "fingerprint.txt").read_text().strip()
    assert fingerprint in created

    assert main(["keys", "inspect", str(tmp_path / SECRET_FILE)]) == 0
    out = capsys.readouterr().out
    assert "profile:     default" in out
    assert fingerprint in out
    assert "secret key:  yes" in out

    assert main(["keys", "inspect", str(tmp_path / SERVER_FILE)]) == 0
    out = capsys.readouterr().out
    assert "secret key:  no" in out and fingerprint in out

    assert main(["keys", "create", "--out", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_inspect_rejects_non_key_file(tmp_path, capsys):
    other = tmp_path / "x.txt"
    other.write_text("hello")
    assert main(["keys", "inspect", str(other)]) == 2
    assert "not a flwr-ext CKKS key file" in capsys.readouterr().err
