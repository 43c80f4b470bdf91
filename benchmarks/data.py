"""Data-pipeline benchmarks: loader speed, shards vs folders, start-up at 1M samples, folder listing, shard libraries.

    python benchmarks/data.py loader --baseline /path/to/old/checkout   # img/s per worker: old code vs this one
    python benchmarks/data.py shards                                    # the same images from a folder and shards
    python benchmarks/data.py startup --samples 1000000                 # per-rank start-up on 1M-sample shards
    python benchmarks/data.py listing --files 1000000                   # listing a 1M-file tree (tmpfs), cached
    python benchmarks/data.py libraries                                 # litdata vs webdataset (wids), as chosen

Every table starts with the CPU class it ran on. Loader rows report two numbers: images per second of one worker's
own CPU time (what a worker delivers when it has a core; steady under other load) and wall-clock images/s.
``loader`` without a subcommand-less call keeps the old table: ``python benchmarks/data.py --workers 0 1 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# shared/ lies beside the checkout (as in CI)
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
IMAGENETTE = SHARED / "imagenette2-224"
COMMANDS = ("loader", "shards", "startup", "listing", "libraries")


# ------------------------------------------------------------------------------------------------- machine
def cpu_class() -> str:
    """One line: CPU model, torch's CPU capability, native bf16, threads, load."""
    import torch

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"CPU: {model}; torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}, "
        f"mkldnn bf16 {bf16}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; load {load}"
    )


# -------------------------------------------------------------------------------------------------- loader
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_rate(root: str | None, source: str, img_size: int, batch_size: int, workers: int, batches: int) -> dict:
    """Steady-state rates over ``batches`` batches after two warm-up batches, files in the page cache: wall img/s and
    img/s per second of worker CPU (main-process CPU with 0 workers). Runs on whichever ``simmim`` is imported."""
    from simmim.data import ImageFiles, PretrainDataModule

    dm = PretrainDataModule(
        root, source, img_size=img_size, batch_size=batch_size, num_workers=workers, pin_memory=False, val_root=None
    )
    dm.setup("fit")
    source_obj = dm.source
    if isinstance(source_obj, ImageFiles):  # warm the page cache with the files the timed batches read
        for index, _ in list(dm.train_sampler)[: (batches + 2) * batch_size]:
            Path(source_obj.name(dm.train_set.indices[index])).read_bytes()
    elif hasattr(source_obj, "urls"):
        for url in source_obj.urls:
            Path(url).read_bytes()
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    workers = getattr(getattr(loader, "_iterator", None) or it, "_workers", [])  # persistent workers live there
    pids = [w.pid for w in workers]
    cpu0 = [_cpu_seconds(p) for p in pids] if pids else [time.process_time()]
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    wall = time.perf_counter() - start
    cpu1 = [_cpu_seconds(p) for p in pids] if pids else [time.process_time()]
    assert batch["image"].shape == (batch_size, 3, img_size, img_size)
    images = batches * batch_size
    cpu = sum(b - a for a, b in zip(cpu0, cpu1))
    return {"wall": images / wall, "per_worker": images / cpu if cpu > 0 else float("nan")}


