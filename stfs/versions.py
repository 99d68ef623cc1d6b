"""Version guard: the freshness rules of the view, in one place.

A handle serves one version of its file, its ``identity`` (device, inode,
size, mtime_ns, ctime_ns). The rules:

* Before serving bytes from a chunk it has not served from yet, a handle
  fstat's its descriptor, unless an fstat or a backing read of it found the
  file unchanged less than ``RECHECK_S`` ago (and within the attribute
  timeout): a stream fed by read-ahead would otherwise pay a round trip to
  the store for each chunk, and a WAN store's fstat costs what a read does.
  Every backing read fstat's after the read too. A different identity means
  the file changed (``IdentityChanged``).
* A handle that was served bytes of the old version keeps going on the new
  one only if re-reading what it answers for (the current pass's last
  checkpointed chunk and every chunk since, and its last reads elsewhere)
  gives the same digests: a touch, an append, a change elsewhere in the
  file. Otherwise its reads fail with EIO until it reads from offset 0 again
  (a new pass), so a copy is never a mix of two versions.
* A handle that was served nothing takes the new version, unless the
  kernel's page cache may have served it old bytes stfs never saw (the old
  version was read through the mount, and the request is neither at offset
  0 nor past the old end): then it is treated as having read them.
* A handle whose replies would put a new version into the page cache that
  other handles of the same file still read an old version from gets EIO
  until those close (a new open reads the new version with direct I/O).
* A demand read retried after an error first re-reads the stream's last
  checkpointed chunk: a file changed while the read was failing gets EIO.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable

from stfs import lru
from stfs.backing import FileIdentity
from stfs.backing_reads import BackingReads
from stfs.budget import MemoryBudget
from stfs.buffers import Buffer, BufferPool
from stfs.handles import OpenFile
from stfs.metrics import Counters
from stfs.recovery import Piece
from stfs.streams import Stream

log = logging.getLogger(__name__)

RECHECK_S = 0.25
"""How long a confirmed identity spares the fstat before a new chunk."""
SERVED_IDENTITIES = 4096
"""Versions remembered as served through the mount (their pages may be cached)."""


class IdentityChanged(Exception):
    """A check found the file changed since the handle last looked."""

    def __init__(self, identity: FileIdentity) -> None:
        super().__init__(identity)
        self.identity = identity


class VersionGuard:
    """Checks identities, and decides what a change means for a stream."""

    def __init__(self, reads: BackingReads, budget: MemoryBudget, pool: BufferPool,
                 counters: Counters, *, max_chunk: int,
                 handles_of: Callable[[int], Iterable[OpenFile]] = lambda _nodeid: (),
                 recheck_s: float = RECHECK_S) -> None:
        self.reads = reads
        self.budget = budget
        self.pool = pool
        self.counters = counters
        self.max_chunk = max_chunk
        self.recheck_s = recheck_s
        self.handles_of = handles_of
        """The open handles of a node id, which share its kernel page cache."""
        self._served: collections.OrderedDict[FileIdentity, None] = collections.OrderedDict()
        """Versions recently served through the mount: the kernel's page cache may
        hold their pages, and serve them to any handle without asking stfs."""

    def check_due(self, stream: Stream) -> bool:
        """Whether serving a new chunk needs an fstat first (see the module docstring)."""
        return time.monotonic() - stream.confirmed_at >= self.recheck_s

    def confirmed(self, stream: Stream) -> None:
        """A backing read of *stream* found the file still its handle's version."""
        stream.confirmed_at = time.monotonic()

    async def check(self, stream: Stream) -> None:
        """fstat the open descriptor before serving a new chunk: a file changed
        since the handle last looked raises ``IdentityChanged``."""
        handle = stream.handle
        seen = handle.seen_identity
        if seen is not None and seen != handle.identity:
            raise IdentityChanged(seen)
        fd = self.reads.descriptors.fd_now(handle)
        if fd < 0:
            return  # closed for now; the reopen before the backing read checks
        try:
            if self.reads.is_local(handle):
                st = os.fstat(fd)  # inode attributes are in memory: no disk wait
            else:
                st = await self.reads.fstat(stream)
        except OSError:
            return  # the backing read meets the same error and deals with it
        now = FileIdentity.of(st)
        if now != handle.identity:
            raise IdentityChanged(now)
        self.confirmed(stream)

    def note_served(self, stream: Stream) -> None:
        """Bytes of the stream's version went to the kernel (its page cache may keep them)."""
        identity = stream.handle.identity
        if stream.noted is not identity:
            lru.remember(self._served, identity, None, SERVED_IDENTITIES)
            stream.noted = identity

    async def on_changed(self, stream: Stream, offset: int, identity: FileIdentity) -> None:
        """The file now has *identity*: carry *stream* over to it, or raise EIO
        (the rules in the module docstring)."""
        handle = stream.handle
        async with stream.change_lock:
            handle.seen_identity = identity
            if handle.identity == identity:
                return  # another request of this handle dealt with it
            verifier = stream.verifier
            unseen = self._may_have_read_unseen(stream, offset)
            if verifier.must_verify(offset) or unseen:
                if verifier.broken != identity:
                    problem = await self._verify_pass(stream, identity, unseen)
                    if problem is not None:
                        self._break(stream, identity)
                        log.warning("%s changed while being read (%s): this handle's reads "
                                    "fail with EIO rather than mix two versions, until it "
                                    "reads from offset 0 again", os.fsdecode(handle.path),
                                    problem)
                if verifier.broken == identity:
                    raise OSError(errno.EIO, "file changed while being read")
                verifier.retarget(identity)
                log.info("%s changed while being read (%s -> %s), but the bytes read so far "
                         "are unchanged: going on", os.fsdecode(handle.path), handle.identity,
                         identity)
            else:
                if not handle.direct_io and self._older_readers(handle, identity):
                    # Its replies would put the new version into the page cache
                    # that the other handles of the file read from.
                    if verifier.broken != identity:
                        self._break(stream, identity)
                        log.warning("%s changed while open, and other handles still read its "
                                    "old version: this handle's reads fail with EIO until they "
                                    "close (a new open reads the new version)",
                                    os.fsdecode(handle.path))
                    raise OSError(errno.EIO, "file changed while being read")
                verifier.reset(identity)
                log.info("%s changed while open: serving its new version",
                         os.fsdecode(handle.path))
            handle.identity = identity
            stream.chunk_seen = (0, 0)

    async def verify_resume(self, stream: Stream, scratch: Buffer) -> None:
        """Before a demand read is retried: re-read the stream's last checkpointed
        chunk; EIO if the file changed while the read was failing."""
        pieces = stream.verifier.pieces_to_verify()
        if not pieces:
            return
        handle = stream.handle
        problem = await self._verify_piece(stream, pieces[0], scratch, handle.identity)
        if problem is not None:
            seen = handle.seen_identity
            self._break(stream, seen if seen is not None else handle.identity)
            log.warning("%s changed while its read was being retried (%s): the read fails "
                        "with EIO rather than mix two versions", os.fsdecode(handle.path),
                        problem)
            raise OSError(errno.EIO, "file changed while being read")

    def _break(self, stream: Stream, identity: FileIdentity) -> None:
        """Fail *stream*'s reads of *identity* until a new pass."""
        stream.verifier.broken = identity
        self.counters.changed_files += 1

    def _older_readers(self, handle: OpenFile, identity: FileIdentity) -> bool:
        """Whether other handles of *handle*'s file, reading through the kernel's
        page cache, are still on a version older than *identity*."""
        return any(other is not handle and other.identity != identity and not other.released
                   and not other.direct_io
                   for other in self.handles_of(handle.nodeid))

    def _may_have_read_unseen(self, stream: Stream, offset: int) -> bool:
        """Whether a request at *offset* may follow bytes of the old version that
        the kernel served this handle from its page cache, never asking stfs.

        So it is when the old version was read through the mount (its pages may
        be cached) and the request is neither a new pass (offset 0) nor wholly
        past the old end (reading what an append added)."""
        identity = stream.handle.identity
        return (0 < offset < identity.size and not stream.verifier.served_anything()
                and identity in self._served)

    async def _verify_pass(self, stream: Stream, identity: FileIdentity,
                           unseen: bool = False) -> str | None:
        """Whether the bytes this stream was served are still the file's, under
        *identity*: None if so, else what differs. *unseen*: the handle may have
        been served bytes stfs never saw (the kernel's page cache)."""
        verifier = stream.verifier
        if identity.size < verifier.position:
            return f"now {identity.size} bytes, {verifier.position} were already read"
        pieces = verifier.pieces_to_verify() + list(verifier.earlier)
        if not pieces:
            if unseen:
                return ("the kernel may have served it cached bytes of the old version, "
                        "which cannot be checked")
            return None
        scratch_size = min(max(p.end - p.start for p in pieces), self.max_chunk)
        await self.budget.reserve(scratch_size)
        scratch = self.pool.take(scratch_size, aligned=not self.reads.is_local(stream.handle))
        try:
            for piece in pieces:
                problem = await self._verify_piece(stream, piece, scratch, identity)
                if problem is not None:
                    return problem
            return None
        finally:
            self.budget.release(scratch_size)
            self.pool.give(scratch)

    async def _verify_piece(self, stream: Stream, piece: Piece, scratch: Buffer,
                            identity: FileIdentity) -> str | None:
        """Re-read one served chunk (with retries) and compare its digest."""
        reader = self.reads.reader
        digest, got, read_under = await self.reads.run(
            stream, lambda fd, _release: reader.pread_digest(fd, scratch, piece.start,
                                                             piece.end, piece.hasher()))
        if read_under != identity:
            stream.handle.seen_identity = read_under
            return "it changed again while being checked"
        if got != piece.end - piece.start or digest != piece.digest:
            return f"bytes {piece.start}-{piece.end} differ from what was served"
        return None
