"""Issue 10, item 7: results, models and keys are private, exclusive, symlink-proof.

Attacks, each against the real writer: a planted symlink at ``metrics.json``, at the
encrypted model's temporary name, at the secret key file (``keys create --force``);
a run pointed at a folder holding another run's results; files readable by other
users (umask 022). The victim file must stay untouched and every file be ``0600``
in a ``0700`` folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_ext import safe_files
from flwr_ext.appkit.results import ResultsWriter
from flwr_ext.safe_files import (
    UnsafePathError,
    atomic_open,
    create_private_dir,
    write_bytes,
    write_text,
)

VICTIM_TEXT = "precious: do not overwrite\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(autouse=True)
def _permissive_umask():
    """Run every test under the common umask 022 (files 0644 unless set)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim" / "important.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


def history() -> list[dict]:
    return [
        {
            "round": 1,
            "aggregated": {"train": {"loss": 0.5}, "evaluate": {}},
            "sites": {"a": {"node-id": 1, "train": {"loss": 0.4}}},
        }
    ]


def model() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.arange(6, dtype=np.float32))})


# ------------------------------------------------------------ results folder
def test_results_are_private(tmp_path):
    writer = ResultsWriter(tmp_path / "runs" / "run-1")
    files = [*writer.write_metrics(history(), run={"app": "x"})]
    files.append(writer.write_arrays(model()))
    files.append(writer.write_json("preprocessing.json", {"a": 1}))
    assert mode(writer.directory) == 0o700
    for path in files:
        assert mode(path) == 0o600, path
    # nothing else (no temporary file) is left behind
    assert sorted(p.name for p in writer.directory.iterdir()) == sorted(
        p.name for p in files
    )


def test_a_run_never_writes_over_another_runs_results(tmp_path):
    out = tmp_path / "out"
    first = ResultsWriter(out)
    first.write_metrics(history(), run={"app": "first"})
    before = (out / "metrics.json").read_text()
    with pytest.raises(UnsafePathError, match="already holds files"):
        ResultsWriter(out)
    assert (out / "metrics.json").read_text() == before
    # explicitly asked: allowed, and the old file is replaced atomically
    again = ResultsWriter(out, overwrite=True)
    again.write_metrics(history(), run={"app": "second"})
    assert '"second"' in (out / "metrics.json").read_text()


def test_an_empty_existing_folder_is_used_and_made_private(tmp_path):
    out = tmp_path / "made-by-user"
    out.mkdir(mode=0o755)
    writer = ResultsWriter(out)
    assert mode(out) == 0o700 and writer.directory == out


def test_planted_symlink_at_metrics_json_is_not_followed(tmp_path, victim):
    writer = ResultsWriter(tmp_path / "out")
    (writer.directory / "metrics.json").symlink_to(victim)
    with pytest.raises(FileExistsError):
        writer.write_metrics(history(), run={"app": "x"})
    assert victim.read_text() == VICTIM_TEXT


def test_planted_symlink_before_the_run_is_refused(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        ResultsWriter(out).write_metrics(history(), run={"app": "x"})
    assert victim.read_text() == VICTIM_TEXT


def test_output_dir_that_is_a_symlink_is_refused(tmp_path, victim):
    link = tmp_path / "out"
    link.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        ResultsWriter(link)


def test_final_model_through_writer_open_is_private(tmp_path, victim):
    writer = ResultsWriter(tmp_path / "out")
    (writer.directory / "final_model.pt").symlink_to(victim)
    with pytest.raises(FileExistsError), writer.open("final_model.pt") as handle:
        handle.write(b"model")
    assert victim.read_text() == VICTIM_TEXT
    with writer.open("other.pt") as handle:
        handle.write(b"model")
    assert mode(writer.path("other.pt")) == 0o600


# ------------------------------------------------------- encrypted model file
@pytest.fixture(scope="module")
def keys_dir(ckks_keys):
    return ckks_keys("main", "compact")


def _encrypted(keys_dir: Path) -> ArrayRecord:
    from flwr_ext.he import SECRET_FILE, encrypt_record, load_keys

    return encrypt_record(model(), load_keys(keys_dir / SECRET_FILE), 1.0)


def test_encrypted_model_temporary_name_symlink_is_not_followed(
    tmp_path, victim, keys_dir
):
    """The old writer used the fixed name ``<file>.tmp`` and followed a symlink."""
    from flwr_ext.he import load_encrypted_model, save_encrypted_model

    out = tmp_path / "out"
    out.mkdir()
    target = out / "final_model.ckks-model"
    (out / "final_model.ckks-model.tmp").symlink_to(victim)
    save_encrypted_model(_encrypted(keys_dir), target)
    assert victim.read_text() == VICTIM_TEXT
    assert mode(target) == 0o600
    assert len(load_encrypted_model(target)) == len(_encrypted(keys_dir))


def test_encrypted_model_symlink_at_the_final_name_is_not_followed(
    tmp_path, victim, keys_dir
):
    from flwr_ext.he import save_encrypted_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "final_model.ckks-model").symlink_to(victim)
    with pytest.raises(FileExistsError):
        save_encrypted_model(_encrypted(keys_dir), out / "final_model.ckks-model")
    assert victim.read_text() == VICTIM_TEXT


