"""Private, exclusive, atomic file writing for results, models and keys.

Everything flwr-ext writes to disk holds something worth protecting: a final model
(which can leak training data), per-site metrics, a CKKS secret key. This module is
the one place that writes such files, with these rules:

- **Private**: folders are created ``0700`` and files ``0600`` (exact modes, not
  left to the umask), so other users on a shared machine read nothing.
- **No symlink followed**: a file is first written under a fresh, random temporary
  name created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` inside a folder opened with
  ``O_NOFOLLOW``, then moved into place with ``rename``/``link`` relative to that
  folder's descriptor. A symlink planted at the final name (or at a guessable
  temporary name) is never written through: it is refused, or - when overwriting
  was asked for - replaced by the new file itself. Symlinks *above* the folder
  (e.g. ``/home -> /usr/home``) are the administrator's and are allowed.
- **Atomic**: a reader sees the old file or the complete new one, never half of
  it; a failed write leaves no temporary file behind.
- **Never over another run's files unless asked**: ``overwrite=False`` (the
  default) refuses an existing file, and :func:`create_private_dir` with
  ``fresh=True`` refuses a folder that already holds anything.

No Flower, torch or numpy import: any layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal, overload

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "UnsafePathError",
    "atomic_open",
    "create_private_dir",
    "write_bytes",
    "write_text",
]

#: Mode of every folder flwr-ext creates for results and keys.
DIR_MODE = 0o700
#: Mode of every file flwr-ext writes with model, metric or key content.
FILE_MODE = 0o600

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class UnsafePathError(OSError):
    """A path is a symlink, not a folder, or would overwrite existing files."""


def _open_dir(path: Path) -> int:
    """Open a folder without following a symlink at its last component."""
    try:
        return os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as err:
        if path.is_symlink():
            raise UnsafePathError(
                f"{path} is a symbolic link; refusing to write through it"
            ) from err
        raise


def create_private_dir(
    path: str | os.PathLike[str], *, fresh: bool = False, claim: bool = False
) -> Path:
    """Create ``path`` (and missing parents) with mode ``0700``.

    Parameters
    ----------
    path : str or PathLike
        The folder.
    fresh : bool (default: False)
        Require a folder that holds nothing: a new one, or an existing empty one
        (e.g. made by the user for this run). A folder holding files - another
        run's results - is refused with :class:`UnsafePathError`.
    claim : bool (default: False)
        The folder is this run's own (a results folder): if it already existed
        and this user owns it, its mode is tightened to ``0700``. Otherwise an
        existing folder (e.g. the user's home) keeps its mode.

    Returns
    -------
    Path
        The folder. An existing folder must be a real folder, not a symlink.
    """
    target = Path(path)
    missing = []
    probe = target
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created concurrently
            os.mkdir(folder, DIR_MODE)
    if target.is_symlink():
        raise UnsafePathError(f"{target} is a symbolic link; refusing to use it")
    info = target.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{target} exists and is not a folder")
    fd = _open_dir(target)
    try:
        if (
            claim
            and info.st_uid == os.getuid()
            and stat.S_IMODE(info.st_mode) != DIR_MODE
        ):
            os.fchmod(fd, DIR_MODE)
        if fresh and os.listdir(fd):
            raise UnsafePathError(
                f"{target} already holds files (another run's results?); refusing "
                "to write over them: choose a new folder, or empty this one"
            )
    finally:
        os.close(fd)
    return target


@overload
def atomic_open(
    path: str | os.PathLike[str],
    mode: Literal["wb"] = "wb",
    *,
    overwrite: bool = False,
    file_mode: int = FILE_MODE,
) -> contextlib.AbstractContextManager[IO[bytes]]: ...
@overload
def atomic_open(
    path: str | os.PathLike[str],
    mode: Literal["w"],
    *,
    overwrite: bool = False,
    file_mode: int = FILE_MODE,
) -> contextlib.AbstractContextManager[IO[str]]: ...
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    overwrite: bool = False,
    file_mode: int = FILE_MODE,
) -> contextlib.AbstractContextManager[IO]:
    r"""Open a private temporary file that becomes ``path`` when the block ends.

    Use it for writers that need a file object (``csv``, ``numpy.savez``,
    ``torch.save``, ``savefig``)::

        with atomic_open(folder / "metrics.csv", "w") as handle:
            handle.write("round,loss\\n")

    Parameters
    ----------
    path : str or PathLike
        Final name; its folder must exist and must not be a symlink.
    mode : {"wb", "w"}
        Binary or text (UTF-8, ``newline=""``).
    overwrite : bool (default: False)
        Replace an existing file (or a symlink, which is replaced, not followed).
        Otherwise an existing name raises ``FileExistsError``.
    file_mode : int (default: 0o600)
        Permission bits of the new file.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    UnsafePathError
        The folder is a symlink.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    return _atomic(Path(path), mode, overwrite, file_mode)


@contextlib.contextmanager
def _atomic(target: Path, mode: str, overwrite: bool, file_mode: int) -> Iterator[IO]:
    folder = target.parent
    name = target.name
    if not name or name in (".", ".."):
        raise ValueError(f"not a file name: {target}")
    dir_fd = _open_dir(folder)
    temp = None
    try:
        if not overwrite and _exists(name, dir_fd):
            raise FileExistsError(f"{target} exists; refusing to overwrite it")
        fd, temp = _create_temp(name, dir_fd, file_mode)
        handle = (
            os.fdopen(fd, "wb")
            if mode == "wb"
            else os.fdopen(fd, "w", encoding="utf-8", newline="")
        )
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _commit(temp, name, dir_fd, overwrite, target)
        temp = None
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
        os.close(dir_fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _create_temp(name: str, dir_fd: int, file_mode: int) -> tuple[int, str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    for _ in range(16):
        temp = f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(temp, flags, file_mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
        os.fchmod(fd, file_mode)  # exact mode, whatever the umask
        return fd, temp
    raise FileExistsError(f"could not create a unique temporary file for {name}")


def _commit(temp: str, name: str, dir_fd: int, overwrite: bool, target: Path) -> None:
    if overwrite:
        # rename() replaces a file or a symlink at ``name``; it never follows it.
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        # link() fails if ``name`` exists (as anything, symlinks included).
        os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(f"{target} exists; refusing to overwrite it") from None
    except OSError:
        # A file system without hard links: rename after a fresh existence check
        # (a symlink planted in between is replaced, never followed).
        if _exists(name, dir_fd):
            raise FileExistsError(
                f"{target} exists; refusing to overwrite it"
            ) from None
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    os.unlink(temp, dir_fd=dir_fd)


def write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    overwrite: bool = False,
    file_mode: int = FILE_MODE,
) -> Path:
    """Write ``data`` to ``path`` privately and atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb", overwrite=overwrite, file_mode=file_mode) as handle:
        handle.write(data)
    return Path(path)


def write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    overwrite: bool = False,
    file_mode: int = FILE_MODE,
) -> Path:
    """Write UTF-8 ``text`` to ``path`` privately and atomically."""
    with atomic_open(path, "w", overwrite=overwrite, file_mode=file_mode) as handle:
        handle.write(text)
    return Path(path)
