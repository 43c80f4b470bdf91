"""Training-step throughput of our SwinV2 against timm's, same weights, same process, interleaved rounds.

    python benchmarks/encoder.py                      # SwinV2-T, 192 px, window 12, batch 8, fp32 (+ native bf16)
    python benchmarks/encoder.py --rounds 10 --dtypes bf16 --threads 2
    python benchmarks/encoder.py --threads 1 --clock cpu   # on a shared machine: immune to other processes
    python benchmarks/encoder.py --compile                 # both models torch.compile'd (minutes to compile)
    python benchmarks/encoder.py --keep-freed-memory       # glibc malloc tuned (timm's step is sensitive to it)
    python benchmarks/encoder.py --inference --batch 1     # forward only (eval, inference_mode): latency

One step = forward (optionally under CPU bf16 autocast), cross-entropy on 1000 classes, backward, AdamW step
(with --inference: the forward pass alone, in eval mode under inference_mode).
Rounds alternate the order of the two models so background load hits both alike; the table reports the
median step, and the range of the rounds' own ratios (wide: a noisy machine, rerun with more rounds). MFU = model
FLOPs (matrix products counted by torch's FlopCounterMode on the timm step) per second over the measured peak of a
large matmul in the same dtype on this machine. The header names the CPU class
(:func:`simmim.runtime.describe`); bf16 rows are left out on CPUs without native bf16 unless ``--dtypes`` asks.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    bf16_rows,
    build_pair,
    interleaved_rounds,
    keep_freed_memory,
    make_inference_step,
    make_train_step,
    matmul_peak,
    step_arguments,
    step_flops,
)
from simmim import runtime  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = step_arguments(__doc__, rounds=6)
    ap.add_argument("--steps", type=int, default=1, help="steps per model per round")
    ap.add_argument(
        "--dtypes", default=None, help="comma-separated subset of fp32,bf16 (default: both; bf16 only where native)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use 1 thread)")
    ap.add_argument("--foreach-adamw", action="store_true", help="torch's default AdamW instead of fused=True")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (compile time reported apart)")
    ap.add_argument("--inference", action="store_true", help="time the forward pass alone (eval, inference_mode)")
    ap.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc malloc keeps freed memory (no page faults per step)"
    )
    args = ap.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs = build_pair(args.model, args.img_size, args.window)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch,))
    fused = not args.foreach_adamw
    dtypes, note = bf16_rows((args.dtypes or "fp32,bf16").split(","), explicit=args.dtypes is not None)
    for name in dtypes:
        if name not in ("fp32", "bf16"):
            raise SystemExit(f"--dtypes: unknown dtype {name!r}; use fp32 and/or bf16")

    def make_step(model: torch.nn.Module, bf16: bool):
        if args.inference:
            return make_inference_step(model, x, bf16)
        return make_train_step(model, x, y, bf16, fused=fused)

    # FLOPs of the eager timm step, counted before any compilation
    flops = {name: step_flops(make_step(theirs, name == "bf16")) for name in dtypes}
    if args.compile:
        ours.compile()
        theirs.compile()
    print(f"# {runtime.describe()}, torch {torch.__version__}")
    print(
        f"# {args.model} {args.img_size}px window {args.window} batch {args.batch}, "
        + ("inference (forward only)" if args.inference else f"training, AdamW {'fused' if fused else 'foreach'}")
        + f", {args.rounds} rounds x {args.steps} step(s), {args.clock} clock"
        + (", both models torch.compile'd" if args.compile else "")
        + (", glibc malloc keeps freed memory" if args.keep_freed_memory else "")
    )
    if note:
        print(f"# {note}")
    print("| dtype | ours img/s | timm img/s | ours / timm | per round | ours MFU | timm MFU | matmul peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dtypes:
        bf16 = name == "bf16"
        steps = {
            "ours": make_step(ours, bf16),
            "timm": make_step(theirs, bf16),
        }
        if args.compile:  # the first steps compile (and recompile under autocast): timed apart, not in the table
            for key, fn in steps.items():
                start = time.perf_counter()
                fn()
                fn()
                print(f"# {key} {name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32, clock=args.clock)
        rounds = interleaved_rounds(steps, rounds=args.rounds, steps=args.steps, clock=args.clock)
        sec = {k: statistics.median(v) for k, v in rounds.items()}
        ips = {k: args.batch / v for k, v in sec.items()}
        mfu = {k: flops[name] / v / peak for k, v in sec.items()}
        # each round's ratio (the two steps timed back to back): how far one round's noise moves the median's
        ratios = [t / o for o, t in zip(rounds["ours"], rounds["timm"])]
        print(
            f"| {name} | {ips['ours']:.2f} | {ips['timm']:.2f} | {sec['timm'] / sec['ours']:.2f}x | "
            f"{min(ratios):.2f}-{max(ratios):.2f}x | {mfu['ours']:.0%} | {mfu['timm']:.0%} | {peak / 1e9:.0f} |",
            flush=True,
        )
    kind = "fwd" if args.inference else "fwd+bwd"
    if dtypes:
        print(f"# model FLOPs per step ({kind} matrix products): {flops[dtypes[0]] / 1e9:.1f} GFLOP")


if __name__ == "__main__":
    main()
