"""Command line: ``stfs mount | umount | stats``; argument parsing lives only here.

``main(args=None)`` is the console script; tests call it with a list. Expected
failures are ``StfsError``: printed as one ``stfs: `` line with their exit
status (2 for usage errors). Anything else is a bug, reported in one line too
unless ``--log-level debug`` asks for the traceback.

Every ``stfs mount`` option is one entry of ``OPTIONS``: the argparse option
(``--memory-limit``) and the ``-o`` key (``memory_limit=``) are both made from
it and parsed by the same function.

mount.fuse3 (``mount -t fuse.stfs``, fstab) runs ``stfs SOURCE MOUNTPOINT -o
OPTS`` without the ``mount`` word; that form is accepted as ``stfs mount``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from stfs import __version__
from stfs.config import LOG_LEVELS, MountConfig, parse_size
from stfs.errors import EXIT_FAILURE, StfsError, UsageError
from stfs.metrics_http import parse_listen
from stfs.retry import RetryPolicy

COMMANDS = ("mount", "umount", "stats", "cache")

# mount(8) and fstab hand these to every helper; the view is read-only whatever they say.
IGNORED_OPTIONS = frozenset({
    "rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
    "defaults", "nofail", "_netdev", "user", "users", "nouser", "owner", "group",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "diratime", "nodiratime", "lazytime", "nolazytime", "sync", "async", "dirsync",
    "silent", "loud", "nosymfollow", "symfollow",
})
IGNORED_PREFIXES = ("x-", "comment=", "subtype=", "helper=")


# -- value parsers: (text, option as the user knows it) -> value ---------------------


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


def _policy(name: str) -> Callable[[str, str], RetryPolicy]:
    def parse(text: str, what: str) -> RetryPolicy:
        try:
            return RetryPolicy.parse(name, text)
        except ValueError as exc:
            raise UsageError(f"invalid {what} '{text}': {exc}") from None

    return parse


def _parse_path(text: str, what: str) -> str:
    if not text:
        raise UsageError(f"{what} needs a path")
    return os.path.abspath(text)


def _parse_dir(text: str, what: str) -> Path:
    return Path(_parse_path(text, what))


def _parse_log_level(text: str, what: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise UsageError(f"invalid {what} '{text}': choose from {', '.join(LOG_LEVELS)}")
    return text.lower()


def _parse_listen(text: str, what: str) -> tuple[str, int]:
    return parse_listen(text)


def _parse_name(text: str, what: str) -> str:
    if not text:
        raise UsageError(f"{what.lstrip('-').replace('-', '_')}= needs a name")
    return text


# -- the option table -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``stfs mount`` option, both as ``--long-option`` and as ``-o key=value``."""

    name: str
    """The MountConfig field; dashes for underscores gives the long option."""
    parse: Callable[[str, str], Any] | None
    """Turns the text given into the field's value; None for a flag (no value)."""
    metavar: str = ""
    help: str = ""
    default: str | None = None
    """The default as --help shows it, in the option's own syntax (MountConfig has the value)."""
    short: str | None = None
    long: bool = True
    """False: a mount option only (``-o name``), with no ``--long`` form."""

    @property
    def flag(self) -> bool:
        return self.parse is None

    @property
    def option(self) -> str:
        """How the user spells it on the command line: ``--memory-limit``."""
        return "--" + self.name.replace("_", "-")

    def value(self, text: str) -> Any:
        """The parsed value of *text* (a flag's value is True)."""
        return True if self.parse is None else self.parse(text, self.option)

    def help_text(self) -> str:
        return f"{self.help} (default {self.default})" if self.default is not None else self.help


