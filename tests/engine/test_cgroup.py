"""Memory cgroups on fake trees (v1 and v2 layouts) and, where the machine has a
writable v1 memory controller, the kernel's notifications on a real child group."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stfs import cgroup
from stfs.cgroup import GroupReading, Limit, MemoryGroup, MemoryNotifier, Usage

MIB = 1024 * 1024
UNLIMITED_V1 = "9223372036854771712"


def remove_group(path: Path) -> None:
    """rmdir a test's cgroup, waiting out the kernel's lag after its last task left."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)

def mountinfo_line(point: Path, root: str, fstype: str, superopts: str) -> str:
    return f"35 31 0:32 {root} {point} rw,relatime shared:9 - {fstype} cgroup {superopts}"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_level(level: Path, limit: int | str, usage: int, stat: str = "") -> None:
    write(level / "memory.limit_in_bytes", f"{limit}\n")
    write(level / "memory.usage_in_bytes", f"{usage}\n")
    write(level / "memory.stat", stat)


def v2_level(level: Path, current: int, maximum: int | str = "max", high: int | str = "max",
             stat: str = "") -> None:
    write(level / "memory.max", f"{maximum}\n")
    write(level / "memory.high", f"{high}\n")
    write(level / "memory.current", f"{current}\n")
    write(level / "memory.stat", stat)


def fake_proc(tmp_path: Path, cgroups: str, mounts: list[str]) -> tuple[Path, Path]:
    write(tmp_path / "proc" / "cgroup", cgroups)
    write(tmp_path / "proc" / "mountinfo", "\n".join(mounts) + "\n")
    return tmp_path / "proc" / "cgroup", tmp_path / "proc" / "mountinfo"


# -- where ---------------------------------------------------------------------------


def test_v1_memory_group_is_found_through_mountinfo_in_a_hybrid_layout(tmp_path: Path) -> None:
    memory, unified = tmp_path / "memory", tmp_path / "unified"
    v1_level(memory / "box", 64 * MIB, 1000)
    (unified / "box").mkdir(parents=True)              # v2 mounted too, without memory files
    proc = fake_proc(tmp_path, "4:memory:/box\n1:cpu:/\n0::/box\n", [
        mountinfo_line(tmp_path / "cpu", "/", "cgroup", "rw,cpu"),
        mountinfo_line(memory, "/", "cgroup", "rw,memory"),
        mountinfo_line(unified, "/", "cgroup2", "rw")])
    group = cgroup.find_memory_group(*proc)
    assert group == MemoryGroup(1, memory / "box", memory)


def test_v2_group_is_found_and_a_container_mount_root_is_stripped(tmp_path: Path) -> None:
    # Without a cgroup namespace a container sees its own group mounted at the top:
    # /proc/self/cgroup says /kubepods/pod1/c1, the mount's root is that path.
    top = tmp_path / "cgroup"
    v2_level(top, 1000, 64 * MIB)
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/c1\n",
                     [mountinfo_line(top, "/kubepods/pod1/c1", "cgroup2", "rw")])
    assert cgroup.find_memory_group(*proc) == MemoryGroup(2, top, top)


def test_mountinfo_escapes_and_missing_groups(tmp_path: Path) -> None:
    top = tmp_path / "with space"
    v2_level(top / "a", 1000)
    escaped = str(top).replace(" ", "\\040")
    proc = fake_proc(tmp_path, "0::/a\n", [mountinfo_line(Path(escaped), "/", "cgroup2", "rw")])
    group = cgroup.find_memory_group(*proc)
    assert group is not None and group.path == top / "a"
    proc = fake_proc(tmp_path, "0::/gone\n", [mountinfo_line(Path(escaped), "/", "cgroup2", "rw")])
    assert cgroup.find_memory_group(*proc) is None         # no such directory
    assert cgroup.find_memory_group(tmp_path / "nothing", tmp_path / "nothing") is None


# -- limits and usage -------------------------------------------------------------------


