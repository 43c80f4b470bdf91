"""simmim.runtime: precision, kernels and threads chosen from what this machine measures (and, through oneDNN's,
ATen's and MKL's ISA variables, from what a lesser CPU would measure: imitated in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from simmim import runtime

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
native_bf16 = pytest.mark.skipif(not runtime.machine().native_bf16, reason="this CPU has no native bf16")


def _imitated(code: str, tmp_path, **env: str) -> str:
    """Run ``code`` in a fresh process imitating an AVX2 CPU without native bf16; its stdout."""
    full = {**os.environ, **AVX2, "SIMMIM_CACHE_DIR": str(tmp_path), **env}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_auto_precision_on_a_cpu_without_native_bf16_is_fp32_and_explicit_bf16_warns_with_its_cost(tmp_path):
    code = (
        "from simmim import runtime\n"
        "m = runtime.machine(); auto = runtime.resolve_precision('auto', 'cpu'); bf16 = runtime.resolve_precision("
        "'bf16-mixed', 'cpu')\n"
        "print(m.capability, m.native_bf16, m.vector_bytes, auto.value, bf16.value, bf16.warning, sep='|')"
    )
    capability, native, vector, auto, explicit, warning = _imitated(code, tmp_path).split("|")
    assert (capability, native, vector, auto, explicit) == ("AVX2", "False", "32", "32-true", "bf16-mixed")
    assert "without native bf16" in warning and "x slower" in warning and "auto picks 32-true" in warning


@native_bf16
def test_auto_precision_on_a_cpu_with_native_bf16_is_bf16_where_bf16_measures_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_CACHE_DIR", str(tmp_path))
    speedup = runtime.bf16_speedup()
    choice = runtime.resolve_precision("auto", "cpu")
    only = "only " if speedup < runtime.BF16_MIN_SPEEDUP else ""
    assert f"bf16 products measured {only}{speedup:.2f}x" in choice.reason
    assert choice.value == ("bf16-mixed" if speedup >= runtime.BF16_MIN_SPEEDUP else "32-true"), choice
    assert choice.warning is None
    assert (runtime.resolve_precision("bf16-mixed", "cpu").warning is None) == (speedup >= 1.0)
    assert "bf16_matmul_speedup" in (tmp_path / "calibration.json").read_text()  # measured once, then cached


def test_precision_values_are_checked():
    assert runtime.resolve_precision("32-true", "cpu").value == "32-true"
    with pytest.raises(ValueError, match="precision='fp8' is not one of auto, 32-true"):
        runtime.resolve_precision("fp8", "cpu")


def test_linear_calibration_is_cached_per_machine_and_the_switch_wins(tmp_path):
    code = "from simmim import runtime\nprint(runtime.fast_paths().reasons['oneDNN float32 linears'])"
    first = _imitated(code, tmp_path)
    assert first.startswith(("on (measured", "off (measured")) and "cached" not in first, first
    cache = json.loads((tmp_path / "calibration.json").read_text())
    (entry,) = cache.values()
    assert entry["onednn_linear_speedup"] > 0 and "AVX2" in entry["machine"] and "imitating" in entry["machine"]
    assert first.split(" (")[0] == ("on" if entry["onednn_linear_speedup"] >= runtime.ONEDNN_MIN_SPEEDUP else "off")
    assert _imitated(code, tmp_path).endswith("cached)")
    assert _imitated(code, tmp_path, SIMMIM_ONEDNN_LINEAR="0") == "off (SIMMIM_ONEDNN_LINEAR=0)"


def test_reference_kernels_turn_every_hand_written_kernel_off():
    from simmim.models import create_model

    model = create_model("swinv2_nano", img_size=32, window_size=4).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = set()

    def record(mode):
        class Record(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                seen.add((mode, getattr(func, "__name__", str(func))))
                return func(*args, **(kwargs or {}))

        return Record()

    with torch.no_grad(), runtime.overridden(onednn_linear=True), record("fast"):
        fast = model(x)
    with torch.no_grad(), runtime.reference_kernels(), record("reference"):
        reference = model(x)
    assert runtime.kernels_enabled()
    names = {mode: {name for m, name in seen if m == mode} for mode in ("fast", "reference")}
    for kernel in ("cosine_window_attention_v2.default", "_linear_pointwise"):  # the CPU op, the oneDNN linears
        assert kernel in names["fast"] and kernel not in names["reference"], kernel
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_thread_plans():
    cores = runtime.machine().cores
    assert runtime.plan_threads(3, workers=1).threads == 3
    assert runtime.plan_threads("auto", workers=0, gflop_per_image=0.01).threads == cores
    small = runtime.plan_threads("auto", workers=1, gflop_per_image=0.03)
    assert small.threads == max(1, cores - 1) and "loader-bound" in small.reason
    assert runtime.plan_threads(None, workers=1, gflop_per_image=5.0).threads == cores
    for bad in (0, "two", 1.5, True):
        with pytest.raises(ValueError, match=r"threads=.*give a number of CPU threads >= 1, or auto"):
            runtime.plan_threads(bad, workers=0)
    before = torch.get_num_threads()
    with runtime.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_describe_names_the_cpu_class():
    text = runtime.describe(threads=2)
    m = runtime.machine()
    assert f"torch CPU capability {m.capability}" in text and "2 threads" in text
    assert ("native bf16 yes" if m.native_bf16 else "native bf16 no") in text


@pytest.mark.parametrize("switch", runtime.SWITCHES)
def test_a_bad_switch_value_is_one_error_line_before_any_work(switch):
    env = {**os.environ, switch: "no"}
    res = subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", "--dry-run"], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {switch}='no': use 1 (on) or 0 (off), or unset it to let simmim decide"
