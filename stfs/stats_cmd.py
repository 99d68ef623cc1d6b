"""``stfs stats``: ask a running daemon for its figures and print them."""

from __future__ import annotations

import json
import os
from typing import Any

from stfs import control
from stfs.errors import StfsError
from stfs.mount import FSTYPE, _resolved
from stfs.mountinfo import mount_at


def stats_command(mountpoint: str, as_json: bool) -> int:
    path = _resolved(mountpoint)
    entry = mount_at(path)
    if entry is None or entry.fstype != FSTYPE:
        if not os.path.exists(path):
            raise StfsError(f"{mountpoint}: no such file or directory")
        raise StfsError(f"{mountpoint}: not a live stfs mount")
    stats = control.request_stats(path)
    if as_json:
        print(json.dumps(stats, indent=None, sort_keys=False))
    else:
        _print_table(stats)
    return 0


def _print_table(stats: dict[str, Any]) -> None:
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key:<{width}}  {value}")
