"""Healing benchmark: SmolLM2-135M + Austen, whitened low-rank at keep 0.6, then `structlin.heal`.

    python benchmarks/healing.py --steps 200            # writes docs/benchmarks/healing.md (+ .json, .png)

Protocol: compress the bf16 model with whitened low-rank (32 calibration windows of 512 tokens from
Emma + Mansfield Park, as in the demo); train the structured layers and norms in fp32 master weights
under bf16 autocast for `--steps` optimizer steps of `--batch` windows of 512 tokens drawn from the
calibration split (windows 32.. onwards, so healing data and calibration data do not overlap), loss =
LM cross entropy + KL to the dense bf16 teacher (T = 1); then evaluate held-out perplexity on the first
8,192 tokens of Pride and Prejudice and Sense and Sensibility in windows of 512 (the demo's protocol).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlin as sl  # noqa: E402
from structlin import data  # noqa: E402
from structlin.demo import EVAL, pick_dtype  # noqa: E402
from structlin.eval import perplexity  # noqa: E402
from structlin.heal import heal  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1, help="windows of 512 tokens per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--train-windows", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    a = ap.parse_args(argv)

    dt = pick_dtype("auto")
    t_all = time.perf_counter()
    dense, tok = data.load_model("smollm2", dtype=dt)
    windows = {n: data.token_windows(data.text(n), tok, a.eval_tokens, a.seq_len) for n in EVAL}

    def evaluate(model):
        return {n: perplexity(model, windows[n], text=n).ppl for n in EVAL}

    calib = data.texts("austen-calib", tok, n=32, seq_len=a.seq_len)
    pool = data.token_windows(data.text("austen-calib"), tok, (32 + a.train_windows) * a.seq_len, a.seq_len)[32:]
    train = [{"input_ids": w[None], "attention_mask": torch.ones(1, a.seq_len, dtype=torch.long)} for w in pool]

    rows = [{"variant": "dense", "steps": 0, **evaluate(dense)}]
    print(rows[-1], flush=True)
    model = copy.deepcopy(dense)
    report = sl.compress(model, sl.CompressConfig(method="lowrank", keep=a.keep, options={"variant": "whiten"}),
                         calib=calib)
    rows.append({"variant": f"whiten {a.keep}", "steps": 0, **evaluate(model)})
    print(rows[-1], flush=True)

    model = model.float()
    t = time.perf_counter()
    res = heal(model, train, steps=a.steps, teacher=dense, lr=a.lr, lm_weight=a.lm_weight, kl_weight=a.kl_weight,
               grad_accum=a.batch, autocast_dtype=dt if dt != torch.float32 else None,
               checkpoint_dir=a.checkpoint_dir, checkpoint_every=50 if a.checkpoint_dir else None)
    heal_s = time.perf_counter() - t
    print(res, flush=True)
    model = model.to(dt)
    rows.append({"variant": f"whiten {a.keep} + heal", "steps": a.steps, **evaluate(model)})
    print(rows[-1], flush=True)

    d, c, h = rows
    closed = {n: (c[n] - h[n]) / (c[n] - d[n]) for n in EVAL}
    meta = {"keep": a.keep, "achieved_keep": report.achieved_keep, "steps": a.steps, "batch": a.batch, "lr": a.lr,
            "seq_len": a.seq_len, "tokens_trained": a.steps * a.batch * a.seq_len, "heal_s": heal_s,
            "trainable": res.trainable, "dtype": str(dt), "eval_tokens": a.eval_tokens,
            "total_s": time.perf_counter() - t_all, "gap_closed": closed,
            "loss_first": res.losses[0], "loss_last10": sum(res.losses[-10:]) / len(res.losses[-10:])}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "healing.json").write_text(json.dumps({"rows": rows, "meta": meta, "losses": res.losses,
                                                     "parts": res.parts}, indent=1))
    (a.out / "healing.md").write_text(render(rows, meta))
    plot(res.losses, res.parts, a.out / "healing.png")
    print(render(rows, meta))
    return 0


def render(rows, meta) -> str:
    lines = ["# Healing a compressed SmolLM2 (`structlin.heal`)", "",
             "Command: `python benchmarks/healing.py --steps {steps} --batch {batch} --lr {lr:g}` on the 2-core CI-class CPU "
             "({dtype} autocast over fp32 master weights).".format(**meta), "",
             f"- Model: SmolLM2-135M-Instruct (4-bit GGUF dequantized), every decoder linear targeted, whitened low-rank "
             f"at keep {meta['keep']} (achieved {meta['achieved_keep']:.4f}), calibration 32 windows × 512 tokens "
             "of Emma + Mansfield Park.",
             f"- Healing: {meta['steps']} optimizer steps × {meta['batch']} window(s) of {meta['seq_len']} tokens "
             f"= {meta['tokens_trained']:,} tokens from later windows of the calibration split (no overlap with the "
             f"calibration windows); loss = LM cross entropy + KL(dense teacher ‖ student), T = 1; AdamW lr {meta['lr']:g}, "
             f"cosine schedule, warm-up 5%, grad-norm clip 1; trained: structured layers + RMSNorms "
             f"({meta['trainable']:,} values). Healing took {meta['heal_s'] / 60:.1f} min.",
             f"- Held-out perplexity: first {meta['eval_tokens']:,} tokens of each novel, windows of 512.", "",
             "| variant | steps | Pride & Prejudice | Sense & Sensibility |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps']} | {r[EVAL[0]]:.2f} | {r[EVAL[1]]:.2f} |")
    g = meta["gap_closed"]
    lines += ["", f"Share of the gap to dense closed by healing: P&P {100 * g[EVAL[0]]:.0f}%, "
              f"S&S {100 * g[EVAL[1]]:.0f}% (target ≥ 30%).", "",
              f"Training loss {meta['loss_first']:.3f} → {meta['loss_last10']:.3f} (mean of the last 10 steps); "
              "curve in `healing.png`.", ""]
    return "\n".join(lines)


def plot(losses, parts, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, label="total", lw=1)
    for k in ("lm", "kl"):
        ax.plot([p[k] for p in parts], label=k, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("healing SmolLM2 whiten keep 0.6")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
