"""Copies taken through the mount are copies of SOURCE, extended attributes included.

stfs keeps a whole-file checksum, readable by name as ``user.stfs.xxh3_128``
once a full read has computed it. It must never be listed: ``cp -a``,
``rsync -aX`` and ``tar --xattrs`` copy what ``listxattr`` lists, so a listed
checksum would end up in every backup taken through the mount. Each test
reads every file in full first (so the checksums are known), checks that the
checksum is readable but not listed, copies with one tool and compares the
copy's attributes with SOURCE's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from tests.conftest import Mount, wait_for

MIB = 1024 * 1024
CHECKSUM = "user.stfs.xxh3_128"
Attributes = dict[str, dict[str, bytes]]


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, timeout=120,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, (args, result.stderr.decode(errors="replace"))
    return result


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """SOURCE with user attributes on files, a directory, the root and a file of a
    size that streams; one file already carries an attribute named like stfs's own
    (as a backup taken through an older stfs would)."""
    src = tmp_path / "source"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "plain.txt").write_text("no attributes here\n")
    (src / "tagged.txt").write_text("tagged\n")
    (src / "dir" / "big.bin").write_bytes(os.urandom(3 * MIB + 5))
    (src / "dir" / "sub" / "empty").write_bytes(b"")
    (src / "carried.bin").write_bytes(os.urandom(100 * 1024))
    os.symlink("tagged.txt", src / "link")
    os.setxattr(src / "tagged.txt", "user.comment", b"a comment")
    os.setxattr(src / "tagged.txt", "user.binary", bytes(range(256)))
    os.setxattr(src / "tagged.txt", "user.empty", b"")
    os.setxattr(src / "dir" / "big.bin", "user.origin", b"camera 7")
    os.setxattr(src / "dir" / "sub", "user.on_dir", b"dir \xff value")
    os.setxattr(src / "dir" / "sub" / "empty", "user.kind", b"placeholder")
    os.setxattr(src / "carried.bin", CHECKSUM, b"SOURCE's own value, not a checksum")
    os.setxattr(src, "user.on_root", b"root value")
    return src


def attributes(root: Path) -> Attributes:
    """Every entry's extended attributes (names and values) under *root*, root included."""
    found: Attributes = {}
    for here, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.join(here, name)
            rel = os.path.normpath(os.path.relpath(path, root))
            found[rel] = {n: os.getxattr(path, n, follow_symlinks=False)
                          for n in os.listxattr(path, follow_symlinks=False)}
    return found


def getfattr_dump(root: Path) -> bytes:
    """``getfattr -R -d -m - -h .`` in *root*: what a person would compare."""
    return run(["getfattr", "-R", "-h", "-d", "-m", "-", "."], cwd=root).stdout


def read_everything(root: Path) -> None:
    for here, _, files in os.walk(root):
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    while f.read(MIB):
                        pass


@pytest.fixture
def view(mounter: Callable[..., Mount], tree: Path, tmp_path: Path) -> Mount:
    """*tree* mounted, every file read in full, so that checksums are known."""
    mount = mounter(tree, "--state-dir", str(tmp_path / "state"))
    read_everything(mount.mountpoint)
    big = mount.mountpoint / "dir" / "big.bin"
    want = xxhash.xxh3_128((tree / "dir" / "big.bin").read_bytes()).hexdigest().encode()

    def known() -> bool:
        try:
            return os.getxattr(big, CHECKSUM) == want
        except OSError:
            return False

    assert wait_for(known, 30), "the full read computed no checksum: the premise fails"
    return mount


