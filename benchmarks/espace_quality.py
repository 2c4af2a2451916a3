"""ESPACE calibrators on SmolLM2-135M + Jane Austen, training-free -> docs/benchmarks/espace.md.

One calibration pass (forward + backward, so nl/nl_l2 are available) over `--calib` windows of Emma +
Mansfield Park; every 4th window is held out for `auto`'s scoring. For each keep and each calibrator the
dense model is copied, compressed with `structlin.compress(..., stats=...)` and scored on the first
`--eval-tokens` tokens of Pride and Prejudice. The whitened low-rank baseline uses the same statistics.

    .venv/bin/python benchmarks/espace_quality.py [--calib 32] [--eval-tokens 8192] [--seq-len 512]

Rows are cached in docs/benchmarks/espace.json: a rerun computes only the rows missing from it (same protocol),
and `--render` rebuilds the markdown from the JSON alone. The healed row: `auto` with shared P at the lowest
keep, then `structlin.heal` for --heal-steps steps × 1 calibration window (LM loss, bf16 autocast over fp32
master weights, only the ESPACE layers' B and biases trainable, P frozen).
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

# (label, calibrator/order, share): most informative first; the doc is rewritten after each run and rows already
# in the JSON are not recomputed (rows "per-layer P" come from the run before shared P existed: share=False)
RUNS = [("lowrank whiten", None, None),
        ("espace output (joint whitened), shared P", "output/signed", True),
        ("espace auto, shared P", "auto/abs", True),
        ("espace mse/signed, shared P", "mse/signed", True),
        ("espace go/abs, shared P", "go/abs", True),
        ("espace mse_l2/signed, shared P", "mse_l2/signed", True),
        ("espace go_l2/abs, shared P", "go_l2/abs", True),
        ("espace output/signed, per-layer P", "output/signed", False),
        ("espace auto/abs, per-layer P", "auto/abs", False),
        ("espace mse/signed, per-layer P", "mse/signed", False),
        ("espace go/abs, per-layer P", "go/abs", False),
        ("espace go/signed, per-layer P", "go/signed", False),
        ("espace mse_l2/signed, per-layer P", "mse_l2/signed", False),
        ("espace go_l2/abs, per-layer P", "go_l2/abs", False)]
HEALED = "espace auto, shared P + heal (B only)"
NL_RUNS = [("espace nl/abs, shared P", "nl/abs"), ("espace nl_l2/abs, shared P", "nl_l2/abs"),
           ("espace auto incl. nl, shared P", "auto/abs")]


class OnlyB:
    """Training hook: freeze everything but the ESPACE layers' B (and biases): norms stay as they are."""

    def param_groups(self, model):
        return []

    def frozen(self, model):
        keep = {f"{n}.{pn}" for n, m in model.named_modules() if isinstance(m, espace.EspaceLinear)
                for pn, _ in m.named_parameters()}
        return {n for n, _ in model.named_parameters() if n not in keep}

    def after_backward(self, model, step):
        pass

    def after_optimizer_step(self, model, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--out", default="docs/benchmarks/espace.md")
    ap.add_argument("--json", default="docs/benchmarks/espace.json")
    ap.add_argument("--heal-steps", type=int, default=30)
    ap.add_argument("--heal-lr", type=float, default=2e-4)
    ap.add_argument("--nl-calib", type=int, default=8, help="windows for the nl/nl_l2 statistics (forward + "
                    "backward in float32 on CPU; 0 skips the nl rows)")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all not yet in the JSON)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="CPU compute dtype (auto: bfloat16 where the CPU has fast bf16 units)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    t0 = time.time()
    dtype = pick_dtype(args.dtype)
    setup = {"calib_windows": args.calib, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
             "holdout": "every 4th calibration window", "dtype": str(dtype)[6:], "nl": False}
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    old = results.get("setup", {})
    if any(old.get(k) != setup[k] for k in ("calib_windows", "seq_len", "eval_tokens")):
        results = {"runs": {}}          # a different protocol: nothing cached is comparable
    results["setup"] = {**old, **setup}
    todo = [(lab, run, share, keep) for lab, run, share in RUNS for keep in args.keeps
            if (not args.only or lab in args.only) and f"{lab} @ {keep}" not in results["runs"]]
    heal_keep = min(args.keeps)
    do_heal = (not args.only or HEALED in args.only) and f"{HEALED} @ {heal_keep}" not in results["runs"]
    nl_todo = [(lab, run, keep) for lab, run in NL_RUNS for keep in args.keeps
               if args.nl_calib and (not args.only or lab in args.only) and f"{lab} @ {keep}" not in results["runs"]]
    if not todo and not do_heal and not nl_todo:
        Path(args.out).write_text(render(results))
        return

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        Path(args.out).write_text(render(results))

    dense, tok = data.load_model("smollm2", dtype=dtype)
    calib = data.texts("austen-calib", tok, n=args.calib, seq_len=args.seq_len)
    windows = data.token_windows(data.text("pride-and-prejudice"), tok, args.eval_tokens, args.seq_len)
    if "dense" not in results:
        results["dense"] = perplexity(dense, windows, text="pride-and-prejudice").ppl
    print(f"dense ppl {results['dense']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    base = sl.CompressConfig(method="espace", keep=0.6, options={"calibrator": "auto", "auto_nl": False})
    stats = espace.calibrate(dense, base, calib, progress=False)
    print(f"calibrated ({time.time() - t0:.0f}s)", flush=True)

    def build(run, share, keep):
        if run is None:
            return sl.CompressConfig(method="lowrank", keep=keep, options={"variant": "whiten"})
        c, o = run.split("/")
        return sl.CompressConfig(method="espace", keep=keep, options={"calibrator": c, "order": o, "share": share,
                                                                      "auto_nl": False})

    def record(label, keep, model, rep, seconds, **extra):
        p = perplexity(model, windows, text="pride-and-prejudice")
        row = {"keep": keep, "ppl": p.ppl, "kept_params": rep.kept_params, "budget": rep.budget,
               "stored_params": rep.model_params_after, "seconds": seconds + 0.0, **extra}
        choices = collections.Counter(f"{m.espace_choice['calibrator']}/{m.espace_choice['order']}"
                                      for m in model.modules() if hasattr(m, "espace_choice"))
        if choices and "auto" in label:
            row["choices"] = dict(choices)
        results["runs"][f"{label} @ {keep}"] = row
        print(f"{label} keep={keep}: ppl {row['ppl']:.3f} params {rep.kept_params}/{rep.budget} "
              f"({row['seconds']:.0f}s)", flush=True)
        save()

    for label, run, share, keep in todo:
        model = copy.deepcopy(dense)
        t1 = time.time()
        rep = sl.compress(model, build(run, share, keep), stats=stats, progress=False)
        record(label, keep, model, rep, time.time() - t1, share=share)
        del model
    if do_heal:
        from structlin.heal import heal

        model = copy.deepcopy(dense)
        t1 = time.time()
        rep = sl.compress(model, build("auto/abs", True, heal_keep), stats=stats, progress=False)
        model.float()
        with torch.enable_grad():
            res = heal(model, calib, steps=args.heal_steps, lr=args.heal_lr, hooks=[OnlyB()],
                       autocast_dtype=torch.bfloat16, progress=False)
        model.to(dtype)
        print(res, flush=True)
        record(HEALED, heal_keep, model, rep, time.time() - t1, share=True,
               heal={"steps": args.heal_steps, "tokens_per_step": args.seq_len, "lr": args.heal_lr,
                     "trainable": res.trainable, "loss_first": res.losses[0],
                     "loss_last10": sum(res.losses[-10:]) / len(res.losses[-10:]), "seconds": res.seconds})
    if nl_todo:
        t1 = time.time()
        dense32 = copy.deepcopy(dense).float()       # CPU bf16 backward is slow; same weight values
        cfg_nl = sl.CompressConfig(method="espace", options={"calibrator": "nl"})
        with torch.enable_grad():
            stats_nl = espace.calibrate(dense32, cfg_nl, calib[:args.nl_calib], progress=False)
        results["setup"]["nl"] = True
        results["setup"]["nl_calib_windows"] = args.nl_calib
        results["setup"]["nl_calibration_seconds"] = time.time() - t1
        print(f"nl statistics ({time.time() - t1:.0f}s)", flush=True)
        for label, run, keep in nl_todo:
            model = copy.deepcopy(dense)
            t1 = time.time()
            c, o = run.split("/")
            cfg = sl.CompressConfig(method="espace", keep=keep, options={"calibrator": c, "order": o})
            rep = sl.compress(model, cfg, stats=stats_nl, progress=False)
            record(label, keep, model, rep, time.time() - t1, share=True, calib_windows=args.nl_calib)
            del model
    results["seconds_last_run"] = time.time() - t0
    save()


def _cell(r, label, keep):
    v = r["runs"].get(f"{label} @ {keep}")
    return "–" if v is None else f"{v['ppl']:.2f}"


def render(r: dict) -> str:
    s = r["setup"]
    keeps = sorted({v["keep"] for v in r["runs"].values()}, reverse=True)
    labels = list(dict.fromkeys(k.rsplit(" @ ", 1)[0] for k in r["runs"]))
    order = [lab for lab, _, _ in RUNS] + [lab for lab, _ in NL_RUNS] + [HEALED]
    labels = sorted(labels, key=lambda lab: order.index(lab) if lab in order else len(order))
    lines = [
        "# ESPACE on SmolLM2-135M", "",
        "Generated by `benchmarks/espace_quality.py` (rows cached in `espace.json`; `--render` rebuilds this file) and "
        "`benchmarks/espace_mixer.py` (mixer, sensitivity and reconstruction sections). Model: SmolLM2-135M-Instruct "
        f"from the offline GGUF (Q4_1 weights, dequantized), run in {s.get('dtype', 'float32')} on the CPU "
        "(statistics and projections in float64). Targets: every decoder linear (lm_head excluded). "
        f"Calibration: {s['calib_windows']} windows × {s['seq_len']} tokens of *Emma* + *Mansfield Park* "
        f"({s['holdout']} held out to score `auto`'s candidates; all windows used for the final fit). "
        f"Evaluation: perplexity on the first {s['eval_tokens']} tokens of *Pride and Prejudice*, "
        f"windows of {s['seq_len']}. `keep` = fraction of the targeted linear params kept; every row is at the "
        "same budget (keep × targeted params, exact after rounding; the params each run kept are listed below).", "",
        "*shared P*: q/k/v and gate/up each share one P (K × L), charged once: the group costs L·(K + Σ N_j), so at "
        "the same budget it gets a larger L than separate layers. *per-layer P*: every layer its own P (rows "
        "measured before shared P existed, same protocol). *output (joint whitened)*: for a single layer the "
        "output-side PCA (= whitened low-rank); for a shared group P spans C^-½·top-L eigenvectors of "
        "C^½(Σ_j W_jᵀW_j)C^½ and each B_j is the least-squares fit — the exact minimiser of Σ_j ‖(W_j − Ŵ_j)X‖² for "
        "one shared P. *auto*: per layer/group, every candidate (the six calibrators × order, output, joint, "
        "joint_rel) fitted on the fit windows and scored on the exact output error on the held-out windows.", "",
        f"Dense perplexity: **{r['dense']:.2f}**.", "",
        "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "| --- | " + " | ".join("---:" for _ in keeps) + " |",
    ]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(_cell(r, lab, k) for k in keeps) + " |")
    mix = _load("espace_mixer.json")
    if mix and mix.get("output_errors"):
        jr = {k.rsplit(" @ ", 1)[1]: v["ppl"] for k, v in mix["output_errors"].items()
              if k.startswith("espace joint_rel") and "ppl" in v}
        if jr:
            lines.append("| espace joint_rel, shared P (from espace_mixer.py) | " + " | ".join(
                f"{jr[str(k)]:.2f}" if str(k) in jr else "–" for k in keeps) + " |")
    if mix:
        lines.append("| espace mixer (sensitivity + progressive selection, shared P) | " + " | ".join(
            (f"{mix['plans'][str(k)]['ppl']:.2f}" if str(k) in mix["plans"] else "–") for k in keeps) + " |")
        hk = str(min(keeps))
        if "healed" in mix["plans"].get(hk, {}):
            lines.append("| espace mixer + heal (B only) | " + " | ".join(
                f"{mix['plans'][hk]['healed']['ppl']:.2f}" if str(k) == hk else "–" for k in keeps) + " |")
    lines += ["", "Params kept / budget per run, and `auto`'s per-layer choices:", ""]
    for key, v in r["runs"].items():
        extra = f" — choices {v['choices']}" if "choices" in v else ""
        if "heal" in v:
            h = v["heal"]
            extra += (f" — healed {h['steps']} steps × {h['tokens_per_step']} tokens of the calibration windows, "
                      f"lr {h['lr']:g}, {h['trainable']:,} trainable values (B and biases only; P frozen, norms "
                      f"frozen), LM loss {h['loss_first']:.3f} → {h['loss_last10']:.3f} (mean of last 10), "
                      f"{h['seconds'] / 60:.1f} min")
        if "calib_windows" in v:
            extra += f" — nl statistics from {v['calib_windows']} calibration windows (forward + backward)"
        lines.append(f"- {key}: {v['kept_params']:,} / {v['budget']:,}{extra}")
    if mix:
        lines += _mixer_section(mix)
    rec = _load("espace_reconstruction.json")
    if rec:
        lines += _reconstruction_section(rec)
    reading = r.get("reading")
    if reading:
        lines += ["", "## Reading", ""] + reading
    if "seconds_last_run" in r:
        lines += ["", f"Last `espace_quality.py` run: {r['seconds_last_run'] / 60:.1f} min on one CPU thread."]
    return "\n".join(lines) + "\n"


