"""Reading the kernel's mount table (``/proc/self/mountinfo``)."""

from __future__ import annotations

import dataclasses
import re

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
