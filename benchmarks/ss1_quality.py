"""SS1 projections on SmolLM2-135M + Jane Austen, training-free and briefly healed -> docs/benchmarks/ss1_quality.md.

SS1 at r = 2 on every decoder linear ("all") and on the MLP linears only ("mlp"), projected by averaging (tied),
least squares (tied), least squares (blockwise) and data-aware sharing (table, `projection="share"`), against
whitened low-rank at the table rows' parameter count. One calibration pass (`--calib` windows × 512 tokens of
Emma + Mansfield Park) gives the input Grams every row reuses; perplexity on the first `--eval-tokens` tokens of
Pride and Prejudice. Then `structlin.heal` for `--heal-steps` steps × 512 tokens (later calibration-split windows,
LM + KL to the dense teacher) on the data-aware and the whitened "all" models.

Every row is cached in the JSON as it finishes; a rerun skips cached rows (`--redo LABEL` recomputes one).

    .venv/bin/python benchmarks/ss1_quality.py [--calib 32] [--eval-tokens 8192] [--heal-steps 30]
    .venv/bin/python benchmarks/ss1_quality.py --render      # markdown + PNG from the JSON only
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_MD = ROOT / "docs/benchmarks/ss1_quality.md"
OUT_JSON = ROOT / "docs/benchmarks/ss1_quality.json"
OUT_PNG = ROOT / "docs/benchmarks/ss1_quality.png"
MLP = ["gate_proj", "up_proj", "down_proj"]
SS1_ROWS = {  # label -> options (r = 2 everywhere)
    "ss1 table, data-aware sharing": {"scheme": "table", "projection": "share"},
    "ss1 tied, least squares": {"scheme": "tied", "projection": "lstsq"},
    "ss1 tied, averaging": {"scheme": "tied", "projection": "average"},
    "ss1 blockwise, least squares": {"scheme": "blockwise", "projection": "lstsq"},
}
WHITEN = "whitened low-rank (same params)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heal-steps", type=int, default=30)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--scopes", nargs="+", default=["all", "mlp"])
    ap.add_argument("--no-heal", action="store_true")
    ap.add_argument("--redo", nargs="*", default=[])
    ap.add_argument("--dump-layers", default="", help="save blocks 2/15/27's (W, C) to this .pt file")
    a = ap.parse_args()

    import structlin as sl
    from structlin import data
    from structlin.calibrate import collect
    from structlin.demo import pick_dtype
    from structlin.eval import perplexity
    from structlin.heal import heal

    torch.set_grad_enabled(False)
    res = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {"rows": {}}
    rows = res["rows"]

    def save():
        OUT_JSON.write_text(json.dumps(res, indent=1))
        OUT_MD.write_text(render(res))

    t0 = time.time()
    dt = pick_dtype("auto")
    dense, tok = data.load_model("smollm2", dtype=dt)
    calib = data.texts("austen-calib", tok, n=a.calib, seq_len=a.seq_len)
    windows = data.token_windows(data.text("pride-and-prejudice"), tok, a.eval_tokens, a.seq_len)
    res["setup"] = {"calib_windows": a.calib, "seq_len": a.seq_len, "eval_tokens": int(windows.numel()),
                    "dtype": str(dt)[6:], "heal_steps": a.heal_steps, "heal_lr": a.heal_lr}
    if "dense" not in rows:
        rows["dense"] = {"ppl": perplexity(dense, windows).ppl}
        save()
    print(f"dense ppl {rows['dense']['ppl']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    targets = sl.targeting.select(dense, "all-linear")
    stats = None

    def get_stats():
        nonlocal stats
        if stats is None:
            stats = collect(dense, targets, calib, {"gram"}, progress=False)
            print(f"calibrated ({time.time() - t0:.0f}s)", flush=True)
            if a.dump_layers:   # a few layers' (W, C) for per-layer experiments
                keep_names = [n for n in targets if any(f"layers.{i}." in n for i in (2, 15, 27))]
                torch.save({n: (targets[n].weight.detach().double(), stats[n].gram_mean()) for n in keep_names},
                           a.dump_layers)
        return stats

    models = {}

    def run(label, scope, cfg, keep_model=False):
        key = f"{scope}: {label}"
        if key in rows and key not in a.redo and not keep_model:
            return rows[key]
        model = copy.deepcopy(dense)
        t1 = time.time()
        rep = sl.compress(model, cfg, stats=get_stats(), progress=False)
        t_proj = time.time() - t1
        ppl = perplexity(model, windows).ppl
        errs = {r.name: r.output_error for r in rep.rows if r.output_error is not None and r.structure != "dense"}
        row = {"scope": scope, "label": label, "ppl": ppl, "x_dense": ppl / rows["dense"]["ppl"],
               "kept_params": rep.kept_params, "targeted_params": rep.targeted_params,
               "achieved_keep": rep.achieved_keep, "project_s": t_proj,
               "out_err_median": statistics.median(errs.values()) if errs else None, "out_err": errs,
               "dense_layers": sum(r.structure == "dense" for r in rep.rows)}
        rows[key] = row
        save()
        print(f"{key}: ppl {ppl:.3f} ({row['x_dense']:.2f}x dense) keep {rep.achieved_keep:.4f} "
              f"median out err {row['out_err_median']:.4f} project {t_proj:.0f}s ({time.time() - t0:.0f}s)",
              flush=True)
        if keep_model:
            models[key] = model
        return row

    from structlin import methods

    ss1m = methods.get("ss1")

    def exact_keep(tg, opts):
        """keep just above the r = 2 size of every targeted layer: the uniform allocator then gives each layer
        r = 2 and has no slack to leave any layer dense."""
        sel = sl.targeting.select(dense, tg)
        o = sl.CompressConfig(method="ss1", keep=0.5, options={"r": 2, **opts}).method_list()[0][1]
        p = d = 0
        for mod in sel.values():
            k, n, b = sl.modules.linear_shape(mod)
            p += ss1m.spec_params(ss1m.candidates(k, n, b, o)[0])
            d += k * n + n * b
        return p / d + 1e-7

    def do_heal():
        if not a.no_heal:
            pool = data.token_windows(data.text("austen-calib"), tok, (a.calib + a.heal_steps) * a.seq_len,
                                      a.seq_len)[a.calib:]
            train = [{"input_ids": w[None], "attention_mask": torch.ones(1, a.seq_len, dtype=torch.long)} for w in pool]
            for key, model in models.items():
                hkey = key + " + heal"
                if hkey in rows and hkey not in a.redo:
                    continue
                model = model.float()
                t1 = time.time()
                with torch.enable_grad():
                    hr = heal(model, train, steps=a.heal_steps, teacher=dense, lr=a.heal_lr,
                              autocast_dtype=dt if dt != torch.float32 else None, progress=False)
                model = model.to(dt)
                ppl = perplexity(model, windows).ppl
                base = rows[key]
                rows[hkey] = {"scope": "all", "label": base["label"] + " + heal", "ppl": ppl,
                              "x_dense": ppl / rows["dense"]["ppl"], "kept_params": base["kept_params"],
                              "targeted_params": base["targeted_params"], "achieved_keep": base["achieved_keep"],
                              "heal_s": time.time() - t1, "losses": hr.losses, "trainable": hr.trainable}
                save()
                print(f"{hkey}: ppl {ppl:.3f} ({time.time() - t0:.0f}s)", flush=True)
        models.clear()

    for scope in a.scopes:
        tg = "all-linear" if scope == "all" else MLP
        for label, opts in SS1_ROWS.items():
            run(label, scope, sl.CompressConfig(method="ss1", keep=exact_keep(tg, opts), targets=tg,
                                                options={"r": 2, **opts}),
                keep_model=(scope == "all" and label.startswith("ss1 table") and not a.no_heal
                            and f"all: {label} + heal" not in rows))
            if label.startswith("ss1 table"):
                keep = rows[f"{scope}: {label}"]["achieved_keep"]
                run(WHITEN, scope, sl.CompressConfig(method="lowrank", keep=keep, targets=tg,
                                                     options={"variant": "whiten"}),
                    keep_model=(scope == "all" and not a.no_heal and f"all: {WHITEN} + heal" not in rows))
        if scope == "all":
            do_heal()

    res["seconds"] = res.get("seconds", 0) + time.time() - t0
    save()
    plot(res)


def render(res) -> str:
    s, rows = res.get("setup", {}), res["rows"]
    d = rows.get("dense", {}).get("ppl", float("nan"))
    lines = ["# SS1 projections on SmolLM2-135M (training-free, then briefly healed)", "",
             "Generated by `benchmarks/ss1_quality.py` (CPU, one thread through `/work/notes/cpu-slot`). Model: "
             f"SmolLM2-135M-Instruct (offline GGUF, dequantized), run in {s.get('dtype', '?')}; statistics and "
             "projections in float64. SS1 r = 2 on every targeted layer (no layer left dense; `dense layers` column). Calibration: "
             f"{s.get('calib_windows', '?')} windows × {s.get('seq_len', '?')} tokens of *Emma* + *Mansfield Park* "
             "(one pass, the Grams reused by every row). Perplexity: first "
             f"{s.get('eval_tokens', '?')} tokens of *Pride and Prejudice*, windows of {s.get('seq_len', '?')}. "
             "`all` = every decoder linear (q, k, v, o, gate, up, down × 30 blocks; lm_head excluded); "
             "`mlp` = gate/up/down only. Whitened low-rank is run at the parameter fraction the table row "
             "achieved (the table stores K scales more than tied/blockwise, which have N·Kc(+bias)). "
             "`out err` = median over layers of ‖(W − Ŵ)X‖/‖WX‖ on the calibration inputs.", "",
             f"Dense perplexity: **{d:.3f}**.", "",
             "| scope | projection | params kept | dense layers | perplexity | × dense | median out err |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        if key == "dense":
            continue
        oe = r.get("out_err_median")
        lines.append(f"| {r['scope']} | {r['label']} | {r['achieved_keep']:.4f} | {r.get('dense_layers', '–')} | "
                     f"{r['ppl']:,.2f} | "
                     f"{r['x_dense']:,.2f} | {'–' if oe is None else f'{oe:.4f}'} |")
    for scope in ("all", "mlp"):
        a, b = rows.get(f"{scope}: ss1 table, data-aware sharing"), rows.get(f"{scope}: {WHITEN}")
        if a and b:
            lines.append(f"\n{scope}: data-aware table / whitened low-rank perplexity = **{a['ppl'] / b['ppl']:.2f}×**.")
    ha, hb = rows.get("all: ss1 table, data-aware sharing + heal"), rows.get(f"all: {WHITEN} + heal")
    if ha:
        lines.append(f"\nHealing ({s.get('heal_steps')} steps × 1 window of {s.get('seq_len')} tokens from later "
                     f"windows of the calibration split, LM + KL to the dense teacher, AdamW lr {s.get('heal_lr')}, "
                     f"structured layers + norms trained, {ha['heal_s'] / 60:.1f} min): data-aware table "
                     f"{rows['all: ss1 table, data-aware sharing']['ppl']:.2f} → {ha['ppl']:.2f}" +
                     (f"; whitened low-rank {rows[f'all: {WHITEN}']['ppl']:.2f} → {hb['ppl']:.2f}; ratio after "
                      f"healing **{ha['ppl'] / hb['ppl']:.2f}×**." if hb else "."))
    per = _per_type(rows)
    if per:
        lines += ["", "Median calibration output error by layer type (`all` rows):", "",
                  "| layer | " + " | ".join(per) + " |", "|---|" + "---:|" * len(per)]
        types = sorted({t for v in per.values() for t in v})
        for t in types:
            lines.append(f"| {t} | " + " | ".join(f"{per[k].get(t, float('nan')):.4f}" for k in per) + " |")
    lines += ["", READING, "", PER_LAYER, "", ALGO]
    if "seconds" in res:
        lines += ["", f"Total run time {res['seconds'] / 60:.1f} min on one CPU thread."]
    return "\n".join(lines) + "\n"


def _per_type(rows):
    out = {}
    for key, r in rows.items():
        if r.get("scope") == "all" and r.get("out_err"):
            by = {}
            for name, e in r["out_err"].items():
                by.setdefault(name.rsplit(".", 1)[-1], []).append(e)
            out[r["label"]] = {t: statistics.median(v) for t, v in by.items()}
    return out


READING = """## Reading

