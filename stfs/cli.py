"""Command line: ``stfs mount | umount | stats``; argument parsing lives only here.

``main(args=None)`` is the console script; tests call it with a list. Expected
failures are ``StfsError``: printed as one ``stfs: `` line with their exit
status (2 for usage errors). Anything else is a bug, reported in one line too
unless ``--log-level debug`` asks for the traceback.

mount.fuse3 (``mount -t fuse.stfs``, fstab) runs ``stfs SOURCE MOUNTPOINT -o
OPTS`` without the ``mount`` word; that form is accepted as ``stfs mount``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from stfs import __version__
from stfs.config import LOG_LEVELS, MountConfig, parse_size
from stfs.errors import EXIT_FAILURE, StfsError, UsageError
from stfs.metrics_http import parse_listen
from stfs.retry import RetryPolicy

COMMANDS = ("mount", "umount", "stats")

# mount(8) and fstab hand these to every helper; the view is read-only whatever they say.
IGNORED_OPTIONS = frozenset({
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
    "defaults", "nofail", "_netdev", "user", "users", "nouser", "owner", "group",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "diratime", "nodiratime", "lazytime", "nolazytime", "sync", "async", "dirsync",
    "silent", "loud", "nosymfollow", "symfollow",
})
IGNORED_PREFIXES = ("x-", "comment=", "subtype=", "helper=")

# -o key=value names (dashes written as underscores) -> how to parse the value
_VALUE_OPTIONS: dict[str, Any] = {
    "memory_limit": lambda v: parse_size(v, "--memory-limit"),
    "cache_size": lambda v: parse_size(v, "--cache-size"),
    "min_chunk": lambda v: parse_size(v, "--min-chunk"),
    "max_chunk": lambda v: parse_size(v, "--max-chunk"),
    "read_around": lambda v: parse_size(v, "--read-around"),
    "max_streams": lambda v: _parse_int(v, "--max-streams"),
    "attr_timeout": lambda v: _parse_seconds(v, "--attr-timeout"),
    "entry_timeout": lambda v: _parse_seconds(v, "--entry-timeout"),
    "monitor_interval": lambda v: _parse_seconds(v, "--monitor-interval"),
    "metrics_listen": lambda v: parse_listen(v),
    "sweep_interval": lambda v: _parse_interval(v, "--sweep-interval"),
    "max_open_fds": lambda v: _parse_int(v, "--max-open-fds"),
    "retry_file_system": lambda v: _parse_policy("file_system", v, "--retry-file-system"),
    "retry_network": lambda v: _parse_policy("network", v, "--retry-network"),
    "retry_jitter": lambda v: _parse_seconds(v, "--retry-jitter"),
    "read_deadline": lambda v: _parse_interval(v, "--read-deadline"),
    "state_dir": lambda v: Path(_parse_path(v, "--state-dir")),
    "log_level": lambda v: _parse_log_level(v),
    "log_file": lambda v: _parse_path(v, "--log-file"),
    "fsname": lambda v: v or _fail("fsname= needs a name"),
}
_FLAG_OPTIONS = ("allow_other", "foreground")


def _fail(message: str) -> str:
    raise UsageError(message)


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"invalid {what} '{text}': expected a whole number") from None


def _parse_seconds(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"invalid {what} '{text}': expected seconds") from None


def _parse_interval(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"invalid {what} '{text}': expected a positive number of seconds")
    return value


def _parse_policy(name: str, text: str, what: str) -> RetryPolicy:
    try:
        return RetryPolicy.parse(name, text)
    except ValueError as exc:
        raise UsageError(f"invalid {what} '{text}': {exc}") from None


def _parse_path(text: str, what: str) -> str:
    if not text:
        raise UsageError(f"{what} needs a path")
    return os.path.abspath(text)


def _parse_log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise UsageError(f"invalid --log-level '{text}': choose from {', '.join(LOG_LEVELS)}")
    return text.lower()


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one ``stfs: `` line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _split_options(values: Sequence[str]) -> list[str]:
    """Split ``-o a,b=c`` groups on unescaped commas."""
    items: list[str] = []
    for group in values:
        current = ""
        escaped = False
        for char in group:
            if escaped:
                current += char
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == ",":
                items.append(current)
                current = ""
            else:
                current += char
        items.append(current)
    return [item.strip() for item in items if item.strip()]


def parse_mount_options(values: Sequence[str]) -> dict[str, Any]:
    """Settings named in ``-o``: long options as key=value, flags, ignored mount(8) options."""
    settings: dict[str, Any] = {}
    for item in _split_options(values):
        key, has_value, value = item.partition("=")
        name = key.strip().replace("-", "_")
        if item in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES):
            continue
        if name in _FLAG_OPTIONS and not has_value:
            settings[name] = True
        elif name in _VALUE_OPTIONS and has_value:
            settings[name] = _VALUE_OPTIONS[name](value)
        elif name in _VALUE_OPTIONS:
            raise UsageError(f"mount option '{name}' needs a value ({name}=...)")
        else:
            raise UsageError(f"unknown mount option '{item}'")
    return settings


def _build_parser() -> _Parser:
    parser = _Parser(prog="stfs", description="Streaming FUSE file system: a read-only view of "
                     "a directory, served through a memory-capped adaptive read engine.")
    parser.add_argument("--version", action="version", version=f"stfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    mount = sub.add_parser(
        "mount", help="mount a read-only view of SOURCE at MOUNTPOINT",
        description="Mount a read-only view of SOURCE at MOUNTPOINT. Without SOURCE, a built-in "
        "demo source is served. Every long option is also accepted in -o as key=value "
        "(dashes written as underscores).")
    mount.add_argument("source", nargs="?", metavar="SOURCE",
                       help="backing directory (default: the built-in demo source)")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="directory to mount on")
    mount.add_argument("-f", "--foreground", action="store_true", default=None,
                       help="stay in the foreground (default: daemonize once the mount is live)")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                       help="mount options: allow_other, fsname=NAME, ro, and the long options "
                       "as key=value; mount(8)'s rw, dev, suid, exec, defaults, nofail, noauto, "
                       "_netdev, x-systemd.* are accepted and ignored")
    mount.add_argument("--memory-limit", metavar="SIZE", help="hard ceiling for all file data "
                       "held: cache + in-flight + read-ahead (default 50M)")
    mount.add_argument("--cache-size", metavar="SIZE",
                       help="page-cache share of the memory limit (default 3/4 of it)")
    mount.add_argument("--max-streams", metavar="N",
                       help="concurrent backing reads without pressure (default 10)")
    mount.add_argument("--min-chunk", metavar="SIZE", help="smallest chunk size (default 4K)")
    mount.add_argument("--max-chunk", metavar="SIZE", help="largest chunk size (default 1M)")
    mount.add_argument("--read-around", metavar="SIZE",
                       help="after a random read, put the window around it into the kernel's "
                       "page cache when SOURCE has it cached (default 1M, 0 = off)")
    mount.add_argument("--attr-timeout", metavar="SECONDS",
                       help="how long the kernel may cache attributes (default 1)")
    mount.add_argument("--entry-timeout", metavar="SECONDS",
                       help="how long the kernel may cache names (default 1)")
    mount.add_argument("--metrics-listen", metavar="[ADDR:]PORT",
                       help="also serve Prometheus /metrics over HTTP (loopback by default)")
    mount.add_argument("--monitor-interval", metavar="SECONDS",
                       help="how often memory pressure is sampled (default 1)")
    mount.add_argument("--sweep-interval", metavar="SECONDS",
                       help="how often orphaned and idle resources are freed (default 30)")
    mount.add_argument("--max-open-fds", metavar="N",
                       help="backing descriptors kept open; idle ones beyond are closed and "
                       "reopened on demand (default: from the open-file limit, at most 8192)")
    mount.add_argument("--retry-file-system", metavar="A:B:M:X",
                       help="retries of transient errors (EIO, EINTR, EAGAIN, EBUSY, ENOMEM, "
                       "EMFILE, ENFILE): attempts, base delay s, multiplier, max delay s "
                       "(default 3:1:2:5)")
    mount.add_argument("--retry-network", metavar="A:B:M:X",
                       help="retries of network-file-system errors (ETIMEDOUT, ESTALE, "
                       "ENOTCONN, ECONNRESET, EHOSTUNREACH, ENETUNREACH, EREMOTEIO) "
                       "(default 5:0.5:1.5:10)")
    mount.add_argument("--retry-jitter", metavar="FRACTION",
                       help="random spread of retry delays, 0 to 1 (default 0.25)")
    mount.add_argument("--read-deadline", metavar="SECONDS",
                       help="no retries of a read past this long after its first attempt "
                       "(default 30)")
    mount.add_argument("--state-dir", metavar="DIR",
                       help="what stfs keeps between mounts (default $XDG_STATE_HOME/stfs)")
    mount.add_argument("--log-level", metavar="LEVEL",
                       help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    mount.add_argument("--log-file", metavar="PATH", help="log here instead of stderr/journal")

    umount = sub.add_parser("umount", help="unmount an stfs mount",
                            description="Unmount an stfs mount. Fails when the mount is busy, "
                            "unless --lazy.")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("-z", "--lazy", action="store_true",
                        help="detach now, finish when no longer busy")

    stats = sub.add_parser("stats", help="show a running mount's statistics",
                           description="Show live statistics of the daemon serving MOUNTPOINT: "
                           "a table by default, or JSON, or Prometheus text exposition; "
                           "--watch redraws the table in place until Ctrl-C.")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    view = stats.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="one JSON object, every key the "
                      "daemon sends")
    view.add_argument("--prometheus", action="store_true",
                      help="Prometheus text exposition format 0.0.4")
    stats.add_argument("--watch", metavar="SECONDS",
                       help="live view redrawn every SECONDS until Ctrl-C (table view only)")
    return parser


def _mount_config(ns: argparse.Namespace) -> MountConfig:
    settings = parse_mount_options(ns.options)
    for name, parse in _VALUE_OPTIONS.items():  # long options win over -o
        value = getattr(ns, name, None)
        if value is not None:
            settings[name] = parse(value)
    if ns.foreground:
        settings["foreground"] = True
    return MountConfig(source=ns.source, mountpoint=ns.mountpoint, **settings)



def _run(ns: argparse.Namespace) -> int:
    if ns.command == "mount":
        from stfs.mount import mount_command

        return mount_command(_mount_config(ns))
    if ns.command == "umount":
        from stfs.mount import umount_command

        return umount_command(ns.mountpoint, ns.lazy)
    if ns.command == "stats":
        from stfs.stats_cmd import stats_command

        watch = None
        if ns.watch is not None:
            if ns.json or ns.prometheus:
                raise UsageError("--watch shows the table view; it cannot be combined with "
                                 f"{'--json' if ns.json else '--prometheus'}")
            watch = _parse_interval(ns.watch, "--watch")
        return stats_command(ns.mountpoint, as_json=ns.json, as_prometheus=ns.prometheus,
                             watch=watch)
    raise UsageError("a command is required: mount, umount or stats (see stfs --help)")


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``stfs`` command; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = any("debug" in arg for arg in argv)
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
            if len([a for a in argv if not a.startswith("-")]) < 2:
                raise UsageError(f"unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)})")
            argv.insert(0, "mount")  # mount.fuse3's form: stfs SOURCE MOUNTPOINT -o OPTS
        ns = _build_parser().parse_args(argv)
        return _run(ns)
    except StfsError as exc:
        print(f"stfs: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("stfs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"stfs: internal error: {exc!r} (run with --log-level debug for details)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
