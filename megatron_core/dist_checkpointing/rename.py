"""Committing a finished checkpoint directory into place, never leaving zero valid checkpoints."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

from megatron_core.dist_checkpointing.metadata import ASIDE_MARK, METADATA_FILE, fsync_dir

logger = logging.getLogger(__name__)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2``); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def discard_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, un-committing it first so a crash mid-way leaves no
    directory that looks complete."""
    try:
        (path / METADATA_FILE).unlink()
        fsync_dir(path)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def commit_directory(tmp: Path, target: Path) -> None:
    """Move the complete checkpoint ``tmp`` to ``target``, replacing (atomically) what is there.

    ``target`` may be absent, an empty directory, or a committed checkpoint (then swapped with
    ``tmp`` by one atomic ``renameat2(RENAME_EXCHANGE)``; where that is unsupported the old one is
    first renamed aside, so it stays complete until the new one is in place).
    """
    parent = target.parent
    if target.is_dir() and os.listdir(target):
        if _exchange(tmp, target):
            fsync_dir(parent)
            discard_checkpoint(tmp)  # now holds the old checkpoint
            return
        # A crash between the two renames leaves no checkpoint at target: the next read of it
        # (``read_metadata``) renames this one back (``restore_interrupted_commit``).
        aside = parent / f"{target.name}{ASIDE_MARK}{uuid.uuid4().hex[:12]}"
        os.rename(target, aside)
        os.rename(tmp, target)
        fsync_dir(parent)
        discard_checkpoint(aside)
        return
    os.replace(tmp, target)  # rename(2) replaces an empty directory
    fsync_dir(parent)
