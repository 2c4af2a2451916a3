"""SmolLM2-135M + Austen: GBLR vs whitened low-rank at equal FLOPs (keep 0.6 of the targeted FLOPs), each
unhealed and after the same short healing run on the calibration split; held-out perplexity.

    nice -n 5 .venv/bin/python benchmarks/gblr_quality.py --steps 24 --heal-n 24 --calib-n 16 --eval-tokens 4096 \
        > /tmp/gblr_quality.log 2>&1 &

Protocol (as structlin/demo.py): calibration = the first `calib_n` windows of *Emma* + *Mansfield Park*;
healing = the first `heal_n` windows of the same split (micro-batches of one window, next-token loss, no
teacher: a distillation teacher's extra forward did not fit this CPU's time); evaluation = the first
`eval_tokens` tokens of *Pride and Prejudice* and *Sense and Sensibility*, windows of `seq_len`. Every decoder
linear is targeted (`all-linear`, tied lm_head excluded). For GBLR, `keep` is also the FLOP fraction (a
component costs s·(n_in + n_out) params and multiply-adds per token); both methods take the same per-layer
budget from the same rank ladder, so the FLOPs are equal layer by layer.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

EVAL = ("pride-and-prejudice", "sense-and-sensibility")


def heal_model(model, teacher, data, steps, lr, hook_options, autocast):
    try:
        from structlin.heal.loop import heal
    except ImportError:
        heal = None
    if heal is not None:
        res = heal(model, data, steps=steps, teacher=None, lr=lr, hook_options=hook_options,
                   autocast_dtype=autocast, progress=False, seed=0)
        return {"loop": "structlin.heal.heal", "first": res.losses[0], "last": sum(res.losses[-8:]) / 8,
                "seconds": res.seconds}
    from structlin.heal.gblr import train_plain

    t = time.perf_counter()
    losses = train_plain(model, data, steps=steps, lr=lr, hook_options=(hook_options or {}).get("gblr"))
    return {"loop": "structlin.heal.gblr.train_plain (LM loss)", "first": losses[0],
            "last": sum(losses[-8:]) / 8, "seconds": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--structure-lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--init-steps", type=int, default=0)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--heal-n", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args()

    import structlin as sl
    from structlin import calibrate, data, targeting
    from structlin.eval import perplexity
    from structlin.methods import gblr as G

    torch.manual_seed(0)
    t_start = time.perf_counter()
    dense, tok = data.load_model("smollm2", dtype=torch.float32)
    windows = {n: data.token_windows(data.text(n), tok, args.eval_tokens, args.seq_len) for n in EVAL}
    calib = data.texts("austen-calib", tok, n=args.calib_n, seq_len=args.seq_len)
    heal_data = data.texts("austen-calib", tok, n=args.heal_n, seq_len=args.seq_len)
    autocast = torch.bfloat16

    def evaluate(model):
        with torch.autocast("cpu", dtype=autocast):
            return {n: perplexity(model, windows[n], text=n).ppl for n in EVAL}

    rows = []

    def add(label, model, extra):
        t = time.perf_counter()
        ppl = evaluate(model)
        rows.append({"variant": label, **ppl, "eval_s": time.perf_counter() - t, **extra})
        print(json.dumps(rows[-1]), flush=True)

    add("dense", dense, {"linear_flops": sum(2 * m.in_features * m.out_features
                                             for m in targeting.select(dense).values())})
    t = time.perf_counter()
    stats = calibrate.collect(dense, targeting.select(dense), calib, {"gram"})
    calib_s = time.perf_counter() - t

    # whitened low-rank
    lr_model = copy.deepcopy(dense)
    t = time.perf_counter()
    rep = sl.compress(lr_model, sl.CompressConfig(method="lowrank", keep=args.keep, options={"variant": "whiten"}),
                      stats=stats, progress=False)
    add("lowrank whiten", lr_model, {"flops_kept": rep.achieved_keep, "compress_s": time.perf_counter() - t + calib_s})
    h = heal_model(lr_model, dense, heal_data, args.steps, args.lr, None, autocast)
    add(f"lowrank whiten, healed {args.steps} steps", lr_model, {"flops_kept": rep.achieved_keep, **h})
    del lr_model

    # GBLR
    g_model = copy.deepcopy(dense)
    t = time.perf_counter()
    rep = sl.compress(g_model, sl.CompressConfig(method="gblr", keep=args.keep,
                                                 options={"rank": args.rank, "init_steps": args.init_steps}),
                      stats=stats, progress=False)
    layers = G.gblr_layers(g_model)
    cost = lambda: sum(m.cost() for m in G.gblr_layers(g_model, None).values())
    add("gblr (start as whitened low-rank)", g_model,
        {"flops_kept": rep.achieved_keep, "compress_s": time.perf_counter() - t + calib_s, "cost": cost()})
    snap_at = int(0.7 * args.steps)
    hook = {"gblr": {"structure_lr": args.structure_lr, "budget": "network", "floor": 0.25,
                     "snap_tile": args.tile, "snap_at": snap_at}}
    before = {n: m.widths.detach().clone() for n, m in layers.items()}
    h = heal_model(g_model, dense, heal_data, args.steps, args.lr, hook, autocast)
    moved = sum(float((m.widths.detach() - before[n]).abs().sum()) for n, m in layers.items())
    per_layer = {n: m.cost() for n, m in layers.items()}
    add(f"gblr, healed {args.steps} steps (network budget, snap-aware to tile {args.tile} from step {snap_at})",
        g_model, {"flops_kept": rep.achieved_keep, "cost": cost(), "width_moved": moved, **h})
    summary = G.export(g_model, tile=args.tile, budget="network")
    add(f"gblr exported (tiles of {args.tile}, budget charged after snapping)", g_model,
        {"cost": cost(), "snapped": sum(v["snapped"] for v in summary.values()),
         "budget": sum(v["budget"] for v in summary.values())})
    total = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"args": vars(args), "rows": rows, "seconds": total, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "layer_costs_after_healing": per_layer,
            "budgets": {n: m.spec.budget for n, m in layers.items()}}
    (out / "gblr.json").write_text(json.dumps(info, indent=1))
    print(f"done in {total / 60:.1f} min", flush=True)


def report(src: Path, dst: Path) -> None:
    """docs/benchmarks/gblr.md from gblr.json (written at the end of a run)."""
    info = json.loads((src / "gblr.json").read_text())
    a, rows = info["args"], info["rows"]
    base = rows[0]
    lines = ["# GBLR vs whitened low-rank on SmolLM2-135M (keep 0.6 of the targeted FLOPs)", "",
             f"Produced by `benchmarks/gblr_quality.py` ({info['machine']}, {info['threads']} threads, torch "
             f"{info['torch']}; whole run {info['seconds'] / 60:.0f} min on a CPU shared with other jobs). SmolLM2-135M-"
             "Instruct (weights dequantized from the Q4_1 GGUF), fp32 weights, bf16 autocast compute. Every decoder "
             "linear targeted. For GBLR `keep` is the fraction of the targeted FLOPs *and* params (a component costs "
             "s·(n_in + n_out) of each per token); both methods get the same per-layer budget from the same rank "
             "ladder, so FLOPs are equal layer by layer.", "",
             f"- Calibration: first {a['calib_n']} windows of {a['seq_len']} tokens of *Emma* + *Mansfield Park*; "
             f"healing: first {a['heal_n']} windows of the same split, {a['steps']} optimizer steps of one window, "
             f"lr {a['lr']} (cosine), next-token loss, no teacher; GBLR structure lr {a['structure_lr']} (AdamW "
             "betas (0, 0.999)), network-wide budget with per-layer floors 0.25, snap-aware (tile "
             f"{a['tile']}) for the last 30% of the steps; GBLR rank per component s = {a['rank']}, init = start as "
             f"whitened low-rank, {a['init_steps']} Adam init steps.",
             f"- Evaluation: first {a['eval_tokens']:,} tokens of *Pride and Prejudice* / *Sense and Sensibility*, "
             f"windows of {a['seq_len']}, exp(token-weighted mean NLL).", "",
             "| variant | P&P ppl | S&S ppl | × dense (P&P) | notes |", "|---|---|---|---|---|"]
    for r in rows:
        note = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                         if k not in ("variant", *EVAL))
        lines.append(f"| {r['variant']} | {r[EVAL[0]]:.2f} | {r[EVAL[1]]:.2f} | {r[EVAL[0]] / base[EVAL[0]]:.2f} | "
                     f"{note} |")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "gblr.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(Path(sys.argv[2]), Path(sys.argv[2]))
    else:
        main()
