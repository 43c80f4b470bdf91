"""Every hardware choice and environment switch of simmim, decided in one place from what the machine does.

Importing this module does nothing (it does not import torch): each decision is made on first use from the machine's
measured capability (never from an architecture's name; measurements in :mod:`simmim.calibration`), and logged once.
:func:`resolve_precision` (``auto``), :func:`fast_paths` (our CPU kernels; :func:`reference_kernels` turns them off
inside a block), :func:`plan_threads`, :func:`prepare_process` (the OpenMP wait policy, before torch loads).

Switches (read when a decision is made, checked by :func:`prepare_process`): ``SIMMIM_ONEDNN_LINEAR=0|1``,
``SIMMIM_CPU_ATTENTION=0``, ``SIMMIM_CACHE_DIR`` (default ``~/.cache/simmim``). ``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY`` and ``MKL_ENABLE_INSTRUCTIONS`` imitate a lesser CPU; every decision honours them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from simmim import calibration

__all__ = [
    "Machine",
    "FastPaths",
    "PrecisionChoice",
    "ThreadPlan",
    "machine",
    "describe",
    "resolve_precision",
    "fast_paths",
    "kernels_enabled",
    "reference_kernels",
    "overridden",
    "plan_threads",
    "prepare_process",
    "summary",
]

log = logging.getLogger("simmim.runtime")

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16", "64-true", "64")
SWITCHES = ("SIMMIM_ONEDNN_LINEAR", "SIMMIM_CPU_ATTENTION")  # each 0 or 1, else unset
IMITATION_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
# float32 linears go to oneDNN only when the calibration measured them at least this much faster than F.linear
ONEDNN_MIN_SPEEDUP = 1.15
# precision=auto: bf16-mixed on a native-bf16 CPU only where bf16 products measure this much faster than float32
BF16_MIN_SPEEDUP = 1.3
# training GFLOP per image below which a CPU model is loader-bound: the nano at 32 px (~0.03) trains fastest leaving the
# loader worker a core, models from the micro at 64 px (~0.2) up on all cores (benchmarks/RESULTS.md, threads)
LOADER_BOUND_GFLOP = 0.1


# ---- what the machine is --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """The CPU as torch and oneDNN see it (imitation variables included) and the CUDA devices."""

    cpu_model: str
    arch: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ...
    native_bf16: bool  # oneDNN has bf16 matrix instructions (AVX512_BF16, AMX, ...)
    cores: int  # CPU cores this process may run on
    cuda_devices: int
    cuda_bf16: bool
    imitated: tuple[str, ...] = ()  # imitation variables set (e.g. ONEDNN_MAX_CPU_ISA=AVX2)

    @property
    def vector_bytes(self) -> int:
        """Width of the CPU's vector registers as ATen's kernels use them."""
        return {"AVX512": 64, "AVX2": 32}.get(self.capability.upper(), 16)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.cache
def machine() -> Machine:
    """This machine (measured once per process)."""
    import torch

    cuda = torch.cuda.is_available()
    native_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return Machine(
        cpu_model=_cpu_model(),
        arch=platform.machine(),
        capability=str(torch.backends.cpu.get_cpu_capability()),
        native_bf16=native_bf16,
        cores=_cores(),
        cuda_devices=torch.cuda.device_count() if cuda else 0,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        imitated=tuple(f"{v}={os.environ[v]}" for v in IMITATION_VARIABLES if os.environ.get(v)),
    )


def describe(threads: int | None = None) -> str:
    """One line naming the CPU class, for logs and benchmark table headers."""
    import torch

    m = machine()
    threads = torch.get_num_threads() if threads is None else threads
    text = (
        f"{m.cpu_model} ({m.arch}), torch CPU capability {m.capability}, native bf16 "
        f"{'yes' if m.native_bf16 else 'no'}, {m.cores} cores, {threads} threads"
    )
    if m.imitated:
        text += f", imitating a lesser CPU ({' '.join(m.imitated)})"
    if m.cuda_devices:
        text += f", {m.cuda_devices} CUDA device(s) ({'bf16' if m.cuda_bf16 else 'no bf16'})"
    return text


# ---- precision --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionChoice:
    """A Lightning precision and why it was chosen (``warning``: a costly explicit choice)."""

    requested: str
    value: str
    reason: str
    warning: str | None = None

    @property
    def bf16(self) -> bool:
        return self.value.startswith("bf16")


def device_type(accelerator: str | None) -> str:
    """``cuda``, ``mps`` or ``cpu`` for a Lightning ``accelerator`` value (``auto``: what this machine has)."""
    import torch

    acc = str(accelerator or "auto").lower()
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda"
    if acc == "mps" or (acc == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def resolve_precision(requested: Any, accelerator: str | None = "auto") -> PrecisionChoice:
    """The Lightning precision for ``requested`` (``auto`` or any Lightning value) on ``accelerator``."""
    req = str(requested)
    if req not in PRECISIONS:
        raise ValueError(f"precision={requested!r} is not one of {', '.join(PRECISIONS)}")
    m, device = machine(), device_type(accelerator)
    if req != "auto":
        warning = None
        speedup = bf16_speedup() if device == "cpu" and req.startswith("bf16") else 1.0
        if not m.native_bf16 or speedup < 1.0:
            what = "without native bf16 matrix instructions" if not m.native_bf16 else "whose bf16 products are slow"
            warning = (
                f"precision={req} on a CPU {what} ({m.capability}): bf16 matrix products measured {1 / speedup:.1f}x "
                "slower than float32; auto picks 32-true"
            )
        return PrecisionChoice(req, req, "as requested", warning)
    if device == "cuda":
        if m.cuda_bf16:
            return PrecisionChoice(req, "bf16-mixed", "CUDA device with bf16")
        return PrecisionChoice(req, "16-mixed", "CUDA device without bf16: fp16 with a GradScaler")
    if device == "mps":
        return PrecisionChoice(req, "32-true", "Apple GPU: mixed precision not measured here")
    if not m.native_bf16:
        return PrecisionChoice(req, "32-true", f"CPU without native bf16 matrix instructions ({m.capability})")
    if (speedup := bf16_speedup()) >= BF16_MIN_SPEEDUP:
        return PrecisionChoice(
            req, "bf16-mixed", f"CPU with native bf16 ({m.capability}): bf16 products measured {speedup:.2f}x float32"
        )
    why = f"CPU with native bf16 ({m.capability}), but bf16 products measured only {speedup:.2f}x float32"
    return PrecisionChoice(req, "32-true", f"{why} (bf16 from {BF16_MIN_SPEEDUP}x)")


def bf16_speedup() -> float:
    """bf16 matrix products' speed over float32 on this CPU (measured once per machine, cached)."""
    return calibration.measured("bf16_matmul_speedup", _machine_key(), describe(), calibration.measure_bf16_speedup)[0]


