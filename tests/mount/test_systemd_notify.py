"""systemd integration without systemd as PID 1: sd_notify against a real
AF_UNIX datagram socket standing in for the service manager, the journal log
format (JOURNAL_STREAM), the unmount summary line, and ``systemd-analyze
verify`` on the template unit.

Every daemon started here is ended in a ``finally`` (SIGTERM by PID, then
SIGKILL) and its mount detached (``fusermount3 -uz``) if still there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stfs import notify
from tests.conftest import STFS, force_unmount, is_mounted

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "stfs@.service"


def parse(datagram: bytes) -> dict[str, str]:
    fields = {}
    for line in datagram.decode().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def receive(sock: socket.socket, timeout: float) -> dict[str, str] | None:
    sock.settimeout(timeout)
    try:
        return parse(sock.recv(4096))
    except TimeoutError:
        return None


def receive_until(sock: socket.socket, key: str, timeout: float,
                  seen: list[dict[str, str]]) -> dict[str, str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = receive(sock, max(0.01, deadline - time.monotonic()))
        if message is None:
            return None
        seen.append(message)
        if key in message:
            return message
    return None


@contextlib.contextmanager
def foreground_daemon(source: Path, mountpoint: Path, *args: str, env: dict[str, str],
                      stderr: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``stfs mount -f``; afterwards the daemon is gone and nothing is mounted."""
    proc = subprocess.Popen([*STFS, "mount", "-f", *args, str(source), str(mountpoint)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if is_mounted(mountpoint):
            force_unmount(mountpoint)


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    env.update(extra)
    return env


# -- notify.py -------------------------------------------------------------


def test_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.enabled()
    assert notify.ready("x") is False
    assert notify.status("x") is False
    assert notify.stopping() is False


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"stfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.enabled()
        assert notify.ready("served 0 B,\nnewline")
        message = parse(sock.recv(4096))
        assert message == {"READY": "1", "STATUS": "served 0 B, newline",
                           "MAINPID": str(os.getpid())}
        assert notify.status("hello")
        assert parse(sock.recv(4096)) == {"STATUS": "hello"}
        assert notify.stopping()
        assert parse(sock.recv(4096)) == {"STOPPING": "1"}


def test_notify_path_socket_and_unreachable_socket(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "n.sock"
    with notify_socket(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.status("via a path")
        assert parse(sock.recv(4096)) == {"STATUS": "via a path"}
    # The manager went away: no exception, just False.
    assert notify.status("nobody listens") is False


# -- the daemon under a stand-in service manager ---------------------------


def test_ready_only_when_live_status_and_stopping(source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    sock_path = tmp_path / "n.sock"
    log_file = tmp_path / "stfs.log"
    with notify_socket(sock_path) as sock:
        env = daemon_env(NOTIFY_SOCKET=str(sock_path))
        with foreground_daemon(source, mountpoint, "--log-file", str(log_file),
                               "--monitor-interval", "0.2", env=env) as proc:
            seen: list[dict[str, str]] = []
            ready = receive_until(sock, "READY", 30, seen)
            # When READY=1 arrives the mount must already answer.
            assert ready is not None, f"no READY=1; got {seen}\n{log_file.read_text()}"
            assert is_mounted(mountpoint)
            os.statvfs(mountpoint)
            assert (mountpoint / "hello.txt").read_text() == "hello, world\n"
            assert [m for m in seen if "READY" in m] == [ready]
            assert ready["READY"] == "1"
            assert ready["MAINPID"] == str(proc.pid)
            assert ready["STATUS"].startswith("served ")
            assert "mounted " in log_file.read_text()

            data = (mountpoint / "data.bin").read_bytes()
            assert data == (source / "data.bin").read_bytes()
            status = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = receive_until(sock, "STATUS", 5, seen)
                if message and "MiB" in message["STATUS"]:
                    status = message["STATUS"]
                    break
            assert status is not None, f"no STATUS= with the bytes served; got {seen}"
            assert re.fullmatch(r"served \d+\.\d MiB, \d+ reads, pressure "
                                r"(none|light|moderate|heavy|critical), \d+ open", status), status

            proc.send_signal(signal.SIGTERM)
            stopping = receive_until(sock, "STOPPING", 15, seen)
            assert stopping is not None, f"no STOPPING=1; got {seen}"
            assert stopping["STOPPING"] == "1"
            assert proc.wait(15) == 0
            assert not is_mounted(mountpoint)


def test_unmount_sends_stopping(source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    sock_path = tmp_path / "n.sock"
    with notify_socket(sock_path) as sock:
        env = daemon_env(NOTIFY_SOCKET=str(sock_path))
        with foreground_daemon(source, mountpoint, "--log-file", str(tmp_path / "stfs.log"),
                               env=env) as proc:
            seen: list[dict[str, str]] = []
            assert receive_until(sock, "READY", 30, seen) is not None, seen
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True,
                           stdin=subprocess.DEVNULL, capture_output=True)
            assert receive_until(sock, "STOPPING", 15, seen) is not None, seen
            assert proc.wait(15) == 0


# -- logs ------------------------------------------------------------------


SUMMARY = re.compile(r"unmounted (?P<mnt>\S+): (?P<bytes>\d+) bytes served in (?P<reads>\d+) "
                     r"reads, cache hit ratio [\d.]+%, peak RSS (?P<rss>\d+) bytes, peak held "
                     r"\d+ bytes, (?P<retries>\d+) retries, \d+ recoveries, (?P<errors>\d+) "
                     r"errors")


def run_with_stderr_pipe(source: Path, mountpoint: Path, journal: bool) -> list[str]:
    """A foreground daemon whose stderr is a pipe; JOURNAL_STREAM names that pipe
    (as systemd does for the journal's stream) or a different inode."""
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    value = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
    env = daemon_env(JOURNAL_STREAM=value)
    try:
        with foreground_daemon(source, mountpoint, env=env, stderr=write_end) as proc:
            os.close(write_end)
            write_end = -1
            deadline = time.monotonic() + 30
            while not is_mounted(mountpoint) and time.monotonic() < deadline:
                assert proc.poll() is None, "daemon exited early"
                time.sleep(0.02)
            os.statvfs(mountpoint)
            assert (mountpoint / "data.bin").read_bytes() == (source / "data.bin").read_bytes()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode().splitlines()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_journal_stream_lines_have_no_timestamps_and_summary(source: Path,
                                                             tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lines = run_with_stderr_pipe(source, mountpoint, journal=True)
    assert lines, "no log lines"
    for line in lines:
        assert re.match(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S", line), line
        assert not re.match(r"\d{4}-\d\d-\d\d", line), line
    assert any(line.startswith("INFO mounted ") for line in lines), lines
    summary = [m for line in lines if (m := SUMMARY.search(line))]
    assert len(summary) == 1, lines
    found = summary[0]
    assert found["mnt"] == str(mountpoint)
    assert int(found["bytes"]) >= (source / "data.bin").stat().st_size
    assert int(found["reads"]) > 0
    assert int(found["rss"]) > 1024 * 1024
    assert found["retries"] == "0" and found["errors"] == "0"


def test_stderr_not_the_journal_keeps_timestamps(source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lines = run_with_stderr_pipe(source, mountpoint, journal=False)
    mounted = [line for line in lines if " INFO mounted " in line]
    assert mounted and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ stfs\[\d+\] INFO ",
                                mounted[0]), lines


# -- the unit --------------------------------------------------------------


def test_unit_file_shape() -> None:
    text = UNIT.read_text()
    for needed in ("Type=notify", "NotifyAccess=main", "EnvironmentFile=/etc/stfs/%i.env",
                   "ExecStartPre=-/usr/bin/fusermount3 -u -z %f",
                   "ExecStart=/usr/local/bin/stfs mount -f $STFS_OPTIONS ${STFS_SOURCE} %f",
                   "Restart=on-failure"):
        assert needed in text.splitlines(), needed


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    if not os.access("/usr/local/bin/stfs", os.X_OK):
        pytest.skip("/usr/local/bin/stfs is not installed (run scripts/setup as root)")
    shutil.copy(UNIT, tmp_path / UNIT.name)
    for unit in (UNIT.name, "stfs@srv-data.service"):
        result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / unit)],
                                check=False, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert "stfs@" not in result.stderr, result.stderr
