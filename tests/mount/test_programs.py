"""Real, unmodified programs give the same results on the mount as on SOURCE.

Every test mounts a SOURCE tree for real (``mounter`` from tests/conftest.py,
which always unmounts) and runs the same program once against SOURCE and once
against the mount, comparing the real outputs (never only exit statuses).

Most tests share one SOURCE tree built once per module (``tree``); no test
writes to it (git runs with ``--no-optional-locks``, Python with
``PYTHONDONTWRITEBYTECODE=1``, SQLite with ``immutable=1``), so running a
program on SOURCE cannot change what the next test sees.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import xxhash

from tests.conftest import Mount

RANDOM_SIZE = 3 * 1024 * 1024 + 4099  # multi-MiB, not a multiple of any page/chunk size
BIG_SIZE = 64 * 1024 * 1024
NS = 1_000_000_000

GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Ada Author",
    "GIT_AUTHOR_EMAIL": "ada@example.org",
    "GIT_COMMITTER_NAME": "Carl Committer",
    "GIT_COMMITTER_EMAIL": "carl@example.org",
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
    "TZ": "UTC",
}
GIT = ["git", "-c", "safe.directory=*", "-c", "core.fileMode=true", "--no-optional-locks",
       "--no-pager"]


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True, timeout: float = 60,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a program in the C locale; output captured as bytes; by default it must exit 0."""
    full_env = {**os.environ, "LC_ALL": "C", "TZ": "UTC", **(env or {})}
    result = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL,
                            timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, (
            f"{argv} exited {result.returncode}\nstdout: {result.stdout[-2000:]!r}\n"
            f"stderr: {result.stderr[-2000:]!r}")
    return result


Result = subprocess.CompletedProcess[bytes]


def both(argv_for: Callable[[Path], list[str]], src: Path, mnt: Path,
         **kwargs: Any) -> tuple[Result, Result]:
    """Run ``argv_for(root)`` with root = SOURCE and root = MOUNT; return both results."""
    return run(argv_for(src), **kwargs), run(argv_for(mnt), **kwargs)


def in_both(argv: list[str], src: Path, mnt: Path, **kwargs: Any) -> tuple[Result, Result]:
    """Run the same argv with cwd = SOURCE and cwd = MOUNT; return both results."""
    return run(argv, cwd=src, **kwargs), run(argv, cwd=mnt, **kwargs)


