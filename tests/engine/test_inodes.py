"""InodeTable without FUSE: node ids, remapping, lookup counts and forget."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from stfs.inodes import REMAP_BASE, ROOT_NODEID, InodeTable

ROOT_DEV = 2049
OTHER_DEV = 77
ROOT_INO = 4242


def fake_stat(ino: int, dev: int = ROOT_DEV, mode: int = stat.S_IFREG | 0o644) -> os.stat_result:
    """A stat result with just the fields the table looks at filled in."""
    return os.stat_result((mode, ino, dev, 1, 0, 0, 0, 0, 0, 0))


@pytest.fixture
def table() -> InodeTable:
    return InodeTable(fake_stat(ROOT_INO, mode=stat.S_IFDIR | 0o755))


def test_root_is_node_1_with_empty_path(table: InodeTable) -> None:
    assert ROOT_NODEID == 1
    assert table.root.nodeid == 1
    assert table.get(1) is table.root
    assert table.root.path == b""
    assert (table.root.dev, table.root.ino) == (ROOT_DEV, ROOT_INO)
    assert len(table) == 1


def test_node_id_equals_backing_inode_on_the_source_device(table: InodeTable) -> None:
    node = table.remember(b"a.txt", fake_stat(1234))
    assert node.nodeid == 1234
    assert table.nodeid_for(fake_stat(1234)) == 1234
    assert table.get(1234) is node
    assert node.path == b"a.txt"


def test_remembering_the_source_itself_gives_the_root(table: InodeTable) -> None:
    node = table.remember(b"dir/..", fake_stat(ROOT_INO))
    assert node is table.root
    assert table.root.path == b""  # the root's path never changes


def test_foreign_device_entry_is_remapped_into_reserved_range(table: InodeTable) -> None:
    node = table.remember(b"sub/file", fake_stat(1234, dev=OTHER_DEV))
    assert node.nodeid >= REMAP_BASE == 2**63
    assert node.nodeid != 1234
    # the same foreign object keeps its id while known
    assert table.nodeid_for(fake_stat(1234, dev=OTHER_DEV)) == node.nodeid
    assert table.remember(b"sub/file", fake_stat(1234, dev=OTHER_DEV)) is node


def test_foreign_entry_with_same_inode_number_does_not_collide(table: InodeTable) -> None:
    local = table.remember(b"x", fake_stat(500))
    foreign = table.remember(b"mnt/x", fake_stat(500, dev=OTHER_DEV))
    assert local.nodeid == 500
    assert foreign.nodeid != local.nodeid
    assert table.get(500) is local
    assert table.get(foreign.nodeid) is foreign


def test_remapped_ids_are_unique_across_many_foreign_entries(table: InodeTable) -> None:
    ids = set()
    for dev in (OTHER_DEV, OTHER_DEV + 1):
        for ino in range(1, 51):
            node = table.remember(f"{dev}/{ino}".encode(), fake_stat(ino, dev=dev))
            assert node.nodeid >= REMAP_BASE
            ids.add(node.nodeid)
    assert len(ids) == 100
    assert len(table) == 101


def test_backing_inode_1_is_remapped_not_confused_with_root(table: InodeTable) -> None:
    node = table.remember(b"one", fake_stat(1))
    assert node.nodeid >= REMAP_BASE
    assert node is not table.root
    assert table.get(1) is table.root
    assert table.root.path == b""


def test_backing_inode_in_reserved_range_is_remapped_uniquely(table: InodeTable) -> None:
    foreign = table.remember(b"f", fake_stat(7, dev=OTHER_DEV))
    huge = table.remember(b"huge", fake_stat(REMAP_BASE + 3))
    assert huge.nodeid >= REMAP_BASE
    assert huge.nodeid != foreign.nodeid
    assert table.get(huge.nodeid).path == b"huge"


def test_lookups_are_counted_and_forget_removes_at_zero(table: InodeTable) -> None:
    st = fake_stat(99)
    table.remember(b"a", st)
    table.remember(b"a", st)
    node = table.remember(b"a", st)
    assert node.lookups == 3
    table.forget(99, 2)
    assert table.get(99).lookups == 1
    table.forget(99, 1)
    with pytest.raises(OSError) as info:
        table.get(99)
    assert info.value.errno == errno.ESTALE
    assert len(table) == 1


def test_forget_of_a_remapped_node_frees_its_mapping(table: InodeTable) -> None:
    st = fake_stat(5, dev=OTHER_DEV)
    node = table.remember(b"m/five", st)
    table.forget(node.nodeid, 1)
    with pytest.raises(OSError) as info:
        table.get(node.nodeid)
    assert info.value.errno == errno.ESTALE
    assert len(table) == 1
    again = table.remember(b"m/five", st)
    assert again.lookups == 1
    assert again.nodeid >= REMAP_BASE


def test_forget_of_unknown_node_is_harmless(table: InodeTable) -> None:
    table.forget(123456, 1)
    assert len(table) == 1


def test_root_is_never_forgotten(table: InodeTable) -> None:
    table.forget(ROOT_NODEID, 1000)
    assert table.get(ROOT_NODEID) is table.root
    assert len(table) == 1


def test_hard_links_share_a_node_and_keep_the_newest_path(table: InodeTable) -> None:
    st = fake_stat(321)
    first = table.remember(b"a", st)
    second = table.remember(b"dir/b", st)
    assert first is second
    assert second.nodeid == 321
    assert second.path == b"dir/b"
    assert second.lookups == 2


def test_matches_compares_device_and_inode(table: InodeTable) -> None:
    node = table.remember(b"a", fake_stat(10))
    assert table.matches(node, fake_stat(10))
    assert not table.matches(node, fake_stat(11))
    assert not table.matches(node, fake_stat(10, dev=OTHER_DEV))