OPTIONS: tuple[Option, ...] = (
    Option("foreground", None, short="-f",
           help="stay in the foreground (default: daemonize once the mount is live)"),
    Option("demo", None, help="serve the built-in demo source instead of SOURCE: "
           "stfs mount --demo MOUNTPOINT"),
    Option("allow_other", None, long=False, help="let other users than the mounting one in"),
    Option("fsname", _parse_name, "NAME", long=False,
           help="the source column of the mount table (default: SOURCE)"),
    Option("memory_limit", parse_size, "SIZE", default="50M",
           help="hard ceiling for all file data held: cache + in-flight + read-ahead"),
    Option("cache_size", parse_size, "SIZE",
           help="with --cache-dir: the disk cache's size (default: up to 10G, leaving 10 %% "
           "of its file system free); without: as --memory-cache-size"),
    Option("memory_cache_size", parse_size, "SIZE",
           help="chunk-cache share of the memory limit (default: 3/4 of it)"),
    Option("cache_dir", _parse_dir, "DIR",
           help="keep chunks read from SOURCE in a persistent cache in DIR, checked and "
           "reused across mounts (default: no disk cache)"),
    Option("max_streams", _parse_int, "N", default="10",
           help="concurrent backing reads without pressure"),
    Option("min_chunk", parse_size, "SIZE", default="4K", help="smallest chunk size"),
    Option("max_chunk", parse_size, "SIZE", default="1M", help="largest chunk size"),
    Option("read_around", parse_size, "SIZE", default="1M",
           help="after a random read, put the window around it into the kernel's page cache "
           "when SOURCE has it cached; 0 turns it off"),
    Option("attr_timeout", _parse_seconds, "SECONDS", default="1",
           help="how long the kernel may cache attributes"),
    Option("entry_timeout", _parse_seconds, "SECONDS", default="1",
           help="how long the kernel may cache names"),
    Option("metrics_listen", _parse_listen, "[ADDR:]PORT",
           help="also serve Prometheus /metrics over HTTP (loopback by default)"),
    Option("monitor_interval", _parse_seconds, "SECONDS", default="1",
           help="how often memory pressure is sampled"),
    Option("sweep_interval", _parse_interval, "SECONDS", default="30",
           help="how often orphaned and idle resources are freed"),
    Option("max_open_fds", _parse_int, "N",
           help="backing descriptors kept open; idle ones beyond are closed and reopened on "
           "demand (default: from the open-file limit, at most 8192)"),
    Option("retry_file_system", _policy("file_system"), "A:B:M:X", default="3:1:2:5",
           help="retries of transient errors (EIO, EINTR, EAGAIN, EBUSY, ENOMEM, EMFILE, "
           "ENFILE): attempts, base delay s, multiplier, max delay s"),
    Option("retry_network", _policy("network"), "A:B:M:X", default="5:0.5:1.5:10",
           help="retries of network-file-system errors (ETIMEDOUT, ESTALE, ENOTCONN, "
           "ECONNRESET, EHOSTUNREACH, ENETUNREACH, EREMOTEIO)"),
    Option("retry_jitter", _parse_seconds, "FRACTION", default="0.25",
           help="random spread of retry delays, 0 to 1"),
    Option("read_deadline", _parse_interval, "SECONDS", default="30",
           help="no retries of a read past this long after its first attempt"),
    Option("state_dir", _parse_dir, "DIR",
           help="what stfs keeps between mounts (default: $XDG_STATE_HOME/stfs)"),
    Option("log_level", _parse_log_level, "LEVEL", default="info",
           help=f"one of {', '.join(LOG_LEVELS)}"),
    Option("log_file", _parse_path, "PATH", help="log here instead of stderr/journal"),
)
"""Every ``stfs mount`` option; ``-o`` takes each by its name (dashes also accepted)."""

_BY_NAME = {option.name: option for option in OPTIONS}


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
        option = _BY_NAME.get(name)
        if option is None:
            raise UsageError(f"unknown mount option '{item}'")
        if option.flag and has_value:
            raise UsageError(f"mount option '{name}' takes no value (not '{item}')")
        if not option.flag and not has_value:
            raise UsageError(f"mount option '{name}' needs a value ({name}=...)")
        settings[name] = option.value(value)
    return settings


def _o_help() -> str:
    only_o = ", ".join(o.name if o.flag else f"{o.name}={o.metavar}"
                       for o in OPTIONS if not o.long)
    return (f"mount options: {only_o}, ro, and the long options as key=value; mount(8)'s rw, "
            "dev, suid, exec, defaults, nofail, noauto, _netdev, x-systemd.* are accepted and "
            "ignored")