def regular_files(root: Path) -> list[str]:
    """Relative paths (str, surrogate-escaped) of every regular file under root, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                out.append(os.path.relpath(path, root))
    return sorted(out, key=os.fsencode)


def set_ns_times(path: Path, seconds: int, nanos: int) -> None:
    t = seconds * NS + nanos
    os.utime(path, ns=(t, t), follow_symlinks=False)


def make_git_repo(repo: Path) -> None:
    """Two commits with fixed identities and dates; one packed, one loose; dirty work tree."""
    repo.mkdir()

    def git(*args: str, date: str = "2020-01-02T03:04:05+00:00") -> None:
        run(["git", *args], cwd=repo,
            env={**GIT_ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date, "HOME": str(repo)})

    git("init", "-q", "-b", "main")
    (repo / "a.txt").write_text("alpha\nneedle in the repo\n")
    (repo / "b.txt").write_text("bravo\n")
    git("add", "a.txt", "b.txt")
    git("commit", "-q", "-m", "first commit")
    git("gc", "-q")  # first commit's objects now live in a pack (git mmaps packs)
    (repo / "b.txt").write_text("bravo\nbravo two\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "c.txt").write_text("charlie\n")
    git("add", "b.txt", "sub/c.txt")
    git("commit", "-q", "-m", "second commit\n\nwith a body", date="2021-05-06T07:08:09+00:00")
    # a dirty work tree, so `git status` has something to report
    (repo / "a.txt").write_text("alpha changed\n")
    (repo / "untracked.txt").write_text("not added\n")


def make_sqlite_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
    con.execute("CREATE INDEX t_name ON t(name)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                    [(i, f"row {i:05d}", hashlib.sha256(str(i).encode()).digest() * 20)
                     for i in range(3000)])  # a few hundred KiB: many pages, several levels
    con.commit()
    con.close()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SOURCE tree with text, binary, empty, sparse, odd names, links, owners,
    modes, nanosecond mtimes, an xattr, a Python package, executables, an SQLite
    database and a git repository."""
    src = tmp_path_factory.mktemp("programs") / "source"
    src.mkdir()
    (src / "hello.txt").write_text("hello, world\nneedle on line two\n")
    (src / "empty").write_bytes(b"")
    (src / "random.bin").write_bytes(os.urandom(RANDOM_SIZE))
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "sub" / "deep.txt").write_text("deep\nNeedle capitalised\nneedle deep\n")
    (src / "dir" / "notes.txt").write_text("".join(f"line {i} {'needle' if i % 7 == 0 else 'hay'}\n"
                                                   for i in range(500)))
    (src / "dir" / "empty-dir").mkdir()
    (src / "with space ü.txt").write_text("unicode name, needle\n")
    (src / os.fsdecode(b"raw\xffbyte")).write_bytes(b"name is not UTF-8\n")
    with open(src / "sparse.bin", "wb") as f:  # holes around one data block
        f.seek(512 * 1024)
        f.write(b"data in the middle" * 100)
        f.truncate(2 * 1024 * 1024)
    os.symlink("hello.txt", src / "link")
    os.symlink("no/such/target", src / "dangling")
    os.symlink("dir", src / "dirlink")
    os.symlink("/etc/hostname", src / "absolute-link")
    os.link(src / "hello.txt", src / "dir" / "hardlink")
    # modes and owners
    (src / "private").write_text("owner only\n")
    os.chmod(src / "private", 0o600)
    (src / "readonly").write_text("read only\n")
    os.chmod(src / "readonly", 0o444)
    (src / "owned").write_text("someone else's\n")
    if os.geteuid() == 0:  # an owner other than the mounting user (setup runs tests as root)
        os.chown(src / "owned", 1234, 5678)
    os.chmod(src / "dir" / "sub", 0o750)
    os.setxattr(src / "hello.txt", "user.comment", b"an extended attribute")
    # a Python package
    pkg = src / "py" / "stfs_probe_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .mod import answer, data\nVERSION = '1.2.3'\n")
    (pkg / "mod.py").write_text(
        "import importlib.resources\n\n"
        "def answer():\n    return sum(range(10)) * 42\n\n"
        "def data():\n"
        "    return importlib.resources.files(__package__).joinpath('data.txt').read_text()\n")
    (pkg / "data.txt").write_text("package data via importlib.resources\n")
    # executables: a real ELF binary and a shell script with a shebang
    (src / "bin").mkdir()
    shutil.copyfile(shutil.which("echo") or "/bin/echo", src / "bin" / "echo")
    os.chmod(src / "bin" / "echo", 0o755)
    (src / "bin" / "script.sh").write_text(
        "#!/bin/sh\n"
        "echo \"script got: $*\"\n"
        "here=$(dirname \"$0\")\n"
        "wc -c < \"$here/../hello.txt\"\n"
        "\"$here/echo\" from the mounted echo\n")
    os.chmod(src / "bin" / "script.sh", 0o755)
    # SQLite database and git repository
    (src / "db").mkdir()
    make_sqlite_db(src / "db" / "test.db")
    make_git_repo(src / "repo")
    # nanosecond timestamps on a few entries (after all content is written)
    set_ns_times(src / "hello.txt", 1_600_000_000, 123_456_789)
    set_ns_times(src / "empty", 1_500_000_000, 1)
    set_ns_times(src / "link", 1_400_000_000, 999_999_999)
    set_ns_times(src / "dir" / "sub", 1_300_000_000, 500_000_000)
    return src


@pytest.fixture
def view(mounter: Callable[..., Mount], tree: Path) -> Mount:
    return mounter(tree)


def find_listing(root: Path, fmt: str) -> list[bytes]:
    """``find . -printf FMT`` run inside root, lines sorted (readdir order may differ)."""
    out = run(["find", ".", "-printf", fmt], cwd=root).stdout
    return sorted(out.splitlines())