def test_v2_effective_limit_is_the_smallest_along_the_hierarchy_memory_high_included(
        tmp_path: Path) -> None:
    top = tmp_path / "cgroup"
    v2_level(top, 500 * MIB)                                   # the root: no limit files read
    v2_level(top / "pod", 30 * MIB, maximum=512 * MIB, high=200 * MIB)
    v2_level(top / "pod" / "c1", 20 * MIB, maximum=300 * MIB,
             stat="anon 12000000\nfile 9000000\nactive_file 3000000\ninactive_file 5000000\n"
                  "file_mapped 1000000\n")
    group = MemoryGroup(2, top / "pod" / "c1", top)
    assert group.levels() == [top / "pod" / "c1", top / "pod", top]
    reading = group.read()
    assert reading.limit == Limit(200 * MIB, top / "pod" / "memory.high", 2)
    assert reading.level == top / "pod"
    assert reading.limit.describe() == f"cgroup v2 {top}/pod/memory.high"
    own = group.usage_at(top / "pod" / "c1")
    assert own == Usage(20 * MIB, 8_000_000, 1_000_000)
    assert own.working_set == 20 * MIB - 7_000_000        # mapped page cache is not dropped


def test_the_binding_limit_is_the_one_with_least_room(tmp_path: Path) -> None:
    # A pod limit shared with a sibling that uses most of it binds before the
    # container's own, smaller limit.
    top = tmp_path / "cgroup"
    v2_level(top / "pod", 140 * MIB, maximum=150 * MIB)
    v2_level(top / "pod" / "c1", 20 * MIB, maximum=100 * MIB)
    reading = MemoryGroup(2, top / "pod" / "c1", top).read()
    assert reading.limit_bytes == 150 * MIB
    assert reading.room_bytes == 10 * MIB


def test_v1_limits_usage_and_a_hidden_ancestor(tmp_path: Path) -> None:
    top = tmp_path / "memory"
    v1_level(top, UNLIMITED_V1, 900 * MIB)
    v1_level(top / "box", UNLIMITED_V1, 60 * MIB)
    v1_level(top / "box" / "app", 96 * MIB, 40 * MIB,
             "cache 30000000\ntotal_active_file 10000000\ntotal_inactive_file 20000000\n"
             f"total_mapped_file 2000000\nhierarchical_memory_limit {96 * MIB}\n")
    group = MemoryGroup(1, top / "box" / "app", top)
    reading = group.read()
    assert reading.limit == Limit(96 * MIB, top / "box" / "app" / "memory.limit_in_bytes", 1)
    assert reading.usage == Usage(40 * MIB, 30_000_000, 2_000_000)
    assert reading.room_bytes == 96 * MIB - (40 * MIB - 28_000_000)
    # An ancestor above the mount (a container's view) shows only in the kernel's figure.
    write(top / "box" / "app" / "memory.stat", f"hierarchical_memory_limit {64 * MIB}\n")
    reading = group.read()
    assert reading.limit_bytes == 64 * MIB
    assert reading.limit is not None and reading.limit.file.name == "memory.stat"


def test_no_limit_anywhere_reads_usage_without_a_limit(tmp_path: Path) -> None:
    top = tmp_path / "cgroup"
    v2_level(top / "a", 5 * MIB)
    reading = MemoryGroup(2, top / "a", top).read()
    assert reading == GroupReading(None, Usage(5 * MIB, 0, 0), None)
    assert reading.room_bytes is None


