from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from safekit_cloud.core.replication import paths
from safekit_cloud.core.replication.paths import PathError, components, open_beneath, parent_dir


@pytest.mark.parametrize("good, parts", [
    (b"", ()),
    (b"a", (b"a",)),
    (b"a/b/c", (b"a", b"b", b"c")),
    (b"...", (b"...",)),
    (b"a..b/.hidden", (b"a..b", b".hidden")),
    (b"\xff\xfe/\x01", (b"\xff\xfe", b"\x01")),  # any byte but NUL and / is a valid Linux name
    (b"x" * 255, (b"x" * 255,)),
])
def test_components_accepts_plain_relative_paths(good: bytes, parts: tuple[bytes, ...]) -> None:
    assert components(good) == parts


@pytest.mark.parametrize("bad", [
    b"/", b"/etc/passwd", b"//a", b"..", b"../x", b"a/..", b"a/../../b", b".", b"./a", b"a/./b",
    b"a//b", b"a/", b"a\0b", b"\0", b"x" * 256, b"a/" * 2048 + b"a"
])
def test_components_refuses_escapes_and_oddities(bad: bytes) -> None:
    with pytest.raises(PathError):
        components(bad)


def test_components_refuses_str() -> None:
    with pytest.raises(PathError):
        components("a")  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | st.lists(st.sampled_from([b"a", b"..", b".", b"", b"/", b"b\0"]), max_size=6).map(b"/".join))
def test_components_property(raw: bytes) -> None:
    try:
        parts = components(raw)
    except PathError:
        return
    assert b"/".join(parts) == raw
    assert all(p not in (b"", b".", b"..") and b"\0" not in p and b"/" not in p for p in parts)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2" and not paths.openat2_available():
        pytest.skip("openat2 not available on this kernel")
    monkeypatch.setattr(paths, "_have_openat2", request.param == "openat2")
    return request.param


@pytest.fixture
def tree(tmp_path: Path) -> tuple[int, Path]:
    root = tmp_path / "root"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "outside", root / "abs_dir_link")
    os.symlink("../outside", root / "rel_dir_link")
    os.symlink(tmp_path / "outside" / "secret", root / "file_link")
    os.symlink("d", root / "inner_link")  # even a link that stays inside is refused
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield fd, tmp_path
    os.close(fd)


def test_open_beneath_plain(tree: tuple[int, Path], resolver: str) -> None:
    fd, _ = tree
    f = open_beneath(fd, b"d/f", os.O_RDONLY)
    try:
        assert os.read(f, 10) == b"inside"
    finally:
        os.close(f)


@pytest.mark.parametrize("path", [b"abs_dir_link/secret", b"rel_dir_link/secret", b"file_link", b"inner_link/f"])
def test_open_beneath_never_follows_symlinks(tree: tuple[int, Path], resolver: str, path: bytes) -> None:
    fd, tmp = tree
    with pytest.raises(OSError) as info:
        os.close(open_beneath(fd, path, os.O_WRONLY | os.O_TRUNC))
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)
    assert (tmp / "outside" / "secret").read_bytes() == b"secret"


def test_open_beneath_create_through_dir_link_refused(tree: tuple[int, Path], resolver: str) -> None:
    fd, tmp = tree
    with pytest.raises(OSError):
        os.close(open_beneath(fd, b"abs_dir_link/new", os.O_WRONLY | os.O_CREAT))
    assert not (tmp / "outside" / "new").exists()


def test_trailing_symlink_as_o_path(tree: tuple[int, Path], resolver: str) -> None:
    fd, _ = tree
    f = open_beneath(fd, b"file_link", os.O_PATH | os.O_NOFOLLOW)
    try:
        import stat
        assert stat.S_ISLNK(os.fstat(f).st_mode)
    finally:
        os.close(f)


def test_open_beneath_refuses_dotdot_before_any_syscall(tree: tuple[int, Path], resolver: str) -> None:
    fd, _ = tree
    with pytest.raises(PathError):
        open_beneath(fd, b"d/../../outside/secret", os.O_RDONLY)


def test_parent_dir(tree: tuple[int, Path], resolver: str) -> None:
    fd, _ = tree
    with parent_dir(fd, b"d/e/new") as (parent, name):
        assert name == b"new"
        os.mkdir(name, dir_fd=parent)
    with parent_dir(fd, b"top") as (parent, name):
        assert parent == fd and name == b"top"
    with pytest.raises(OSError), parent_dir(fd, b"abs_dir_link/x"):
        pass
    with pytest.raises(PathError), parent_dir(fd, b""):
        pass
