"""Inode table: FUSE node ids <-> backing entries, with kernel lookup counts.

Node ids are the backing inode numbers, so ``st_ino`` is stable across
remounts and hard links share it. Two exceptions, because FUSE reserves node
id 1 for the root and because inode numbers are only unique per device:

* SOURCE itself is node id 1 (its ``getattr`` still reports its real inode);
* an entry on another device (a file system mounted inside SOURCE), or a
  backing inode number that would collide with node id 1 or the reserved
  range, gets a node id from ``REMAP_BASE`` upwards, unique while the kernel
  remembers it but not stable across remounts.

Each entry lives while the kernel holds a lookup reference to it; ``forget``
drops it, so memory follows the kernel's dentry cache rather than the number
of files ever seen.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os

from stfs.backing import FileIdentity

ROOT_NODEID = 1
REMAP_BASE = 1 << 63


@dataclasses.dataclass
class Inode:
    """One node the kernel knows about."""

    nodeid: int
    dev: int
    ino: int
    path: bytes
    """Latest known path relative to SOURCE (b"" for SOURCE); hard links keep the newest."""
    lookups: int = 0
    cached_identity: FileIdentity | None = None
    """Identity whose data the kernel may hold in its page cache (for keep_cache)."""


class InodeTable:
    """Node id bookkeeping; pure data, no I/O."""

    def __init__(self, root_stat: os.stat_result) -> None:
        self.root_dev = root_stat.st_dev
        self._root = Inode(ROOT_NODEID, root_stat.st_dev, root_stat.st_ino, b"", lookups=1)
        self._by_nodeid: dict[int, Inode] = {ROOT_NODEID: self._root}
        self._remapped: dict[tuple[int, int], int] = {}
        self._next_remap = itertools.count(REMAP_BASE)

    def __len__(self) -> int:
        return len(self._by_nodeid)

    @property
    def root(self) -> Inode:
        return self._root

    def get(self, nodeid: int) -> Inode:
        """The node the kernel calls *nodeid*; ESTALE if it was forgotten."""
        try:
            return self._by_nodeid[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None

    def nodeid_for(self, st: os.stat_result) -> int:
        """The node id that *st* is (or would be) known under."""
        key = (st.st_dev, st.st_ino)
        if key == (self._root.dev, self._root.ino):
            return ROOT_NODEID
        if st.st_dev == self.root_dev and ROOT_NODEID < st.st_ino < REMAP_BASE:
            return st.st_ino
        remapped = self._remapped.get(key)
        if remapped is None:
            remapped = next(self._next_remap)
            self._remapped[key] = remapped
        return remapped

    def remember(self, path: bytes, st: os.stat_result) -> Inode:
        """Record one more kernel lookup reference to the entry at *path*."""
        nodeid = self.nodeid_for(st)
        node = self._by_nodeid.get(nodeid)
        if node is None:
            node = Inode(nodeid, st.st_dev, st.st_ino, path)
            self._by_nodeid[nodeid] = node
        elif nodeid != ROOT_NODEID:
            node.path = path
        node.lookups += 1
        return node

    def forget(self, nodeid: int, count: int) -> None:
        """Drop *count* kernel references; the entry goes when none are left."""
        node = self._by_nodeid.get(nodeid)
        if node is None or nodeid == ROOT_NODEID:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self._by_nodeid[nodeid]
            self._remapped.pop((node.dev, node.ino), None)

    def matches(self, node: Inode, st: os.stat_result) -> bool:
        """Whether *st* is the same backing object as *node*."""
        return (st.st_dev, st.st_ino) == (node.dev, node.ino)
