"""The persistent chunk cache (``--cache-dir``) through real mounts: what a remount
reads, what it must never serve, what it survives, what it refuses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stfs.disk_store import parse_name
from tests.conftest import force_unmount, is_mounted, run_stfs, wait_for
from tests.faultfs import FaultFS, faultfs_mount
from tests.mount.test_containers import (  # the cgroup fixtures and helpers
    Group,
    Watch,
    check_group_and_daemon,
    files,
    group,
    idle_rss,
    own_v1_group,
    read_through,
    uncache,
)

__all__ = ["files", "group", "idle_rss"]  # fixtures, used by name

MIB = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> Path:
    src = tmp_path / "store"
    src.mkdir()
    for i, size in enumerate((5 * MIB + 4321, 2 * MIB, 70_000, 1)):
        (src / f"f{i}.bin").write_bytes(os.urandom(size))
    return src


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


def digests(root: Path) -> dict[str, str]:
    """sha256sum of every regular file under *root*, as a program reads them."""
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    out = subprocess.run(["sha256sum", *names], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def entries(cache_dir: Path) -> list[str]:
    return sorted(os.listdir(cache_dir / "chunks"))


def test_a_remount_reads_from_the_disk_cache_not_from_source(mounter, store: Path,  # type: ignore[no-untyped-def]
                                                             cache_dir: Path) -> None:
    want = digests(store)
    args = ("--cache-dir", str(cache_dir), "--cache-size", "64M")
    first = mounter(store, *args)
    assert digests(first.mountpoint) == want
    stats = first.stats()
    assert stats["disk_cache_dir"] == str(cache_dir)
    assert stats["disk_cache_writes"] > 0  # type: ignore[operator]
    assert first.unmount() == 0
    assert entries(cache_dir)
    listing = run_stfs("cache", str(cache_dir))
    assert listing.returncode == 0 and f"{len(entries(cache_dir))} entries" in listing.stdout
    assert "not in use" in listing.stdout

    second = mounter(store, *args)
    assert digests(second.mountpoint) == want
    stats = second.stats()
    assert stats["backing_reads"] == 0, stats  # not one byte of file data from SOURCE
    assert stats["disk_cache_hits"] > 0 and stats["disk_cache_verify_failures"] == 0  # type: ignore[operator]
    assert stats["disk_cache_hit_bytes"] >= sum(  # type: ignore[operator]
        p.stat().st_size for p in store.iterdir())
    table = run_stfs("stats", str(second.mountpoint))
    assert f"Disk cache ({cache_dir})" in table.stdout
    prom = run_stfs("stats", "--prometheus", str(second.mountpoint)).stdout
    assert "stfs_disk_cache_hits_total" in prom and "stfs_disk_cache_bytes" in prom
    in_use = run_stfs("cache", str(cache_dir))
    assert f"in use by the stfs mount of pid {second.pid}" in in_use.stdout


def rewrite_same_size_and_mtime(path: Path) -> None:
    st = path.stat()
    path.write_bytes(os.urandom(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells


def touch_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def replace_by_rename(path: Path) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(os.urandom(path.stat().st_size))
    os.rename(tmp, path)


@pytest.mark.parametrize("change", [rewrite_same_size_and_mtime, touch_mtime, replace_by_rename])
def test_a_changed_file_is_read_from_source_again(mounter, store: Path, cache_dir: Path,  # type: ignore[no-untyped-def]
                                                  change) -> None:  # type: ignore[no-untyped-def]
    args = ("--cache-dir", str(cache_dir), "--cache-size", "64M")
    first = mounter(store, *args)
    digests(first.mountpoint)
    assert first.unmount() == 0
    change(store / "f0.bin")
    want = digests(store)
    second = mounter(store, *args)
    assert digests(second.mountpoint) == want
    stats = second.stats()
    assert stats["backing_reads"] > 0  # type: ignore[operator]
    # Only the changed file was read again: the others came from the disk.
    assert stats["disk_cache_hits"] > 0  # type: ignore[operator]


def test_a_file_changed_while_mounted_is_not_served_from_the_disk(mounter, store: Path,  # type: ignore[no-untyped-def]
                                                                  cache_dir: Path) -> None:
    args = ("--cache-dir", str(cache_dir), "--cache-size", "64M", "--attr-timeout", "0")
    m = mounter(store, *args)
    digests(m.mountpoint)
    rewrite_same_size_and_mtime(store / "f1.bin")
    assert digests(m.mountpoint) == digests(store)


def test_a_damaged_cache_file_is_caught_and_the_right_bytes_served(mounter, store: Path,  # type: ignore[no-untyped-def]
                                                                   cache_dir: Path) -> None:
    args = ("--cache-dir", str(cache_dir), "--cache-size", "64M")
    want = digests(store)
    first = mounter(store, *args)
    digests(first.mountpoint)
    assert first.unmount() == 0
    damaged = 0
    for name in entries(cache_dir):
        key = parse_name(name)
        assert key is not None
        if key.length > 4096:  # every big entry gets one bit flipped, mid-chunk
            path = cache_dir / "chunks" / name
            with open(path, "r+b") as f:
                f.seek(key.length // 2)
                byte = f.read(1)
                f.seek(key.length // 2)
                f.write(bytes([byte[0] ^ 0x10]))
            damaged += 1
    assert damaged
    second = mounter(store, *args, allow_log=("failed its check",))
    assert digests(second.mountpoint) == want
    stats = second.stats()
    # Each damaged entry read is caught (one whose bytes another entry also holds,
    # from chunks of other boundaries, may never be read) and its bytes read again.
    assert 1 <= stats["disk_cache_verify_failures"] <= damaged  # type: ignore[operator]
    assert stats["backing_reads"] >= stats["disk_cache_verify_failures"]  # type: ignore[operator]


@pytest.fixture
def store_fs(tmp_path: Path) -> Iterator[FaultFS]:
    """SOURCE behind faultfs (requested before ``mounter``: stfs goes first)."""
    with faultfs_mount(tmp_path) as fs:
        yield fs


def test_kill_9_during_a_fill_then_a_remount_reads_right(store_fs: FaultFS, mounter,  # type: ignore[no-untyped-def]
                                                         cache_dir: Path) -> None:
    fs = store_fs
    (fs.backing / "big.bin").write_bytes(os.urandom(48 * MIB))
    want = digests(fs.backing)
    args = ("--cache-dir", str(cache_dir), "--cache-size", "256M", "--memory-limit", "8M")
    victim = mounter(fs.mountpoint, *args)
    reader = open(victim.mountpoint / "big.bin", "rb", buffering=0)  # noqa: SIM115
    try:
        got = 0
        while got < 8 * MIB:  # a reader part way through: read-ahead is filling beyond
            got += len(reader.read(MIB))
        # The store stops answering (what is in flight lands first): the fill is cut
        # in the middle of the file, with chunks landed and being written. Then
        # the daemon is killed.
        with fs.held("big.bin"):
            assert wait_for(lambda: len(entries(cache_dir)) >= 4, 60)
            os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(30)  # its reads at the store end once the hold does
    finally:
        with contextlib.suppress(OSError):
            reader.close()
        force_unmount(victim.mountpoint)
    filled = len(entries(cache_dir))
    # A write cut short by a crash, as it would be left in tmp/.
    (cache_dir / "tmp" / "torn.1.0").write_bytes(b"half an entry")
    second = mounter(fs.mountpoint, *args)
    assert not os.listdir(cache_dir / "tmp")
    assert digests(second.mountpoint) == want
    stats = second.stats()
    assert stats["disk_cache_verify_failures"] == 0
    assert stats["disk_cache_hits"] >= min(filled, 1)  # type: ignore[operator]
    assert second.unmount() == 0


def test_a_cache_smaller_than_the_working_set_stays_within_its_size(mounter, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                    cache_dir: Path) -> None:
    src = tmp_path / "many"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.bin").write_bytes(os.urandom(4 * MIB))
    want = digests(src)
    size = 5 * MIB
    m = mounter(src, "--cache-dir", str(cache_dir), "--cache-size", str(size))
    for _ in range(2):
        assert digests(m.mountpoint) == want
    stats = m.stats()
    assert stats["disk_cache_bytes"] <= size and stats["disk_cache_evictions"] > 0  # type: ignore[operator]
    assert m.unmount() == 0
    used = sum(os.lstat(os.path.join(d, f)).st_blocks * 512
               for d, dirs, files in os.walk(cache_dir) for f in (*files, *dirs))
    used += os.lstat(cache_dir).st_blocks * 512
    assert used <= size, used


def test_a_second_mount_on_the_same_cache_dir_is_refused(mounter, store: Path,  # type: ignore[no-untyped-def]
                                                         cache_dir: Path, tmp_path: Path) -> None:
    first = mounter(store, "--cache-dir", str(cache_dir))
    other = tmp_path / "other"
    other.mkdir()
    for foreground in (["-f"], []):
        result = run_stfs("mount", *foreground, "--cache-dir", str(cache_dir), str(store),
                          str(other))
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stfs: --cache-dir ")
        assert f"in use by another stfs mount (pid {first.pid})" in lines[0]
        assert not is_mounted(other)
    refused = run_stfs("cache", "--clear", str(cache_dir))
    assert refused.returncode == 1
    assert refused.stderr == (f"stfs: {cache_dir}: in use by the stfs mount of pid "
                              f"{first.pid}; unmount it first\n")
    assert digests(first.mountpoint) == digests(store)  # the owner goes on unharmed


def test_clearing_the_cache_between_mounts(mounter, store: Path, cache_dir: Path) -> None:  # type: ignore[no-untyped-def]
    first = mounter(store, "--cache-dir", str(cache_dir))
    digests(first.mountpoint)
    assert first.unmount() == 0
    assert entries(cache_dir)
    held = len(entries(cache_dir))
    shown = run_stfs("cache", str(cache_dir))
    assert shown.returncode == 0
    assert shown.stdout.startswith(f"{cache_dir}: {held} entr") and "(not in use)" in shown.stdout
    cleared = run_stfs("cache", "--clear", str(cache_dir))
    assert cleared.returncode == 0
    assert cleared.stdout.startswith(f"{cache_dir}: removed {held} entr")
    assert not (cache_dir / "chunks").exists() or not entries(cache_dir)
    second = mounter(store, "--cache-dir", str(cache_dir))
    assert digests(second.mountpoint) == digests(store)
    assert second.stats()["disk_cache_hits"] == 0


def test_the_options_work_from_o_as_fstab_gives_them(mounter, store: Path,  # type: ignore[no-untyped-def]
                                                     cache_dir: Path) -> None:
    m = mounter(store, "-o", f"cache_dir={cache_dir},cache_size=32M,memory_cache_size=8M")
    stats = m.stats()
    assert stats["disk_cache_limit_bytes"] == 32 * MIB
    # The disk cache's index (1/16 of the limit) comes out of the memory cache's share.
    assert stats["disk_cache_index_bytes"] == 50 * MIB // 16
    assert stats["cache_limit_bytes"] == 8 * MIB - 50 * MIB // 16


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def refused(*args: str, mountpoint: Path) -> str:
    result = run_stfs("mount", *args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stfs: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mountpoint)
    return lines[0]


def test_bad_cache_dirs_and_sizes_get_one_line_and_exit_2(store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    base = (str(store), str(mnt))
    assert "no such file or directory" in refused(
        "--cache-dir", str(tmp_path / "missing"), *base, mountpoint=mnt)
    (tmp_path / "afile").write_bytes(b"")
    assert "not a directory" in refused("--cache-dir", str(tmp_path / "afile"), *base,
                                        mountpoint=mnt)
    assert "too small for a disk cache" in refused(
        "--cache-dir", str(tmp_path), "--cache-size", "512K", *base, mountpoint=mnt)
    assert "more than the file system" in refused(
        "--cache-dir", str(tmp_path), "--cache-size", "100000G", *base, mountpoint=mnt)
    with tmpfs(tmp_path / "ro", "ro,size=16m") as ro:
        assert "not writable" in refused("--cache-dir", str(ro), *base, mountpoint=mnt)
    with tmpfs(tmp_path / "full", "size=1m") as full:
        assert "too full for a cache" in refused("--cache-dir", str(full), *base,
                                                 mountpoint=mnt)


# -- inside a memory cgroup ----------------------------------------------------------



@pytest.mark.skipif(own_v1_group() is None or os.geteuid() != 0,
                    reason="needs root and a v1 memory controller")
def test_a_disk_cache_fills_and_serves_inside_a_memory_cgroup(  # type: ignore[no-untyped-def]
        group: Group, mounter, files: tuple[Path, dict[str, str]], idle_rss: int,
        cache_dir: Path) -> None:
    """16 readers through a 50M mount fitted into idle + 48 MiB: 256 MiB written to
    the disk cache (its page cache charged to the group) and read back after a
    remount, with no OOM kill and RSS within idle + budget + 16 MiB."""
    src, want = files
    group.limit(idle_rss + 48 * MIB)
    args = ("--memory-limit", "50M", "--cache-dir", str(cache_dir), "--cache-size", "512M")
    for fill in (True, False):
        uncache(src)
        mount = mounter(src, *args, prefix=group.prefix(), allow_log=("lowered to",))
        with Watch(mount) as watch:
            got = read_through(mount, want, group)
        assert got == [want[name] for name in sorted(want)]
        check_group_and_daemon(group, mount, watch, idle_rss)
        stats = mount.stats()
        if fill:
            assert stats["disk_cache_writes"] > 0  # type: ignore[operator]
        else:
            assert stats["disk_cache_hits"] > 0 and stats["disk_cache_verify_failures"] == 0  # type: ignore[operator]
        assert mount.unmount() == 0
        assert group.oom_kills() == 0
