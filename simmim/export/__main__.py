"""``python -m simmim.export SOURCE --to hf|timm|official|onnx --out FOLDER`` (see :mod:`simmim.export`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from simmim.export import FORMATS, ExportError, export


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simmim.export",
        description="Export SimMIM / SwinV2 weights to HF transformers, timm, the official layout or ONNX, with a "
        "model card.",
    )
    parser.add_argument("source", help="a run folder, a .ckpt, an encoder.safetensors (or an HF/timm export folder)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format")
    parser.add_argument("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="fully unpickle a file the safe reader refuses (trusted only)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = export(args.source, args.to, args.out, args.overwrite, args.trust_checkpoint)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} ({args.to}: {files}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