def _rate_in(tree: str | None, *args) -> dict:
    """``loader_rate`` in a fresh process importing ``simmim`` from ``tree`` (None: this checkout)."""
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": tree or here, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "_rate", json.dumps([str(a) if isinstance(a, Path) else a for a in args])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), noise: float = 12.0) -> Path:
    """``count`` JPEGs (quality 90) of ``size``: Imagenette photos upscaled, with sensor-like noise for detail (so
    files are about ImageNet's size); without Imagenette, synthetic textures."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    photos = sorted((IMAGENETTE / "val").rglob("*.JPEG"))
    rng = np.random.default_rng(0)
    for i in range(count):
        if photos:
            img = Image.open(photos[i * 7 % len(photos)]).convert("RGB").resize(size, Image.BICUBIC)
            pixels = np.asarray(img, np.float32)
        else:
            yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
            pixels = 128 + 60 * np.sin(xx * rng.uniform(0.01, 0.1) + yy * rng.uniform(0.01, 0.1))[..., None].repeat(
                3, 2
            )
        pixels = (pixels + rng.normal(0, noise, pixels.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", "JPEG", quality=90)
    return folder


def _best_rates(rounds: list[dict]) -> dict:
    """The best of the rounds for each rate: other processes on the machine only ever slow a round down."""
    return {k: max(r[k] for r in rounds) for k in rounds[0]}


def cmd_loader(args) -> None:
    print(cpu_class())
    work = Path(args.work)
    rows = [("Imagenette train (224 px JPEG)", IMAGENETTE / "train")]
    if args.jpegs:
        rows.append((f"generated 500x375 JPEG q90 ({args.jpegs})", make_jpegs(work / "jpeg500", args.jpegs)))
    if args.large:
        rows.append(
            (f"generated 1600x1200 JPEG q90 ({args.large})", make_jpegs(work / "jpeg1600", args.large, (1600, 1200)))
        )
    trees = [("before", args.baseline), ("now", None)] if args.baseline else [("now", None)]
    print(
        f"\n`python benchmarks/data.py loader` - pretraining augmentation at {args.img_size} px, batch "
        f"{args.batch_size}, {args.batches} timed batches, best of {args.rounds} interleaved rounds\n"
    )
    head = "| data | workers | " + " | ".join(f"{name}: img/s per worker CPU | {name}: wall img/s" for name, _ in trees)
    print(head + (" | per-worker speed-up |" if len(trees) == 2 else " |"))
    print("|" + "---|" * (2 + 2 * len(trees) + (len(trees) == 2)))
    for label, root in rows:
        if not root.exists():
            print(f"| {label} | - | missing: {root} |")
            continue
        sizes = [p.stat().st_size for p in list(Path(root).rglob("*.*"))[:2000]]
        label = f"{label}, {np.mean(sizes) / 1e3:.0f} KB avg"
        for workers in args.workers:
            found = {name: [] for name, _ in trees}
            for r in range(args.rounds):
                for name, tree in trees if r % 2 == 0 else trees[::-1]:
                    found[name].append(_rate_in(tree, str(root), "auto", args.img_size, args.batch_size, workers,
                                                args.batches))  # fmt: skip
            rates = {name: _best_rates(v) for name, v in found.items()}
            cells = " | ".join(f"{rates[n]['per_worker']:.0f} | {rates[n]['wall']:.0f}" for n, _ in trees)
            gain = (
                f" | **{rates['now']['per_worker'] / rates['before']['per_worker']:.2f}x** |" if args.baseline else " |"
            )
            print(f"| {label} | {workers} | {cells}{gain}", flush=True)


# -------------------------------------------------------------------------------------------------- shards
def cmd_shards(args) -> None:
    from simmim.data.pack import pack

    print(cpu_class())
    work = Path(args.work)
    rows = [("Imagenette train", IMAGENETTE / "train")]
    if args.jpegs:
        rows.append((f"generated 500x375 JPEG q90 ({args.jpegs})", make_jpegs(work / "jpeg500", args.jpegs)))
    print(
        f"\n`python benchmarks/data.py shards` - the same images from their folder and from shards on local disk "
        f"({args.shard_size} shards), pretraining augmentation at {args.img_size} px, batch {args.batch_size}, "
        f"best of {args.rounds} interleaved rounds\n"
    )
    print(
        "| data | workers | folder: img/s per worker CPU | folder: wall img/s | shards: img/s per worker CPU | "
        "shards: wall img/s | shards / folder |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, root in rows:
        out = work / f"shards-{Path(root).parent.name}-{Path(root).name}"
        if not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            pack(root, out, args.shard_size, workers=2)
            print(f"(packed {root} in {time.perf_counter() - start:.1f} s with 2 workers)")
        for workers in args.workers:
            found = {"folder": [], "shards": []}
            for r in range(args.rounds):
                for name in ("folder", "shards") if r % 2 == 0 else ("shards", "folder"):
                    where, kind = (root, "auto") if name == "folder" else (out, "shards")
                    found[name].append(_rate_in(None, str(where), kind, args.img_size, args.batch_size, workers,
                                                args.batches))  # fmt: skip
            f, s = _best_rates(found["folder"]), _best_rates(found["shards"])
            print(f"| {label} | {workers} | {f['per_worker']:.0f} | {f['wall']:.0f} | {s['per_worker']:.0f} | "
                  f"{s['wall']:.0f} | {s['per_worker'] / f['per_worker']:.2f}x |", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------- startup
def fake_shards(folder: Path, samples: int, per_shard: int, classes: int = 1000) -> Path:
    """A manifest (and labels) of ``samples`` samples in shards of ``per_shard``; the shard files are not written
    (start-up reads only the manifest and the labels)."""
    from simmim.data.shards import FORMAT

    folder.mkdir(parents=True, exist_ok=True)
    counts = [per_shard] * (samples // per_shard) + ([samples % per_shard] if samples % per_shard else [])
    shardlist = [{"url": f"shard-{i:06d}.tar", "nsamples": c, "filesize": c * 110_000} for i, c in enumerate(counts)]
    labels = np.random.default_rng(0).integers(0, classes, samples).astype(np.int16)
    np.save(folder / "labels.npy", labels)
    manifest = {"format": FORMAT, "version": 1, "wids_version": 1, "num_samples": samples, "shardlist": shardlist,
                "classes": [f"c{i}" for i in range(classes)], "labels": "labels.npy"}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _startup(root: str, rank: int, world: int) -> float:
    """Seconds from the data module's construction to this rank's first-epoch order (manifest, labels, sampler,
    shard-aware order), in a fresh process that imported simmim.data (torch, Lightning, ...) before the clock."""
    code = (
        "import time; from simmim.data.datamodule import PretrainDataModule; t = time.perf_counter();"
        f"dm = PretrainDataModule({root!r}, 'shards', batch_size=128, num_workers=0, val_root=None, rank={rank},"
        f" world_size={world}, cache_dir={tempfile.gettempdir()!r} + '/simmim-bench-cache');"
        "dm.setup('fit'); order = dm.train_sampler.indices();"
        "print(time.perf_counter() - t, len(order))"
    )
    here = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "PYTHONPATH": here, "PYTHONWARNINGS": "ignore"}, timeout=600)  # fmt: skip
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.split()[0])


def _import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import simmim.data.datamodule; print(time.perf_counter() - t)"
    here = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": here}, check=True)  # fmt: skip
    return float(out.stdout.split()[0])


def cmd_startup(args) -> None:
    print(cpu_class())
    work = Path(args.work) / f"fake-{args.samples}"
    root = fake_shards(work, args.samples, args.per_shard)
    print(
        f"\n`python benchmarks/data.py startup --samples {args.samples}` - a fresh process per rank, timed after its "
        f"imports: data module on {args.samples:,} samples in {args.samples // args.per_shard} shards, sampler, "
        f"the epoch's shard-aware order (world size {args.world}); median of {args.rounds}\n"
    )
    print(f"importing simmim.data.datamodule (torch, Lightning, ...): {_import_seconds():.2f} s\n")
    print("| shards at | rank 0 | last rank |")
    print("|---|---|---|")
    where = [("local folder", str(root))]
    server = None
    try:
        server, url = _moto(root)
        where.append(("s3:// (moto server on loopback)", url))
    except ImportError as err:
        print(f"(no s3 row: {err})")
    try:
        for name, r in where:
            first = statistics.median(_startup(r, 0, args.world) for _ in range(args.rounds))
            last = (
                statistics.median(_startup(r, args.world - 1, args.world) for _ in range(args.rounds))
                if args.world > 1
                else first  # one rank: rank 0 is the last
            )
            print(f"| {name} | {first:.2f} s | {last:.2f} s |", flush=True)
    finally:
        if server is not None:
            server.stop()


def _moto(folder: Path):
    """moto's S3 server on loopback with ``folder``'s manifest and labels uploaded; sets the AWS_* environment."""
    import boto3

    server = _moto_server()
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for path in folder.iterdir():
        if path.is_file() and not path.name.endswith(".tar"):
            client.upload_file(str(path), "bench", f"data/{path.name}")
    return server, "s3://bench/data"


# ------------------------------------------------------------------------------------------------- listing
def make_tree(root: Path, files: int, per_folder: int) -> Path:
    """``files`` empty .jpg files, ``per_folder`` per class folder (an ImageNet-like layout)."""
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for start in range(0, files, per_folder):
        folder = root / f"n{start // per_folder:08d}"
        folder.mkdir(parents=True)
        for i in range(start, min(start + per_folder, files)):
            os.close(os.open(folder / f"img_{i:08d}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    (root / ".complete").touch()
    return root


def _timed(tree: str | None, code: str) -> tuple[float, str]:
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": tree or here, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    seconds, *rest = out.stdout.split()
    return float(seconds), " ".join(rest)


def cmd_listing(args) -> None:
    print(cpu_class())
    base = Path(args.tmpfs)
    root = make_tree(base / f"tree-{args.files}", args.files, args.per_folder)
    cache = base / f"run-{args.files}"
    shutil.rmtree(cache, ignore_errors=True)

    def build(kind: str, cached: bool) -> str:
        extra = f", listing_cache={str(cache)!r}" if cached else ""
        return (
            "import time; from simmim.data.datamodule import PretrainDataModule; t = time.perf_counter();"
            f"dm = PretrainDataModule({str(root)!r}, {kind!r}, batch_size=128, num_workers=0, val_root=None{extra});"
            "print(time.perf_counter() - t, len(dm.source))"
        )

    print(
        f"\n`python benchmarks/data.py listing --files {args.files}` - PretrainDataModule on {args.files:,} empty "
        f"files in {args.files // args.per_folder} class folders on tmpfs ({base}); a fresh process each, timed "
        "after its imports\n"
    )
    print("| code | source | listing | seconds | images |")
    print("|---|---|---|---|---|")
    for kind in args.sources.split(","):
        if args.baseline:
            seconds, n = _timed(args.baseline, build(kind, False))
            print(f"| before (os.walk) | {kind} | scan | {seconds:.2f} | {n} |", flush=True)
        seconds, n = _timed(None, build(kind, False))
        print(f"| now | {kind} | scan | {seconds:.2f} | {n} |", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        seconds, n = _timed(None, build(kind, True))
        print(f"| now | {kind} | scan, writing the listing cache | {seconds:.2f} | {n} |", flush=True)
        for _ in range(2):
            seconds, n = _timed(None, build(kind, True))
            print(f"| now | {kind} | from the listing cache | {seconds:.2f} | {n} |", flush=True)
    print(f"\n(importing simmim.data.datamodule, before every row's clock: {_import_seconds():.2f} s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- libraries
def cmd_libraries(args) -> None:
    """litdata vs webdataset/wids for what the toolkit needs: packing, and reading by index in the shard-aware
    order (a window of 2 shards at a time) from local disk and from S3 (moto on loopback)."""
    import tarfile

    print(cpu_class())
    work = Path(args.work) / "libraries"
    shutil.rmtree(work, ignore_errors=True)
    files = sorted(p for p in (IMAGENETTE / "train").rglob("*") if p.is_file())
    classes = sorted({p.parent.name for p in files})
    labels = [classes.index(p.parent.name) for p in files]
    limit = 16 * 2**20
    for p in files:
        p.read_bytes()
    packed = {}

    def pack_wds(out: Path) -> None:
        import webdataset as wds

        out.mkdir(parents=True)
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=limit, maxcount=10**9, verbose=0, mtime=0) as w:
            for i, (p, label) in enumerate(zip(files, labels)):
                w.write({"__key__": f"{i:09d}", "jpeg": p.read_bytes(), "cls": str(label).encode()})

    def pack_lit(out: Path) -> None:
        from litdata.streaming.writer import BinaryWriter

        writer = BinaryWriter(str(out), chunk_bytes=limit)
        for i, (p, label) in enumerate(zip(files, labels)):
            writer[i] = {"image": p.read_bytes(), "label": label}
        writer.done()
        writer.merge()

    print(
        f"\n`python benchmarks/data.py libraries` - Imagenette train ({len(files)} JPEGs, "
        f"{sum(p.stat().st_size for p in files) / 1e6:.0f} MB), 16 MiB shards / chunks, one process\n"
    )
    print("| library | pack s | shards | MB on disk | local: us/sample | S3: s per epoch | S3: GET requests |")
    print("|---|---|---|---|---|---|---|")
    server = _moto_server()
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="libs")
    for name, packer in (("webdataset + wids", pack_wds), ("litdata", pack_lit)):
        out = work / name.split()[0]
        start = time.perf_counter()
        packer(out)
        seconds = time.perf_counter() - start
        shard_files = sorted(p for p in out.iterdir() if p.suffix in (".tar", ".bin"))
        if name.startswith("web"):
            sizes = []
            for p in shard_files:
                with tarfile.open(p) as t:
                    sizes.append(sum(m.name.endswith(".jpeg") for m in t.getmembers()))
        else:
            sizes = [c["chunk_size"] for c in json.loads((out / "index.json").read_text())["chunks"]]
        order = _window_order(sizes, 2)
        for p in out.iterdir():
            client.upload_file(str(p), "libs", f"{name.split()[0]}/{p.name}")
        _read_library(name, str(out), order, None)  # first pass maps the files in
        local = _read_library(name, str(out), order, None)
        before = server.gets
        remote = _read_library(name, f"s3://libs/{name.split()[0]}", order, work / f"cache-{name.split()[0]}")
        gets = server.gets - before
        packed[name] = (
            seconds,
            len(shard_files),
            sum(p.stat().st_size for p in shard_files) / 1e6,
            local,
            remote,
            gets,
        )
        s, n, mb, loc, rem, g = packed[name]
        print(f"| {name} | {s:.2f} | {n} | {mb:.0f} | {loc * 1e6 / len(order):.0f} | {rem:.1f} | {g} |", flush=True)
    server.stop()


def _window_order(sizes: list[int], window: int, seed: int = 0) -> np.ndarray:
    """The shard-aware order: shards permuted, samples shuffled within windows of ``window`` shards."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    perm = rng.permutation(len(sizes))
    parts = []
    for k in range(0, len(perm), window):
        members = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in perm[k : k + window]])
        parts.append(rng.permutation(members))
    return np.concatenate(parts)


