"""How much of a training step the window attention costs, ours against timm's, and what the rest allows.

    python benchmarks/attention_share.py                  # SwinV2-T, 192 px, window 12, batch 8, bf16
    python benchmarks/attention_share.py --dtype fp32 --rounds 10
    python benchmarks/attention_share.py --threads 1 --clock cpu   # on a shared machine

Times five steps, interleaved: each model as is, and each with its window attention's core (normalisation, logits,
position bias, mask, softmax, attention times values, in forward and backward) replaced by the same stand-in, the
value slice of the qkv projection. Everything else (qkv and output projections, MLPs, norms, patch merging, head,
loss, AdamW) is left as is; ours still computes its Log-CPB position bias and masks (``set_attention_kernel``
replaces the core only: a few ms a step for SwinV2-T), timm's stand-in replaces its whole attention forward. The
difference is what the attention costs; the stand-in steps show how the rest compares, and so the ours / timm ratio
that a free attention would give. The fifth step bounds what any implementation that forms the logits can reach:
our model with an attention made of its matrix products alone (head-major q, k, v; q k^T; times v; and their four
backward products), every elementwise pass (normalisation, temperature, bias, mask, softmax and their backward) free.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import build_pair, interleaved, make_train_step, step_arguments  # noqa: E402
from simmim import runtime  # noqa: E402


def _value_slice(qkv: torch.Tensor, *_) -> torch.Tensor:
    """The stand-in attention core: each token's value (the last third of its qkv projection)."""
    return qkv[..., 2 * qkv.shape[-1] // 3 :]


def _matmuls_only(qkv: torch.Tensor, scale: torch.Tensor, *_) -> torch.Tensor:
    """An attention core with only the matrix products of the real one: (q k^T) v per window and head."""
    bw, n, _ = qkv.shape
    q, k, v = qkv.view(bw, n, 3, scale.shape[0], -1).permute(2, 0, 3, 1, 4)
    out = torch.matmul(torch.matmul(q, k.transpose(-2, -1)), v)
    return out.transpose(1, 2).reshape(bw, n, -1)


def _timm_stand_in(self, x: torch.Tensor, mask: object = None) -> torch.Tensor:
    """timm's WindowAttention.forward without the attention (timm has no hook for it: swapped in per call)."""
    bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
    qkv = F.linear(x, self.qkv.weight, bias)
    return self.proj_drop(self.proj(_value_slice(qkv)))


class _Swapped(torch.nn.Module):
    """Runs ``model`` with ``target.name`` replaced by ``stand_in`` (restored after each call)."""

    def __init__(self, model: torch.nn.Module, target: object, name: str, stand_in) -> None:
        super().__init__()
        self.model, self.target, self.name, self.stand_in = model, target, name, stand_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original = getattr(self.target, self.name)
        setattr(self.target, self.name, self.stand_in)
        try:
            return self.model(x)
        finally:
            setattr(self.target, self.name, original)


def main(argv: list[str] | None = None) -> None:
    from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttention

    ap = step_arguments(__doc__, rounds=8)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use 1 thread)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch,))
    bf16 = args.dtype == "bf16"
    ours, timm = build_pair(args.model, args.img_size, args.window)
    ours_bare, timm_bare = build_pair(args.model, args.img_size, args.window)
    ours_matmuls = build_pair(args.model, args.img_size, args.window)[0]
    ours_bare.set_attention_kernel(_value_slice)
    ours_matmuls.set_attention_kernel(_matmuls_only)
    steps = {
        "ours": make_train_step(ours, x, y, bf16),
        "ours, attention swapped out": make_train_step(ours_bare, x, y, bf16),
        "ours, matrix products only": make_train_step(ours_matmuls, x, y, bf16),
        "timm": make_train_step(timm, x, y, bf16),
        "timm, attention swapped out": make_train_step(
            _Swapped(timm_bare, TimmWindowAttention, "forward", _timm_stand_in), x, y, bf16
        ),
    }
    ms = {k: v * 1e3 for k, v in interleaved(steps, rounds=args.rounds, steps=1, clock=args.clock).items()}
    print(f"# {runtime.describe()}, torch {torch.__version__}")
    print(
        f"# {args.model} {args.img_size}px window {args.window} batch {args.batch}, {args.dtype}, "
        f"median of {args.rounds} interleaved rounds, {args.clock} clock"
    )
    print("| step | ms | attention ms | attention share |")
    print("|---|---|---|---|")
    for name in ("ours", "timm"):
        attention = ms[name] - ms[f"{name}, attention swapped out"]
        print(f"| {name} | {ms[name]:.0f} | {attention:.0f} | {attention / ms[name]:.0%} |")
        print(f"| {name}, attention swapped out | {ms[f'{name}, attention swapped out']:.0f} | | |")
    print(f"| ours, matrix products only | {ms['ours, matrix products only']:.0f} | | |")
    rest = ms["timm, attention swapped out"] / ms["ours, attention swapped out"]
    ceiling = ms["timm"] / ms["ours, attention swapped out"]
    print(
        f"# ours / timm: whole step {ms['timm'] / ms['ours']:.2f}x; the rest alone {rest:.2f}x; "
        f"with a free attention at most {ceiling:.2f}x; with an attention of matrix products only "
        f"{ms['timm'] / ms['ours, matrix products only']:.2f}x; attention alone (timm's ms / ours) "
        f"{(ms['timm'] - ms['timm, attention swapped out']) / (ms['ours'] - ms['ours, attention swapped out']):.2f}x"
    )


if __name__ == "__main__":
    main()
