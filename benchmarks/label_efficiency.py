"""Label efficiency of SimMIM pretraining on Imagenette: fine-tune with 10% and 100% of the labels, from SimMIM
weights (pretrained on the Imagenette training images without labels) and from random weights; top-1 on val.

    python benchmarks/label_efficiency.py --preset smoke     # a few minutes: proves the pipeline
    python benchmarks/label_efficiency.py --preset 90min     # the issue's CPU run (2 cores), see PRESETS
    python benchmarks/label_efficiency.py --preset 90min --pretrain-epochs 4 --finetune-epochs 6 --out /tmp/le

Runs ``python -m simmim.pretrain`` once and ``python -m simmim.finetune`` four times (fractions x init) as
subprocesses, each in its own run folder under ``--out``; writes ``results.json`` there, and the plot
``label_efficiency_<preset>.png`` into benchmarks/. Fine-tuning uses the same recipe (``imagenette_cpu``) and the
same number of epochs for both inits; arms with a label fraction below 1 train ``low_label_epochs`` (more epochs, as
their epochs are shorter). ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# shared/ lies beside the checkout (as in CI); --data points elsewhere.
DATA = HERE.parent.parent / "shared" / "data" / "imagenette2-224"

# Sizes per budget. "limit" keys cap training batches per epoch (None: full epochs); validation and the final
# test always use the whole Imagenette val set (it is ordered by class, so a partial one would be one class).
PRESETS: dict[str, dict] = {
    "smoke": dict(  # ~7 min: pipeline check only, the numbers are noise
        model="swinv2_nano", img_size=32, window_size=4, mask_patch_size=8, norm_target_patch_size=7,
        batch_size=32, pretrain_epochs=1, pretrain_lr=2e-3, finetune_epochs=1, low_label_epochs=1,
        pretrain_limit=40, finetune_limit=20,
    ),
    "90min": dict(  # 72 min measured on the 2-core CPU (pretraining 65 s an epoch, bf16): RESULTS.md
        model="swinv2_micro", img_size=64, window_size=4, mask_patch_size=16, norm_target_patch_size=15,
        batch_size=64, pretrain_epochs=40, pretrain_lr=2e-3, finetune_epochs=10, low_label_epochs=30,
        pretrain_limit=None, finetune_limit=None,
    ),
    "gpu": dict(  # one GPU: the 96 px geometry of the pretraining imagenette_cpu recipe, longer schedules
        model="swinv2_micro", img_size=96, window_size=6, mask_patch_size=16, norm_target_patch_size=23,
        batch_size=128, pretrain_epochs=200, pretrain_lr=2e-3, finetune_epochs=50, low_label_epochs=150,
        pretrain_limit=None, finetune_limit=None,
    ),
}  # fmt: skip


def sh(cmd: list[str], dry: bool) -> float:
    print("$ " + " ".join(cmd), flush=True)
    if dry:
        return 0.0
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return time.perf_counter() - start


def pretrain_cmd(p: dict, run_dir: Path, workers: int) -> list[str]:
    cmd = [
        sys.executable, "-m", "simmim.pretrain", "recipe=imagenette_cpu", f"run_dir={run_dir}",
        f"model.name={p['model']}", f"model.img_size={p['img_size']}", f"model.window_size={p['window_size']}",
        f"model.norm_target_patch_size={p['norm_target_patch_size']}",
        f"data.root={p['data']}", "data.source=folder", "data.val_root=null",  # the training images, labels unused
        f"data.mask_patch_size={p['mask_patch_size']}", f"data.batch_size={p['batch_size']}",
        f"data.num_workers={workers}", f"schedule.epochs={p['pretrain_epochs']}", f"optim.lr={p['pretrain_lr']}",
        # no warmup for runs of a few epochs, else one epoch
        f"schedule.warmup_epochs={int(p['pretrain_epochs'] >= 5)}", "checkpoint.every_n_steps=0",
        "reconstructions=8",
    ]  # fmt: skip
    if p["pretrain_limit"]:
        cmd.append(f"trainer.limit_train_batches={p['pretrain_limit']}")
    return cmd


def finetune_cmd(p: dict, run_dir: Path, fraction: float, pretrained: Path | None, workers: int) -> list[str]:
    epochs = p["finetune_epochs"] if fraction >= 1 else p["low_label_epochs"]
    cmd = [
        sys.executable, "-m", "simmim.finetune", "recipe=imagenette_cpu", f"run_dir={run_dir}",
        f"model.name={p['model']}", f"model.img_size={p['img_size']}", f"model.window_size={p['window_size']}",
        f"data.root={p['data']}", f"data.label_fraction={fraction}", f"data.batch_size={p['batch_size']}",
        f"data.num_workers={workers}", f"schedule.epochs={epochs}",
        f"schedule.warmup_epochs={min(1.0, epochs / 5)}", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if pretrained is not None:
        cmd.append(f"pretrained={pretrained}")
    if p["finetune_limit"]:
        cmd.append(f"trainer.limit_train_batches={p['finetune_limit']}")
    return cmd


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for init, style in (("simmim", "o-"), ("random", "s--")):
        rows = sorted((r for r in results if r["init"] == init), key=lambda r: r["fraction"])
        xs = [100 * r["fraction"] for r in rows]
        ys = [r["top1"] for r in rows]
        ax.plot(xs, ys, style, label="SimMIM pretrained" if init == "simmim" else "random init")
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel="labelled training images (%)", ylabel="Imagenette val top-1 (%)", title=title)
    ax.set_xticks([10, 100], ["10", "100"])
    ax.margins(x=0.12)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--out", type=Path, default=Path("runs/label_efficiency"))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--data", type=Path, default=DATA, help="Imagenette root with train/ and val/")
    for key in PRESETS["smoke"]:
        kind = {"model": str, "pretrain_lr": float}.get(key, int)
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind)
    args = ap.parse_args()
    p = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k in PRESETS["smoke"] and v is not None}}
    p["data"] = str(args.data)
    out = args.out / args.preset
    print(f"preset {args.preset}: {json.dumps(p)}")

    encoder = out / "pretrain" / "encoder.safetensors"
    if encoder.is_file() and not args.dry_run:  # a finished pretraining (e.g. of an interrupted benchmark) is reused
        print(f"reusing {encoder}")
        seconds = {}
    else:
        seconds = {"pretrain": sh(pretrain_cmd(p, out / "pretrain", args.workers), args.dry_run)}
    results = []
    for fraction in args.fractions:
        for init, weights in (("simmim", encoder), ("random", None)):
            run_dir = out / f"ft_{init}_{int(round(fraction * 100))}pct"
            secs = sh(finetune_cmd(p, run_dir, fraction, weights, args.workers), args.dry_run)
            if args.dry_run:
                continue
            m = json.loads((run_dir / "metrics.json").read_text())
            results.append({"init": init, "fraction": fraction, "top1": m["test"]["top1"], "seconds": secs})
            seconds[f"{init}_{fraction}"] = secs
    if args.dry_run:
        return
    summary = {"preset": args.preset, "params": p, "results": results, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    png = HERE / f"label_efficiency_{args.preset}.png"
    plot(results, png, f"Imagenette, {p['model']} {p['img_size']} px ({args.preset})")
    print("\n| labels | SimMIM top-1 | random top-1 |\n|---|---|---|")
    for fraction in args.fractions:
        row = {r["init"]: r["top1"] for r in results if r["fraction"] == fraction}
        print(f"| {fraction:.0%} | {row['simmim']:.1f} | {row['random']:.1f} |")
    print(f"\ntimes (s): {json.dumps({k: round(v) for k, v in seconds.items()})}\nplot: {png}\nresults: {out}")


if __name__ == "__main__":
    main()