def test_events_counters_v1_and_v2(tmp_path: Path) -> None:
    write(tmp_path / "v2" / "memory.events", "low 0\nhigh 7\nmax 3\noom 1\noom_kill 1\n")
    assert MemoryGroup(2, tmp_path / "v2", tmp_path).events() == {
        "high": 7, "max": 3, "oom": 1, "oom_kill": 1}
    write(tmp_path / "v1" / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    write(tmp_path / "v1" / "memory.failcnt", "1790\n")
    assert MemoryGroup(1, tmp_path / "v1", tmp_path).events() == {
        "high": 0, "max": 1790, "oom": 0, "oom_kill": 2}


# -- notifications ------------------------------------------------------------------


def test_arming_a_fake_v1_tree_registers_thresholds_pressure_and_oom(tmp_path: Path) -> None:
    level = tmp_path / "box"
    v1_level(level, 100 * MIB, 10 * MIB)
    for name in ("memory.pressure_level", "memory.oom_control", "cgroup.event_control"):
        write(level / name, "")
    group = MemoryGroup(1, level, tmp_path)
    notifier = MemoryNotifier.arm(group, group.read())
    try:
        assert [s.name for s in notifier.sources] == ["threshold", "threshold", "pressure",
                                                      "oom"]
        fds = [fd for s in notifier.sources for fd in (s.fd, *s.keep)]
        assert all(os.fstat(fd) for fd in fds)
        # The last registration written: "<eventfd> <oom_control fd>"
        oom = notifier.sources[-1]
        assert (level / "cgroup.event_control").read_text() == f"{oom.fd} {oom.keep[0]}"
    finally:
        notifier.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_arming_what_is_missing_is_skipped(tmp_path: Path) -> None:
    group = MemoryGroup(2, tmp_path / "nothing", tmp_path)
    notifier = MemoryNotifier.arm(group, GroupReading(None, None, None))
    assert notifier.sources == [] and notifier.kinds == []
    notifier.start()                                          # nothing to wait for: no thread
    notifier.close()


def test_the_notifier_thread_reports_what_fired_and_stops_before_closing() -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    notifier = MemoryNotifier([cgroup._Source(efd, "threshold", select.POLLIN, "eventfd")])
    notifier.start()
    try:
        os.eventfd_write(efd, 1)
        poller = select.poll()
        poller.register(notifier.fileno(), select.POLLIN)
        assert poller.poll(5000)
        assert notifier.take() == ["threshold"]
        assert notifier.take() == []                          # drained, pipe emptied
        assert not poller.poll(50)
        assert notifier.received == 1
    finally:
        notifier.close()
    with pytest.raises(OSError):
        os.fstat(efd)


# -- a real v1 child group ------------------------------------------------------------


def own_v1_group() -> MemoryGroup | None:
    group = cgroup.find_memory_group()
    return group if group is not None and group.version == 1 else None


@pytest.mark.skipif(own_v1_group() is None or os.geteuid() != 0,
                    reason="needs root and a v1 memory controller")
def test_real_v1_thresholds_and_limit_are_seen(tmp_path: Path) -> None:
    parent = own_v1_group()
    assert parent is not None
    path = parent.path / f"stfs-test-cgroup-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a child memory cgroup: {exc}")
    hog = None
    notifier = None
    try:
        (path / "memory.limit_in_bytes").write_text(f"{256 * MIB}")
        group = MemoryGroup(1, path, parent.top)
        reading = group.read()
        assert reading.limit_bytes == 256 * MIB and reading.level == path
        notifier = MemoryNotifier.arm(group, reading)
        assert set(notifier.kinds) == {"threshold", "pressure", "oom"}
        notifier.start()
        began = time.monotonic()
        hog = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$@"', "sh", sys.executable,
             "-c", ("b = bytearray(230 << 20); b[::4096] = b'x' * len(b[::4096]); "
                    "print('ready', flush=True); import time; time.sleep(60)")],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        poller = select.poll()
        poller.register(notifier.fileno(), select.POLLIN)
        assert poller.poll(30_000), "no notification while crossing 80 and 90 %"
        assert "threshold" in notifier.take()
        assert time.monotonic() - began < 30
        assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
        assert group.read().usage is not None
        assert group.read().usage.working_set > 200 * MIB  # type: ignore[union-attr]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)
        if notifier is not None:
            notifier.close()
        remove_group(path)


def own_v2_dir() -> Path | None:
    """This process's v2 group directory (a hybrid layout mounts v2 without memory)."""
    paths = cgroup.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    for mount in cgroup.parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        rel = cgroup._inside(paths.get(2, "\0"), mount.root) if mount.version == 2 else None
        if rel is not None:
            return mount.point / rel if rel else mount.point
    return None


@pytest.mark.skipif(own_v2_dir() is None or os.geteuid() != 0, reason="needs root and cgroup v2")
def test_v2_kernfs_notifications_and_a_psi_trigger_arm_and_fire_on_change() -> None:
    # memory.events is a kernfs file like cgroup.events: a change wakes
    # poll(POLLPRI), and reading it again re-arms. cgroup.events changes when
    # a process enters the group, which needs no memory controller.
    parent = own_v2_dir()
    assert parent is not None
    path = parent / f"stfs-test-v2-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a child v2 cgroup: {exc}")
    child = None
    notifier = None
    try:
        events = cgroup._Source(os.open(path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC),
                                "events", select.POLLPRI, "kernfs")
        psi = cgroup._psi_trigger(parent / "memory.pressure"
                                  if (parent / "memory.pressure").exists()
                                  else Path("/proc/pressure/memory"))
        notifier = MemoryNotifier([events, psi])
        notifier.start()
        poller = select.poll()
        poller.register(notifier.fileno(), select.POLLIN)
        assert not poller.poll(100) or "events" not in notifier.take()  # armed, quiet
        child = subprocess.Popen(["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec sleep 30'])
        assert poller.poll(5000), "no notification when the group became populated"
        assert "events" in notifier.take()
    finally:
        if child is not None:
            child.kill()
            child.wait(10)
        if notifier is not None:
            notifier.close()
        remove_group(path)
