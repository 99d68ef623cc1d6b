"""stfs inside a memory-limited control group, as in a container (issue 15).

Each test makes a child v1 memory cgroup of this process's own (skipped where
the memory controller is not writable), starts the daemon inside it and reads
through the mount with 16 small C readers (``sha256sum``), outside the group
or inside it (their page cache then counts too). Every read must return the
right bytes, the group must see no OOM kill, the daemon's budget must be the
one fitted to the group and its RSS within idle + budget + 16 MiB. The group
is removed in all outcomes (processes moved out first).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest

from stfs import cgroup
from tests.conftest import STFS, Mount, wait_for

MIB = 1024 * 1024
READERS = 16
FILE_BYTES = 16 * MIB
LEVELS = ["none", "light", "moderate", "heavy", "critical"]
_serial = itertools.count()


def own_v1_group() -> cgroup.MemoryGroup | None:
    group = cgroup.find_memory_group()
    return group if group is not None and group.version == 1 else None


pytestmark = pytest.mark.skipif(own_v1_group() is None or os.geteuid() != 0,
                                reason="needs root and a v1 memory controller")


class Group:
    """A child memory cgroup of our own; ``remove`` moves stragglers out first."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self.path = parent / f"stfs-test-containers-{os.getpid()}-{next(_serial)}"
        self.path.mkdir()

    def limit(self, n_bytes: int) -> None:
        (self.path / "memory.limit_in_bytes").write_text(str(n_bytes))

    def prefix(self) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def read_int(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def oom_kills(self) -> int:
        return cgroup.MemoryGroup(1, self.path, self.parent).events()["oom_kill"]

    def remove(self) -> None:
        for _ in range(100):
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.parent / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"could not remove the test cgroup {self.path}")


@pytest.fixture
def group() -> Iterator[Group]:
    parent = own_v1_group()
    assert parent is not None
    try:
        made = Group(parent.path)
    except OSError as exc:
        pytest.skip(f"cannot create a child memory cgroup: {exc}")
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    src = tmp_path_factory.mktemp("containers-source")
    digests = {}
    for i in range(READERS):
        data = os.urandom(FILE_BYTES)
        (src / f"f{i:02d}.bin").write_bytes(data)
        digests[f"f{i:02d}.bin"] = hashlib.sha256(data).hexdigest()
    return src, digests


def stat_int(value: object) -> int:
    assert isinstance(value, int)
    return value


def uncache(src: Path) -> None:
    """Drop SOURCE's pages, so the daemon's reads bring them in (charged to its group)."""
    for path in src.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture(scope="module")
def idle_rss(tmp_path_factory: pytest.TempPathFactory) -> int:
    """The daemon's idle RSS, from a mount in an unlimited child group."""
    parent = own_v1_group()
    assert parent is not None
    made = Group(parent.path)
    root = tmp_path_factory.mktemp("idle")
    (root / "src").mkdir()
    (root / "mnt").mkdir()
    mount = Mount(root / "src", root / "mnt", root / "stfs.log", [], made.prefix())
    try:
        mount.start()
        time.sleep(1.0)
        return stat_int(mount.stats()["rss_bytes"])
    finally:
        mount.unmount()
        made.remove()


class Watch:
    """Samples the daemon's stats while readers run: levels, RSS, budgets."""

    def __init__(self, mount: Mount) -> None:
        self.mount = mount
        self.levels: list[str] = []
        self.rss: list[int] = []
        self.budgets: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                stats = self.mount.stats()
            except AssertionError:
                return  # the daemon is gone; the test says why
            self.levels.append(str(stats["pressure_level"]))
            self.rss.append(stat_int(stats["rss_bytes"]))
            self.budgets.append(stat_int(stats["memory_limit_bytes"]))
            time.sleep(0.1)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def top_level(self) -> str:
        return max(self.levels, key=LEVELS.index, default="none")


def read_through(mount: Mount, digests: dict[str, str], inside: Group | None) -> list[str]:
    """sha256 of every file through the mount, one reader process each."""
    def one(name: str) -> str:
        command = ["sha256sum", str(mount.mountpoint / name)]
        result = subprocess.run([*inside.prefix(), *command] if inside else command,
                                capture_output=True, text=True, timeout=120, check=False)
        return result.stdout.split()[0] if result.returncode == 0 else result.stderr.strip()

    with concurrent.futures.ThreadPoolExecutor(len(digests)) as pool:
        return list(pool.map(one, sorted(digests)))


def check_group_and_daemon(group: Group, mount: Mount, watch: Watch, idle_rss: int) -> None:
    assert group.oom_kills() == 0
    assert mount.proc is not None and mount.proc.poll() is None
    stats = mount.stats()
    assert stats["errors"] == 0
    assert watch.rss, "no stats sample while reading"
    assert max(watch.rss) <= idle_rss + max(watch.budgets) + 16 * MIB


