"""corral's cache directory, and how a directory is published into it.

A directory is built beside its final place under a staging name, flushed to disk, and
renamed into place in one step, so no process ever sees a half-written entry under the
final name. A crash leaves only a staging directory (a dot name ending in `.tmp`), which
the next build of the same entry removes once the process that made it is gone. This
module never decides what a complete entry holds: its callers say so.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "fsync_tree", "publish", "staging_dir"]


def cache_dir() -> Path:
    """corral's cache directory: ``$CORRAL_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/corral``, else ``~/.cache/corral``. Not created here."""
    if explicit := os.environ.get("CORRAL_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "corral"


def staging_dir(target: Path) -> Path:
    """Make an empty staging directory beside ``target`` (its parents too), after
    removing the staging directories of ``target`` whose processes are gone.

    Raises:
        OSError: the parent directory cannot be written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        if not _alive(stale.name.split(".")[-3]):
            shutil.rmtree(stale, ignore_errors=True)
    # Not tempfile.mkdtemp: its mode 0o700 would outlive the rename, while os.mkdir
    # gives the directory the permissions the user's umask asks for.
    staging = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    return staging


def fsync_tree(directory: Path) -> None:
    """Flush every file in ``directory`` and the directory itself, so that a rename of
    it cannot reach the disk before its contents."""
    for path in directory.iterdir():
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def publish(staging: Path, target: Path, is_complete: Callable[[Path], bool]) -> Path:
    """Move the complete directory ``staging`` to ``target`` in one rename.

    If ``target`` exists and `is_complete` says it holds a complete entry, another
    process won the race: ``staging`` is discarded and the existing entry kept. An
    incomplete or stale ``target`` is moved aside and replaced.

    Returns:
        ``target``.

    Raises:
        OSError: the rename failed for a reason other than an existing ``target``.
    """
    fsync_tree(staging)
    for _ in range(3):
        try:
            os.rename(staging, target)
            _fsync(target.parent)
            return target
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if is_complete(target):
            shutil.rmtree(staging, ignore_errors=True)
            return target
        aside = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue  # someone else moved it first
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EEXIST, f"could not publish {target}: it kept changing underneath")


def _alive(pid_text: str) -> bool:
    """Whether the process that named a staging directory may still be writing it."""
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
