"""What stfs keeps between mounts (--state-dir)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from stfs.state import StateStore, device_key
from tests.conftest import Mount


def test_a_remount_starts_from_the_throughput_learned_before(mounter, source: Path,
                                                             tmp_path: Path) -> None:
    state = tmp_path / "state"
    first: Mount = mounter(source, "--state-dir", str(state))
    (first.mountpoint / "data.bin").read_bytes()
    assert first.stats()["learned_throughput_bps"]
    assert first.unmount() == 0
    saved = json.loads((state / "state.json").read_text())
    entry = saved["devices"][device_key(source.stat().st_dev)]
    assert entry["throughput_bps"]
    second: Mount = mounter(source, "--state-dir", str(state))
    assert second.stats()["learned_throughput_bps"]      # before any read of this mount
    assert "learned in earlier mounts" in second.log()


def test_a_corrupt_or_foreign_state_file_is_ignored_with_a_warning(mounter, source: Path,
                                                                   tmp_path: Path) -> None:
    for content in ("{not json", json.dumps(["a", "list"]), json.dumps({"version": 99})):
        state = tmp_path / f"state-{len(content)}"
        state.mkdir()
        (state / "state.json").write_text(content)
        mount: Mount = mounter(source, "--state-dir", str(state))
        assert mount.stats()["learned_throughput_bps"] == []
        assert (mount.mountpoint / "hello.txt").read_text() == "hello, world\n"
        assert "ignoring" in mount.log()
        assert mount.unmount() == 0
        # The next save replaced it with a valid file.
        assert json.loads((state / "state.json").read_text())["version"] == 1


def test_concurrent_saves_for_different_devices_all_land(tmp_path: Path) -> None:
    state = tmp_path / "state"
    errors: list[BaseException] = []

    def save(dev: int) -> None:
        try:
            for _ in range(20):
                StateStore(state).save_throughputs(os.makedev(8, dev), [1e6 * dev])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(d,)) for d in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = StateStore(state)
    assert [store.throughputs(os.makedev(8, d)) for d in range(1, 9)] == \
        [[1e6 * d] for d in range(1, 9)]
    assert not [p for p in state.iterdir() if p.name.startswith(".state-")]
