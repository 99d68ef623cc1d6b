"""Bounded recency sets and maps kept in ``OrderedDict``s (oldest first)."""

from __future__ import annotations

import collections
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(lru: collections.OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """Make *key* the most recent entry of *lru* (with *value*); the oldest
    entries beyond *limit* are dropped."""
    lru[key] = value
    lru.move_to_end(key)
    while len(lru) > limit:
        lru.popitem(last=False)
