"""ESPACE sensitivity + projection mixer + progressive selection, and the reconstruction analysis, on
SmolLM2-135M + Austen -> docs/benchmarks/espace_mixer.json, espace_sensitivity.json, espace_reconstruction.{json,png}
(docs/benchmarks/espace.md shows them; rebuild it with `python benchmarks/espace_quality.py --render`).

Calibration as in espace_quality.py (32 windows × 512 of Emma + Mansfield Park, statistics in float64). Validation
for the sensitivity table: 2 windows × 256 tokens of *Sense and Sensibility* (neither calibration nor the
evaluation text). Each unit (q/k/v group, o, gate/up group, down: 120 units) is projected alone at
--unit-keep of its params with each calibrator; the mixer takes the best calibrator per unit and adds units
from least to most damaging until keep × targeted params is met; evaluation: perplexity on the first 8192
tokens of *Pride and Prejudice* (as espace.md).

    .venv/bin/python benchmarks/espace_mixer.py [--unit-keep 0.4] [--keeps 0.8 0.6]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import time
from pathlib import Path

import torch

from structlin import data
from structlin import espace_mixer as mx
from structlin.demo import pick_dtype
from structlin.eval import perplexity
from structlin.methods import espace

OUT = Path("docs/benchmarks")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--unit-keep", type=float, default=0.4)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--calibrators", nargs="+", default=list(mx.DEFAULT_CALIBRATORS) + ["joint_rel/signed"])
    ap.add_argument("--heal-steps", type=int, default=30, help="heal the lowest-keep mixer model as espace_quality.py "
                    "does (B only, calibration windows, LM loss); 0 skips")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    dtype = pick_dtype("auto")
    dense, tok = data.load_model("smollm2", dtype=dtype)
    calib = data.texts("austen-calib", tok, n=args.calib, seq_len=args.seq_len)
    val_ids = data.token_windows(data.text("sense-and-sensibility"), tok, 512, 256)
    val = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in val_ids]
    windows = data.token_windows(data.text("pride-and-prejudice"), tok, args.eval_tokens, args.seq_len)
    cfg = espace.EspaceOptions  # noqa: F841  (options documented in the module)
    import structlin as sl

    stats = espace.calibrate(dense, sl.CompressConfig(method="espace", options={"auto_nl": False}), calib,
                             progress=False)
    t_cal = time.time() - t0
    print(f"calibrated ({t_cal:.0f}s)", flush=True)

    # reconstruction analysis: eigenvalues only
    t1 = time.time()
    if not (OUT / "espace_reconstruction.json").is_file():       # same statistics: computed once
        curves = mx.reconstruction_curves(stats)
        (OUT / "espace_reconstruction.json").write_text(json.dumps(curves))
        plot_curves(curves, OUT / "espace_reconstruction.png")
        print(f"reconstruction curves ({time.time() - t1:.1f}s)", flush=True)

    table = mx.sensitivity(dense, stats, val, unit_keep=args.unit_keep, calibrators=args.calibrators,
                           cache=OUT / "espace_sensitivity.json", progress=False)
    print(f"sensitivity table: {len(table['units'])} units × {len(args.calibrators)} calibrators, "
          f"{table['seconds']:.0f}s", flush=True)
    targeted = sum(e["dense"] for e in table["units"].values())
    old = json.loads((OUT / "espace_mixer.json").read_text()) if (OUT / "espace_mixer.json").is_file() else {}
    res = {"setup": {"calib_windows": args.calib, "seq_len": args.seq_len, "eval_tokens": int(windows.numel()),
                     "validation": "2 × 256 tokens of Sense and Sensibility", "unit_keep": args.unit_keep,
                     "calibrators": args.calibrators, "dtype": str(dtype)[6:]},
           "sensitivity_seconds": table["seconds"], "calibration_seconds": t_cal,
           "units": len(table["units"]), "plans": {}}
    best = collections.Counter(min(e["loss"], key=e["loss"].get) for e in table["units"].values())
    res["best_calibrator_counts"] = dict(best)
    for keep in args.keeps:
        plan = mx.mixer_plan(table, keep, targeted)
        model = copy.deepcopy(dense)
        mx.apply_plan(model, stats, table, plan)
        p = perplexity(model, windows, text="pride-and-prejudice")
        res["plans"][str(keep)] = {"ppl": p.ppl, "kept_params": plan["kept"], "budget": plan["budget"],
                                   "units_compressed": len(plan["units"]),
                                   "calibrators": dict(collections.Counter(plan["units"].values()))}
        print(f"mixer keep={keep}: ppl {p.ppl:.3f} ({plan['kept']}/{plan['budget']}, "
              f"{len(plan['units'])} units)", flush=True)
        if keep == min(args.keeps) and args.heal_steps:
            from espace_quality import OnlyB
            from structlin.heal import heal

            model.float()
            with torch.enable_grad():
                hr = heal(model, calib, steps=args.heal_steps, lr=2e-4, hooks=[OnlyB()],
                          autocast_dtype=torch.bfloat16, progress=False)
            model.to(dtype)
            res["plans"][str(keep)]["healed"] = {"ppl": perplexity(model, windows, text="pride-and-prejudice").ppl,
                                                 "steps": args.heal_steps, "seconds": hr.seconds,
                                                 "loss_first": hr.losses[0],
                                                 "loss_last10": sum(hr.losses[-10:]) / len(hr.losses[-10:])}
            print(f"mixer keep={keep} healed: {res['plans'][str(keep)]['healed']}", flush=True)
        del model
    # per-layer relative output errors (calibration Gram) of whitened low-rank vs the shared-P joint fits at
    # equal params: why perplexities at keep 0.6 are close
    res["output_errors"] = {k: v for k, v in old.get("output_errors", {}).items()}
    runs = {"lowrank whiten": ("lowrank", {"variant": "whiten"}),
            "espace joint_rel, shared P": ("espace", {"calibrator": "joint_rel"}),
            "espace output (joint whitened), shared P": ("espace", {"calibrator": "output"}),
            "espace output, per-layer P": ("espace", {"calibrator": "output", "share": False})}
    for keep in args.keeps:
        for label, (method, opts) in runs.items():
            if f"{label} @ {keep}" in res["output_errors"]:
                continue
            model = copy.deepcopy(dense)
            rep = sl.compress(model, sl.CompressConfig(method=method, keep=keep, options=opts), stats=stats,
                              progress=False)
            kinds = collections.defaultdict(list)
            for row in rep.rows:
                kinds[row.name.rsplit(".", 1)[-1]].append(row.output_error ** 2)
            entry = {"kept_params": rep.kept_params, "budget": rep.budget,
                     "mean_rel_err2": {k: sum(v) / len(v) for k, v in kinds.items()},
                     "mean_rel_err2_all": sum(sum(v) for v in kinds.values()) / len(rep.rows)}
            if label == "espace joint_rel, shared P":
                entry["ppl"] = perplexity(model, windows, text="pride-and-prejudice").ppl
            res["output_errors"][f"{label} @ {keep}"] = entry
            print(label, keep, entry, flush=True)
            del model
        (OUT / "espace_mixer.json").write_text(json.dumps(res, indent=2))
    res["seconds"] = time.time() - t0
    (OUT / "espace_mixer.json").write_text(json.dumps(res, indent=2))


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {"q_proj": "C0", "o_proj": "C1", "gate_proj": "C2", "down_proj": "C3"}
    seen = set()
    for first, c in curves.items():
        kind = first.rsplit(".", 1)[-1]
        label = {"q_proj": "q/k/v (shared P)", "gate_proj": "gate/up (shared P)"}.get(kind, kind)
        k = c["ranks"][-1]
        x = [r / k for r in c["ranks"]]
        for ax, key in zip(axes, ("input_mse", "output")):
            ax.plot(x, c[key], color=colors.get(kind, "k"), alpha=0.35, lw=1,
                    label=None if (kind, key) in seen else label)
            seen.add((kind, key))
    for ax, title in zip(axes, ("input reconstruction (mse calibrator): Σ discarded λ(C_x) / Σ λ",
                                "best output error (output / joint whitened): Σ discarded σ² / Σ σ²")):
        ax.set_yscale("log")
        ax.set_ylim(1e-6, 2)
        ax.set_xlabel("L / K")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative squared error")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, every block (one line per layer or shared group), from calibration eigenvalues")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--plot"]:       # redraw the plot from the saved curves
        plot_curves(json.loads((OUT / "espace_reconstruction.json").read_text()), OUT / "espace_reconstruction.png")
    else:
        main()
