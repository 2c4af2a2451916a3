"""ESPACE calibrators on SmolLM2-135M + Jane Austen, training-free -> docs/benchmarks/espace.md.

One calibration pass (forward + backward, so nl/nl_l2 are available) over `--calib` windows of Emma +
Mansfield Park; every 4th window is held out for `auto`'s scoring. For each keep and each calibrator the
dense model is copied, compressed with `structlin.compress(..., stats=...)` and scored on the first
`--eval-tokens` tokens of Pride and Prejudice. The whitened low-rank baseline uses the same statistics.

    .venv/bin/python benchmarks/espace_quality.py [--calib 32] [--eval-tokens 8192] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import time
from pathlib import Path

import torch

import structlin as sl
from structlin import data
from structlin.demo import pick_dtype
from structlin.eval import perplexity
from structlin.methods import espace

RUNS = ["lowrank whiten", "output/signed", "auto/abs", "mse/signed", "go/abs", "go/signed", "mse_l2/signed",
        "go_l2/abs", "nl/abs", "nl_l2/abs"]       # most informative first: the doc is rewritten after each run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--out", default="docs/benchmarks/espace.md")
    ap.add_argument("--json", default="docs/benchmarks/espace.json")
    ap.add_argument("--no-nl", action="store_true", help="skip nl/nl_l2 (their backward pass and per-batch "
                    "K×K products dominate the time on CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="CPU compute dtype (auto: bfloat16 where the CPU has fast bf16 units)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    t0 = time.time()
    dtype = pick_dtype(args.dtype)
    dense, tok = data.load_model("smollm2", dtype=dtype)
    calib = data.texts("austen-calib", tok, n=args.calib, seq_len=args.seq_len)
    windows = data.token_windows(data.text("pride-and-prejudice"), tok, args.eval_tokens, args.seq_len)
    results = {"setup": {"calib_windows": args.calib, "seq_len": args.seq_len, "eval_tokens": int(windows.numel()),
                         "holdout": "every 4th calibration window", "dtype": str(dtype)[6:]}, "runs": {}}
    ppl = perplexity(dense, windows, text="pride-and-prejudice")
    results["dense"] = ppl.ppl
    print(f"dense ppl {results['dense']:.3f} ({time.time() - t0:.0f}s)", flush=True)

    base = sl.CompressConfig(method="espace", keep=0.6, options={"calibrator": "auto", "auto_nl": not args.no_nl})
    with torch.enable_grad():
        stats = espace.calibrate(dense, base, calib, progress=False)
    print(f"calibrated ({time.time() - t0:.0f}s)", flush=True)
    results["setup"]["nl"] = not args.no_nl
    labels = [r for r in RUNS if not (args.no_nl and r.startswith("nl"))]

    def save():
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        Path(args.out).write_text(render(results))

    for run in labels:
        for keep in args.keeps:
            label = run if run == "lowrank whiten" else f"espace {run}"
            if run == "lowrank whiten":
                cfg = sl.CompressConfig(method="lowrank", keep=keep, options={"variant": "whiten"})
            else:
                c, o = run.split("/")
                opts = {"calibrator": c, "order": o} | ({"auto_nl": False} if args.no_nl and c == "auto" else {})
                cfg = sl.CompressConfig(method="espace", keep=keep, options=opts)
            model = copy.deepcopy(dense)
            t1 = time.time()
            rep = sl.compress(model, cfg, stats=stats, progress=False)
            p = perplexity(model, windows, text="pride-and-prejudice")
            row = {"keep": keep, "ppl": p.ppl, "kept_params": rep.kept_params, "budget": rep.budget,
                   "seconds": time.time() - t1}
            if "auto" in label:
                row["choices"] = dict(collections.Counter(
                    f"{m.espace_choice['calibrator']}/{m.espace_choice['order']}"
                    for m in model.modules() if hasattr(m, "espace_choice")))
            results["runs"][f"{label} @ {keep}"] = row
            print(f"{label} keep={keep}: ppl {row['ppl']:.3f} params {rep.kept_params}/{rep.budget} "
                  f"({row['seconds']:.0f}s)", flush=True)
            save()
            del model
    results["seconds"] = time.time() - t0
    save()


def render(r: dict) -> str:
    s = r["setup"]
    keeps = sorted({v["keep"] for v in r["runs"].values()}, reverse=True)
    labels = list(dict.fromkeys(k.rsplit(" @ ", 1)[0] for k in r["runs"]))
    lines = [
        "# ESPACE on SmolLM2-135M (training-free)", "",
        "Generated by `benchmarks/espace_quality.py`. Model: SmolLM2-135M-Instruct from the offline GGUF "
        f"(Q4_1 weights, dequantized), run in {s.get('dtype', 'float32')} (statistics and projections in "
        "float64). Targets: every decoder linear (lm_head excluded). "
        f"Calibration: {s['calib_windows']} windows × {s['seq_len']} tokens of *Emma* + *Mansfield Park* "
        f"({s['holdout']} held out to score `auto`'s candidates; all windows used for the final fit). "
        f"Evaluation: perplexity on the first {s['eval_tokens']} tokens of *Pride and Prejudice*, "
        f"windows of {s['seq_len']}. `keep` = fraction of targeted linear params kept; ESPACE charges "
        "P (K·L) to every layer, so q/k/v and gate/up each pay for their own P.", "",
        f"Dense perplexity: **{r['dense']:.3f}**. nl/nl_l2 statistics collected: {s.get('nl')}.", "",
        "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "| --- | " + " | ".join("---:" for _ in keeps) + " |",
    ]
    for lab in labels:
        cells = []
        for k in keeps:
            v = r["runs"].get(f"{lab} @ {k}")
            cells.append("–" if v is None else f"{v['ppl']:.3f}")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Params kept / budget per run, and `auto`'s per-layer choices:", ""]
    for key, v in r["runs"].items():
        extra = f" — choices {v['choices']}" if "choices" in v else ""
        lines.append(f"- {key}: {v['kept_params']:,} / {v['budget']:,}{extra}")
    lines += ["", "Reading: the output-side projection (PCA of W C_x Wᵀ) and whitened low-rank both reach the "
              "minimum of ‖(W − Ŵ)X‖ over rank-L matrices on the calibration inputs, so at equal params they "
              "are the same optimum; their perplexities differ only by rounding of the stored factors and the "
              "one extra parameter layout. `auto` scores every candidate on held-out calibration batches and "
              "picks the output-side projection for every layer, so it beats every input-side calibrator by "
              "a wide margin and ties whitened low-rank. Input-side calibrators (ESPACE's paper setting) "
              "need healing to recover; training-free they lose 2–1000× more perplexity here."]
    if "seconds" in r:
        lines += ["", f"Total run time {r['seconds'] / 60:.1f} min on CPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--render"]:  # re-render the markdown from the saved JSON
        Path("docs/benchmarks/espace.md").write_text(render(json.loads(Path("docs/benchmarks/espace.json").read_text())))
    else:
        main()
