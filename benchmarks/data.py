"""Data-pipeline throughput: images/s of decode + augmentation + mask through the pretraining DataLoader.

Compare with the model's training images/s: the loader must outpace it with the workers you can spare.

    python benchmarks/data.py --root /work/shared/data/imagenette2-224 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from simmim.data import ImageFiles, PretrainDataModule

# shared/ lies beside the checkout (as in CI)
IMAGENETTE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenette2-224"


def throughput(root: str | None, img_size: int, batch_size: int, num_workers: int, batches: int) -> float:
    """Steady-state images/s over ``batches`` batches, after one warm-up batch (worker start-up excluded) and with
    the files already in the page cache (every row reads the same files: epoch 0 of seed 0)."""
    dm = PretrainDataModule(root, img_size=img_size, batch_size=batch_size, num_workers=num_workers, pin_memory=False)
    dm.setup("fit")
    if isinstance(dm.source, ImageFiles):
        for index, _ in list(dm.train_sampler)[: (batches + 1) * batch_size]:
            Path(dm.source.name(dm.train_set.indices[index])).read_bytes()
    it = iter(dm.train_dataloader())
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, 3, img_size, img_size)
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(IMAGENETTE), help="image folder (train/ is used)")
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--fashion-img-size", type=int, default=64, help="Fashion-MNIST row (0: skip)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    rows = [(args.root, "images", args.img_size)]
    if args.fashion_img_size:
        rows.append((None, "Fashion-MNIST", args.fashion_img_size))
    print(f"| data | px | batch | {' | '.join(f'{w} workers' for w in args.workers)} |")
    print(f"|---|---|---|{'---|' * len(args.workers)}")
    for root, name, size in rows:
        rates = [throughput(root, size, args.batch_size, w, args.batches) for w in args.workers]
        label = root if root else name
        print(f"| {label} | {size} | {args.batch_size} | {' | '.join(f'{r:.0f} img/s' for r in rates)} |", flush=True)


if __name__ == "__main__":
    main()