def _machine_key() -> list[str]:
    import torch

    m = machine()
    return [m.cpu_model, m.capability, str(m.native_bf16), torch.__version__, str(torch.get_num_threads()), *m.imitated]


# ---- CPU kernels ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastPaths:
    """Which hand-written CPU kernels run, with the measurements behind them."""

    onednn_linear: bool
    cpu_attention: bool
    vector_bytes: int
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    def lanes(self, element_size: int) -> int:
        """Elements per vector register: rows shorter than this take scalar loops in ATen's half-precision
        kernels, which the attention kernel avoids."""
        return self.vector_bytes // element_size


_FAST: FastPaths | None = None
_REFERENCE = 0  # nesting depth of reference_kernels()


def fast_paths() -> FastPaths:
    """The CPU kernels to use in this process (decided on first call; the CLIs log the reasons)."""
    global _FAST
    if _FAST is None:
        _FAST = _decide_fast_paths()
        for key, reason in _FAST.reasons.items():
            log.debug("%s: %s", key, reason)
    return _FAST


def kernels_enabled() -> bool:
    """False inside :func:`reference_kernels`."""
    return _REFERENCE == 0


@contextlib.contextmanager
def overridden(**changes: bool) -> Iterator[FastPaths]:
    """The fast paths with ``changes`` (e.g. ``onednn_linear=False``) inside the block: A/B comparisons in
    benchmarks and tests of each path on any machine."""
    global _FAST
    before = fast_paths()
    _FAST = replace(before, **changes)
    try:
        yield _FAST
    finally:
        _FAST = before


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Plain PyTorch ops only inside the block: no hand-written CPU attention, no oneDNN linears (exports such as
    ONNX, whose tracers cannot translate our custom ops, and reference checks)."""
    global _REFERENCE
    _REFERENCE += 1
    try:
        yield
    finally:
        _REFERENCE -= 1


def _switch(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: use 1 (on) or 0 (off), or unset it to let simmim decide")
    return value == "1"


def _decide_fast_paths() -> FastPaths:
    import torch

    m = machine()
    reasons: dict[str, str] = {}
    forced = _switch("SIMMIM_ONEDNN_LINEAR")
    if not torch.backends.mkldnn.is_available():
        onednn = False
        reasons["oneDNN float32 linears"] = "off (this torch build has no oneDNN)"
    elif forced is not None:
        onednn = forced
        reasons["oneDNN float32 linears"] = f"{'on' if forced else 'off'} (SIMMIM_ONEDNN_LINEAR={int(forced)})"
    else:
        threads = torch.get_num_threads()
        speedup, cached = calibration.measured(
            "onednn_linear_speedup", _machine_key(), describe(threads), calibration.measure_linear_speedup
        )
        onednn = speedup >= ONEDNN_MIN_SPEEDUP
        reasons["oneDNN float32 linears"] = (
            f"{'on' if onednn else 'off'} (measured {speedup:.2f}x F.linear at {torch.get_num_threads()} threads; "
            f"on from {ONEDNN_MIN_SPEEDUP}x{', cached' if cached else ''})"
        )
    attention = _switch("SIMMIM_CPU_ATTENTION") is not False
    reasons["CPU attention kernel"] = (
        f"on, {m.vector_bytes * 8}-bit vectors ({m.capability})" if attention else "off (SIMMIM_CPU_ATTENTION=0)"
    )
    return FastPaths(onednn, attention, m.vector_bytes, reasons)


# ---- threads ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    reason: str


def plan_threads(requested: Any, workers: int, gflop_per_image: float | None = None) -> ThreadPlan:
    """torch's CPU threads for a training process: ``requested`` (a number, or ``auto``/None).

    ``auto``: all of this process's cores, except for loader-bound models (a training step under
    ``LOADER_BOUND_GFLOP`` per image, e.g. the nano model at 32 px), whose matrix products are too small to share out
    and which run fastest leaving one core to each loader worker."""
    cores = machine().cores
    if requested not in (None, "auto"):
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads={requested!r}: give a number of CPU threads >= 1, or auto")
        return ThreadPlan(requested, "as requested")
    if workers and gflop_per_image is not None and gflop_per_image < LOADER_BOUND_GFLOP:
        n = max(1, cores - workers)
        return ThreadPlan(
            n, f"{cores} cores, {workers} loader worker(s), {gflop_per_image:.2f} GFLOP/image: loader-bound model"
        )
    return ThreadPlan(cores, f"{cores} cores")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside the block (restored after, so in-process runs leave the caller's)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- process set-up -----------------------------------------------------------------------------------------------
def prepare_process() -> None:
    """For entry points, before torch loads: passive OpenMP waiting (unless set; GNU OpenMP's busy-waiting made CPU
    steps 20-50x slower whenever a loader worker shared the cores). A bad ``SIMMIM_*`` switch ends the process here
    with one ``error:`` line (exit 2), before any work."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        for name in SWITCHES:
            _switch(name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def summary(**decisions: Any) -> dict[str, Any]:
    """The machine and the decisions of a run, for the run folder (``recipe.yaml``'s ``resolved`` section)."""
    out: dict[str, Any] = {"machine": describe()}
    for key, value in decisions.items():
        out[key] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    if _FAST is not None:
        out["fast_paths"] = dict(_FAST.reasons)
    return out