* **Target (data-aware sharing within 1.5× of whitened low-rank's perplexity at equal params, all decoder
  linears): met, 1.35×** (236 vs 175; dense 24.2). The fixed tied pairing with least squares is 18,500× dense
  in this run (the issue quoted 5,070× with another calibration/eval setup), blockwise 53,000×, averaging
  210,000×: no projection can undo summing unrelated features, and choosing the pairing from the data removes
  almost all of that loss (×1,900 lower perplexity than tied least squares).
* Per layer, sharing beats whitened low-rank where the input has a few strong directions that a subset of
  features carries well (down_proj, v_proj, and o/k in several blocks) and loses on q/gate/up, whose input is the
  RMS-normed residual stream: there arbitrary linear combinations (low rank) capture its low-dimensional
  structure better than disjoint bucket sums. The greedy anchors alone (pure column-subset selection) already
  do most of the work; bucket assignment + alternating least squares lowers the relative error by another 4–28 % (per-layer table below).
* **Healing narrows the rest and more**: 30 steps × 512 tokens take the data-aware SS1 model from 236 to 67.1,
  below whitened low-rank healed the same way (175 → 78.7): 0.85×. SS1 trains all N·K/2 entries of W0 under
  a fixed table, low-rank trains its factors; at equal params SS1 healed faster in this run.