def _build_parser() -> _Parser:
    parser = _Parser(prog="stfs", description="Streaming FUSE file system: a read-only view of "
                     "a directory, served through a memory-capped adaptive read engine.")
    parser.add_argument("--version", action="version", version=f"stfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    mount = sub.add_parser(
        "mount", help="mount a read-only view of SOURCE at MOUNTPOINT",
        usage="stfs mount [options] SOURCE MOUNTPOINT\n"
        "       stfs mount [options] --demo MOUNTPOINT",
        description="Mount a read-only view of SOURCE at MOUNTPOINT, or with --demo a built-in "
        "demo source. Every long option is also accepted in -o as key=value (dashes written "
        "as underscores).")
    # Both optional for argparse, so that _positionals can say what is missing.
    mount.add_argument("source", nargs="?", metavar="SOURCE",
                       help="backing directory (none with --demo)")
    mount.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                       help="directory to mount on")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                       help=_o_help())
    for option in OPTIONS:
        if not option.long:
            continue
        names = [option.short, option.option] if option.short else [option.option]
        if option.flag:
            mount.add_argument(*names, dest=option.name, action="store_true", default=None,
                               help=option.help_text())
        else:
            mount.add_argument(*names, dest=option.name, metavar=option.metavar,
                               help=option.help_text())

    umount = sub.add_parser("umount", help="unmount an stfs mount",
                            description="Unmount an stfs mount. Fails when the mount is busy, "
                            "unless --lazy.")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("-z", "--lazy", action="store_true",
                        help="detach now, finish when no longer busy")

    stats = sub.add_parser("stats", help="show a running mount's statistics",
                           description="Show live statistics of the daemon serving MOUNTPOINT: "
                           "a table by default, or JSON, or Prometheus text exposition; "
                           "--watch redraws the table in place until Ctrl-C, or with --json "
                           "prints one JSON object per line (JSON Lines).")
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    view = stats.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="one JSON object, every key the "
                      "daemon sends (with --watch: one per line)")
    view.add_argument("--prometheus", action="store_true",
                      help="Prometheus text exposition format 0.0.4")
    stats.add_argument("--watch", metavar="SECONDS",
                       help="every SECONDS until Ctrl-C: redraw the table, or with --json print "
                       "one more line")

    cache = sub.add_parser("cache", help="show or clear a disk cache (--cache-dir)",
                           description="Show how many chunks and bytes the disk cache in DIR "
                           "holds and whether a mount uses it, or with --clear delete them "
                           "(refused while a mount uses DIR).")
    cache.add_argument("directory", metavar="DIR")
    cache.add_argument("--clear", action="store_true", help="delete every cached chunk")
    return parser


def _positionals(ns: argparse.Namespace, demo: bool) -> tuple[str | None, str]:
    """(SOURCE, MOUNTPOINT) from what was given; SOURCE is None for the demo.

    A missing MOUNTPOINT is a usage error, never the demo mounted over SOURCE's
    place: ``stfs mount /data`` must not hide /data.
    """
    given = [path for path in (ns.source, ns.mountpoint) if path is not None]
    if demo:
        if len(given) == 2:
            raise UsageError(f"--demo serves the built-in demo source and takes no SOURCE "
                             f"(got {given[0]} {given[1]}): stfs mount --demo MOUNTPOINT")
        if not given:
            raise UsageError("missing MOUNTPOINT: stfs mount --demo MOUNTPOINT")
        return None, given[0]
    if not given:
        raise UsageError("missing SOURCE and MOUNTPOINT: stfs mount SOURCE MOUNTPOINT, or "
                         "stfs mount --demo MOUNTPOINT for the built-in demo source")
    if len(given) == 1:
        raise UsageError(f"missing MOUNTPOINT after SOURCE {given[0]}: stfs mount SOURCE "
                         f"MOUNTPOINT; to mount the built-in demo source there, "
                         f"stfs mount --demo {given[0]}")
    return given[0], given[1]


def _mount_config(ns: argparse.Namespace) -> MountConfig:
    settings = parse_mount_options(ns.options)
    for option in OPTIONS:  # long options win over -o
        text = getattr(ns, option.name, None)
        if text is not None:
            settings[option.name] = option.value(text)
    source, mountpoint = _positionals(ns, bool(settings.get("demo")))
    return MountConfig(source=source, mountpoint=mountpoint, **settings)


def mount_config(args: Sequence[str]) -> MountConfig:
    """The configuration ``stfs mount ARGS`` would mount with (nothing is mounted)."""
    return _mount_config(_build_parser().parse_args(["mount", *args]))


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
            if ns.prometheus:
                raise UsageError("--watch shows the table, or JSON Lines with --json; it "
                                 "cannot be combined with --prometheus")
            watch = _parse_interval(ns.watch, "--watch")
        return stats_command(ns.mountpoint, as_json=ns.json, as_prometheus=ns.prometheus,
                             watch=watch)
    if ns.command == "cache":
        from stfs.disk_store import cache_command

        return cache_command(Path(os.path.abspath(ns.directory)), ns.clear)
    raise UsageError("a command is required: mount, umount, stats or cache (see stfs --help)")


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
    except BrokenPipeError:  # the reader of stdout left (stats ... | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"stfs: internal error: {exc!r} (run with --log-level debug for details)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