def _read_library(name: str, root: str, order: np.ndarray, cache: Path | None) -> float:
    """Seconds to read every sample's bytes in ``order`` by index with the library's random-access dataset."""
    start = time.perf_counter()
    if name.startswith("web"):
        import wids.wids

        from simmim.data.storage import ShardCache

        tars = sorted(Path(root).glob("*.tar")) if cache is None else None
        if tars is not None:
            urls = [str(p) for p in tars]
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(root)
            urls = [f"s3://{p}" for p in sorted(fs.ls(path)) if p.endswith(".tar")]
        readers = {}
        counts = []
        fetch = ShardCache(cache, 10**12) if cache is not None else None
        for url in urls:  # counts from the tar index (the real source keeps them in its manifest)
            local = url if fetch is None else str(fetch.fetch(url))
            readers[url] = wids.wids.IndexedTarSamples(path=local)
            counts.append(len(readers[url]))
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i in order:
            s = int(np.searchsorted(starts, i, side="right") - 1)
            len(readers[urls[s]][int(i - starts[s])][".jpeg"].getvalue())
    else:
        from litdata import StreamingDataset

        kw = {} if cache is None else {"cache_dir": str(cache)}
        ds = StreamingDataset(root, **kw)
        for i in order:
            len(ds[int(i)]["image"])
    return time.perf_counter() - start