def test_decrypted_model_is_private(tmp_path, keys_dir):
    from flwr_ext.he import SECRET_FILE, decrypt_model_file, save_encrypted_model

    save_encrypted_model(_encrypted(keys_dir), tmp_path / "m.ckks-model")
    out = tmp_path / "m.npz"
    decrypt_model_file(tmp_path / "m.ckks-model", keys_dir / SECRET_FILE, out)
    assert mode(out) == 0o600


# ------------------------------------------------------------------ key files
def test_keys_create_force_does_not_write_the_secret_key_through_a_symlink(
    tmp_path, victim
):
    """``flwr-ext keys create --force`` used to open the secret file with O_TRUNC,
    following a planted symlink: the secret key landed in the attacker's file."""
    from flwr_ext.cli import main
    from flwr_ext.he import SECRET_FILE, load_keys

    out = tmp_path / "keys"
    out.mkdir()
    (out / SECRET_FILE).symlink_to(victim)
    assert main(["keys", "create", "--out", str(out), "--profile", "compact",
                 "--force"]) == 0  # fmt: skip
    assert victim.read_text() == VICTIM_TEXT
    secret = out / SECRET_FILE
    assert not secret.is_symlink() and mode(secret) == 0o600
    assert load_keys(secret).has_secret


def test_key_files_are_private_and_never_replaced_silently(tmp_path):
    from flwr_ext.he import SECRET_FILE, SERVER_FILE, create_keys

    out = tmp_path / "keys"
    create_keys(out, "compact")
    assert mode(out) == 0o700
    assert mode(out / SECRET_FILE) == 0o600
    assert mode(out / SERVER_FILE) in (0o600, 0o644)
    with pytest.raises(FileExistsError):
        create_keys(out, "compact")


# ------------------------------------------------------------ safe_files unit
def test_write_refuses_existing_file_unless_asked(tmp_path):
    path = tmp_path / "f.txt"
    write_text(path, "one")
    with pytest.raises(FileExistsError):
        write_text(path, "two")
    write_text(path, "two", overwrite=True)
    assert path.read_text() == "two" and mode(path) == 0o600


def test_overwrite_replaces_a_symlink_instead_of_following_it(tmp_path, victim):
    link = tmp_path / "f.txt"
    link.symlink_to(victim)
    write_bytes(link, b"new", overwrite=True)
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert victim.read_text() == VICTIM_TEXT


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write(b"half")
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_writing_into_a_symlinked_folder_is_refused(tmp_path, victim):
    link = tmp_path / "dir"
    link.symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        write_text(link / "x.txt", "x")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["important.txt"]


def test_create_private_dir_modes_and_fresh(tmp_path):
    folder = create_private_dir(tmp_path / "a" / "b", fresh=True)
    assert mode(folder) == 0o700 and mode(folder.parent) == 0o700
    write_text(folder / "x", "x")
    with pytest.raises(UnsafePathError, match="already holds files"):
        create_private_dir(folder, fresh=True)
    assert create_private_dir(folder) == folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafePathError, match="not a folder"):
        create_private_dir(tmp_path / "file")


def test_module_is_a_bottom_layer():
    source = Path(safe_files.__file__).read_text()
    for banned in ("flwr", "torch", "numpy"):
        assert f"import {banned}" not in source and f"from {banned}" not in source


def test_decrypted_results_folder_is_private_and_not_replaced_silently(
    tmp_path, keys_dir
):
    from flwr_ext.appkit.ckks_results import decrypt_results
    from flwr_ext.he import SECRET_FILE, save_encrypted_model

    results = tmp_path / "run"
    results.mkdir()
    save_encrypted_model(_encrypted(keys_dir), results / "final_model.ckks-model")
    (results / "preprocessing.json").write_text('{"note": "x"}')
    out = decrypt_results(results, keys_dir / SECRET_FILE)
    assert mode(out) == 0o700
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "final_model.npz": 0o600,
        "final_model.pt": 0o600,
        "preprocessing.json": 0o600,
    }
    with pytest.raises(UnsafePathError, match="already holds files"):
        decrypt_results(results, keys_dir / SECRET_FILE)
    decrypt_results(results, keys_dir / SECRET_FILE, overwrite=True)
