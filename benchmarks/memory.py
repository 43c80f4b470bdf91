"""Peak memory and time of one SwinV2 training step at high resolution: our memory savers against timm.

    python benchmarks/memory.py                         # 1024 px, window 32, batch 1: the headline table
    python benchmarks/memory.py --sizes 512,1024,1536   # the full grid (several minutes per size)
    python benchmarks/memory.py --sizes 512 --configs ours:ckpt+seq,timm:ckpt
    python benchmarks/memory.py --device cuda --bf16 --sizes 512,1024,1536   # on a GPU: peak allocated memory

Each configuration runs in a fresh subprocess (peak RSS from ``resource.getrusage``; tracemalloc does not see
torch's allocations): build the model and AdamW, one warm-up step, one timed step. The peak includes the
process baseline (Python, torch, weights, gradients, AdamW state), reported separately. Configurations:
``ours:plain``, ``ours:ckpt`` (per-block activation checkpointing), ``ours:seq`` (sequential attention over
chunks of ``--chunk`` (window, head) pairs), ``ours:ckpt+seq``, ``timm:plain``, ``timm:ckpt`` (timm's own
``set_grad_checkpointing``). A CPU worker is capped at ``--limit-gb`` of address space so that a configuration that
does not fit fails alone instead of pushing the machine into swap or the OOM killer. With ``--device cuda`` the peak
is ``torch.cuda.max_memory_allocated`` of the step and the baseline what is allocated before it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("ours:ckpt+seq", "ours:ckpt", "ours:seq", "ours:plain", "timm:ckpt", "timm:plain")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(cfg: str, img: int, window: int, batch: int, chunk: int, bf16: bool, device: str = "cpu") -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks._common import make_train_step

    impl, mode = cfg.split(":")
    torch.manual_seed(0)
    if impl == "ours":
        from simmim.models import create_model

        model = create_model("swinv2_tiny", img_size=img, window_size=window)
    else:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        model = SwinTransformerV2(img_size=img, window_size=window, embed_dim=96, depths=(2, 2, 6, 2))
    model.set_grad_checkpointing("ckpt" in mode)
    if impl == "ours":
        model.set_attn_chunk_size(chunk if "seq" in mode else 0)
    model.to(device)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    step = make_train_step(model, x, y, bf16)
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated() / 2**30 if cuda else _rss_gb()
    step()  # warm-up: allocates gradients and AdamW state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gb()
    return {"step_s": time.perf_counter() - t, "peak_gb": peak, "base_gb": base}


def run(cfg: str, img: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", cfg, "--sizes", str(img), "--window", str(args.window)]
    cmd += ["--batch", str(args.batch), "--chunk", str(args.chunk), "--limit-gb", str(args.limit_gb)]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--device", args.device]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {args.timeout}s"}
    if res.returncode != 0:
        err = res.stderr.strip().splitlines()
        return {"error": (err[-1] if err else f"exit {res.returncode}")[:80]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024", help="comma-separated image sizes")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=16, help="(window, head) pairs per attention chunk")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--limit-gb", type=float, default=20.0, help="address-space cap per worker")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        if args.device == "cpu":  # an address-space cap would break CUDA's own reservations
            limit = int(args.limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(worker(args.worker, sizes[0], args.window, args.batch, args.chunk, args.bf16, args.device)))
        return
    configs = args.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    if args.device == "cpu":
        sys.path.insert(0, str(ROOT))
        from simmim import runtime

        print(f"# {runtime.describe()}")
    print(
        f"# swinv2_tiny, window {args.window}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"sequential chunk {args.chunk}, {args.device}; peak "
        + ("allocated CUDA memory" if args.device != "cpu" else "RSS")
        + " of a fresh process per row (baseline = before the first step)"
    )
    print("| px | config | peak GB | baseline GB | step s | peak vs timm:ckpt |")
    print("|---|---|---|---|---|---|")
    for img in sizes:
        rows = {c: run(c, img, args) for c in configs}
        ref = rows.get("timm:ckpt", {}).get("peak_gb")
        for c, r in rows.items():
            if "error" in r:
                print(f"| {img} | {c} | failed: {r['error']} | | | |", flush=True)
                continue
            rel = f"{r['peak_gb'] / ref:.2f}" if ref else ""
            print(f"| {img} | {c} | {r['peak_gb']:.2f} | {r['base_gb']:.2f} | {r['step_s']:.1f} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