class _MotoServer:
    """moto's S3 server on 127.0.0.1 (a free port), counting the GET requests it answers; sets the AWS_* environment
    of this process (and of the subprocesses it starts)."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        self.gets = 0
        outer = self

        class Count(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "GET /" in record.getMessage():  # 206 (ranged) lines come wrapped in colour codes
                    outer.gets += 1

        log = logging.getLogger("werkzeug")  # one INFO record per request
        log.setLevel(logging.INFO)
        log.propagate = False
        log.handlers[:] = [Count()]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip

    def stop(self) -> None:
        self.server.stop()


def _moto_server() -> _MotoServer:
    return _MotoServer()


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_rate":  # a row measured in this process (see _rate_in)
        print(json.dumps(loader_rate(*json.loads(argv[1]))))
        return
    if not argv or argv[0] not in COMMANDS:
        argv = ["loader", *argv]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "simmim-bench-data"))
    common.add_argument("--img-size", type=int, default=192)
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    common.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the best is reported)")
    common.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    common.add_argument("--jpegs", type=int, default=1500, help="generated 500x375 JPEGs (0: no such row)")
    p = sub.add_parser("loader", parents=[common], help="loader img/s, optionally against an older checkout")
    p.add_argument("--baseline", help="a checkout of the code to compare with (its PYTHONPATH)")
    p.add_argument("--large", type=int, default=0, help="also N generated 1600x1200 JPEGs (reduced decoding)")
    p = sub.add_parser("shards", parents=[common], help="folder vs shards on local disk")
    p.add_argument("--shard-size", default="64MB")
    p = sub.add_parser("startup", parents=[common], help="per-rank start-up on a large shard manifest")
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--per-shard", type=int, default=2500, help="samples per shard (2,500 x 110 KB = 256 MB)")
    p.add_argument("--world", type=int, default=8)
    p = sub.add_parser("listing", parents=[common], help="listing a large tree of empty files")
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--per-folder", type=int, default=1000)
    p.add_argument("--tmpfs", default="/dev/shm/simmim-bench-listing")
    p.add_argument("--baseline", help="also time an older checkout's listing")
    p.add_argument("--keep", action="store_true", help="keep the generated tree")
    p.add_argument("--sources", default="folder,imagefolder", help="data.source values to list the tree as")
    sub.add_parser("libraries", parents=[common], help="litdata vs webdataset (wids)")
    args = parser.parse_args(argv)
    {"loader": cmd_loader, "shards": cmd_shards, "startup": cmd_startup, "listing": cmd_listing,
     "libraries": cmd_libraries}[args.command](args)  # fmt: skip


if __name__ == "__main__":
    main()
