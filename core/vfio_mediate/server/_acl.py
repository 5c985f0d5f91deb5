"""POSIX ACL entries for one more user on a file: how a socket made for one user (mode 0600 in a
directory of its own) is opened to exactly one other user id, and to nobody else.

The ACL is the kernel's ``system.posix_acl_access`` attribute: a version word, then entries of
(tag, permissions, id). Adding a named user entry needs a mask entry, which becomes the group
bits of the mode; the owning group's own entry keeps what it had (nothing, for our files).
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

__all__ = ["grant_user"]

_NAME = "system.posix_acl_access"
_VERSION = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFF_FFFF


def _entries(path: Path) -> dict[tuple[int, int], int]:
    """The ACL of ``path`` as {(tag, id): permissions}; the one its mode implies when it has
    none."""
    try:
        raw = os.getxattr(path, _NAME, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        mode = path.lstat().st_mode
        return {
            (_USER_OBJ, _UNDEFINED_ID): (mode >> 6) & 7,
            (_GROUP_OBJ, _UNDEFINED_ID): (mode >> 3) & 7,
            (_OTHER, _UNDEFINED_ID): mode & 7,
        }
    entries = {}
    for tag, permissions, number in _ENTRY.iter_unpack(raw[_VERSION.size :]):
        entries[(tag, number)] = permissions
    return entries


def grant_user(path: Path, uid: int, permissions: int) -> None:
    """Give user ``uid`` ``permissions`` (rwx bits: 4, 2, 1) on ``path``, added to what it has;
    nobody else gains anything. Raises ``OSError`` (EOPNOTSUPP where the filesystem has no
    ACLs)."""
    entries = _entries(path)
    key = (_USER, uid)
    entries[key] = entries.get(key, 0) | permissions
    group_class = 0
    for (tag, _), granted in entries.items():
        if tag in (_USER, _GROUP_OBJ, _GROUP):
            group_class |= granted
    entries[(_MASK, _UNDEFINED_ID)] = group_class
    raw = _VERSION.pack(_ACL_VERSION) + b"".join(
        _ENTRY.pack(tag, granted, number) for (tag, number), granted in sorted(entries.items())
    )
    os.setxattr(path, _NAME, raw, follow_symlinks=False)
