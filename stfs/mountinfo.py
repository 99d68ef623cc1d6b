"""Reading the kernel's mount table (``/proc/self/mountinfo``)."""

from __future__ import annotations

import dataclasses
import os
import re

FSTYPE = "fuse.stfs"
"""The file system type of an stfs mount in the mount table."""

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str


def mounts() -> list[MountEntry]:
    """All mounts visible to this process, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            fstype, source, super_opts = (right.split(" ") + ["", "", ""])[:3]
            entries.append(MountEntry(_unescape(fields[4]), _unescape(fstype),
                                      _unescape(source), super_opts))
    return entries


def mount_at(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly *path* (absolute, resolved)."""
    found = None
    for entry in mounts():
        if entry.mountpoint == path:
            found = entry
    return found


def resolve(path: str) -> str:
    """*path* as the mount table spells it: absolute, symlinks resolved in the parent.

    The last component is left as is: a stale mount point cannot be resolved.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path
