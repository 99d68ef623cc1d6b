"""stfs under real memory pressure: inside a memory control group with a hog.

The group is made as a child of this process's own memory cgroup (found in
/proc/self/cgroup; v1 or v2) and removed afterwards.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount, wait_for

MIB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
_serial = itertools.count()


def own_memory_cgroup() -> tuple[Path, str] | None:
    """(directory, version) of this process's memory cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/"), "v1"
        if controllers == "" and (CGROUP_ROOT / "cgroup.controllers").exists():
            return CGROUP_ROOT / path.lstrip("/"), "v2"
    return None


@pytest.fixture
def memory_cgroup() -> Iterator[tuple[Path, str]]:
    found = own_memory_cgroup()
    if found is None or os.geteuid() != 0:
        pytest.skip("needs root and a memory cgroup")
    parent, version = found
    group = parent / f"stfs-test-{os.getpid()}-{next(_serial)}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a child memory cgroup: {exc}")
    try:
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        (group / limit_file).write_text(f"{320 * MIB}\n")
        yield group, version
    finally:
        # The mount fixture (requested after this one) has ended the daemon by now.
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"could not remove the test cgroup {group}")


def in_group(group: Path) -> list[str]:
    """A command prefix that runs the command inside *group*."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]


def read_all(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return b"".join(iter(lambda: f.read(128 * 1024), b""))


@pytest.fixture
def pressure_source(tmp_path: Path) -> Path:
    src = tmp_path / "pressure-source"
    src.mkdir()
    for i in range(16):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(4 * MIB + i))
    return src


def test_sixteen_readers_in_a_memory_limited_cgroup_get_every_byte(
        memory_cgroup: tuple[Path, str], mounter, pressure_source: Path) -> None:
    group, _ = memory_cgroup
    mount: Mount = mounter(pressure_source, "--memory-limit", "16M",
                           prefix=in_group(group))
    assert str(mount.pid) in (group / "cgroup.procs").read_text().split()
    idle = mount.stats()["rss_bytes"]
    names = sorted(p.name for p in pressure_source.iterdir())
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda n: hashlib.sha256(read_all(mount.mountpoint / n)).digest(),
                            names))
    assert got == [hashlib.sha256((pressure_source / n).read_bytes()).digest() for n in names]
    # The monitor found the group's limit (one snapshot a second).
    assert wait_for(lambda: mount.stats()["cgroup_memory_limit_bytes"] == 320 * MIB, 30)
    stats = mount.stats()
    assert stats["errors"] == 0
    assert stats["peak_held_bytes"] <= 16 * MIB
    assert stats["rss_bytes"] <= idle + 16 * MIB + 16 * MIB  # type: ignore[operator]


def test_a_hog_in_the_cgroup_raises_the_level_and_it_falls_back_after(
        memory_cgroup: tuple[Path, str], mounter, pressure_source: Path) -> None:
    group, _ = memory_cgroup
    mount: Mount = mounter(pressure_source, "--memory-limit", "16M", "--monitor-interval", "0.2",
                           prefix=in_group(group), allow_log=("pressure",))
    assert wait_for(lambda: mount.stats()["pressure_level"] == "none", 30)
    hog = subprocess.Popen(
        [*in_group(group), sys.executable, "-c",
         "import sys, time; b = b'x' * (250 << 20); print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
        assert wait_for(lambda: mount.stats()["pressure_level"] != "none", 30)
        stats = mount.stats()
        assert stats["memory_use_pct"] > 60
        # Reads go on, right, while the level is up.
        names = sorted(p.name for p in pressure_source.iterdir())[:4]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda n: read_all(mount.mountpoint / n), names))
        assert got == [(pressure_source / n).read_bytes() for n in names]
    finally:
        hog.send_signal(signal.SIGKILL)
        hog.wait(10)
    assert wait_for(lambda: mount.stats()["pressure_level"] == "none", 30), str(
        [mount.stats()[k] for k in ("pressure_level", "memory_use_pct", "rss_bytes",
                                     "held_bytes", "cache_bytes", "concurrency_cap")])
    stats = mount.stats()
    assert stats["pressure_level_changes"] >= 2
    assert stats["errors"] == 0
    assert "pressure none ->" in mount.log()
