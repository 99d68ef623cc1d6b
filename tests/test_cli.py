"""The command line through real processes (``python -m stfs``), plus its parsers.

Exit status 2 for usage errors, 1 for other failures; every failure is one
stderr line starting with ``stfs: `` that names the path or option, never a
traceback. Every long option also works inside ``-o``, and so do the options
mount(8) hands its helpers; mounts made here are real and always cleaned up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stfs import __version__
from stfs.cli import OPTIONS, Option, mount_config, parse_mount_options
from stfs.config import MountConfig, parse_size
from stfs.errors import UsageError
from stfs.mountinfo import mount_at
from tests.conftest import (
    STFS,
    Mount,
    cleanup_mount,
    is_mounted,
    pid_alive,
    run_stfs,
    run_stfs_detached,
    wait_for,
)

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


# -- helpers ---------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int,
                          *names: str) -> str:
    """*result* failed with *status* and one ``stfs:`` line naming one of *names*."""
    detail = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, detail
    assert result.returncode == status, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("stfs: "), detail
    assert len(line) > len("stfs: ") + 5, detail
    if names:
        assert any(name in line for name in names), f"none of {names} in {line!r}"
    return line


def stats_pid(mountpoint: Path) -> int | None:
    result = run_stfs("stats", "--json", str(mountpoint), timeout=15)
    if result.returncode != 0:
        return None
    return int(json.loads(result.stdout)["pid"])


@contextlib.contextmanager
def daemon_mount(*args: str, mountpoint: Path) -> Iterator[subprocess.CompletedProcess[str]]:
    """Run ``stfs *args`` (which daemonizes) and always clean *mountpoint* afterwards."""
    pids: list[int] = []
    try:
        result = run_stfs_detached(*args)
        if is_mounted(mountpoint):
            pid = stats_pid(mountpoint)
            if pid is not None:
                pids.append(pid)
        yield result
    finally:
        cleanup_mount(mountpoint, pids)


@contextlib.contextmanager
def world_readable_dir() -> Iterator[Path]:
    """A temporary directory user nobody can reach (pytest's tmp_path is owner-only)."""
    path = Path(tempfile.mkdtemp(prefix="stfs-cli-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def assert_read_only(path: Path) -> None:
    with pytest.raises(OSError) as info:
        (path / "new-file").write_text("x")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.mkdir(path / "new-dir")
    assert info.value.errno == errno.EROFS


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


# -- help and version --------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["mount", "--help"], ["umount", "--help"],
                                  ["stats", "--help"], ["-h"]])
def test_help_exits_zero_and_prints_usage(args: list[str]) -> None:
    result = run_stfs(*args)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower()
    assert result.stderr == ""


def test_mount_help_lists_the_long_options() -> None:
    out = run_stfs("mount", "--help").stdout
    for option in ("--memory-limit", "--cache-size", "--max-streams", "--min-chunk",
                   "--max-chunk", "--read-around", "--state-dir", "--log-level", "--log-file", "-o",
                   "--foreground"):
        assert option in out


def test_version_prints_stfs_and_a_semantic_version() -> None:
    result = run_stfs("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"stfs \d+\.\d+\.\d+\n", result.stdout), result.stdout
    assert result.stdout == f"stfs {__version__}\n"


# -- usage errors: exit status 2 -------------------------------------------------


BAD_SIZES = [("--memory-limit", v) for v in ("5X", "-1", "1.5M", "", "M", "12 34", "0x10")] + [
    (option, v) for option in ("--cache-size", "--min-chunk", "--max-chunk", "--read-around")
    for v in ("5X", "-1", "1.5M", "")] + [
    ("--read-around", v) for v in ("2K", "300K", "32M")]  # not a power of two from 4K to 16M


@pytest.mark.parametrize("option,value", BAD_SIZES)
def test_bad_size_is_a_usage_error_naming_the_option(option: str, value: str, source: Path,
                                                     mnt: Path) -> None:
    result = run_stfs_detached("mount", f"{option}={value}", str(source), str(mnt))
    assert_one_line_error(result, 2, option)
    assert not is_mounted(mnt)


@pytest.mark.parametrize("value", ["5X", "-1", "1.5M", ""])
def test_bad_size_in_o_is_a_usage_error(value: str, source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", "-o", f"memory_limit={value}", str(source), str(mnt))
    assert_one_line_error(result, 2, "memory_limit", "--memory-limit")


@pytest.mark.parametrize("value", ["x", "0", "-1", "1.5", "", "ten"])
def test_bad_max_streams_is_a_usage_error(value: str, source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", f"--max-streams={value}", str(source), str(mnt))
    assert_one_line_error(result, 2, "--max-streams", "max_streams")


@pytest.mark.parametrize("value", ["loud", "", "DEBUGGING", "5"])
def test_bad_log_level_is_a_usage_error(value: str, source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", f"--log-level={value}", str(source), str(mnt))
    assert_one_line_error(result, 2, "--log-level", "log_level")


@pytest.mark.parametrize("option,value", [("--attr-timeout", "soon"), ("--attr-timeout", "-1"),
                                          ("--entry-timeout", "x"), ("--entry-timeout", ""),
                                          ("--attr-timeout", "")])
def test_bad_timeout_is_a_usage_error(option: str, value: str, source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", f"{option}={value}", str(source), str(mnt))
    assert_one_line_error(result, 2, option, "timeout")


@pytest.mark.parametrize("option", ["--state-dir", "--log-file"])
@pytest.mark.parametrize("with_source", [True, False], ids=["source", "demo"])
def test_empty_path_option_is_a_usage_error(option: str, with_source: bool, source: Path,
                                            mnt: Path) -> None:
    args = ["mount", f"{option}=", *([str(source)] if with_source else ["--demo"]), str(mnt)]
    with daemon_mount(*args, mountpoint=mnt) as result:
        assert_one_line_error(result, 2, option)
        assert not is_mounted(mnt)


def test_min_chunk_larger_than_max_chunk_is_a_usage_error(source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", "--min-chunk", "1M", "--max-chunk", "64K", str(source),
                               str(mnt))
    assert_one_line_error(result, 2, "--min-chunk", "--max-chunk")
    result = run_stfs_detached("mount", "-o", "min_chunk=1M,max_chunk=64K", str(source), str(mnt))
    assert_one_line_error(result, 2, "--min-chunk", "min_chunk", "max_chunk")


@pytest.mark.parametrize("args,names", [
    (["mount", "--bogus"], ("--bogus",)),
    (["mount", "--memory-limits=5M"], ("--memory-limits",)),
    (["mount", "-x"], ("-x",)),
])
def test_unknown_option_is_a_usage_error(args: list[str], names: tuple[str, ...], source: Path,
                                         mnt: Path) -> None:
    result = run_stfs_detached(*args, str(source), str(mnt))
    assert_one_line_error(result, 2, *names)


@pytest.mark.parametrize("args", [["--frobnicate"], ["mount", "--frobnicate", "/nonexistent-stfs"],
                                  ["umount", "--frobnicate", "/nonexistent-stfs"],
                                  ["stats", "--frobnicate", "/nonexistent-stfs"]])
def test_unknown_option_of_any_command_is_a_usage_error(args: list[str]) -> None:
    assert_one_line_error(run_stfs(*args), 2, "--frobnicate")


@pytest.mark.parametrize("opt", ["bogus", "memory_limit_x=5M", "allow_other=yes", "rw,frob"])
def test_unknown_o_option_is_a_usage_error(opt: str, source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", "-o", opt, str(source), str(mnt))
    line = assert_one_line_error(result, 2)
    assert any(word in line for word in ("bogus", "memory_limit_x", "allow_other", "frob"))


@pytest.mark.parametrize("key", ["memory_limit", "cache_size", "max_streams", "min_chunk",
                                 "max_chunk", "attr_timeout", "entry_timeout", "log_level",
                                 "state_dir", "log_file", "fsname"])
def test_o_key_without_value_is_a_usage_error(key: str, source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", "-o", key, str(source), str(mnt))
    assert_one_line_error(result, 2, key)


@pytest.mark.parametrize("args", [["mount"], ["mount", "-f"], ["mount", "-o", "ro"],
                                  ["mount", "--demo"], ["mount", "-o", "demo"]])
def test_missing_mountpoint_is_a_usage_error(args: list[str]) -> None:
    result = run_stfs(*args)
    assert_one_line_error(result, 2, "MOUNTPOINT")


@pytest.mark.parametrize("form", [["mount"], ["mount", "-f"], ["mount", "-o", "memory_limit=32M"],
                                  ["-o", "rw"]], ids=["mount", "foreground", "o", "mount.fuse3"])
def test_a_lone_directory_is_a_missing_mountpoint_never_the_demo(form: list[str],
                                                                 source: Path) -> None:
    """``stfs mount /data`` once mounted the demo over /data; now it says what is missing."""
    before = sorted(os.listdir(source))
    args = [*form, str(source)] if form[0] == "mount" else [str(source), *form]
    result = run_stfs_detached(*args, timeout=30)
    try:
        line = assert_one_line_error(result, 2, "MOUNTPOINT")
        assert "--demo" in line and str(source) in line, line
        assert not is_mounted(source)
        assert sorted(os.listdir(source)) == before
    finally:
        cleanup_mount(source, [])


@pytest.mark.parametrize("args", [["--demo"], ["-o", "demo"], ["-o", "ro,demo"]])
def test_demo_with_a_source_is_a_usage_error(args: list[str], source: Path, mnt: Path) -> None:
    result = run_stfs_detached("mount", *args, str(source), str(mnt), timeout=30)
    try:
        line = assert_one_line_error(result, 2, "--demo")
        assert "SOURCE" in line, line
        assert not is_mounted(mnt)
    finally:
        cleanup_mount(mnt, [])
    # mount.fuse3's form (an fstab line always has a SOURCE) says the same
    result = run_stfs_detached(str(source), str(mnt), "-o", "rw,demo", timeout=30)
    assert_one_line_error(result, 2, "--demo")
    assert not is_mounted(mnt)


@pytest.mark.parametrize("args,names", [
    ([], ("command", "mount")),
    (["umount"], ("MOUNTPOINT",)),
    (["stats"], ("MOUNTPOINT",)),
    (["frobnicate"], ("frobnicate",)),
    (["mount", "a", "b", "c"], ("c",)),
])
def test_incomplete_or_unknown_command_is_a_usage_error(args: list[str],
                                                        names: tuple[str, ...]) -> None:
    result = run_stfs(*args)
    assert_one_line_error(result, 2, *names)


# -- other failures: exit status 1 ------------------------------------------------


def test_missing_source_fails_naming_it(tmp_path: Path, mnt: Path) -> None:
    missing = tmp_path / "no-such-source"
    result = run_stfs_detached("mount", str(missing), str(mnt))
    line = assert_one_line_error(result, 1, str(missing))
    assert "no such file" in line.lower()
    assert not is_mounted(mnt)


def test_source_that_is_a_file_fails_naming_it(tmp_path: Path, mnt: Path) -> None:
    afile = tmp_path / "plain-file"
    afile.write_text("x")
    result = run_stfs_detached("mount", str(afile), str(mnt))
    line = assert_one_line_error(result, 1, str(afile))
    assert "not a directory" in line.lower()


def test_unreadable_source_fails_for_user_nobody() -> None:
    with world_readable_dir() as base:
        src = base / "private"
        src.mkdir(mode=0o700)
        (src / "secret").write_text("x")
        point = base / "mnt"
        point.mkdir()
        result = subprocess.run([*NOBODY, *STFS, "mount", str(src), str(point)],
                                capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, check=False)
        try:
            line = assert_one_line_error(result, 1, str(src))
            assert "permission denied" in line.lower()
        finally:
            cleanup_mount(point, [])


def test_missing_mountpoint_directory_fails_naming_it(source: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-mnt"
    result = run_stfs_detached("mount", str(source), str(missing))
    line = assert_one_line_error(result, 1, str(missing))
    assert "no such file" in line.lower()


def test_mountpoint_that_is_a_file_fails_naming_it(source: Path, tmp_path: Path) -> None:
    afile = tmp_path / "mnt-file"
    afile.write_text("x")
    result = run_stfs_detached("mount", str(source), str(afile))
    line = assert_one_line_error(result, 1, str(afile))
    assert "not a directory" in line.lower()


@pytest.mark.parametrize("inner", ["dir", "dir/sub"])
def test_mountpoint_inside_source_is_refused(source: Path, inner: str) -> None:
    point = source / inner
    result = run_stfs_detached("mount", str(source), str(point))
    line = assert_one_line_error(result, 1, str(point))
    assert "inside" in line.lower()
    assert not is_mounted(point)


def test_mountpoint_inside_source_through_a_symlink_is_refused(source: Path,
                                                               tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(source / "dir")
    result = run_stfs_detached("mount", str(source), str(alias))
    assert_one_line_error(result, 1, str(alias))
    assert not is_mounted(source / "dir")


def test_mountpoint_already_a_live_stfs_mount_is_refused(mounted: Mount, source: Path) -> None:
    result = run_stfs_detached("mount", str(source), str(mounted.mountpoint))
    line = assert_one_line_error(result, 1, str(mounted.mountpoint))
    assert "mount" in line.lower()
    # the existing mount is untouched and still serves
    assert is_mounted(mounted.mountpoint)
    assert (mounted.mountpoint / "hello.txt").read_text() == "hello, world\n"


def test_umount_of_a_directory_that_is_not_a_mount_fails(tmp_path: Path) -> None:
    result = run_stfs("umount", str(tmp_path))
    line = assert_one_line_error(result, 1, str(tmp_path))
    assert "not" in line.lower()


def test_umount_of_a_missing_path_fails(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = run_stfs("umount", str(missing))
    line = assert_one_line_error(result, 1, str(missing))
    assert "no such file" in line.lower()


def test_umount_refuses_a_mount_that_is_not_stfs(tmp_path: Path) -> None:
    point = tmp_path / "tmpfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stfs-test-tmpfs", str(point)],
                   check=True, capture_output=True)
    try:
        result = run_stfs("umount", str(point))
        line = assert_one_line_error(result, 1, str(point))
        assert "not an stfs mount" in line
        assert mount_at(str(point)) is not None, "stfs umount removed a foreign mount"
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def test_stats_of_a_directory_that_is_not_a_mount_fails(tmp_path: Path) -> None:
    result = run_stfs("stats", str(tmp_path))
    assert_one_line_error(result, 1, str(tmp_path))
    result = run_stfs("stats", "--json", str(tmp_path))
    assert_one_line_error(result, 1, str(tmp_path))
    assert result.stdout == ""


def test_stats_of_a_missing_path_fails(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = run_stfs("stats", str(missing))
    assert_one_line_error(result, 1, str(missing))


# -- -o: every long option and mount(8)'s options, on real mounts --------------------


MOUNT8_OPTIONS = ("rw,dev,suid,exec,nodev,nosuid,noexec,defaults,nofail,noauto,_netdev,"
                  "x-systemd.automount,x-systemd.requires=foo,relatime,noatime")


def test_mount8_helper_options_are_accepted_and_view_stays_read_only(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(source, "-o", MOUNT8_OPTIONS)
    point = mount.mountpoint
    assert (point / "hello.txt").read_text() == "hello, world\n"
    assert_read_only(point)
    entry = mount_at(os.path.realpath(point))
    assert entry is not None and entry.fstype == "fuse.stfs"
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if f" {point} " in ln)
    assert "ro" in line.split()[5].split(","), line  # the kernel mount is read-only


def test_every_long_option_is_accepted_as_key_value_in_o(mounter, source: Path,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    state = tmp_path / "state"
    opts = ("memory_limit=32M,cache_size=8M,max_streams=4,min_chunk=8K,max_chunk=512K,"
            f"attr_timeout=0.5,entry_timeout=0.5,log_level=debug,state_dir={state}")
    mount = mounter(source, "-o", opts)
    point = mount.mountpoint
    assert (point / "data.bin").read_bytes() == (source / "data.bin").read_bytes()
    assert_read_only(point)
    stats = mount.stats()
    assert stats["memory_limit_bytes"] == 32 * MIB
    assert stats["cache_limit_bytes"] == 8 * MIB
    assert " DEBUG " in mount.log(), "log_level=debug did not reach the daemon"


def test_dashed_long_option_names_are_accepted_in_o(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(source, "-o", "memory-limit=16M,cache-size=4M")
    stats = mount.stats()
    assert stats["memory_limit_bytes"] == 16 * MIB
    assert stats["cache_limit_bytes"] == 4 * MIB


def test_allow_other_fsname_and_ro_mount(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(source, "-o", "allow_other,fsname=stfs-test-data,ro")
    point = mount.mountpoint
    entry = mount_at(os.path.realpath(point))
    assert entry is not None
    assert entry.source == "stfs-test-data"
    assert "allow_other" in entry.options
    assert (point / "hello.txt").read_text() == "hello, world\n"
    assert_read_only(point)


def test_fsname_shows_as_the_source_column_in_mountinfo(mounter, source: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(source, "-o", "fsname=my-dataset")
    with open("/proc/self/mountinfo") as f:
        fields = next(ln for ln in f if f" {mount.mountpoint} " in ln).split(" - ")[1].split()
    assert fields[0] == "fuse.stfs"
    assert fields[1] == "my-dataset"


def test_log_file_and_state_dir_in_o_are_used_by_the_daemon(tmp_path: Path, mnt: Path) -> None:
    log = tmp_path / "daemon.log"
    state = tmp_path / "state"
    pids: list[int] = []
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        try:
            # -o demo: the demo source is created in state_dir
            result = subprocess.run([*STFS, "mount", "-o",
                                     f"demo,log_file={log},state_dir={state}",
                                     str(mnt)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, timeout=120, check=False)
            err.seek(0)
            assert result.returncode == 0, err.read()
            pid = stats_pid(mnt)
            assert pid is not None
            pids.append(pid)
            assert (state / "demo-source" / "README.txt").is_file()
            assert (mnt / "README.txt").read_bytes() == (
                state / "demo-source" / "README.txt").read_bytes()
            assert wait_for(lambda: "mounted" in log.read_text(errors="replace"), 30)
        finally:
            cleanup_mount(mnt, pids)


def test_demo_flag_mounts_the_demo_source_and_says_how_to_look(tmp_path: Path,
                                                                mnt: Path) -> None:
    state = tmp_path / "state"
    with daemon_mount("mount", "--demo", "--state-dir", str(state), str(mnt),
                      mountpoint=mnt) as result:
        assert result.returncode == 0, result.stderr
        demo = state / "demo-source"
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(demo))
        tiny = Path("small", "tiny.txt")
        assert (mnt / tiny).read_bytes() == (demo / tiny).read_bytes()
        assert_read_only(mnt)
        stats = json.loads(run_stfs("stats", "--json", str(mnt)).stdout)
        assert stats["source"] == str(demo.resolve())
        said = result.stdout.splitlines()
        assert len(said) == 1 and said[0].startswith("stfs: demo source mounted at "), said
        assert f"stfs umount {mnt}" in said[0]
    assert not is_mounted(mnt)


def test_mount_fuse3_form_without_mount_word_mounts(source: Path, mnt: Path) -> None:
    with daemon_mount(str(source), str(mnt), "-o", "rw,memory_limit=32M,dev,suid",
                      mountpoint=mnt) as result:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert is_mounted(mnt)
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(source))
        assert (mnt / "hello.txt").read_text() == "hello, world\n"
        assert_read_only(mnt)
        stats = json.loads(run_stfs("stats", "--json", str(mnt)).stdout)
        assert stats["memory_limit_bytes"] == 32 * MIB
        pid = stats["pid"]
        assert pid_alive(pid)
    assert not is_mounted(mnt)
    assert wait_for(lambda: not pid_alive(pid), 30)


def test_mount_fuse3_form_reports_errors_like_mount(tmp_path: Path, mnt: Path) -> None:
    missing = tmp_path / "nope"
    result = run_stfs_detached(str(missing), str(mnt), "-o", "rw,memory_limit=32M")
    assert_one_line_error(result, 1, str(missing))
    result = run_stfs_detached(str(tmp_path), str(mnt), "-o", "rw,frobnicate")
    assert_one_line_error(result, 2, "frobnicate")


# -- parsers, in-process ------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("1", 1), ("512", 512), ("4096", 4096),
    ("4K", 4 * KIB), ("4k", 4 * KIB), ("8KiB", 8 * KIB), ("8KB", 8 * KIB),
    ("50M", 50 * MIB), ("50m", 50 * MIB), ("1M", MIB), ("2G", 2 * GIB), ("1g", GIB),
    (" 16M ", 16 * MIB), ("1024K", MIB),
])
def test_parse_size_accepts_bytes_and_powers_of_1024(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", " ", "5X", "-1", "1.5M", "M", "K4", "4KK", "0x10",
                                  "1e6", "4 K B", "five", "4T", "+4K"])
def test_parse_size_rejects_malformed_sizes_with_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text, "--memory-limit")
    assert info.value.exit_code == 2
    assert "--memory-limit" in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("values,expected", [
    ([], {}),
    (["memory_limit=32M"], {"memory_limit": 32 * MIB}),
    (["memory-limit=32M"], {"memory_limit": 32 * MIB}),
    (["cache_size=8M,max_streams=4"], {"cache_size": 8 * MIB, "max_streams": 4}),
    (["min_chunk=8K", "max_chunk=512K"], {"min_chunk": 8 * KIB, "max_chunk": 512 * KIB}),
    (["attr_timeout=0.5,entry_timeout=2"], {"attr_timeout": 0.5, "entry_timeout": 2.0}),
    (["log_level=debug"], {"log_level": "debug"}),
    (["log_level=DEBUG"], {"log_level": "debug"}),
    (["allow_other"], {"allow_other": True}),
    (["fsname=data"], {"fsname": "data"}),
    (["fsname=a\\,b"], {"fsname": "a,b"}),
    (["ro"], {}),
    ([MOUNT8_OPTIONS], {}),
    (["rw,memory_limit=32M,dev,suid"], {"memory_limit": 32 * MIB}),
    (["x-systemd.requires=foo,x-systemd.idle-timeout=30,comment=x"], {}),
    (["rw,,ro,"], {}),
])
def test_parse_mount_options_table(values: list[str], expected: dict[str, object]) -> None:
    assert parse_mount_options(values) == expected


def test_parse_mount_options_paths_are_made_absolute(tmp_path: Path) -> None:
    settings = parse_mount_options([f"state_dir={tmp_path}/s,log_file={tmp_path}/l.log"])
    assert Path(settings["state_dir"]) == tmp_path / "s"
    assert str(settings["log_file"]) == str(tmp_path / "l.log")
    relative = parse_mount_options(["state_dir=rel/state,log_file=rel.log"])
    assert os.path.isabs(str(relative["state_dir"]))
    assert os.path.isabs(str(relative["log_file"]))


@pytest.mark.parametrize("values,named", [
    (["bogus"], "bogus"),
    (["memory_limit"], "memory_limit"),
    (["memory_limit=5X"], "memory-limit"),
    (["memory_limit=1.5M"], "memory-limit"),
    (["max_streams=x"], "max-streams"),
    (["attr_timeout=soon"], "attr-timeout"),
    (["log_level=loud"], "log-level"),
    (["allow_other=yes"], "allow_other"),
    (["fsname"], "fsname"),
    (["rw,frob,ro"], "frob"),
])
def test_parse_mount_options_rejects_with_usage_error(values: list[str], named: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_mount_options(values)
    assert info.value.exit_code == 2
    assert named in info.value.message


# -- the option table: one entry per option, both spellings -------------------------


SAMPLES = {  # a valid, non-default value of each option that takes one
    "memory_limit": "32M", "cache_size": "8M", "max_streams": "4", "min_chunk": "8K",
    "max_chunk": "512K", "read_around": "64K", "attr_timeout": "0.5", "entry_timeout": "2",
    "metrics_listen": "127.0.0.1:9101", "monitor_interval": "0.5", "sweep_interval": "5",
    "max_open_fds": "64", "retry_file_system": "2:0.1:2:1", "retry_network": "4:0.2:1.5:3",
    "retry_jitter": "0.1", "read_deadline": "10", "state_dir": "/tmp/stfs-cli-state",
    "log_level": "debug", "log_file": "/tmp/stfs-cli.log", "fsname": "my-data",
    "memory_cache_size": "8M", "cache_dir": "/tmp/stfs-cli-cache",
}


def test_every_option_of_the_table_has_a_sample_here() -> None:
    valued = {option.name for option in OPTIONS if not option.flag}
    assert valued == set(SAMPLES), "a new option needs a sample value in SAMPLES"


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.long], ids=lambda o: o.name)
def test_every_long_option_gives_the_same_config_as_its_o_form(option: Option) -> None:
    plain = mount_config(["/srv/src", "/srv/mnt"])
    paths = ["/srv/mnt"] if option.name == "demo" else ["/srv/src", "/srv/mnt"]
    dashed_name = option.name.replace("_", "-")
    if option.flag:
        long_form, o_form, dashed = [option.option], option.name, dashed_name
    else:
        sample = SAMPLES[option.name]
        long_form = [option.option, sample]
        o_form, dashed = f"{option.name}={sample}", f"{dashed_name}={sample}"
    by_long = mount_config([*long_form, *paths])
    assert mount_config(["-o", o_form, *paths]) == by_long
    assert mount_config(["-o", dashed, *paths]) == by_long
    assert by_long != plain, f"{option.option} changed nothing"
    assert getattr(by_long, option.name) == (True if option.flag else option.value(
        SAMPLES[option.name]))


@pytest.mark.parametrize("option", [o for o in OPTIONS if not o.long], ids=lambda o: o.name)
def test_mount_only_options_work_in_o_and_are_no_long_options(option: Option) -> None:
    text = option.name if option.flag else f"{option.name}={SAMPLES[option.name]}"
    config = mount_config(["-o", text, "/srv/src", "/srv/mnt"])
    assert getattr(config, option.name) == (True if option.flag else SAMPLES[option.name])
    with pytest.raises(UsageError):
        mount_config([option.option, *([] if option.flag else [SAMPLES[option.name]]),
                      "/srv/src", "/srv/mnt"])


def test_long_option_wins_over_o() -> None:
    config = mount_config(["-o", "memory_limit=64M", "--memory-limit", "32M", "/s", "/m"])
    assert config.memory_limit == 32 * MIB


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.default is not None],
                         ids=lambda o: o.name)
def test_the_default_help_shows_is_the_default_used(option: Option) -> None:
    defaults = MountConfig(source="/s", mountpoint="/m")
    assert option.value(option.default or "") == getattr(defaults, option.name)
    assert f"(default {option.default})" in option.help_text()


def test_mount_help_names_every_option_of_the_table() -> None:
    out = run_stfs("mount", "--help").stdout
    for option in OPTIONS:
        assert (option.option if option.long else option.name) in out, option.name
