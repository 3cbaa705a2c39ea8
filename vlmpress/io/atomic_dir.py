"""Atomic replacement of a whole directory, with temporaries that are provably ours.

A new directory is built in a sibling temporary (``.NAME.vlmpress-PID.RANDOM.tmp``), then put in
place by one ``rename`` (new path) or an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``),
so every instant a kill can hit leaves either the old or the new complete directory.

Ownership: every temporary holds the marker file :data:`OWNER_MARKER` for as long as it sits at a
temporary name (it travels with the rename and is removed from the final path afterwards). Only a
directory that matches the name pattern, whose process is gone, *and* holds the marker is ever
deleted as stale; the one exception is an *empty* one (a kill between creating it and marking it),
which ``rmdir`` removes and which cannot hold anything of the user's. A user's folder that merely
looks like one (``.NAME.old``, ``.NAME.k2j3x9ab.tmp``, even ``.NAME.vlmpress-1.x.tmp`` with files in
it) is never touched. A backup of a killed two-rename swap (file systems
without exchange) is restored, never deleted, when the target is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: file inside each temporary directory proving vlmpress created it (content: a random token)
OWNER_MARKER = ".vlmpress-owned-temporary"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_renameat2 = _libc_renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if _renameat2 is None:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (flag not supported by the file system), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


def temp_prefix(out: Path) -> str:
    return f".{out.name}.vlmpress-"


def _mark(directory: Path) -> None:
    (directory / OWNER_MARKER).write_text(secrets.token_hex(16))


def is_owned(directory: Path) -> bool:
    """Whether ``directory`` is a real directory holding vlmpress's ownership marker."""
    return directory.is_dir() and not directory.is_symlink() and (directory / OWNER_MARKER).is_file()


def make_owned_temp(out: Path, suffix: str = ".tmp") -> Path:
    """A fresh, marked temporary directory beside ``out`` (unguessable name, this process's id)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out)}{os.getpid()}.", suffix=suffix, dir=out.parent))
    _mark(tmp)
    return tmp


def remove_owned(directory: Path) -> bool:
    """Delete ``directory`` only if it carries the marker; True when it was removed."""
    if not is_owned(directory):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path, restorable=lambda d: False) -> list[Path]:
    """Remove marked temporaries left beside ``out`` by processes that no longer run.

    An unmarked backup (``.old``) of a killed two-rename swap is moved back to ``out`` when ``out``
    is missing and ``restorable(backup)`` says it holds what ``out`` should hold; anything else
    unmarked is left alone.
    """
    removed: list[Path] = []
    pattern = re.compile(re.escape(temp_prefix(out)) + r"(\d+)\.[A-Za-z0-9_]+\.(tmp|old)$")
    if not out.parent.is_dir():
        return removed
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or _pid_alive(int(match.group(1))) or entry.is_symlink() or not entry.is_dir():
            continue
        if match.group(2) == "old" and not out.exists() and restorable(entry):
            os.replace(entry, out)  # a two-rename swap was killed between its renames
            (out / OWNER_MARKER).unlink(missing_ok=True)
            logger.warning("restored %s from the backup of a save killed mid-swap", out)
            continue
        if remove_owned(entry):
            removed.append(entry)
        elif match.group(2) == "tmp" and not any(entry.iterdir()):
            # killed between mkdtemp and writing the marker: rmdir removes only an empty directory,
            # so a look-alike user folder with anything in it is still never touched
            os.rmdir(entry)
            removed.append(entry)
    if removed:
        logger.info("removed %d stale temporary director%s of killed saves next to %s", len(removed), "y" if len(removed) == 1 else "ies", out)
    return removed


def fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(tmp: Path, out: Path) -> None:
    """Put the complete, marked temporary ``tmp`` at ``out``, never leaving ``out`` missing or partial.

    The marker stays in whatever sits at a temporary name at every instant (the new copy before
    the rename, the old copy after it), so a kill at any point leaves only marked, removable
    temporaries; the new ``out`` sheds its marker last (a leftover marker in ``out`` is harmless:
    loading ignores it and the next save replaces it).
    """
    if not out.exists():
        os.replace(tmp, out)
        (out / OWNER_MARKER).unlink(missing_ok=True)
        return
    _mark(out)  # the old copy is marked before it moves to a temporary name
    if exchange_paths(tmp, out):  # tmp now holds the old directory
        remove_owned(tmp)
        (out / OWNER_MARKER).unlink(missing_ok=True)
        return
    # no atomic exchange (not Linux, or the file system lacks it): two renames; a kill in between
    # leaves the old copy at a backup name that the next save restores before anything else
    backup = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out)}{os.getpid()}.", suffix=".old", dir=out.parent))
    os.rmdir(backup)  # reserve an unguessable name; rename needs it absent (or empty)
    os.replace(out, backup)
    os.replace(tmp, out)
    remove_owned(backup)
    (out / OWNER_MARKER).unlink(missing_ok=True)
