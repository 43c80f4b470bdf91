"""Shared helpers for the benchmarks: matched ours/timm models, a training step, interleaved timing, FLOPs."""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from simmim import runtime
from simmim.models import MODEL_CONFIGS, create_model
from simmim.models.convert import official_to_timm


def build_pair(name: str, img_size: int, window_size: int, num_classes: int = 1000, **kw) -> tuple:
    """Our model and timm's ``SwinTransformerV2`` with the same weights (timm imported lazily)."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    cfg = {**MODEL_CONFIGS[name], "img_size": img_size, "window_size": window_size, "num_classes": num_classes}
    ours = create_model(name, **cfg, **kw)
    timm_kw = {k: v for k, v in cfg.items() if k in ("img_size", "embed_dim", "depths", "num_heads", "window_size")}
    theirs = TimmSwinV2(**timm_kw, num_classes=num_classes)
    theirs.load_state_dict(official_to_timm(ours.state_dict()))
    return ours, theirs


def step_arguments(description: str, rounds: int) -> argparse.ArgumentParser:
    """The command line shared by the training-step benchmarks: model geometry, batch and interleaved rounds
    (default: SwinV2-T, 192 px, window 12, batch 8)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="swinv2_tiny")
    ap.add_argument("--img-size", type=int, default=192)
    ap.add_argument("--window", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (median reported)")
    return ap


def keep_freed_memory() -> None:
    """glibc malloc keeps freed memory for reuse instead of returning it to the OS (mmap threshold 32 MiB, trim
    threshold 16 GiB, top pad 1 GiB: as ``MALLOC_MMAP_THRESHOLD_`` etc. would), so a step's large temporaries do
    not page-fault afresh on every step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as err:
        raise SystemExit(f"--keep-freed-memory needs glibc (Linux): {err}") from None
    for param, value in ((-3, 32 << 20), (-1, 16 << 30), (-2, 1 << 30)):  # M_MMAP_THRESHOLD, M_TRIM_, M_TOP_PAD
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) failed")


def make_train_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, fused: bool = True
) -> Callable[[], None]:
    """One training step: forward (optionally under bf16 autocast on ``x``'s device), cross-entropy, backward,
    AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    model.train()

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_inference_step(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One forward pass in eval mode under ``torch.inference_mode`` (optionally bf16 autocast)."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return step


def step_flops(step: Callable[[], None]) -> int:
    """Matrix FLOPs (mm, bmm, addmm, conv, attention) of one call of ``step``, counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def bf16_rows(requested: list[str], explicit: bool) -> tuple[list[str], str | None]:
    """The dtypes to time: bf16 rows are left out on a CPU without native bf16 matrix instructions (its products
    run ~80x slower there, and oneDNN has no bf16 kernel to measure a peak with) unless asked for explicitly;
    returns them and the note that says so."""
    if "bf16" not in requested or explicit or runtime.machine().native_bf16:
        return requested, None
    kept = [d for d in requested if d != "bf16"]
    return kept, "bf16 rows skipped: this CPU has no native bf16 (pass --dtypes bf16 to time them anyway)"


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, clock: str = "wall") -> float:
    """Measured FLOP/s of a square ``n x n`` matmul in ``dtype``: the best of repeated timings, of ATen's ``mm``
    and (on CPU with oneDNN, where it has a kernel for ``dtype``: bf16 needs native bf16) oneDNN's inner product,
    whichever is faster (float32 on AMD CPUs with AVX-512: oneDNN ~2x MKL)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    native = dtype != torch.bfloat16 or runtime.machine().native_bf16
    n = n if native else min(n, 512)  # emulated bf16 runs ~1 GFLOP/s: a 2048^3 product would take ~20 s
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    kernels = [lambda: a @ b]
    if torch.backends.mkldnn.is_available() and native:
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        kernel()
        end = time.perf_counter() + seconds / len(kernels)
        while time.perf_counter() < end:
            t = now()
            kernel()
            best = min(best, now() - t)
    return 2 * n**3 / best


def interleaved_rounds(
    fns: dict[str, Callable[[], None]], rounds: int, steps: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Every round's seconds per call for each function, timed in alternating rounds so background load hits all
    alike.

    ``clock="cpu"`` measures this process's CPU time instead of wall time: with one thread it is immune to other
    processes sharing the cores (with several threads it also counts OpenMP spin-waiting)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = now()
            for _ in range(steps):
                fns[name]()
            times[name].append((now() - t) / steps)
    return times


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, steps: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call for each function over :func:`interleaved_rounds`."""
    return {k: statistics.median(v) for k, v in interleaved_rounds(fns, rounds, steps, warmup, clock).items()}