def _load(name):
    p = Path("docs/benchmarks") / name
    return json.loads(p.read_text()) if p.is_file() else None


def _mixer_section(m):
    s = m["setup"]
    out = ["", "## Sensitivity table and projection mixer", "",
           f"`structlin.espace_mixer.sensitivity`: each of the {m['units']} units (q/k/v group, o, gate/up group, down "
           f"in 30 blocks) projected alone at {s['unit_keep']} of its params with each calibrator "
           f"({', '.join(s['calibrators'])}); validation loss on {s['validation']} with only the blocks from the "
           f"unit's on re-run. Cost: {m['sensitivity_seconds'] / 60:.1f} min on one CPU thread "
           f"({m['units'] * len(s['calibrators'])} partial forwards + one eigendecomposition per unit and "
           f"calibrator), cached in `espace_sensitivity.json`. Best calibrator per unit: "
           f"{m['best_calibrator_counts']}. The mixer compresses units from least to most damaging (each at "
           f"{s['unit_keep']} of its params, best calibrator) until the budget is met:", ""]
    for k, p in sorted(m["plans"].items(), reverse=True):
        out.append(f"- keep {k}: perplexity {p['ppl']:.2f}, {p['units_compressed']} of {m['units']} units "
                   f"compressed, {p['kept_params']:,} / {p['budget']:,} params, calibrators {p['calibrators']}")
    oe = m.get("output_errors")
    if oe:
        kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        out += ["", "## Output error at equal params", "",
                "Mean over the 30 blocks of each layer's relative squared output error ‖(W − Ŵ)X‖²/‖WX‖² on the "
                "calibration inputs (`Report.rows[i].output_error`²), same budgets as above:", "",
                "| run | " + " | ".join(k.replace("_proj", "") for k in kinds) + " | all | ppl |",
                "| --- | " + " | ".join("---:" for _ in kinds) + " | ---: | ---: |"]
        for key, e in oe.items():
            ppl = f"{e['ppl']:.2f}" if "ppl" in e else ""
            out.append(f"| {key} | " + " | ".join(f"{e['mean_rel_err2'].get(k, float('nan')):.4f}" for k in kinds)
                       + f" | {e['mean_rel_err2_all']:.4f} | {ppl} |")
    return out