* MLP-only rows are worse than all-linear rows for both methods (260 vs 236, 191 vs 175), although the MLP
  layers' projections are identical in both (checked: per-layer errors equal to the last digit). Compressing
  attention as well changes the MLP inputs the projections were fitted for; training-free perplexities this far
  from dense are not additive. Sequential calibration (each layer fitted on the compressed model's inputs) was
  not run for SS1 here.
* Cost: projecting all 210 layers took 194 s (data-aware) vs 164 s (whitened, SVDs) on one CPU thread."""


PER_LAYER = """## Per-layer check (before the whole-model runs)

Relative calibration output error ‖(W − Ŵ)X‖/‖WX‖ (same 32 × 512 calibration tokens, float64) of single SmolLM2 layers from blocks 2, 15 and 27: whitened low-rank at the table's parameter count (rank k), least squares on the tied pairing, the greedy anchors alone (column subset, `sel`) and full data-aware sharing (2 assignment rounds). Computed by `share_table` and a whitened SVD on the (W, C) that `benchmarks/ss1_quality.py --dump-layers FILE` saves (block 2 q_proj was cut from the log).\n\n| layer | k | whitened low-rank | lstsq (tied) | anchors only | data-aware sharing |\n|---|---:|---:|---:|---:|---:|\n| 2.self_attn.k_proj | 72 | 0.1594 | 0.1857 | 0.1493 | 0.1362 |\n| 2.self_attn.v_proj | 72 | 0.4015 | 0.4176 | 0.3611 | 0.3308 |\n| 2.self_attn.o_proj | 144 | 0.1810 | 0.3165 | 0.1949 | 0.1787 |\n| 2.mlp.gate_proj | 209 | 0.2727 | 0.3711 | 0.3396 | 0.3245 |\n| 2.mlp.up_proj | 209 | 0.3673 | 0.4784 | 0.4469 | 0.4279 |\n| 2.mlp.down_proj | 210 | 0.1671 | 0.1824 | 0.1594 | 0.1513 |\n| 15.self_attn.q_proj | 144 | 0.1056 | 0.1996 | 0.1748 | 0.1593 |\n| 15.self_attn.k_proj | 72 | 0.1154 | 0.1780 | 0.1454 | 0.1291 |\n| 15.self_attn.v_proj | 72 | 0.4289 | 0.4486 | 0.3955 | 0.3657 |\n| 15.self_attn.o_proj | 144 | 0.1507 | 0.2543 | 0.1655 | 0.1463 |\n| 15.mlp.gate_proj | 209 | 0.2085 | 0.2978 | 0.2737 | 0.2614 |\n| 15.mlp.up_proj | 209 | 0.2975 | 0.3885 | 0.3633 | 0.3493 |\n| 15.mlp.down_proj | 210 | 0.3632 | 0.3964 | 0.3072 | 0.2875 |\n| 27.self_attn.q_proj | 144 | 0.1089 | 0.1666 | 0.1472 | 0.1366 |\n| 27.self_attn.k_proj | 72 | 0.1091 | 0.1434 | 0.1215 | 0.1096 |\n| 27.self_attn.v_proj | 72 | 0.4043 | 0.4009 | 0.3644 | 0.3389 |\n| 27.self_attn.o_proj | 144 | 0.1243 | 0.2372 | 0.1322 | 0.0955 |\n| 27.mlp.gate_proj | 209 | 0.1796 | 0.2533 | 0.2274 | 0.2184 |\n| 27.mlp.up_proj | 209 | 0.2398 | 0.3244 | 0.3003 | 0.2875 |\n| 27.mlp.down_proj | 210 | 0.2823 | 0.2904 | 0.2164 | 0.2071 |"""


ALGO = """## Data-aware sharing (`projection="share"`, `structlin.methods.ss1.share_table`)

Objective: over the table (bucket b_i and scale s_i of every input feature i, exactly Kc = K/r buckets) and W0,
minimise ‖(W − W0 Sᵀ)X‖² = tr((W − W0 Sᵀ) C (W − W0 Sᵀ)ᵀ), C the float64, ridge-damped calibration Gram. For a
fixed S the optimum is W0 = W C S (SᵀCS)⁻¹.

1. **Anchors** (column-subset selection, a special case of the table: Kc features alone in their buckets, the
   rest at scale 0). Greedy forward selection maximising the explained output energy tr(M_T C_TT⁻¹ M_Tᵀ),
   M = W C: a pivoted Cholesky of C whose pivot is the feature with the largest gain ‖M_res e_i‖²/C_res,ii,
   kept in factored form (C_res = C − VVᵀ, M_res = M − UVᵀ). The least-squares W0 then regresses the dropped
   features on the kept ones through their correlations.
2. **Assignment**: with W0 fixed, putting feature i in bucket b with its best scale lowers the error by
   (W0_bᵀ h_i)²/(‖W0_b‖² C_ii), h_i the residual correlation (W C − Ŵ C)_{:,i} with i's own contribution added
   back; every non-anchor feature goes to its best bucket (anchors stay, so no bucket empties).
3. **Alternating least squares**: scales given (buckets, W0) are linear (one K×K solve,
   H_ij = (W0ᵀW0)_{b_i b_j} C_ij), W0 given the table is the closed form; a few alternations, each an exact
   block minimisation. Steps 2–3 repeat for a few rounds, a round kept only if it lowers the calibration error.

Cost: M = W C (N·K²), the selection ≈ one N×K×Kc product done as Kc matrix–vector steps, per round one Kc×N×K
product for the gains and K×K plus Kc×Kc solves. On SmolLM2's layers a fraction of a second each on one CPU
thread; a 4096 × 14336 layer is a few tens of GFLOP plus a 14336² solve (seconds on a GPU)."""


def plot(res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in res["rows"].items() if k != "dense"}
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    keys = list(rows)
    vals = [rows[k]["ppl"] for k in keys]
    colors = ["tab:green" if "data-aware" in k else "tab:blue" if "whiten" in k else "tab:gray" for k in keys]
    ax.barh(range(len(keys)), vals, color=colors)
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(res["rows"]["dense"]["ppl"], color="k", ls="--", lw=1, label="dense")
    ax.invert_yaxis()
    ax.set_xlabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M, SS1 r=2 vs whitened low-rank at equal params")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--render"]:
        r = json.loads(OUT_JSON.read_text())
        OUT_MD.write_text(render(r))
        plot(r)
    else:
        main()
