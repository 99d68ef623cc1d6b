"""ChunkCache without FUSE: byte-bounded, held in the MemoryBudget, keyed by file
identity, and scan-resistant (2Q: a second open's hit or a ghost re-fetch
protects a chunk; one stream's repeated requests do not)."""

from __future__ import annotations

import random

from stfs.backing import FileIdentity
from stfs.budget import MemoryBudget
from stfs.cache import ChunkCache

KIB = 1024
MIB = 1024 * KIB

FILE = FileIdentity(dev=1, ino=10, size=100 * MIB, mtime_ns=1000, ctime_ns=2000)
BIG = FileIdentity(dev=1, ino=20, size=10 * 1024 * MIB, mtime_ns=1000, ctime_ns=2000)
BIG2 = BIG._replace(ino=21)

SCANNER = 1
HOT_OWNER = 2
SECOND_OPEN = 3


def make(capacity: int, limit: int | None = None) -> tuple[ChunkCache, MemoryBudget]:
    budget = MemoryBudget(limit if limit is not None else 4 * capacity)
    return ChunkCache(capacity, budget), budget


def put(cache: ChunkCache, budget: MemoryBudget, identity: FileIdentity, start: int,
        length: int, owner: int, reserved: int | None = None, fill: int | None = None) -> bytes:
    """Insert a chunk the way the engine does: reserve first, then hand it over."""
    reserved = length if reserved is None else reserved
    assert budget.try_reserve(reserved)
    data = bytes([(start // 4096 + (fill or 0)) % 251]) * length
    cache.insert((identity, start), data, reserved, owner)
    return data


def check_accounting(cache: ChunkCache, budget: MemoryBudget) -> None:
    assert budget.held_bytes == cache.cached_bytes
    assert cache.cached_bytes <= cache.capacity_bytes
    assert cache.cached_bytes == cache.a1in_bytes + cache.am_bytes
    assert len(list(cache.keys())) == len(cache)


# -- accounting ------------------------------------------------------------------

def test_insert_takes_over_the_fetch_reservation() -> None:
    cache, budget = make(1 * MIB)
    put(cache, budget, FILE, 0, 64 * KIB, SCANNER)
    put(cache, budget, FILE, 64 * KIB, 128 * KIB, SCANNER)
    assert cache.cached_bytes == 192 * KIB
    assert budget.held_bytes == cache.cached_bytes


def test_insert_of_a_short_last_chunk_returns_the_unused_reservation() -> None:
    cache, budget = make(1 * MIB)
    put(cache, budget, FILE, 0, 1000, SCANNER, reserved=64 * KIB)
    assert cache.cached_bytes == 1000
    assert budget.held_bytes == 1000


def test_insert_of_a_chunk_already_cached_releases_the_whole_reservation() -> None:
    cache, budget = make(1 * MIB)
    first = put(cache, budget, FILE, 0, 64 * KIB, SCANNER)
    put(cache, budget, FILE, 0, 64 * KIB, HOT_OWNER, fill=7)
    assert budget.held_bytes == cache.cached_bytes == 64 * KIB
    assert cache.lookup(FILE, 0, SCANNER) == (0, first)


def test_insert_of_a_chunk_larger_than_the_capacity_is_not_cached_and_not_held() -> None:
    cache, budget = make(128 * KIB)
    put(cache, budget, FILE, 0, 256 * KIB, SCANNER)
    assert len(cache) == 0
    assert budget.held_bytes == 0


def test_capacity_is_never_exceeded_and_evictions_release_the_budget() -> None:
    cache, budget = make(1 * MIB)
    rng = random.Random(7)
    owners = [SCANNER, HOT_OWNER, SECOND_OPEN]
    identities = [FileIdentity(1, ino, 50 * MIB, 5, 5) for ino in range(1, 6)]
    for _ in range(3000):
        identity = rng.choice(identities)
        length = rng.choice([4 * KIB, 32 * KIB, 64 * KIB, 100 * KIB, 256 * KIB])
        start = rng.randrange(0, 200) * 256 * KIB
        if rng.random() < 0.4:
            cache.lookup(identity, start + rng.randrange(length), rng.choice(owners))
        else:
            put(cache, budget, identity, start, length, rng.choice(owners))
        assert cache.cached_bytes <= cache.capacity_bytes
        assert budget.held_bytes == cache.cached_bytes
    assert cache.evictions > 0
    assert budget.peak_held_bytes <= cache.capacity_bytes + 256 * KIB
    check_accounting(cache, budget)


# -- lookup ------------------------------------------------------------------------

def test_lookup_finds_the_chunk_holding_an_offset_among_chunks_of_different_lengths() -> None:
    cache, budget = make(4 * MIB)
    layout = [(0, 4 * KIB), (4 * KIB, 60 * KIB), (64 * KIB, 128 * KIB),
              (300 * KIB, 1000), (1 * MIB, 256 * KIB)]
    chunks = {start: put(cache, budget, FILE, start, length, SCANNER)
              for start, length in layout}
    for start, length in layout:
        for offset in (start, start + 1, start + length // 2, start + length - 1):
            found = cache.lookup(FILE, offset, SCANNER)
            assert found is not None, offset
            assert found[0] == start
            assert bytes(found[1]) == chunks[start]


def test_lookup_misses_outside_every_chunk() -> None:
    cache, budget = make(4 * MIB)
    put(cache, budget, FILE, 64 * KIB, 64 * KIB, SCANNER)
    put(cache, budget, FILE, 300 * KIB, 1000, SCANNER)
    hits = cache.hits
    for offset in (0, 64 * KIB - 1, 128 * KIB, 200 * KIB, 300 * KIB + 1000, 50 * MIB):
        assert cache.lookup(FILE, offset, SCANNER) is None, offset
    assert cache.hits == hits
    assert cache.misses >= 6


def test_lookup_never_serves_another_file_identity() -> None:
    cache, budget = make(4 * MIB)
    put(cache, budget, FILE, 0, 64 * KIB, SCANNER)
    assert cache.lookup(FILE, 100, SCANNER) is not None
    changed = [
        FILE._replace(mtime_ns=FILE.mtime_ns + 1),    # rewritten in place, same size
        FILE._replace(ctime_ns=FILE.ctime_ns + 1),
        FILE._replace(size=FILE.size + 1),
        FILE._replace(ino=FILE.ino + 1),
        FILE._replace(dev=FILE.dev + 1),
    ]
    for other in changed:
        assert cache.lookup(other, 100, SCANNER) is None, other
        assert cache.lookup(other, 100, SECOND_OPEN) is None, other


def test_a_new_identity_gets_its_own_chunks_beside_the_old_ones() -> None:
    cache, budget = make(4 * MIB)
    new = FILE._replace(mtime_ns=FILE.mtime_ns + 1)
    old_data = put(cache, budget, FILE, 0, 64 * KIB, SCANNER, fill=1)
    new_data = put(cache, budget, new, 0, 64 * KIB, SCANNER, fill=2)
    assert old_data != new_data
    assert cache.lookup(FILE, 10, SCANNER) == (0, old_data)
    assert cache.lookup(new, 10, SCANNER) == (0, new_data)
    assert budget.held_bytes == 128 * KIB


# -- scan resistance (2Q) ------------------------------------------------------------

CAP = 1 * MIB
CHUNK = 16 * KIB
HOT = [i * CHUNK for i in range(8)]          # 128 KiB of hot data in FILE


def scan(cache: ChunkCache, budget: MemoryBudget, n_chunks: int, chunk: int = 64 * KIB,
         identity: FileIdentity = BIG) -> None:
    """One `cat` of a big file: each chunk fetched once, then hit by its own stream."""
    for i in range(n_chunks):
        put(cache, budget, identity, i * chunk, chunk, SCANNER)
        for off in range(0, chunk, 16 * KIB):          # the stream's own requests
            assert cache.lookup(identity, i * chunk + off, SCANNER) is not None


def test_hot_chunks_hit_by_a_second_open_survive_a_long_scan() -> None:
    cache, budget = make(CAP)
    for start in HOT:
        put(cache, budget, FILE, start, CHUNK, HOT_OWNER)
    for start in HOT:
        assert cache.lookup(FILE, start, SECOND_OPEN) is not None   # real reuse
    assert cache.am_bytes == len(HOT) * CHUNK
    scan(cache, budget, 20 * CAP // (64 * KIB))                      # 20x the capacity
    for start in HOT:
        assert (FILE, start) in cache, start
        assert cache.lookup(FILE, start, SECOND_OPEN) is not None
    assert cache.evictions > 0
    check_accounting(cache, budget)


def test_hot_chunks_survive_a_scan_while_being_used_during_it() -> None:
    cache, budget = make(CAP)
    for start in HOT:
        put(cache, budget, FILE, start, CHUNK, HOT_OWNER)
        cache.lookup(FILE, start, SECOND_OPEN)
    for i in range(300):
        put(cache, budget, BIG, i * 64 * KIB, 64 * KIB, SCANNER)
        if i % 10 == 0:
            for start in HOT:
                assert cache.lookup(FILE, start + 5, SECOND_OPEN) is not None, (i, start)
    check_accounting(cache, budget)


def test_repeated_hits_from_the_fetching_stream_do_not_protect_a_chunk() -> None:
    cache, budget = make(CAP)
    for start in HOT:
        put(cache, budget, FILE, start, CHUNK, HOT_OWNER)
    for _ in range(50):                      # one stream's many requests in its chunks
        for start in HOT:
            for off in range(0, CHUNK, 4 * KIB):
                assert cache.lookup(FILE, start + off, HOT_OWNER) is not None
    assert cache.am_bytes == 0
    scan(cache, budget, 20 * CAP // (64 * KIB))
    for start in HOT:
        assert (FILE, start) not in cache, start
        assert cache.lookup(FILE, start, HOT_OWNER) is None
    check_accounting(cache, budget)


def test_a_scan_alone_cycles_through_the_cache_evicting_its_own_oldest_chunks() -> None:
    cache, budget = make(CAP)
    scan(cache, budget, 100)
    assert cache.cached_bytes <= CAP
    assert (BIG, 0) not in cache
    assert (BIG, 99 * 64 * KIB) in cache
    check_accounting(cache, budget)


def test_a_chunk_refetched_while_its_ghost_is_remembered_goes_to_the_protected_part() -> None:
    cache, budget = make(CAP)
    put(cache, budget, FILE, 0, CHUNK, SCANNER)
    scan(cache, budget, 2 * CAP // (64 * KIB))          # pushes it out of A1in
    assert (FILE, 0) not in cache
    am_before = cache.am_bytes
    put(cache, budget, FILE, 0, CHUNK, SCANNER)          # fetched again, same stream even
    assert cache.am_bytes == am_before + CHUNK
    scan(cache, budget, 20 * CAP // (64 * KIB), identity=BIG2)   # another big file
    assert (FILE, 0) in cache                            # protected now
    check_accounting(cache, budget)


def test_a_chunk_refetched_after_its_ghost_is_forgotten_is_not_protected() -> None:
    cache, budget = make(CAP)
    put(cache, budget, FILE, 0, CHUNK, SCANNER)
    # enough single-use chunks to push the ghost out of A1out too
    scan(cache, budget, 2000, chunk=4 * KIB)
    put(cache, budget, FILE, 0, CHUNK, SCANNER)
    assert cache.am_bytes == 0
    scan(cache, budget, 20 * CAP // (64 * KIB), identity=BIG2)
    assert (FILE, 0) not in cache


def test_protected_part_is_lru_and_evicts_its_least_recent_when_it_alone_overflows() -> None:
    cache, budget = make(256 * KIB)
    for i in range(8):                                   # 8 x 32K = the whole capacity
        put(cache, budget, FILE, i * 32 * KIB, 32 * KIB, HOT_OWNER)
        cache.lookup(FILE, i * 32 * KIB, SECOND_OPEN)
    cache.lookup(FILE, 0, SECOND_OPEN)                   # chunk 0 most recent now
    put(cache, budget, FILE, 8 * 32 * KIB, 32 * KIB, HOT_OWNER)
    put(cache, budget, FILE, 9 * 32 * KIB, 32 * KIB, HOT_OWNER)
    cache.lookup(FILE, 8 * 32 * KIB, SECOND_OPEN)
    cache.lookup(FILE, 9 * 32 * KIB, SECOND_OPEN)
    assert (FILE, 0) in cache
    assert (FILE, 32 * KIB) not in cache                 # least recently used
    check_accounting(cache, budget)


# -- reclaim and clear ------------------------------------------------------------------

def fill(cache: ChunkCache, budget: MemoryBudget, n: int, length: int = 64 * KIB) -> None:
    for i in range(n):
        put(cache, budget, BIG, i * length, length, SCANNER)


def test_reclaim_frees_at_least_the_bytes_asked_for() -> None:
    cache, budget = make(1 * MIB)
    fill(cache, budget, 16)
    before = budget.held_bytes
    freed = cache.reclaim(100 * KIB)
    assert freed >= 100 * KIB
    assert freed == before - budget.held_bytes
    assert budget.held_bytes == cache.cached_bytes
    assert cache.reclaim(0) == 0
    assert cache.reclaim(-5) == 0


def test_reclaim_frees_everything_when_asked_for_more_than_is_cached() -> None:
    cache, budget = make(1 * MIB)
    fill(cache, budget, 4)
    assert cache.reclaim(10 * MIB) == 256 * KIB
    assert cache.cached_bytes == 0
    assert budget.held_bytes == 0


def test_reclaim_never_goes_below_the_floor() -> None:
    cache, budget = make(1 * MIB)
    fill(cache, budget, 16)                  # 16 x 64K
    cache.floor_bytes = 640 * KIB
    freed = cache.reclaim(10 * MIB)
    assert cache.cached_bytes == 640 * KIB
    assert freed == 1 * MIB - 640 * KIB
    assert budget.held_bytes == cache.cached_bytes
    assert cache.reclaim(64 * KIB) == 0      # already at the floor
    cache.floor_bytes = 0
    assert cache.reclaim(64 * KIB) == 64 * KIB


def test_an_empty_chunk_does_not_stop_eviction_or_reclaim() -> None:
    """A read at or past the end of a file caches a zero-length chunk; evicting it
    frees 0 bytes, which must not be taken for "nothing left to evict"."""
    cache, budget = make(1 * MIB)
    assert budget.try_reserve(64 * KIB)
    cache.insert((FILE, FILE.size), b"", 64 * KIB, SCANNER)      # past end of file
    assert budget.held_bytes == 0
    fill(cache, budget, 16)                                      # exactly the capacity
    freed = cache.reclaim(100 * KIB)
    assert freed >= 100 * KIB
    assert budget.held_bytes == cache.cached_bytes
    # and the capacity holds on insert too
    cache2, budget2 = make(1 * MIB)
    fill(cache2, budget2, 15)
    assert budget2.try_reserve(4 * KIB)
    cache2.insert((FILE, FILE.size), b"", 4 * KIB, SCANNER)
    fill(cache2, budget2, 17)                                    # pushes out the empty one
    assert cache2.cached_bytes <= cache2.capacity_bytes


def test_reclaim_is_the_budgets_way_to_make_room_for_a_demand_reservation() -> None:
    import trio

    cache, budget = make(1 * MIB, limit=1 * MIB)
    budget.set_reclaimer(cache.reclaim)
    fill(cache, budget, 16)                  # budget full of cache

    async def main() -> None:
        with trio.fail_after(10):                    # a hang, not a slow machine
            await budget.reserve(200 * KIB)

    trio.run(main)
    assert cache.cached_bytes <= 1 * MIB - 200 * KIB
    assert budget.held_bytes == cache.cached_bytes + 200 * KIB <= budget.limit_bytes


def test_clear_releases_everything() -> None:
    cache, budget = make(1 * MIB)
    for start in HOT:
        put(cache, budget, FILE, start, CHUNK, HOT_OWNER)
        cache.lookup(FILE, start, SECOND_OPEN)
    fill(cache, budget, 8)
    assert cache.am_bytes > 0 and cache.a1in_bytes > 0
    cache.clear()
    assert len(cache) == 0
    assert cache.cached_bytes == 0
    assert budget.held_bytes == 0
    assert cache.lookup(FILE, 0, SECOND_OPEN) is None
    assert cache.lookup(BIG, 0, SCANNER) is None