# --- cp / diff -------------------------------------------------------------------------


def test_diff_r_finds_no_difference_between_source_and_mount(view: Mount, tree: Path) -> None:
    result = run(["diff", "-r", "--no-dereference", str(tree), str(view.mountpoint)], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_cp_a_of_whole_mount_gives_tree_equal_to_source_in_content_and_metadata(
        view: Mount, tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    result = run(["cp", "-a", str(view.mountpoint), str(copy)])
    assert result.stderr == b""
    diff = run(["diff", "-r", "--no-dereference", str(tree), str(copy)], check=False)
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, b"", b"")
    # cp -a preserved what the mount showed: it must be what SOURCE has
    fmt = "%y %p %s %m %U:%G %n %T@ %l\\n"
    assert find_listing(copy, fmt) == find_listing(tree, fmt)
    # Exactly SOURCE's xattrs came along: stfs's checksum (known once cp -a read a file
    # in full) is readable by name but never listed, so never copied.
    xattrs = ["getfattr", "-R", "-h", "-d", "-m", "-", "."]
    assert run(xattrs, cwd=copy).stdout == run(xattrs, cwd=tree).stdout
    assert b"user.comment" in run(xattrs, cwd=copy).stdout
    checksum = os.getxattr(view.mountpoint / "random.bin", "user.stfs.xxh3_128").decode()
    assert checksum == xxhash.xxh3_128((tree / "random.bin").read_bytes()).hexdigest()


# --- tar ------------------------------------------------------------------------------


def test_tar_archive_of_mount_is_byte_identical_to_archive_of_source(
        view: Mount, tree: Path) -> None:
    src, mnt = both(lambda root: ["tar", "--sort=name", "--format=gnu", "-cf", "-",
                                  "-C", str(root), "."], tree, view.mountpoint)
    assert src.stderr == mnt.stderr == b""
    if src.stdout != mnt.stdout:  # show a readable difference first
        listing = ["tar", "--full-time", "-tvf", "-"]
        lists = [run(listing, input=r.stdout).stdout for r in (src, mnt)]
        assert lists[1].decode(errors="replace") == lists[0].decode(errors="replace")
    assert hashlib.sha256(mnt.stdout).hexdigest() == hashlib.sha256(src.stdout).hexdigest()


def test_tar_of_mount_lists_same_members_and_extracts_to_same_contents(
        view: Mount, tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "mount.tar"
    run(["tar", "-cf", str(archive), "-C", str(view.mountpoint), "."])
    listed = sorted(run(["tar", "--full-time", "-tvf", str(archive)]).stdout.splitlines())
    src_tar = run(["tar", "-cf", "-", "-C", str(tree), "."]).stdout
    src_listed = sorted(run(["tar", "--full-time", "-tvf", "-"], input=src_tar).stdout.splitlines())
    assert listed == src_listed
    out = tmp_path / "extracted"
    out.mkdir()
    run(["tar", "-xpf", str(archive), "-C", str(out)])
    diff = run(["diff", "-r", "--no-dereference", str(tree), str(out)], check=False)
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, b"", b"")


# --- checksums ------------------------------------------------------------------------


def test_sha256sum_of_every_file_matches_source_including_large_and_empty(
        view: Mount, tree: Path) -> None:
    files = regular_files(tree)
    assert "empty" in files and "random.bin" in files and "sparse.bin" in files
    src, mnt = in_both(["sha256sum", "--", *files], tree, view.mountpoint)
    assert mnt.stdout == src.stdout
    expected = {os.fsencode(f): hashlib.sha256((tree / f).read_bytes()).hexdigest().encode()
                for f in files}
    got = {}
    for line in mnt.stdout.splitlines():
        digest, name = line.split(b"  ", 1)
        got[name] = digest
    plain = {name: digest for name, digest in expected.items() if b"\\" not in name}
    assert {n: got.get(n) for n in plain} == plain
    assert got[b"empty"] == hashlib.sha256(b"").hexdigest().encode()


# --- rsync ----------------------------------------------------------------------------


def test_rsync_a_from_mount_gives_tree_identical_to_source(
        view: Mount, tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "rsynced"
    result = run(["rsync", "-aHX", f"{view.mountpoint}/", f"{dest}/"])
    assert result.stderr == b""
    diff = run(["diff", "-r", "--no-dereference", str(tree), str(dest)], check=False)
    assert (diff.returncode, diff.stdout, diff.stderr) == (0, b"", b"")
    fmt = "%y %p %s %m %U:%G %n %T@ %l\\n"
    assert find_listing(dest, fmt) == find_listing(tree, fmt)


def test_rsync_checksum_dry_run_reports_no_difference_between_mount_and_source(
        view: Mount, tree: Path) -> None:
    for a, b in ((view.mountpoint, tree), (tree, view.mountpoint)):
        result = run(["rsync", "-aHX", "--checksum", "-n", "-i", f"{a}/", f"{b}/"])
        assert (result.stdout, result.stderr) == (b"", b""), f"rsync {a}/ -> {b}/"


# --- find / du ------------------------------------------------------------------------


def test_find_shows_same_names_types_sizes_and_modes(view: Mount, tree: Path) -> None:
    fmt = "%y %p %s %m\\n"
    listing = find_listing(view.mountpoint, fmt)
    assert listing == find_listing(tree, fmt)
    assert b"f ./empty 0 644" in listing
    assert f"f ./random.bin {RANDOM_SIZE} 644".encode() in listing
    assert b"l ./dangling 14 777" in listing


def test_find_shows_same_owners_link_counts_inodes_nanosecond_mtimes_and_targets(
        view: Mount, tree: Path) -> None:
    fmt = "%y %p %U:%G %n %i %T@ %C@ %l\\n"
    listing = find_listing(view.mountpoint, fmt)
    assert listing == find_listing(tree, fmt)
    me = f"{os.getuid()}:{os.getgid()}".encode()
    assert any(line.startswith(b"f ./hello.txt " + me + b" 2 ")
               and b" 1600000000.1234567890 " in line
               for line in listing), listing


def test_du_reports_same_apparent_size_and_disk_usage(view: Mount, tree: Path) -> None:
    for args in (["du", "-s", "--apparent-size", "-B1", "."], ["du", "-s", "."],
                 ["du", "-a", "--apparent-size", "-B1", "."], ["du", "-a", "."]):
        src, mnt = in_both(args, tree, view.mountpoint)
        assert sorted(mnt.stdout.splitlines()) == sorted(src.stdout.splitlines()), args


# --- grep -----------------------------------------------------------------------------


def test_grep_r_finds_same_matches(view: Mount, tree: Path) -> None:
    for args in (["grep", "-r", "-n", "needle", "."], ["grep", "-r", "-i", "-c", "needle", "."],
                 ["grep", "-R", "-l", "needle", "."]):
        src, mnt = in_both(args, tree, view.mountpoint, check=False)
        assert mnt.returncode == src.returncode
        assert sorted(mnt.stdout.splitlines()) == sorted(src.stdout.splitlines()), args
        assert sorted(mnt.stderr.splitlines()) == sorted(src.stderr.splitlines()), args
    matches = run(["grep", "-r", "-n", "needle", "."], cwd=view.mountpoint).stdout
    assert b"./dir/sub/deep.txt:3:needle deep" in matches
    assert b"./with space \xc3\xbc.txt:1:unicode name, needle" in matches


# --- Python import --------------------------------------------------------------------


def test_python_imports_a_package_from_the_mount(view: Mount, tree: Path) -> None:
    code = ("import os, sys, stfs_probe_pkg as p\n"
            "root = sys.argv[1]\n"
            "print(os.path.relpath(p.__file__, root))\n"
            "print(p.VERSION, p.answer())\n"
            "print(p.data(), end='')\n"
            "print(sorted(m for m in sys.modules if m.startswith('stfs_probe')))\n")

    def argv(root: Path) -> list[str]:
        return [sys.executable, "-c", code, str(root)]

    env_src = {"PYTHONPATH": str(tree / "py"), "PYTHONDONTWRITEBYTECODE": "1"}
    env_mnt = {"PYTHONPATH": str(view.mountpoint / "py"), "PYTHONDONTWRITEBYTECODE": "1"}
    src = run(argv(tree), env=env_src)
    mnt = run(argv(view.mountpoint), env=env_mnt)
    assert mnt.stdout == src.stdout
    assert mnt.stdout == (b"py/stfs_probe_pkg/__init__.py\n1.2.3 1890\n"
                          b"package data via importlib.resources\n"
                          b"['stfs_probe_pkg', 'stfs_probe_pkg.mod']\n")
    assert mnt.stderr == b""


# --- SQLite ---------------------------------------------------------------------------


def sqlite_uri(path: Path, query: str) -> str:
    return f"file:{quote(str(path))}?{query}"


def test_sqlite3_cli_reads_database_on_mount_like_on_source(view: Mount, tree: Path) -> None:
    sql = ("SELECT count(*), sum(length(payload)), min(name), max(name) FROM t;"
           "SELECT id, hex(payload) FROM t WHERE name = 'row 02718';"
           "PRAGMA integrity_check;")

    src, mnt = both(lambda root: ["sqlite3", "-batch", "-bail",
                                  sqlite_uri(root / "db" / "test.db", "immutable=1"), sql],
                    tree, view.mountpoint)
    assert mnt.stdout == src.stdout
    assert mnt.stdout.startswith(b"3000|1920000|row 00000|row 02999\n2718|")
    assert mnt.stdout.endswith(b"\nok\n")
    assert mnt.stderr == b""
    dump_src, dump_mnt = both(lambda root: ["sqlite3", "-batch",
                                            sqlite_uri(root / "db" / "test.db", "immutable=1"),
                                            ".dump"], tree, view.mountpoint)
    assert (hashlib.sha256(dump_mnt.stdout).hexdigest()
            == hashlib.sha256(dump_src.stdout).hexdigest())
    assert dump_mnt.stdout.count(b"INSERT INTO t VALUES") == 3000


def test_python_sqlite3_reads_database_on_mount_read_only_immutable(
        view: Mount, tree: Path) -> None:
    def read(root: Path) -> list[tuple[object, ...]]:
        con = sqlite3.connect(sqlite_uri(root / "db" / "test.db", "mode=ro&immutable=1"),
                              uri=True)
        try:
            rows = con.execute("SELECT id, name, payload FROM t ORDER BY name DESC").fetchall()
            rows.append(con.execute("PRAGMA integrity_check").fetchone())
            return rows
        finally:
            con.close()

    mnt = read(view.mountpoint)
    assert mnt == read(tree)
    assert len(mnt) == 3001 and mnt[-1] == ("ok",)


# --- mmap -----------------------------------------------------------------------------


def test_mmap_of_file_on_mount_gives_same_bytes(view: Mount, tree: Path) -> None:
    expected = (tree / "random.bin").read_bytes()
    with open(view.mountpoint / "random.bin", "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert len(m) == RANDOM_SIZE
        for off, size in ((0, 1), (4095, 2), (12345, 100_000), (RANDOM_SIZE - 10, 10)):
            assert m[off:off + size] == expected[off:off + size], (off, size)
        assert m.find(expected[2_000_000:2_000_032]) == expected.find(expected[2_000_000:2_000_032])
        assert hashlib.sha256(m).hexdigest() == hashlib.sha256(expected).hexdigest()


# --- executing ------------------------------------------------------------------------


def test_binary_copied_into_source_runs_from_mount(view: Mount, tree: Path) -> None:
    src, mnt = both(lambda root: [str(root / "bin" / "echo"), "-n", "hello", "from", "echo"],
                    tree, view.mountpoint)
    assert mnt.stdout == src.stdout == b"hello from echo"
    assert mnt.stderr == b""


def test_shell_script_with_shebang_runs_from_mount(view: Mount, tree: Path) -> None:
    src, mnt = both(lambda root: [str(root / "bin" / "script.sh"), "a", "b c"],
                    tree, view.mountpoint)
    assert mnt.stdout == src.stdout
    assert mnt.stdout == b"script got: a b c\n32\nfrom the mounted echo\n"
    assert mnt.stderr == b""


# --- git ------------------------------------------------------------------------------


def test_git_log_on_mount_matches_source(view: Mount, tree: Path) -> None:
    for args in (["log", "--format=fuller", "--date=iso-strict", "--stat", "-p"],
                 ["log", "--format=%H %T %P %an <%ae> %ad %cn <%ce> %cd %s", "--date=raw"],
                 ["cat-file", "--batch-all-objects", "--batch-check"],
                 ["show", "HEAD~1:a.txt"]):
        src, mnt = in_both([*GIT, "-C", "repo", *args], tree, view.mountpoint,
                           env={**GIT_ENV, "HOME": "/nonexistent"})
        assert mnt.stdout == src.stdout, args
        assert mnt.stderr == src.stderr, args
    log = run([*GIT, "-C", str(view.mountpoint / "repo"), "log", "--format=%s|%ad|%an",
               "--date=iso-strict"], env={**GIT_ENV, "HOME": "/nonexistent"}).stdout
    assert log == (b"second commit|2021-05-06T07:08:09+00:00|Ada Author\n"
                   b"first commit|2020-01-02T03:04:05+00:00|Ada Author\n")


def test_git_status_and_diff_on_mount_match_source(view: Mount, tree: Path) -> None:
    for args in (["status", "--porcelain"], ["status", "--porcelain=v2", "--branch"],
                 ["diff"], ["diff", "--stat", "HEAD~1"]):
        src, mnt = in_both([*GIT, "-C", "repo", *args], tree, view.mountpoint,
                           env={**GIT_ENV, "HOME": "/nonexistent"})
        assert mnt.stdout == src.stdout, args
        assert mnt.stderr == src.stderr, args
    status = run([*GIT, "-C", str(view.mountpoint / "repo"), "status", "--porcelain"],
                 env={**GIT_ENV, "HOME": "/nonexistent"}).stdout
    assert status == b" M a.txt\n?? untracked.txt\n"


# --- head / tail / dd -----------------------------------------------------------------


def test_head_and_tail_c_give_same_bytes_at_many_sizes(view: Mount, tree: Path) -> None:
    data = (tree / "random.bin").read_bytes()
    for tool in ("head", "tail"):
        for n in (0, 1, 4095, 4096, 4097, 65537, 131071, 1_048_577, RANDOM_SIZE - 1,
                  RANDOM_SIZE, RANDOM_SIZE + 12345):
            src, mnt = in_both([tool, "-c", str(n), "random.bin"], tree, view.mountpoint)
            expected = data[:n] if tool == "head" else (data[-n:] if n else b"")
            assert src.stdout == expected
            assert mnt.stdout == expected, (tool, n, len(mnt.stdout))
        src, mnt = in_both([tool, "-c", "10", "empty"], tree, view.mountpoint)
        assert mnt.stdout == src.stdout == b""


def test_dd_at_aligned_unaligned_and_past_eof_offsets_gives_same_bytes(
        view: Mount, tree: Path) -> None:
    data = (tree / "random.bin").read_bytes()
    cases = [  # (dd operands, expected slice)
        (["bs=4096", "skip=0", "count=1"], data[0:4096]),
        (["bs=4096", "skip=1", "count=3"], data[4096:4 * 4096]),
        (["bs=4096", "skip=255", "count=2"], data[255 * 4096:257 * 4096]),
        (["bs=4096", "skip=768", "count=5"], data[768 * 4096:773 * 4096]),  # crosses EOF
        (["bs=4096", "skip=800", "count=2"], b""),  # entirely past EOF
        (["bs=1000", "skip=3", "count=7"], data[3000:10000]),
        (["bs=65536", "skip=17", "count=3"], data[17 * 65536:20 * 65536]),
        (["bs=1M", "skip=3", "count=1"], data[3 * 1024 * 1024:]),
        (["bs=4096", "iflag=skip_bytes,count_bytes", "skip=12345", "count=54321"],
         data[12345:12345 + 54321]),
        (["bs=7", "iflag=skip_bytes,count_bytes", "skip=1048575", "count=3"],
         data[1048575:1048578]),
        (["bs=4096", "iflag=skip_bytes,count_bytes", "skip=" + str(RANDOM_SIZE - 3),
          "count=100"], data[-3:]),
        (["bs=4096", "iflag=skip_bytes", "skip=" + str(RANDOM_SIZE + 1)], b""),
    ]
    for operands, expected in cases:
        src, mnt = in_both(["dd", "if=random.bin", "status=none", *operands],
                           tree, view.mountpoint)
        assert src.stdout == expected, operands
        assert mnt.stdout == expected, (operands, len(mnt.stdout))
    src, mnt = both(lambda root: ["dd", f"if={root / 'empty'}", "bs=4096", "skip=1",
                                  "status=none"], tree, view.mountpoint)
    assert mnt.stdout == src.stdout == b""


def test_dd_with_o_direct_reads_the_same_bytes(view: Mount, tree: Path) -> None:
    """O_DIRECT opens bypass the kernel's page cache and reach the engine directly."""
    data = (tree / "random.bin").read_bytes()
    for operands, expected in ((["bs=4096"], data), (["bs=1M", "skip=1", "count=2"],
                                                       data[1024 * 1024:3 * 1024 * 1024])):
        _, mnt = in_both(["dd", "if=random.bin", "status=none", "iflag=direct", *operands],
                         tree, view.mountpoint)
        assert mnt.stdout == expected, operands


# --- a big file -----------------------------------------------------------------------


def test_big_file_read_sequentially_with_cat_and_cmp_equals_source(
        mounter: Callable[..., Mount], tmp_path: Path) -> None:
    src = tmp_path / "bigsource"
    src.mkdir()
    big = os.urandom(BIG_SIZE)
    (src / "big.bin").write_bytes(big)
    digest = hashlib.sha256(big).hexdigest()
    del big
    mnt = mounter(src).mountpoint
    cmp = run(["cmp", str(src / "big.bin"), str(mnt / "big.bin")], check=False)
    assert (cmp.returncode, cmp.stdout, cmp.stderr) == (0, b"", b"")
    cat = run(["cat", "--", str(mnt / "big.bin")]).stdout
    assert len(cat) == BIG_SIZE
    assert hashlib.sha256(cat).hexdigest() == digest
    del cat
    piped = run(["sh", "-c", 'cat -- "$1" | sha256sum', "sh", str(mnt / "big.bin")])
    assert piped.stdout == f"{digest}  -\n".encode()
    assert run(["stat", "-c", "%s", str(mnt / "big.bin")]).stdout == f"{BIG_SIZE}\n".encode()


# --- special files --------------------------------------------------------------------


def test_find_and_stat_show_fifo_socket_and_device_nodes_like_source(
        mounter: Callable[..., Mount], tmp_path: Path) -> None:
    src = tmp_path / "specials"
    src.mkdir()
    os.mkfifo(src / "fifo", 0o640)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    assert os.geteuid() == 0, "device nodes need root; tests/ runs as root after ./scripts/setup"
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    (src / "plain").write_text("plain\n")
    for name, mode in (("fifo", 0o640), ("sock", 0o755), ("null", 0o666), ("blk", 0o600)):
        os.chmod(src / name, mode)  # mkfifo/mknod modes are cut by the umask
    mnt = mounter(src).mountpoint
    fmt = "%y %p %s %m %U:%G %n %T@\\n"
    assert find_listing(mnt, fmt) == find_listing(src, fmt)
    stat_args = ["stat", "-c", "%n|%F|%a|%t:%T|%s", "fifo", "sock", "null", "blk", "plain"]
    s, m = in_both(stat_args, src, mnt)
    assert m.stdout == s.stdout
    assert b"null|character special file|666|1:3|0" in m.stdout
