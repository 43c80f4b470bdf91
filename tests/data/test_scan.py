"""Folder listings (simmim.data.scan): the same files as before on ordinary trees, symlink loops followed once with
a warning, and a listing cache that is reused until the tree changes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from simmim.data import ImageFiles, PretrainDataModule
from simmim.data.images import is_image_file
from simmim.data.scan import SymlinkLoopWarning, list_images


def _walk_listing(root: Path) -> list[str]:
    """The listing as the sources made it before (os.walk following links), for comparison on loop-free trees."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if is_image_file(f) and not f.startswith(".")]
    return sorted(found)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_listing_matches_the_previous_walk_on_ordinary_trees(tmp_path):
    root = tmp_path / "data"
    for name in ("a.jpg", "B.JPEG", "c.png", "notes.txt", ".hidden.jpg", "sub/d.webp", "sub/deeper/e.Tif",
                 ".git/f.jpg", "sub/.cache/g.png", "x y/h i.jpg"):  # fmt: skip
        _touch(root / name)
    _touch(tmp_path / "elsewhere" / "linked.jpg")
    (root / "link").symlink_to(tmp_path / "elsewhere")  # an outside folder linked in: followed
    (root / "file_link.jpg").symlink_to(root / "a.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = list_images(root)
    assert found == _walk_listing(root)
    assert "link/linked.jpg" in found and "file_link.jpg" in found and not any("hidden" in p for p in found)


def _looped_tree(root: Path) -> Path:
    """85 images in nested folders, with a link back to its own folder and one back to the root."""
    for i in range(85):
        _touch(root / f"part{i % 5}" / f"sub{i % 3}" / f"img_{i:03d}.jpg")
    (root / "part1" / "sub0" / "again").symlink_to(".")  # loops to itself
    (root / "part3" / "up").symlink_to("..")  # loops to a parent (the root)
    return root


def test_symlink_loops_are_followed_once_with_a_warning(tmp_path):
    root = _looped_tree(tmp_path / "looped")
    with pytest.warns(SymlinkLoopWarning) as caught:
        found = list_images(root)
    assert len(found) == 85 and len(set(found)) == 85
    assert len(_walk_listing(root)) == 8405  # before: each loop followed until the OS stopped it (40 links deep)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    loop = root / "part1" / "sub0"
    assert f"not following symlinked folder {loop / 'again'} -> {loop}" in messages[0]
    assert f"{root / 'part3' / 'up'} -> {root}: that folder is already listed" in messages[1]
    with pytest.warns(SymlinkLoopWarning):
        dm = PretrainDataModule(root, "folder", img_size=32, mask_patch_size=8, batch_size=4, num_workers=0)
    assert len(dm.source) == 85


def test_a_folder_linked_twice_is_listed_once_under_its_real_path(tmp_path):
    root = tmp_path / "data"
    _touch(root / "real" / "x.jpg")
    (root / "alias").symlink_to(root / "real")  # sorts before "real": the real path still wins
    with pytest.warns(SymlinkLoopWarning, match="alias"):
        assert list_images(root) == ["real/x.jpg"]


def test_the_listing_cache_is_reused_until_a_folder_changes(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _touch(root / f"c{i % 2}" / f"{i}.png")
    cache = tmp_path / "run"
    first = list_images(root, cache)
    assert len(first) == 6 and len(list(cache.glob("listing-*.npz"))) == 1
    # A file added while the folder's mtime is put back: only a cached listing can miss it (proves it is used).
    folder = root / "c0"
    before = folder.stat()
    _touch(folder / "new.png")
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert list_images(root, cache) == first
    os.utime(folder)  # the folder changed (as adding a file does): rescanned
    assert "c0/new.png" in list_images(root, cache)
    (root / "c1" / "1.png").unlink()
    assert "c1/1.png" not in list_images(root, cache)
    # another root gets its own file; ImageFolder labels come out the same with the cache
    plain = ImageFiles.from_imagefolder(root)
    cached = ImageFiles.from_imagefolder(root, cache)
    assert plain.paths.tolist() == cached.paths.tolist() and plain.labels.tolist() == cached.labels.tolist()


def test_the_cache_replays_the_loop_warnings(tmp_path):
    root = _looped_tree(tmp_path / "looped")
    with pytest.warns(SymlinkLoopWarning):
        list_images(root, tmp_path / "run")
    with pytest.warns(SymlinkLoopWarning) as caught:
        assert len(list_images(root, tmp_path / "run")) == 85
    assert len(caught) == 2
