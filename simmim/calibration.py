"""Start-up measurements behind :mod:`simmim.runtime`'s choices: a few milliseconds each, cached per machine.

Plain torch ops only (no simmim kernel is imported), so a measurement never depends on the choice it informs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["best_seconds", "cache_dir", "measure_bf16_speedup", "measure_linear_speedup", "measured"]


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cache_dir() -> Path:
    """Where per-machine measurements are kept: ``SIMMIM_CACHE_DIR``, else ``~/.cache/simmim``."""
    return Path(os.environ.get("SIMMIM_CACHE_DIR") or Path.home() / ".cache" / "simmim")


def measured(
    name: str, machine_key: Sequence[str], machine_line: str, measure: Callable[[], float]
) -> tuple[float, bool]:
    """(``measure()``, read from the cache?): the value is kept in ``cache_dir()/calibration.json`` per ``name`` and
    ``machine_key`` (what makes the measurement differ: CPU, capability, torch version, threads)."""
    path = cache_dir() / "calibration.json"
    key = hashlib.sha1("|".join(["linear-v2", *machine_key]).encode()).hexdigest()[:16]
    try:
        cached = json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, Mapping) and isinstance(cached.get(name), float):
        return cached[name], True
    value = measure()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        entry = data.get(key) if isinstance(data.get(key), dict) else {}
        data[key] = {**entry, name: value, "machine": machine_line}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # an unwritable cache only costs the next process its own measurement
    return value, False


def measure_bf16_speedup() -> float:
    """Best-of-5 time of a 512 x 512 float32 matrix product over the same product in bf16 (~2 ms each): above 1,
    bf16 pays on this CPU. Native bf16 instructions alone do not say it: on a 2-core Intel Xeon with AVX512_BF16 and
    no AMX, bf16 products ran at half the float32 rate (benchmarks/RESULTS.md)."""
    import torch

    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    pairs = {dtype: (a.to(dtype), a.t().contiguous().to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
        seconds = {dtype: best_seconds(lambda x=x, y=y: x @ y, 5) for dtype, (x, y) in pairs.items()}
    return round(seconds[torch.float32] / seconds[torch.bfloat16], 3)


def measure_linear_speedup() -> float:
    """Best-of-3 time of a float32 linear's forward and backward (three products) through ``F.linear`` over the same
    three products through oneDNN's inner product as :mod:`simmim.kernels.linear` runs them (plain torch ops: this
    module imports no kernel), for x [256, 384] @ w [1536, 384]^T + b (a SwinV2-T MLP layer; ~0.9 GFLOP, a few ms each
    on a small CPU), interleaved so background load hits both alike."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(256, 1536, generator=g)
    ip = lambda a, b, bias=None: torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")  # noqa: E731
    kernels = {
        "aten": lambda x, w, b: F.linear(x, w, b).backward(grad),
        "onednn": lambda x, w, b: (ip(x, w, b), ip(grad, w.t().contiguous()), ip(x.t(), grad.t()).t(), grad.sum(0)),
    }
    best = {k: math.inf for k in kernels}
    # decided wherever the first linear runs: also inside no_grad, inference_mode or autocast
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        x, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in ((256, 384), (1536, 384), (1536,)))
        for warm in (True, False, False, False):
            for k, fn in kernels.items():
                t = time.perf_counter()
                fn(*((x, w, b) if k == "aten" else (x.detach(), w.detach(), b.detach())))
                if not warm:
                    best[k] = min(best[k], time.perf_counter() - t)
    return round(best["aten"] / best["onednn"], 3)
