"""Fixtures shared by the engine tests (no FUSE)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.helpers import Source


@pytest.fixture
def src(tmp_path: Path) -> Iterator[Source]:
    """A temporary SOURCE directory, opened the way View.open does; closed afterwards."""
    source = Source(tmp_path)
    try:
        yield source
    finally:
        source.close()
