"""``python -m simmim.data.pack SOURCE OUT [--shard-size 256MB] [--workers N]``: a dataset as webdataset shards.

SOURCE is anything ``data.root`` accepts (a folder of images, an ImageFolder tree, a .txt file list, a folder of
Fashion-MNIST idx files or ``fashion_mnist``); an ImageNet layout (``train/`` and ``val/``, optionally ``test/``) is
packed split by split into ``OUT/train``, ``OUT/val``, ... and Fashion-MNIST into ``OUT/train`` (60k) and
``OUT/val`` (its 10k test images, which fine-tuning validates on). OUT may then be used as
``data.source=shards data.root=OUT`` (or the URL it is uploaded to: ``aws s3 sync OUT s3://bucket/prefix``).

What is stored (see ``simmim.data.shards`` for the layout):

- every image file's original bytes, never re-encoded (``<key>.<ext>``, ext the file's own, lower-cased). The one
  exception is Fashion-MNIST, which has no encoded files: its raw 28x28 greyscale arrays are stored as lossless PNGs
  (decoded, the same pixels);
- the label, where the source has one (``<key>.cls``, the webdataset convention, and ``labels.npy``);
- ``manifest.json``: counts, classes, bytes, where it came from; it is also a wids descriptor, so
  ``wids.ShardListDataset("OUT/manifest.json")`` reads the shards too.

Samples are shuffled (``--seed``; ``--no-shuffle`` keeps the source order) so that a shard mixes classes: training
reads a few shards at a time. A file that cannot be read from disk is left out with a warning (and counted in the
manifest); a file that is not a valid image is packed as is and skipped at training time like in a folder.
``--workers N`` reads and writes N contiguous parts in parallel (the shard order stays the same).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from simmim.data.datasets import SOURCES, ImageFiles, build_source, detect_source
from simmim.data.errors import DataError
from simmim.data.fashion_mnist import FashionMNIST
from simmim.data.shards import FORMAT, MANIFEST
from simmim.data.storage import parse_size

__all__ = ["main", "pack"]

_MODE = 0o444


def pack(
    source: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: str | int = "256MB",
    workers: int = 1,
    kind: str = "auto",
    shuffle: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Pack ``source`` into shards under ``out`` (see the module docstring); returns the manifests written."""
    out = Path(out)
    limit = parse_size(shard_size)
    if limit < 1:
        raise ValueError(f"--shard-size {shard_size}: must be positive, e.g. 256MB")
    splits = _splits(source, kind)
    written = []
    for split, src in splits:
        folder = out / split if split else out
        written.append(_pack_one(src, folder, limit, max(1, workers), shuffle, seed, str(source), split))
    return written


def _splits(source: str | os.PathLike, kind: str) -> list[tuple[str, object]]:
    """[(split name or "", source object)]: one set, or each split of an ImageNet / Fashion-MNIST layout."""
    if kind not in SOURCES or kind == "shards":
        raise ValueError(f"--source {kind}: choose one of {', '.join(s for s in SOURCES if s != 'shards')}")
    root = None if str(source) in ("fashion_mnist", "") else Path(source)
    if kind == "fashion_mnist" or (kind == "auto" and _is_fashion(root)):
        return [("train", FashionMNIST(root, train=True)), ("val", FashionMNIST(root, train=False))]
    if root is not None and kind in ("auto", "folder", "imagefolder") and (root / "train").is_dir():
        found = [(name, root / name) for name in ("train", "val", "test") if (root / name).is_dir()]
        return [(name, build_source(path, kind)) for name, path in found]
    return [("", build_source(root, kind))]


def _is_fashion(root: Path | None) -> bool:
    return root is None or detect_source(root) == "fashion_mnist"


def _pack_one(src, folder: Path, limit: int, workers: int, shuffle: bool, seed: int, given: str, split: str) -> Path:
    """One set into ``folder``: shards, labels.npy, samples.tsv, manifest.json (written last: its presence means
    the set is complete)."""
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds {MANIFEST}: choose an empty OUT folder or delete it first")
    folder.mkdir(parents=True, exist_ok=True)
    n = len(src)
    order = np.random.default_rng([seed, 0x5A4D]).permutation(n) if shuffle else np.arange(n)
    labels = np.asarray(src.labels, np.int64)[order]
    labelled = bool(len(labels)) and bool((labels >= 0).all())
    parts = np.array_split(np.arange(n), min(workers, max(n, 1)))
    jobs = [(src, order, labels if labelled else None, part, folder, limit, k) for k, part in enumerate(parts)]
    start = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a fork of a process with threads (torch's, a notebook's, a test runner's) can inherit a
        # held lock and hang forever
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_pack_part, jobs)
    else:
        results = [_pack_part(job) for job in jobs]
    shards, skipped, rows, encodings, image_bytes = [], [], [], {}, 0
    for part_shards, part_skipped, part_rows, part_encodings, part_bytes in results:
        shards += part_shards
        skipped += part_skipped
        rows += part_rows
        image_bytes += part_bytes
        for ext, count in part_encodings.items():
            encodings[ext] = encodings.get(ext, 0) + count
    shardlist = []
    for number, (tmp_name, count, size) in enumerate(shards):  # global shard numbers in part order
        name = f"shard-{number:06d}.tar"
        os.replace(folder / tmp_name, folder / name)
        shardlist.append({"url": name, "nsamples": count, "filesize": size})
    kept = np.array([row[0] for row in rows], np.int64)  # positions in `order` that were packed
    (folder / "samples.tsv").write_text(
        "key\tlabel\tsource\n" + "".join(f"{key}\t{label}\t{name}\n" for _, key, label, name in rows)
    )
    if labelled:
        dtype = np.int16 if len(src.class_names) < 2**15 else np.int32
        np.save(folder / "labels.npy", labels[kept].astype(dtype))
    manifest = {
        "format": FORMAT,
        "version": 1,
        "wids_version": 1,  # also a wids (webdataset) descriptor: wids.ShardListDataset(path to this file)
        "name": f"{Path(given).name or given}{'/' + split if split else ''}",
        "num_samples": len(rows),
        "num_shards": len(shardlist),
        "num_bytes": image_bytes,
        "shard_bytes": sum(s["filesize"] for s in shardlist),
        "encodings": encodings,
        "classes": list(src.class_names) if labelled else [],
        "labels": "labels.npy" if labelled else None,
        "source": {
            "given": given,
            "split": split or None,
            "kind": type(src).__name__,
            "path": _source_path(src),
            "count": n,
            "unreadable": len(skipped),
            "unreadable_examples": skipped[:10],
        },
        "shuffled": {"seed": seed} if shuffle else None,
        "note": _note(src),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 2),
        "shardlist": shardlist,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    if skipped:
        warnings.warn(f"{len(skipped)} files could not be read and were left out, e.g. {skipped[0]}", stacklevel=2)
    return folder / MANIFEST


