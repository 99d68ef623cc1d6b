"""``--metrics-listen``: /metrics over HTTP for a Prometheus scraper."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stfs.mountinfo import mount_at
from tests.conftest import Mount, run_stfs


def test_metrics_endpoint_serves_the_prometheus_exposition(mounter: Callable[..., Mount],
                                                           source: Path) -> None:
    mount: Mount = mounter(source, "--metrics-listen", "127.0.0.1:0")
    port = mount.stats()["metrics_port"]
    assert isinstance(port, int) and port > 0
    (mount.mountpoint / "data.bin").read_bytes()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    served = families["stfs_served_bytes"]
    assert served.type == "counter"
    assert served.samples[0].value >= (source / "data.bin").stat().st_size
    assert families["stfs_read_duration_seconds"].type == "histogram"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as not_get:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", data=b"x", timeout=5)
    assert not_get.value.code == 405


def test_bad_metrics_listen_value_is_a_usage_error(source: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    result = run_stfs("mount", "--metrics-listen", "localhost:http", str(source),
                      str(tmp_path / "m"))
    assert result.returncode == 2
    assert result.stderr.startswith("stfs: ") and len(result.stderr.splitlines()) == 1


def test_metrics_port_in_use_fails_the_mount_with_one_line(source: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_stfs("mount", "--metrics-listen", f"127.0.0.1:{port}", str(source),
                          str(tmp_path / "m"))
    assert result.returncode == 1
    expected = f"stfs: --metrics-listen 127.0.0.1:{port}: address already in use"
    assert result.stderr.splitlines() == [expected]
    assert mount_at(os.path.realpath(tmp_path / "m")) is None
