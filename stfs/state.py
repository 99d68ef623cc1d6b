"""What stfs keeps between mounts, in ``--state-dir``.

One JSON file, ``state.json``: per backing device, the chunk sizer's recent
throughput samples, so a remount starts at the chunk size it had learned.
Writers take an exclusive ``flock`` on ``state.lock``, re-read, merge their
own device's entry and replace the file atomically, so concurrent mounts of
the same SOURCE never lose or tear each other's updates. A missing, corrupt
or foreign file is ignored with a warning: state is an optimisation, never a
reason to fail a mount.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_SAMPLES = 10


def device_key(st_dev: int) -> str:
    return f"dev:{os.major(st_dev)}:{os.minor(st_dev)}"


class StateStore:
    """The state file of one ``--state-dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self.lock_path = state_dir / "state.lock"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": STATE_VERSION, "devices": {}}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {"version": STATE_VERSION, "devices": {}}
        if (not isinstance(data, dict) or data.get("version") != STATE_VERSION
                or not isinstance(data.get("devices"), dict)):
            log.warning("ignoring state file %s: not an stfs state file of version %d",
                        self.path, STATE_VERSION)
            return {"version": STATE_VERSION, "devices": {}}
        return data

    def throughputs(self, st_dev: int) -> list[float]:
        """The learned throughput samples (bytes/s) of a backing device."""
        entry = self._read()["devices"].get(device_key(st_dev))
        samples = entry.get("throughput_bps") if isinstance(entry, dict) else None
        if not isinstance(samples, list):
            return []
        return [float(x) for x in samples if isinstance(x, (int, float)) and x > 0][-MAX_SAMPLES:]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def save_throughputs(self, st_dev: int, samples: list[float]) -> None:
        """Merge this device's samples into the file (atomic, under the lock)."""
        clean = [round(x, 1) for x in samples if x > 0 and x != float("inf")][-MAX_SAMPLES:]
        if not clean:
            return
        try:
            with self._locked():
                data = self._read()
                data["devices"][device_key(st_dev)] = {"throughput_bps": clean,
                                                       "updated": int(time.time())}
                fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".state-", suffix=".json")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError as exc:
            log.warning("could not save state to %s: %s", self.path, exc)
