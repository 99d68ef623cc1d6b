"""``stfs mount`` and ``stfs umount``.

``mount_command`` validates SOURCE and MOUNTPOINT (``checks``: cleaning a
stale mount left by a killed daemon), then either serves in the foreground or
forks a daemon (``daemon.Daemon``) and waits until it reports the mount live
(or its one-line error) through a pipe. ``umount_command`` unmounts an stfs
mount, failing clearly on a busy one unless lazily.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

from stfs import (
    control,
    demo,
    logs,
    memory,
    metrics,
)
from stfs.checks import check_mountpoint, check_source, probe_path
from stfs.config import MountConfig
from stfs.daemon import Daemon
from stfs.disk_store import check_cache_dir
from stfs.errors import EXIT_FAILURE, EXIT_OK, StfsError, path_error
from stfs.mountinfo import FSTYPE, mount_at, resolve

log = logging.getLogger("stfs")


def _redirect_stdio(log_file: str | None) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if not logs.stderr_is_journal():
        os.dup2(devnull, 2)  # never keep the caller's terminal or pipe open
    os.close(devnull)


def mount_command(config: MountConfig) -> int:
    """``stfs mount``: returns once the mount is live (or raises StfsError)."""
    memory.configure_allocator()  # before the first thread (the mount point probe)
    logs.setup(config.log_level, config.log_file)
    source = str(demo.source_path(config.state_dir)) if config.demo else config.source
    assert source is not None
    mountpoint = check_mountpoint(config.mountpoint, os.path.realpath(source))
    if config.demo:
        try:
            demo.ensure_demo_source(config.state_dir)
        except OSError as exc:
            raise path_error(str(config.state_dir), exc) from None
        log.info("--demo: serving the demo source %s", source)
    source = check_source(source)
    if config.cache_dir is not None:  # its errors before forking, on the terminal
        check_cache_dir(config.cache_dir, config.cache_size, config.disk_cache_min_bytes)
    daemon = Daemon(config, source, mountpoint)
    if config.foreground:
        return daemon.run(on_ready=lambda: None)
    status = _daemonize(daemon)
    if config.demo:
        print(f"stfs: demo source mounted at {mountpoint}; look with ls -l {mountpoint}, "
              f"watch with stfs stats {mountpoint}, unmount with stfs umount {mountpoint}")
    return status


def _daemonize(daemon: Daemon) -> int:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        status = EXIT_FAILURE
        try:
            os.setsid()
            os.chdir("/")  # keep no directory busy; every path is absolute by now
            metrics.reset_process()
            _redirect_stdio(daemon.config.log_file)

            def ready() -> None:
                for line in daemon.warnings:  # the parent shows them on its terminal
                    _report(write_end, f"WARNING {line}")
                os.write(write_end, b"READY\n")
                os.close(write_end)

            status = daemon.run(on_ready=ready)
        except StfsError as exc:
            _report(write_end, f"ERROR {exc.exit_code} {exc.message}")
            status = exc.exit_code
        except BaseException as exc:
            log.exception("daemon failed")
            _report(write_end, f"ERROR {EXIT_FAILURE} {daemon.mountpoint}: daemon failed: {exc!r}")
        finally:
            logging.shutdown()
            os._exit(status)
    os.close(write_end)
    message = b""
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        message += chunk
    os.close(read_end)
    lines = message.decode("utf-8", "replace").strip().splitlines()
    for line in lines:
        if line.startswith("WARNING "):
            print(f"stfs: warning: {line[8:]}", file=sys.stderr)
    text = lines[-1] if lines else ""
    if text == "READY":
        return EXIT_OK
    if text.startswith("ERROR "):
        _, code, detail = text.split(" ", 2)
        raise StfsError(detail, int(code))
    os.waitpid(pid, 0)
    raise StfsError(f"{daemon.mountpoint}: the daemon exited before the mount was ready")


def _report(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass


def umount_command(mountpoint: str, lazy: bool) -> int:
    """``stfs umount``: unmount an stfs mount; busy mounts fail unless *lazy*."""
    path = resolve(mountpoint)
    entry = mount_at(path)
    if entry is None:
        probe = probe_path(path)
        if isinstance(probe, OSError) and probe.errno == errno.ENOENT:
            raise path_error(mountpoint, probe)
        raise StfsError(f"{mountpoint}: not an stfs mount (nothing is mounted there)")
    if entry.fstype != FSTYPE:
        raise StfsError(f"{mountpoint}: not an stfs mount (it is {entry.fstype})")
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        if "busy" in said.lower():
            raise StfsError(f"{mountpoint}: mount point is busy (files or directories in use); "
                            "close them or use --lazy")
        raise StfsError(f"{mountpoint}: unmount failed: {said or 'fusermount3 failed'}")
    if not lazy:
        # Let the daemon finish so that an immediate remount finds the place free.
        control.wait_gone(path, timeout=10)
    return EXIT_OK

