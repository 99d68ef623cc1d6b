"""The most basic promise: a mount shows SOURCE's names and bytes."""

from pathlib import Path

from tests.conftest import Mount


def test_mount_lists_names_and_serves_identical_bytes(mounted: Mount, source: Path) -> None:
    assert sorted(p.name for p in mounted.mountpoint.iterdir()) == sorted(
        p.name for p in source.iterdir())
    assert (mounted.mountpoint / "data.bin").read_bytes() == (source / "data.bin").read_bytes()


def test_foreground_daemon_exits_zero_when_unmounted(mounted: Mount) -> None:
    assert mounted.unmount() == 0
