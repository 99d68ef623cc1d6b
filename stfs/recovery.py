"""Checkpoints and single-pass checksums of what each stream served (seeds'
StreamRecoveryManager and seed 004's single-pass pipeline).

A ``StreamVerifier`` follows one open handle. The bytes it serves are hashed
in file order as they go out (requests the kernel answers out of order wait
in a small reorder buffer: a reply that is a view of a cached chunk keeps
that chunk pinned, with no copy and no new memory; any other is copied into
room reserved in the budget), with no extra read:

* per chunk, a digest; every ``CHECKPOINT_CHUNKS`` chunks a
  ``Checkpoint`` records the offset reached, the file identity and the xxh3 of
  the chunks since the previous one. When the stream must resume after an
  error, or finds the file's identity changed, the engine re-reads the last
  checkpointed chunk and every chunk served since, and compares digests: any
  difference means the file changed under the reader, and the read fails
  with EIO instead of mixing two versions;
* for reads outside the current run (a random reader, a seek), the pieces of
  the last runs (``EARLIER_PIECES``, at most ``EARLIER_BYTES``): a change that
  altered bytes a random reader was served fails its later reads too;
* for a pass that starts at offset 0 and reaches the end of the file, the
  whole file's xxh3-128, which the engine records by file identity.

One pass over the bytes: a run from offset 0 feeds only the whole-file
xxh3-128, and its chunk digests are that hash's state at each chunk's end (a
chunk keeps a copy of the state at its start, to replay a re-read from). Only
runs that start elsewhere hash each chunk on its own (xxh3-64). Hashing twice
cost a fifth of the daemon's time on a warm sequential read.

Pure bookkeeping: the engine does the reads and decides what a mismatch means.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

import xxhash

from stfs.backing import FileIdentity

CHECKPOINT_CHUNKS = 5
"""Chunks between two checkpoints."""
MAX_REORDER_BYTES = 4 * 1024 * 1024
"""Bytes served ahead of the hashed position that may wait to be hashed."""
EARLIER_PIECES = 32
"""Pieces of earlier runs (random reads, seeks) kept to verify after a change."""
EARLIER_BYTES = 16 * 1024 * 1024
"""At most this many bytes of earlier pieces are kept (re-read on a change)."""

Keep: TypeAlias = Callable[[], Callable[[], int] | None]
"""Keeps a reply's bytes alive in memory already held (a pinned cached chunk):
returns what gives them back (and says how many budget bytes that freed), or
None when they are not held that way."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """A chunk of a stream as served: ``[start, end)`` and its digest.

    Without *base* the digest is the chunk's own xxh3-64; with it, the digest
    is the xxh3-128 of the run from offset 0 through this chunk, and *base* the
    hash state just before it."""

    start: int
    end: int
    digest: int
    base: xxhash.xxh3_128 | None = dataclasses.field(default=None, compare=False, repr=False)

    def hasher(self) -> xxhash.xxh3_64 | xxhash.xxh3_128:
        """A hash to feed re-read bytes ``[start, end)`` into: its ``intdigest()``
        equals ``digest`` when they are the bytes that were served."""
        return xxhash.xxh3_64() if self.base is None else self.base.copy()

    def digest_of(self, data: bytes | bytearray | memoryview) -> int:
        """What *data*, all of ``[start, end)``, hashes to in this piece's scheme."""
        hasher = self.hasher()
        hasher.update(data)
        return hasher.intdigest()


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a stream had got to, and proof of what it had read."""

    offset: int
    identity: FileIdentity
    digest: int
    """xxh3-64 of the chunk digests since the previous checkpoint."""
    last: Piece
    """The last chunk before *offset*: re-read to verify on resume."""


class StreamVerifier:
    """Hashes one stream's served bytes in file order.

    Out-of-order bytes wait pinned where the caller can *keep* them (see
    ``Keep``), else copied: *reserve* and *release* account the copies in the
    memory budget. When neither works, the run is given up (its checksum is
    just not known) rather than holding memory outside the limit.
    """

    def __init__(self, identity: FileIdentity, reserve: Callable[[int], bool],
                 release: Callable[[int], None]) -> None:
        self.identity = identity
        self._reserve = reserve
        self._release = release
        self.run_start: int | None = 0
        """Where the current run began. A fresh verifier waits for a pass from 0:
        the kernel's first concurrent requests may complete out of order."""
        self.position = 0
        """End of the bytes hashed so far."""
        self.checkpoint: Checkpoint | None = None
        self.checkpoints = 0
        self.pending_pieces: list[Piece] = []
        self._piece_start = 0
        self._piece_hash = xxhash.xxh3_64()
        self._piece_bytes = 0
        self._chain: xxhash.xxh3_128 | None = xxhash.xxh3_128()
        """The run's hash from offset 0 (None for a run that starts elsewhere)."""
        self._piece_base: xxhash.xxh3_128 | None = self._chain.copy()
        self._checksum_open = True
        """Whether ``_chain`` will be the file's checksum once it reaches the end."""
        self._ahead: dict[int, tuple[bytes | memoryview, Callable[[], int]]] = {}
        """Bytes waiting to be hashed by offset, with what gives their memory back."""
        self.ahead_bytes = 0
        self.reserved_bytes = 0
        """Of ``ahead_bytes``, those copied into room reserved in the budget."""
        self.broken: FileIdentity | None = None
        """Set when the stream was failed for a change to this identity."""
        self.earlier: deque[Piece] = deque()
        """Pieces served by earlier runs of this handle, newest last."""
        self._earlier_bytes = 0

    # -- the run ----------------------------------------------------------

    def continues(self, offset: int) -> bool:
        """Whether a request at *offset* goes on from where the run got to
        (a re-read of bytes already served does not)."""
        return (self.run_start is not None
                and self.position <= offset <= self.position + MAX_REORDER_BYTES)

    def served_anything(self) -> bool:
        """Whether this handle was served bytes it still answers for."""
        return bool(self.earlier) or (self.run_start is not None
                                      and self.position > self.run_start)

    def must_verify(self, offset: int) -> bool:
        """Whether a request at *offset*, after a change of the file, may only be
        served if the bytes this handle was served are still the file's. Only a
        request at offset 0 starts afresh (a new pass, or a reader re-reading a
        header, as sqlite does): it gets the new version."""
        return offset > 0 and self.served_anything()

    def reset(self, identity: FileIdentity | None = None) -> None:
        """Forget everything served (a new version served from scratch: under
        *identity*); wait for a pass from 0 again."""
        if identity is not None:
            self.identity = identity
        self.earlier.clear()
        self._earlier_bytes = 0
        self._reset_run()

    def _reset_run(self) -> None:
        self.run_start = 0
        self.position = 0
        self.checkpoint = None
        self.pending_pieces = []
        self._piece_start = 0
        self._piece_bytes = 0
        self._piece_hash.reset()
        self._chain = xxhash.xxh3_128()
        self._piece_base = self._chain.copy()
        self._checksum_open = True
        self.broken = None
        self._drop_ahead()

    def retarget(self, identity: FileIdentity) -> None:
        """The file changed but everything verified: go on under *identity*.

        The whole-file checksum is given up (its bytes spanned two identities)."""
        self.identity = identity
        self._checksum_open = False
        self.checkpoint = None if self.checkpoint is None else dataclasses.replace(
            self.checkpoint, identity=identity)

    def _start(self, offset: int) -> None:
        """Begin a new run at *offset*; the pieces of the one before are kept."""
        self._keep_earlier(self.pieces_to_verify())
        broken = self.broken
        self._reset_run()
        self.broken = broken
        if offset:
            self.run_start = self.position = self._piece_start = offset
            self._chain = self._piece_base = None
            self._checksum_open = False

    def served(self, offset: int, data: bytes | bytearray | memoryview, chunk_size: int,
               sequential: bool = True, keep: Keep | None = None) -> str | None:
        """Account bytes served at *offset*; returns the file's xxh3-128 (hex)
        when this completes a pass over the whole file from offset 0.

        Only a *sequential* request may wait in the reorder buffer for the bytes
        before it; any other request not exactly at ``position`` starts a new run.
        *keep*: how to hold *data* without a copy if it must wait.
        """
        end = offset + len(data)
        overlaps = self.run_start is not None and self.run_start <= offset <= self.position
        if overlaps and end <= self.position:
            return None  # served again (the kernel re-read pages it dropped)
        if not overlaps and (not self.continues(offset) or not sequential):
            self._start(offset)
        if offset > self.position:
            held = self._wait(data, keep)
            if held is None:
                self._start(offset)  # no room to wait for the gap: begin again here
            else:
                self._ahead[offset] = held
                self.ahead_bytes += len(data)
                return None
        self._feed(memoryview(data)[self.position - offset:], chunk_size)
        while self._ahead:
            next_offset = min(self._ahead)
            if next_offset > self.position:
                break
            waiting, give_back = self._ahead.pop(next_offset)
            self.ahead_bytes -= len(waiting)
            if next_offset + len(waiting) > self.position:
                self._feed(memoryview(waiting)[self.position - next_offset:], chunk_size)
            del waiting
            give_back()
        if self._checksum_open and self.position >= self.identity.size:
            assert self._chain is not None and self.run_start == 0
            self._checksum_open = False
            return self._chain.hexdigest()
        return None

    def _wait(self, data: bytes | bytearray | memoryview, keep: Keep | None
              ) -> tuple[bytes | memoryview, Callable[[], int]] | None:
        """*data* held to be hashed later, pinned or copied; None if no room."""
        n = len(data)
        if self.ahead_bytes + n > MAX_REORDER_BYTES:
            return None
        give_back = keep() if keep is not None else None
        if give_back is not None:
            return memoryview(data), give_back
        if not self._reserve(n):
            return None
        self.reserved_bytes += n
        return bytes(data), lambda: self._give_back_copy(n)

    def _give_back_copy(self, n: int) -> int:
        self.reserved_bytes -= n
        self._release(n)
        return n

    def _feed(self, data: memoryview, chunk_size: int) -> None:
        """Hash bytes that start exactly at ``position``."""
        hasher = self._piece_hash if self._chain is None else self._chain
        while len(data):
            room = max(1, chunk_size - self._piece_bytes)
            part = data[:room]
            hasher.update(part)
            self._piece_bytes += len(part)
            self.position += len(part)
            data = data[len(part):]
            if self._piece_bytes >= chunk_size:
                self._close_piece()

    def _current_piece(self) -> Piece:
        """The piece being hashed now, ``[_piece_start, position)``."""
        if self._chain is None:
            return Piece(self._piece_start, self.position, self._piece_hash.intdigest())
        return Piece(self._piece_start, self.position, self._chain.intdigest(), self._piece_base)

    def _close_piece(self) -> None:
        piece = self._current_piece()
        self.pending_pieces.append(piece)
        self._piece_start = self.position
        self._piece_hash.reset()
        if self._chain is not None:
            self._piece_base = self._chain.copy()
        self._piece_bytes = 0
        if len(self.pending_pieces) >= CHECKPOINT_CHUNKS:
            span = xxhash.xxh3_64()
            for p in self.pending_pieces:
                span.update(p.digest.to_bytes(16, "little"))
            self.checkpoint = Checkpoint(self.position, self.identity, span.intdigest(), piece)
            self.checkpoints += 1
            self.pending_pieces = []

    def _keep_earlier(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if self.earlier and self.earlier[-1] == piece:
                continue
            self.earlier.append(piece)
            self._earlier_bytes += piece.end - piece.start
        while self.earlier and (len(self.earlier) > EARLIER_PIECES
                                or self._earlier_bytes > EARLIER_BYTES):
            dropped = self.earlier.popleft()
            self._earlier_bytes -= dropped.end - dropped.start

    def _drop_ahead(self) -> int:
        """Give back every byte waiting to be hashed; the budget bytes that freed."""
        waiting = list(self._ahead.values())
        self._ahead.clear()
        self.ahead_bytes = 0
        freed = 0
        for _data, give_back in waiting:
            freed += give_back()
        return freed

    def free_buffers(self) -> int:
        """Drop bytes waiting to be hashed (emergency cleanup); returns the budget
        bytes that freed (a pinned chunk still cached frees none until evicted).
        The run is given up: its checkpoints and checksum can no longer be trusted
        to cover what was served."""
        if not self._ahead:
            return 0
        freed = self._drop_ahead()
        self._start(0)
        return freed

    # -- verification -----------------------------------------------------

    def pieces_to_verify(self) -> list[Piece]:
        """What to re-read to prove the file unchanged for the current run: the
        last checkpointed chunk, every chunk since, and the chunk being hashed now.
        (``earlier`` holds what earlier runs served.)"""
        pieces = [self.checkpoint.last] if self.checkpoint is not None else []
        pieces.extend(self.pending_pieces)
        if self._piece_bytes:
            pieces.append(self._current_piece())
        return pieces
