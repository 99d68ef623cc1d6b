"""The built-in demo source: files of several sizes, mounted by ``stfs mount --demo``."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

DEMO_VERSION = "1"

_FILES = {
    "README.txt": None,
    "small/tiny.txt": 13,
    "medium/photo-1.bin": 700 * 1024,
    "medium/clip-5M.bin": 5 * 1024 * 1024,
    "large/dataset-64M.bin": 64 * 1024 * 1024,
}
_README = (
    "This is the stfs demo source.\n"
    "Everything here is served read-only through the stfs chunk engine.\n"
    "Try: sha256sum, cp -a, tar, or `stfs stats MOUNTPOINT` while reading.\n"
)


def source_path(state_dir: Path) -> Path:
    """Where the demo source lives."""
    return state_dir / "demo-source"


def ensure_demo_source(state_dir: Path) -> str:
    """Create (once) and return the demo source directory under *state_dir*."""
    target = source_path(state_dir)
    marker = state_dir / "demo-source.version"
    if target.is_dir() and marker.exists() and marker.read_text().strip() == DEMO_VERSION:
        return str(target)
    state_dir.mkdir(parents=True, exist_ok=True)
    building = state_dir / f"demo-source.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    rng = random.Random(20261123)
    for rel, size in _FILES.items():
        path = building / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            if size is None:
                f.write(_README.encode())
                continue
            remaining = size
            while remaining:
                n = min(remaining, 1 << 20)
                f.write(rng.randbytes(n))
                remaining -= n
    for i in range(200):
        (building / "small" / f"note-{i:03d}.txt").write_text(f"note {i}\n" * (1 + i % 50))
    deepest = building / "nested" / "deeper" / "deepest"
    deepest.mkdir(parents=True)
    (deepest / "hello.txt").write_text("hello from deep inside\n")
    os.symlink("README.txt", building / "link-to-readme")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(building, target)
    marker.write_text(DEMO_VERSION + "\n")
    return str(target)
