"""Where shards live: local paths and fsspec URLs (s3://, gs://, http(s)://), and the machine-wide download cache
with a size limit that shard readers share."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from pathlib import Path

from simmim.data.errors import DataError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "ShardCache",
    "exists",
    "filesystem",
    "is_url",
    "join_url",
    "local_path",
    "parse_size",
    "read_bytes",
]

DEFAULT_CACHE_DIR = Path("~/.cache/simmim/shards")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_RETRIES = (1.0, 2.0, 4.0)  # seconds between download attempts


def is_url(root: str | os.PathLike | None) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path)."""
    text = str(root)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def local_path(root: str | os.PathLike) -> str:
    """The path of a local root (``file://`` and ``~`` resolved)."""
    text = str(root)
    return text[len("file://") :] if text.startswith("file://") else os.path.expanduser(text)


def join_url(root: str, name: str) -> str:
    """``root/name`` for a URL or a local path."""
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(local_path(root), name)


def filesystem(url: str):
    """The fsspec filesystem and path for ``url``, or a one-line error naming the package it needs."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        scheme = url.split("://", 1)[0]
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme)
        hint = f"pip install {package}" if package else f"install the fsspec implementation for {scheme}://"
        raise DataError(f"data.root={url}: cannot open {scheme}:// URLs ({err}): {hint}") from err


def exists(url: str) -> bool:
    """Whether the file at ``url`` (or local path) exists."""
    if not is_url(url):
        return os.path.isfile(local_path(url))
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except OSError:
        return False


def parse_size(value: str | int | float) -> int:
    """Bytes from ``256MB``, ``20GB``, ``1.5TiB`` or a number (KB/MB/GB/TB: powers of 1000; KiB/...: of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    found = _SIZE.match(str(value))
    if not found:
        raise ValueError(f"size {value!r}: write a number of bytes or e.g. 256MB, 20GB, 1.5TiB")
    number, unit = float(found.group(1)), (found.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit in ("B", ""):
        return int(number)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** powers[unit[0]])


def read_bytes(url: str) -> bytes:
    """The whole file at ``url`` (or local path)."""
    if not is_url(url):
        with open(local_path(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url)
    return fs.cat_file(path)


class ShardCache:
    """Whole shards downloaded into a local folder, shared by every process on the machine, least recently used
    deleted first so the folder stays within ``limit`` bytes.

    Concurrency: a file lock per shard (one download per machine; others wait, then read it) and one lock around
    eviction. Downloads land in a temporary file, are checked against the manifest's size and renamed, so a
    killed download never leaves a truncated shard. A shard deleted while another process reads it stays readable
    there (POSIX keeps the file until it is closed).
    """

    def __init__(self, folder: str | os.PathLike, limit: int) -> None:
        self.folder = Path(folder).expanduser()
        self.limit = int(limit)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        """Where ``url`` is kept: its name, prefixed by a hash of its URL (shards of different datasets share the
        folder and its limit)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        return self.folder / f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"

    def fetch(self, url: str, size: int | None = None) -> Path:
        """The local copy of ``url``, downloaded first when missing (``size``: expected bytes, checked)."""
        local = self.path(url)
        if local.exists():
            _touch(local)
            return local
        with _locked(local.with_name(local.name + ".lock")):
            if local.exists():  # another process downloaded it while this one waited
                _touch(local)
                return local
            self._make_room(size or 0, keep=local)
            self._download(url, local, size)
        return local

    def _download(self, url: str, local: Path, size: int | None) -> None:
        fs, path = filesystem(url)
        tmp = local.with_name(f"{local.name}.{os.getpid()}.part")
        for attempt, pause in enumerate((*_RETRIES, None)):
            try:
                fs.get_file(path, str(tmp))
                got = tmp.stat().st_size
                if size is not None and got != size:
                    raise OSError(f"downloaded {got} bytes, manifest.json says {size}")
                os.replace(tmp, local)
                return
            except Exception as err:  # network errors come as many types (OSError, ClientError, timeouts)
                tmp.unlink(missing_ok=True)
                if isinstance(err, FileNotFoundError) or pause is None:
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise DataError(
                        f"cannot download shard {url}{tries}: {type(err).__name__}: {err}; check the URL, the "
                        "credentials and the network (shards and manifest.json must stay together)"
                    ) from err
                time.sleep(pause)

    def _make_room(self, incoming: int, keep: Path) -> None:
        """Delete the least recently used shards until ``incoming`` more bytes fit within the limit."""
        with _locked(self.folder / ".evict.lock"):
            files = []
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".tar") and entry.path != str(keep):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime_ns, st.st_size, entry.path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total + incoming <= self.limit:
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                total -= size


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # mtime is the "last used" time eviction sorts by
    except OSError:
        pass


class _locked:
    """An exclusive ``flock`` on ``path`` for the ``with`` block (between processes; released if one dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.file = open(self.path, "a")
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