def _reconstruction_section(rec):
    import statistics

    kinds = {}
    for first, c in rec.items():
        kinds.setdefault(first.rsplit(".", 1)[-1], []).append(c)
    out = ["", "## Reconstruction analysis (from the eigenvalues, no data pass)", "",
           "`structlin.espace_mixer.reconstruction_curves`: per layer (or shared group) the relative squared error "
           "at L, median over the 30 blocks: input MSE Σ_{i>L} λ_i(C_x)/Σ λ_i (what `mse` minimises) / best "
           "output error Σ_{i>L} σ_i²/Σ σ_i² of W C^½ (stacked W for a group; what `output`/joint reaches). "
           "Plot: `espace_reconstruction.png` (every block).", ""]
    fr = [0.125, 0.25, 0.5, 0.75]
    out.append("| unit (K) | " + " | ".join(f"L = {f:g}·K" for f in fr) + " |")
    out.append("| --- | " + " | ".join("---:" for _ in fr) + " |")
    names = {"q_proj": "q/k/v, shared P", "gate_proj": "gate/up, shared P"}
    for kind, cs in kinds.items():
        k = cs[0]["ranks"][-1]
        cells = []
        for f in fr:
            i = min(range(len(cs[0]["ranks"])), key=lambda j: abs(cs[0]["ranks"][j] - f * k))
            cells.append(f"{statistics.median(c['input_mse'][i] for c in cs):.3f} / "
                         f"{statistics.median(c['output'][i] for c in cs):.3f}")
        out.append(f"| {names.get(kind, kind)} ({k}) | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--render"]:  # re-render the markdown from the saved JSON
        Path("docs/benchmarks/espace.md").write_text(render(json.loads(Path("docs/benchmarks/espace.json").read_text())))
    else:
        main()
