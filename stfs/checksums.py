"""Whole-file checksums kept between mounts, in ``--state-dir/checksums.sqlite``.

A checksum is the xxh3-128 of a file's bytes, computed in the same pass that
served them (``recovery.StreamVerifier``), and recorded under the file's
identity (device, inode, size, mtime_ns, ctime_ns). The same identity must
always mean the same bytes: when a later full pass of an identity gives a
different checksum, SOURCE changed without its metadata saying so (silent
corruption of the backing store). The first checksum recorded is kept; each
mismatch is reported to the caller.

Except for racy records (as git calls racily clean index entries): a file
written again within its file system's timestamp granularity keeps its
identity. A checksum recorded less than that granularity after the file's
ctime may therefore belong to an earlier write; a mismatch with it replaces
it instead of being reported.

SQLite (standard library) gives atomic updates and safe concurrent use by
several mounts sharing one state directory. Every method blocks: the daemon
calls them from worker threads. A store that cannot be opened or written is
reported once with a warning and then ignored: checksums are a safety net,
never a reason to fail a read.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import trio

from stfs import lru
from stfs.backing import FileIdentity
from stfs.metrics import Counters

log = logging.getLogger(__name__)

XATTR_NAME = b"user.stfs.xxh3_128"
FINE_RACY_NS = 100_000_000
"""Racy window for file systems with sub-second timestamps."""
COARSE_RACY_NS = 2_000_000_000
"""Racy window when ctime is a whole second (1 s or 2 s timestamp granularity)."""
BUSY_TIMEOUT_S = 5.0
SQLITE_CACHE_KIB = 256
"""sqlite page cache of the checksum store."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS checksums (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    xxh3_128 TEXT NOT NULL, path BLOB NOT NULL, recorded_at_ns INTEGER NOT NULL,
    PRIMARY KEY (dev, ino, size, mtime_ns, ctime_ns)
) WITHOUT ROWID
"""


def racy_window_ns(ctime_ns: int) -> int:
    """How long after *ctime_ns* the same timestamps may still be given to a new
    write: whole-second times suggest a coarse file system."""
    return COARSE_RACY_NS if ctime_ns % 1_000_000_000 == 0 else FINE_RACY_NS


class ChecksumStore:
    """Checksums by file identity; thread-safe (one connection, opened on first use)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "checksums.sqlite"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._failed = False

    def _db(self) -> sqlite3.Connection | None:
        if self._failed or self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # Lookups are by primary key: a small page cache does, and keeps
                # the daemon's RSS from growing with the table (default 2 MiB).
                db.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
                db.execute(_SCHEMA)
                db.execute("SELECT xxh3_128 FROM checksums LIMIT 1").fetchall()
            except BaseException:
                db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            self._give_up(exc)
            return None
        self._conn = db
        return db

    def _give_up(self, exc: Exception) -> None:
        if not self._failed:
            log.warning("checksum store %s unusable, checksums are not kept: %s", self.path, exc)
        self._failed = True

    def open(self) -> bool:
        """Open the database now (at mount, so its descriptors count as idle ones);
        whether it is usable."""
        with self._lock:
            return self._db() is not None

    def get(self, identity: FileIdentity) -> str | None:
        """The recorded checksum of *identity*, if any."""
        with self._lock:
            return self._get(identity)

    def _get(self, identity: FileIdentity) -> str | None:
        db = self._db()
        if db is None:
            return None
        try:
            row = db.execute(
                "SELECT xxh3_128 FROM checksums WHERE dev=? AND ino=? AND size=? "
                "AND mtime_ns=? AND ctime_ns=?", tuple(identity)).fetchone()
        except sqlite3.Error as exc:
            self._give_up(exc)
            return None
        return str(row[0]) if row else None

    def record(self, identity: FileIdentity, digest: str, path: bytes | str) -> str | None:
        """Record *digest* for *identity* unless one is known; returns the
        previously recorded checksum when it differs (None otherwise)."""
        key = tuple(identity)
        now_ns = time.time_ns()
        with self._lock:
            db = self._db()
            if db is None:
                return None
            try:
                db.execute("INSERT OR IGNORE INTO checksums VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (*key, digest, os.fsencode(path), now_ns))
                known, recorded_at_ns = db.execute(
                    "SELECT xxh3_128, recorded_at_ns FROM checksums WHERE dev=? AND ino=? "
                    "AND size=? AND mtime_ns=? AND ctime_ns=?", key).fetchone()
                if known == digest:
                    return None
                if recorded_at_ns - identity.ctime_ns < racy_window_ns(identity.ctime_ns):
                    log.info("%s: rewritten within its timestamp granularity; its checksum is "
                             "updated", os.fsdecode(path))
                    db.execute("UPDATE checksums SET xxh3_128=?, recorded_at_ns=? WHERE dev=? "
                               "AND ino=? AND size=? AND mtime_ns=? AND ctime_ns=?",
                               (digest, now_ns, *key))
                    return None
            except (sqlite3.Error, TypeError) as exc:
                self._give_up(exc)
                return None
        return str(known)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


RECENT_CHECKSUMS = 4096
"""Whole-file checksums of this session kept in memory."""


class ChecksumRegistry:
    """The checksums the read path computes: kept in memory, recorded in the
    store (in a worker thread) and compared with what the store knew.

    A mismatch with a recorded checksum of the same identity is logged as
    ``SOURCE CORRUPTION`` and counted; the recorded checksum stands.
    """

    def __init__(self, store: ChecksumStore | None, counters: Counters) -> None:
        self.store = store
        self.counters = counters
        self._recent: collections.OrderedDict[FileIdentity, str] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Where records into the store run (None: they are not recorded)."""
        self._nursery = nursery

    def completed(self, path: bytes, identity: FileIdentity, digest: str) -> None:
        """A pass read the whole file *identity* and its bytes hash to *digest*."""
        self.counters.checksums_computed += 1
        self._remember(identity, digest)
        if self.store is not None and self._nursery is not None:
            self._nursery.start_soon(self._record, path, identity, digest)

    async def lookup(self, identity: FileIdentity) -> str | None:
        """The known whole-file checksum of *identity* (this session or the store)."""
        known = self._recent.get(identity)
        if known is None and self.store is not None:
            known = await trio.to_thread.run_sync(self.store.get, identity)
        return known

    def known(self) -> dict[FileIdentity, str]:
        """The checksums of this session, oldest first."""
        return dict(self._recent)

    def _remember(self, identity: FileIdentity, digest: str) -> None:
        lru.remember(self._recent, identity, digest, RECENT_CHECKSUMS)

    async def _record(self, path: bytes, identity: FileIdentity, digest: str) -> None:
        assert self.store is not None
        try:
            previous = await trio.to_thread.run_sync(self.store.record, identity, digest, path)
        except Exception:  # a background task: never take the mount down
            log.exception("could not record the checksum of %s", os.fsdecode(path))
            return
        if previous is not None:
            self._remember(identity, previous)  # the recorded one stands
            self.counters.corruptions_detected += 1
            log.error("SOURCE CORRUPTION: %s read as xxh3-128 %s, but %s when last read with "
                      "the same size, mtime and ctime: its bytes changed without its metadata",
                      os.fsdecode(path), digest, previous)