def test_listxattr_is_exactly_sources_and_the_checksum_is_readable_by_name(
        view: Mount, tree: Path) -> None:
    assert attributes(view.mountpoint) == attributes(tree)
    big = view.mountpoint / "dir" / "big.bin"
    assert CHECKSUM not in os.listxattr(big)
    assert os.getxattr(big, CHECKSUM) == xxhash.xxh3_128(
        (tree / "dir" / "big.bin").read_bytes()).hexdigest().encode()
    # SOURCE's own attribute of that name is SOURCE's, listed and read as such
    carried = view.mountpoint / "carried.bin"
    assert CHECKSUM in os.listxattr(carried)
    assert os.getxattr(carried, CHECKSUM) == os.getxattr(tree / "carried.bin", CHECKSUM)


@needs("getfattr")
def test_getfattr_dump_equals_sources_and_n_still_gives_the_checksum(
        view: Mount, tree: Path) -> None:
    assert getfattr_dump(view.mountpoint) == getfattr_dump(tree)
    out = run(["getfattr", "--only-values", "-n", CHECKSUM, "dir/big.bin"],
              cwd=view.mountpoint).stdout
    assert out.decode() == xxhash.xxh3_128((tree / "dir" / "big.bin").read_bytes()).hexdigest()


@needs("cp", "getfattr")
def test_cp_a_copies_exactly_sources_attributes(view: Mount, tree: Path,
                                                tmp_path: Path) -> None:
    copy = tmp_path / "cp-copy"
    run(["cp", "-a", str(view.mountpoint), str(copy)])
    assert attributes(copy) == attributes(tree)
    assert getfattr_dump(copy) == getfattr_dump(tree)


@needs("rsync", "getfattr")
def test_rsync_ax_copies_exactly_sources_attributes(view: Mount, tree: Path,
                                                    tmp_path: Path) -> None:
    copy = tmp_path / "rsync-copy"
    run(["rsync", "-aX", f"{view.mountpoint}/", f"{copy}/"])
    assert attributes(copy) == attributes(tree)
    assert getfattr_dump(copy) == getfattr_dump(tree)


@needs("rsync")
def test_rsync_itemize_finds_no_difference_between_copies_of_source_and_of_mount(
        view: Mount, tree: Path, tmp_path: Path) -> None:
    of_source, of_mount = tmp_path / "of-source", tmp_path / "of-mount"
    run(["rsync", "-aX", f"{tree}/", f"{of_source}/"])
    run(["rsync", "-aX", f"{view.mountpoint}/", f"{of_mount}/"])
    for a, b in ((of_source, of_mount), (of_mount, of_source),
                 (tree, view.mountpoint), (view.mountpoint, tree)):
        changes = run(["rsync", "-aXn", "--checksum", "--itemize-changes", f"{a}/", f"{b}/"])
        assert changes.stdout == b"", f"rsync {a}/ -> {b}/:\n{changes.stdout.decode()}"
    # the check can fail: an attribute SOURCE lacks is itemized
    os.setxattr(of_mount / "plain.txt", "user.extra", b"x")
    changes = run(["rsync", "-aXn", "--itemize-changes", f"{of_source}/", f"{of_mount}/"])
    assert b"plain.txt" in changes.stdout


TAR = ["tar", "--sort=name", "--format=posix", "--xattrs", "--xattrs-include=*",
       "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"]


@needs("tar", "getfattr")
def test_tar_xattrs_archive_equals_sources_and_extracts_sources_attributes(
        view: Mount, tree: Path, tmp_path: Path) -> None:
    of_mount = run([*TAR, "-cf", "-", "-C", str(view.mountpoint), "."]).stdout
    of_source = run([*TAR, "-cf", "-", "-C", str(tree), "."]).stdout
    assert CHECKSUM.encode() in of_mount  # carried.bin's own attribute is archived
    assert xxhash.xxh3_128((tree / "dir" / "big.bin").read_bytes()).hexdigest().encode() \
        not in of_mount
    assert of_mount == of_source
    out = tmp_path / "extracted"
    out.mkdir()
    archive = tmp_path / "mount.tar"
    archive.write_bytes(of_mount)
    run(["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(archive), "-C", str(out)])
    assert attributes(out) == attributes(tree)
    assert getfattr_dump(out) == getfattr_dump(tree)
