"""LoSparse on the real MiniLM encoder: task fine-tuning with PLATON row pruning -> docs/benchmarks/losparse.md.

For each dataset (Pang & Lee sentences, Reuters R8) the dense all-MiniLM-L6-v2 + a new classifier head is
fine-tuned first (the baseline and the teacher). Then, for each keep (fraction of the targeted params =
every linear of the 6 encoder blocks), a copy of the dense fine-tuned model (`--init pretrained`: of the
pretrained encoder) is compressed with `method="losparse"` (L R from the SVD, S = the full residual, so it
starts equal to its source), and fine-tuned for the same number
of steps while the pruner removes rows of S on the cubic schedule (global ranking, PLATON scores), with
distillation from the dense fine-tuned teacher (logit KL, T = 2, and hidden-state MSE). At the end the pruned
rows are gone from storage and the achieved keep is counted from the layers themselves.

    nice -n 5 .venv/bin/python benchmarks/losparse_finetune.py            # both datasets, keeps 0.2 and 0.1
    .venv/bin/python benchmarks/losparse_finetune.py --smoke               # a minute: tiny steps, no doc

Computes in fp32 with bf16 autocast on CPUs with fast bf16 (see structlin.demo.pick_dtype).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path

import torch

import structlin as sl
from structlin import data
from structlin.heal.classify import accuracy, finetune_classifier
from structlin.methods.losparse import LoSparseLinear

from _minilm import FREEZE, TARGETS, dense_finetune, encoder_params  # noqa: E402  (benchmarks/ is on sys.path)

RECIPE = ("rank_ratio", "init", "lr", "lr_dense", "batch_size", "t_i", "t_f", "delta_t", "beta2", "kl", "hidden",
          "temperature", "bf16", "epochs")

DATASETS = {
    # name: (max_length, epochs, train subsample or None)
    "pang-lee": (64, 2, None),
    "reuters-r8": (64, 1, None),
}


def run(args):
    amp = torch.bfloat16 if args.bf16 else None
    results = []
    out_json = Path(args.json)
    for ds in args.datasets:
        max_len, epochs, sub = DATASETS[ds]
        train, labels = data.labelled(ds, "train")
        test, _ = data.labelled(ds, "test")
        if args.smoke:
            train, test, epochs = train[:64], test[:64], 1
        elif sub:
            train = train[:sub]
        epochs = args.epochs or epochs
        steps = epochs * -(-len(train) // args.batch_size)
        base, tok = data.load_model("minilm", task="classification", num_labels=len(labels), seed=0)
        dense = copy.deepcopy(base)
        # the dense fine-tune is deterministic: reuse it across runs
        acc_dense, minutes = dense_finetune(dense, train, test, tok, dataset=ds, steps=steps, max_len=max_len,
                                            lr=args.lr_dense, batch_size=args.batch_size, amp=amp,
                                            cache_dir=None if args.smoke else args.cache, progress=args.progress)
        dense.eval()
        row = dict(dataset=ds, config="dense fine-tune", keep=1.0, achieved=1.0, steps=steps, train=len(train),
                   epochs=epochs, accuracy=acc_dense, relative=1.0, minutes=minutes)
        results.append(row)
        print(json.dumps(row), flush=True)
        for keep in args.keeps:
            recipe = dict(dataset=ds, keep=keep, train=len(train), steps=steps, dense=acc_dense,
                          **{a: getattr(args, a) for a in RECIPE})
            row_file = None
            if args.cache and not args.smoke:  # a finished row of the same recipe (runs are deterministic)
                digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
                row_file = Path(args.cache) / "rows" / f"{digest}.json"
                if row_file.exists():
                    row = json.loads(row_file.read_text())["row"]
                    results.append(row)
                    print(json.dumps(row), "(cached)", flush=True)
                    out_json.write_text(json.dumps(dict(args=vars(args), results=results), indent=1))
                    write_doc(args, results)
                    continue
            model = copy.deepcopy(base if args.init == "pretrained" else dense)
            cfg = sl.CompressConfig(method="losparse", keep=keep, targets=TARGETS,
                                    options={"rank_ratio": args.rank_ratio})
            sl.compress(model, cfg, progress=False)
            t0 = time.perf_counter()
            hook_opts = {"losparse": dict(total_steps=steps, initial_warmup=int(args.t_i * steps),
                                          final_warmup=int(args.t_f * steps), delta_t=args.delta_t,
                                          beta1=0.85, beta2=args.beta2)}
            finetune_classifier(model, train, tok, steps=steps, lr=args.lr, batch_size=args.batch_size,
                                max_length=max_len, seed=0, autocast_dtype=amp, teacher=dense,
                                kl_weight=args.kl, hidden_weight=args.hidden, temperature=args.temperature,
                                hook_options=hook_opts, progress=args.progress, freeze=FREEZE)
            acc = accuracy(model, test, tok, max_length=max_len, autocast_dtype=amp)
            kept, total = encoder_params(model)
            ranks = sorted({m.spec.rank for m in model.modules() if isinstance(m, LoSparseLinear)})
            rows_kept = sum(m.spec.kept for m in model.modules() if isinstance(m, LoSparseLinear))
            rows_full = sum(m.spec.lines for m in model.modules() if isinstance(m, LoSparseLinear))
            lr_params = sum(m.spec.rank * (m.in_features + m.out_features)
                            for m in model.modules() if isinstance(m, LoSparseLinear))
            row = dict(dataset=ds, config=f"losparse keep {keep}", keep=keep, achieved=kept / total, steps=steps,
                       train=len(train), epochs=epochs,
                       accuracy=acc, relative=acc / acc_dense, minutes=(time.perf_counter() - t0) / 60,
                       p=lr_params / total, r_f=(kept - lr_params) / total, ranks=ranks,
                       rows=f"{rows_kept}/{rows_full}")
            results.append(row)
            print(json.dumps(row), flush=True)
            if row_file is not None:
                row_file.parent.mkdir(parents=True, exist_ok=True)
                row_file.write_text(json.dumps(dict(recipe=recipe, row=row)))
            if not args.smoke:
                out_json.write_text(json.dumps(dict(args=vars(args), results=results), indent=1))
                write_doc(args, results)
    return results


def write_doc(args, results):
    lines = [
        "# LoSparse on MiniLM: task fine-tuning with PLATON row pruning",
        "",
        "Generated by `benchmarks/losparse_finetune.py` (command below). Model: all-MiniLM-L6-v2 (6-layer BERT, "
        "22.7M params) + a new linear classifier head (seed 0). Targeted: every linear of the 6 encoder blocks "
        "(36 layers, 384×384 and 384↔1536, 10.6M params); embeddings, pooler and head stay dense. "
        f"CPU (2 shared cores), fp32 weights{' with bf16 autocast' if args.bf16 else ''}.",
        "",
        "* **dense**: fine-tune everything but the word-embedding table (frozen in every run), AdamW lr "
        f"{args.lr_dense}, batch {args.batch_size}, linear warm-up (6%) and decay, grad-norm clip 1.",
        f"* **losparse keep k**: `compress(method='losparse', keep=k, options={{'rank_ratio': {args.rank_ratio}}})` "
        f"from the {'dense fine-tuned model (the teacher)' if args.init == 'finetuned' else 'pretrained encoder'} "
        "(L R = SVD, S = full residual, so it starts equal to it), then the same number of fine-tuning steps "
        f"(lr {args.lr}) with the pruner: cubic schedule t_i = {args.t_i:g}·T, t_f = {args.t_f:g}·T, "
        f"ΔT = {args.delta_t}, β₁ = 0.85, β₂ = {args.beta2:g}, global row ranking (mean), and distillation from "
        f"the dense fine-tuned model (KL weight {args.kl:g}, T = {args.temperature:g}; hidden MSE weight {args.hidden:g}). Pruned "
        "rows leave storage as they go; `achieved` counts the encoder linears' params after training "
        "(L, R, kept rows of S, biases) over their dense count; p = low-rank share, r_f = kept-S share.",
        "",
        "| dataset | train rows × epochs | config | steps | achieved keep | p | r_f | ranks | rows of S kept | accuracy | × dense | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        dash = "p" not in r
        lines.append(f"| {r['dataset']} | {r['train']} × {r['epochs']} | {r['config']} | {r['steps']} | {r['achieved']:.3f} | "
                     f"{'—' if dash else format(r['p'], '.3f')} | {'—' if dash else format(r['r_f'], '.3f')} | "
                     f"{r.get('ranks', '—')} | {r.get('rows', '—')} | "
                     f"{r['accuracy']:.4f} | {r['relative']:.3f} | {r['minutes']:.1f} |")
    lines += ["", "Test sets: Pang & Lee = the fixed 800-sentence split of `structlin.data.labelled`, Reuters R8 = "
              "the official 2,189-document test split; texts cut at the stated max length (64 tokens).", "",
              "Command: `nice -n 5 .venv/bin/python benchmarks/losparse_finetune.py "
              + " ".join(args.argv) + "`", ""]
    if args.sweep and Path(args.sweep).exists():
        sw = json.loads(Path(args.sweep).read_text())
        lines += ["## Recipe sweep (Pang & Lee, keep 0.2)", "",
                  sw["note"], "",
                  "| variant | differs from the session-2 recipe by | accuracy | × dense |",
                  "| --- | --- | --- | --- |"]
        for v in sw["rows"]:
            lines.append(f"| {v['name']} | {v['change']} | {v['accuracy']:.4f} | {v['accuracy'] / sw['dense']:.3f} |")
        lines.append("")
    Path(args.out).write_text("\n".join(lines))


def main():
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--keeps", type=float, nargs="*", default=[0.2, 0.1])
    ap.add_argument("--rank-ratio", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=0, help="0: the per-dataset default")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--init", choices=("finetuned", "pretrained"), default="finetuned",
                    help="compress the dense fine-tuned model (default) or the pretrained encoder")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-dense", type=float, default=5e-5)
    ap.add_argument("--t-i", type=float, default=0.05)
    ap.add_argument("--t-f", type=float, default=0.6)
    ap.add_argument("--delta-t", type=int, default=5)
    ap.add_argument("--beta2", type=float, default=1.0)
    ap.add_argument("--kl", type=float, default=1.0)
    ap.add_argument("--hidden", type=float, default=1.0)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--cache", "--dense-cache", dest="cache", default="",
                    help="folder for the dense fine-tuned models and finished rows (reused by later runs with the "
                         "same settings; every run is deterministic, so a reused row is what a rerun computes)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--sweep", default="docs/benchmarks/losparse_sweep.json", help="JSON of recipe-sweep rows to list in the doc")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="docs/benchmarks/losparse.md")
    ap.add_argument("--json", default="docs/benchmarks/losparse.json")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    torch.set_num_threads(1)  # 2 cores shared by several agents: one thread thrashes least
    run(args)


if __name__ == "__main__":
    main()