@pytest.mark.parametrize("readers_inside", [False, True], ids=["readers-outside",
                                                                 "readers-inside"])
def test_the_issue_scenario_fits_idle_plus_48m_at_memory_limit_50m(
        group: Group, mounter: Callable[..., Mount], files: tuple[Path, dict[str, str]],
        idle_rss: int, readers_inside: bool) -> None:
    src, digests = files
    group.limit(idle_rss + 48 * MIB)
    uncache(src)
    mount: Mount = mounter(src, "--memory-limit", "50M", prefix=group.prefix(),
                           allow_log=("lowered to",))
    stats = mount.stats()
    budget = stat_int(stats["memory_limit_bytes"])
    assert budget < 50 * MIB
    assert stats["memory_limit_requested_bytes"] == 50 * MIB
    assert str(stats["memory_limit_source"]).startswith(f"cgroup v1 {group.path}/")
    assert stats["cgroup_memory_limit_bytes"] == idle_rss + 48 * MIB
    assert "--memory-limit 50.0 MiB lowered to" in mount.log()
    with Watch(mount) as watch:
        got = read_through(mount, digests, group if readers_inside else None)
    assert got == [digests[name] for name in sorted(digests)]
    check_group_and_daemon(group, mount, watch, idle_rss)


def test_idle_plus_24m_with_the_default_budget(
        group: Group, mounter: Callable[..., Mount], files: tuple[Path, dict[str, str]],
        idle_rss: int) -> None:
    src, digests = files
    group.limit(idle_rss + 24 * MIB)
    uncache(src)
    mount: Mount = mounter(src, prefix=group.prefix(), allow_log=("lowered to",))
    assert stat_int(mount.stats()["memory_limit_bytes"]) < 20 * MIB
    with Watch(mount) as watch:
        got = read_through(mount, digests, group)
    assert got == [digests[name] for name in sorted(digests)]
    check_group_and_daemon(group, mount, watch, idle_rss)


def test_a_hog_in_the_group_shrinks_the_budget_raises_the_level_and_reads_go_on(
        group: Group, mounter: Callable[..., Mount], files: tuple[Path, dict[str, str]],
        idle_rss: int) -> None:
    src, digests = files
    limit = idle_rss + 48 * MIB
    group.limit(limit)
    uncache(src)
    mount: Mount = mounter(src, "--monitor-interval", "0.25", prefix=group.prefix(),
                           allow_log=("lowered to", "memory budget now", "pressure"))
    before = stat_int(mount.stats()["memory_limit_bytes"])
    # The hog takes 32 MiB, 1 MiB every 20 ms, while the readers run; with its
    # interpreter and the idle daemon that is over 60 % of the limit.
    hog = subprocess.Popen(
        [*group.prefix(), sys.executable, "-c",
         ("import time\nheld = []\nfor _ in range(32):\n"
          "    b = bytearray(1 << 20); b[::4096] = b'x' * 256; held.append(b); time.sleep(0.02)\n"
          "print('ready', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        with Watch(mount) as watch:
            got = read_through(mount, digests, None)
            assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
            assert wait_for(lambda: mount.stats()["pressure_level"] != "none", 30)
        assert got == [digests[name] for name in sorted(digests)]
        stats = mount.stats()
        assert stat_int(stats["memory_limit_bytes"]) <= before - 16 * MIB
        assert hog.poll() is None                              # nobody was killed
        check_group_and_daemon(group, mount, watch, idle_rss)
    finally:
        hog.kill()
        hog.wait(10)
    # The hog gone, the budget grows back.
    assert wait_for(lambda: stat_int(mount.stats()["memory_limit_bytes"]) >= before - 4 * MIB,
                    30)


def test_a_group_too_small_to_serve_fails_the_mount_with_one_line(
        group: Group, tmp_path: Path, idle_rss: int) -> None:
    group.limit(idle_rss + 8 * MIB)
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([*group.prefix(), *STFS, "mount", str(tmp_path / "src"),
                             str(tmp_path / "mnt")], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"stfs: {tmp_path / 'mnt'}: the memory cgroup is too small "
                               "to serve: the limit of ")
    assert "stfs needs at least 4.0 MiB" in lines[0]


def test_a_lowered_budget_is_said_on_the_terminal_of_a_background_mount(
        group: Group, tmp_path: Path, idle_rss: int) -> None:
    group.limit(idle_rss + 48 * MIB)
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([*group.prefix(), *STFS, "mount", str(tmp_path / "src"),
                             str(tmp_path / "mnt")], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL, check=False)
    try:
        assert result.returncode == 0, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("stfs: warning: --memory-limit 50.0 MiB lowered to ")
        assert f"(cgroup v1 {group.path}/memory.limit_in_bytes)" in lines[0]
    finally:
        subprocess.run([*STFS, "umount", str(tmp_path / "mnt")], capture_output=True,
                       timeout=30, check=False)
        assert wait_for(lambda: not (group.path / "cgroup.procs").read_text().split(), 30)