def _note(src) -> str:
    if isinstance(src, FashionMNIST):
        return (
            "Fashion-MNIST has no encoded image files: its raw 28x28 greyscale idx arrays are stored as lossless "
            "PNGs (the same pixels once decoded). Every other source keeps its files' original bytes."
        )
    return "original encoded bytes of every file, not re-encoded"


def _source_path(src) -> str:
    if isinstance(src, FashionMNIST):
        return str(src.folder)
    common = os.path.commonpath([os.fsdecode(p) for p in src.paths[:1000]]) if len(src) else ""
    return os.path.abspath(common)


def _pack_part(job) -> tuple[list, list, list, dict, int]:
    """Pack samples ``order[part]`` into shards ``part-KKK-NNNNN.tar`` (renamed by the caller)."""
    import webdataset as wds

    src, order, labels, part, folder, limit, k = job
    shards, skipped, rows, encodings, image_bytes = [], [], [], {}, 0
    writer, stream, count, name = None, None, 0, None

    def close() -> None:
        nonlocal writer, stream
        if writer is not None:
            writer.close()  # ends the archive; the file is ours to close
            stream.close()
            shards.append((name, count, (folder / name).stat().st_size))
            writer = stream = None

    for position in part:
        index = int(order[position])
        try:
            data, ext = _encoded(src, index)
        except OSError as err:
            skipped.append(f"{src.name(index)} ({type(err).__name__}: {err})")
            continue
        if writer is not None and stream.tell() + len(data) + 2048 > limit and count:
            close()
        if writer is None:
            name = f"part-{k:03d}-{len(shards):05d}.tar"
            stream = open(folder / name, "wb")
            # ustar with a fixed mtime: reproducible files, no pax header per member (1 KiB each)
            writer = wds.TarWriter(stream, mtime=0, mode=_MODE, user="simmim", group="simmim", encoder=False)
            count = 0
        key = f"{position:09d}"
        sample = {"__key__": key, ext: data}
        label = -1 if labels is None else int(labels[position])
        if labels is not None:
            sample["cls"] = str(label).encode()
        writer.write(sample)
        count += 1
        image_bytes += len(data)
        encodings[ext] = encodings.get(ext, 0) + 1
        rows.append((position, key, label, src.name(index)))
    close()
    return shards, skipped, rows, encodings, image_bytes


def _encoded(src, index: int) -> tuple[bytes, str]:
    """(file bytes, extension) of item ``index``: the file as it is, or a PNG for Fashion-MNIST's arrays."""
    if isinstance(src, ImageFiles):
        path = src.name(index)
        with open(path, "rb") as f:
            data = f.read()
        ext = os.path.splitext(path)[1].lstrip(".").lower() or "img"
        return data, ext
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(src.images[index], "L").save(buffer, "PNG")
    return buffer.getvalue(), "png"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simmim.data.pack",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Then: python -m simmim.pretrain data.source=shards data.root=OUT (or the URL it was uploaded to)",
    )
    parser.add_argument(
        "source", help="image folder, ImageFolder tree, .txt file list, Fashion-MNIST idx folder or fashion_mnist"
    )
    parser.add_argument("out", help="output folder (created; must not hold a manifest already)")
    parser.add_argument("--shard-size", default="256MB", help="target bytes per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="parallel packers (default: %(default)s)")
    parser.add_argument("--source", dest="kind", default="auto", help="layout of SOURCE, as data.source (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default: %(default)s)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source's order")
    args = parser.parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers {args.workers}: use 1 or more", file=sys.stderr)
        return 2
    try:
        written = pack(args.source, args.out, args.shard_size, args.workers, args.kind, not args.no_shuffle, args.seed)
    except (OSError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        manifest = json.loads(path.read_text())
        print(
            f"{path.parent}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
            f"{manifest['shard_bytes'] / 1e6:.1f} MB, {len(manifest['classes'])} classes, {manifest['seconds']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
