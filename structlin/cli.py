"""`structlin` command line: compress, eval, heal, demo, sensitivity (and dry runs).

Bad arguments and bad input print one line, `structlin: error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"structlin: error: --option expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k] = _value(v)
    return out


def _load(model: str, dtype: str = "float32"):
    """(model, tokenizer) from a structlin directory, an offline asset name or a transformers path."""
    import torch

    from . import data, io

    dt = getattr(torch, dtype)
    path = Path(model)
    if (path / io.META).is_file():
        from transformers import AutoTokenizer

        m = io.from_pretrained(path, dtype=dt)
        tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        return m, tok
    if path.is_dir() and not (path / "tokenizer_config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **{data.dtype_kwarg(): dt}).eval(), None
    return data.load_model(model, dtype=dt)


def cmd_compress(a) -> int:
    import structlin as sl

    from . import data

    options = _options(a.option)
    if a.variant:
        options["variant"] = a.variant
    if a.sequential:
        options["sequential"] = True
    targets = a.targets[0] if a.targets and len(a.targets) == 1 and not a.targets[0].isidentifier() else a.targets
    cfg = sl.CompressConfig(method=a.method, keep=a.keep, targets=targets or "all-linear", exclude=a.exclude,
                            layers=a.layers, options=options, seed=a.seed, allocation=a.allocation, floor=a.floor)
    if not a.dry_run and a.out is None:
        raise sl.ConfigError("--out DIR is required (or use --dry-run)")
    if a.out is not None and Path(a.out).exists() and not a.overwrite:
        raise sl.StructlinError(f"{a.out} already exists; pass --overwrite to replace it")
    model, tok = _load(a.model, a.dtype)
    if a.dry_run:
        print(sl.targeting.format_dry_run(sl.dry_run(model, cfg)))
        return 0
    calib = None
    if not a.no_calib:
        if tok is None:
            raise sl.ConfigError(f"{a.model} has no tokenizer for calibration text; use --no-calib")
        calib = data.texts(a.calib, tok, n=a.calib_n, seq_len=a.seq_len)
    if a.ranking:
        from . import ranking

        report = ranking.compress_ranked(model, ranking.load(a.ranking), a.keep, calib=calib)
    else:
        report = sl.compress(model, cfg, calib=calib)
    print(report)
    sl.save_pretrained(model, a.out, tokenizer=tok, overwrite=a.overwrite)
    (Path(a.out) / "report.md").write_text(report.to_markdown())
    print(f"saved to {a.out}")
    return 0


def cmd_sensitivity(a) -> int:
    import torch

    import structlin as sl

    from . import data, ranking

    options = _options(a.option)
    if a.r:
        options["r"] = a.r
    model, tok = _load(a.model, a.dtype)
    if tok is None:
        raise sl.ConfigError(f"{a.model} has no tokenizer for calibration text")
    calib = data.texts(a.calib, tok, n=a.calib_n, seq_len=a.seq_len)
    pool = data.token_windows(data.text(a.calib), tok, (a.calib_n + a.val_n) * a.seq_len, a.seq_len)[a.calib_n:]
    if len(pool) == 0:
        raise sl.ConfigError(f"text {a.calib!r} has no validation windows after the {a.calib_n} calibration ones")
    val = [{"input_ids": w[None], "attention_mask": torch.ones(1, a.seq_len, dtype=torch.long)} for w in pool]
    targets = a.targets[0] if a.targets and len(a.targets) == 1 and not a.targets[0].isidentifier() else a.targets
    with torch.no_grad():
        r = ranking.rank(model, a.method, options, calib, val, unit=a.unit, targets=targets or "all-linear",
                         exclude=a.exclude, layer_keep=a.layer_keep)
    out = ranking.save(r, a.out, title=a.model)
    print(ranking.to_markdown(r, a.model))
    print(f"wrote {out / 'sensitivity.md'}, sensitivity.json, sensitivity.png; use it with "
          f"`structlin compress {a.model} --ranking {out} --keep K --out DIR`")
    return 0


def cmd_eval(a) -> int:
    from . import data
    from .eval import perplexity

    model, tok = _load(a.model, a.dtype)
    if tok is None:
        raise SystemExit(f"structlin: error: {a.model} has no tokenizer; save it with save_pretrained(..., tokenizer=)")
    for name in a.text:
        w = data.token_windows(data.text(name), tok, a.tokens, a.seq_len)
        print(perplexity(model, w, text=name, progress=True))
    return 0


def cmd_heal(a) -> int:
    import torch

    import structlin as sl

    from . import data, io
    from .heal import heal

    if not (Path(a.model) / io.META).is_file():
        raise sl.LoadError(f"{a.model} is not a structlin directory (no {io.META}); compress it first")
    if Path(a.out).exists() and not a.overwrite:
        raise sl.StructlinError(f"{a.out} already exists; pass --overwrite to replace it")
    model, tok = _load(a.model, "float32")               # fp32 master weights
    if tok is None:
        raise sl.ConfigError(f"{a.model} has no tokenizer; save it with save_pretrained(..., tokenizer=)")
    teacher = None
    if a.teacher:
        teacher, _ = _load(a.teacher, "bfloat16" if a.autocast == "bfloat16" else "float32")
    pool = data.token_windows(data.text(a.data), tok, (a.skip + a.windows) * a.seq_len, a.seq_len)[a.skip:]
    if len(pool) == 0:
        raise sl.ConfigError(f"text {a.data!r} has no windows of {a.seq_len} tokens after skipping {a.skip}")
    train = [{"input_ids": w[None], "attention_mask": torch.ones(1, a.seq_len, dtype=torch.long)} for w in pool]
    ckpt = Path(a.checkpoint_dir) if a.checkpoint_dir else Path(a.out).with_name(Path(a.out).name + ".checkpoints")
    res = heal(model, train, steps=a.steps, teacher=teacher, lr=a.lr, lm_weight=a.lm_weight,
               kl_weight=a.kl_weight if teacher is not None else 0.0, hidden_weight=a.hidden_weight,
               temperature=a.temperature, train=a.train, grad_accum=a.batch,
               autocast_dtype=None if a.autocast == "none" else getattr(torch, a.autocast),
               checkpoint_dir=ckpt, checkpoint_every=a.checkpoint_every, seed=a.seed)
    print(res)
    model.structlin_history = list(getattr(model, "structlin_history", [])) + [{
        "heal": {"steps": a.steps, "lr": a.lr, "data": a.data, "windows": len(train), "seq_len": a.seq_len,
                 "teacher": a.teacher, "kl_weight": a.kl_weight if teacher is not None else 0.0,
                 "lm_weight": a.lm_weight, "final_loss": res.losses[-1]}}]
    model = model.to(getattr(torch, a.save_dtype))
    sl.save_pretrained(model, a.out, tokenizer=tok, overwrite=a.overwrite)
    print(f"saved to {a.out} (checkpoints in {ckpt}; delete them when done)")
    return 0


def cmd_bench_model(a) -> int:
    import torch

    from .bench.model import run_model_bench

    if not torch.cuda.is_available() and not a.allow_cpu:
        raise SystemExit("structlin: error: bench model times CUDA graphs on a GPU and none is visible; pass "
                         "--allow-cpu for a (slow, eager) smoke run")
    prefills = [tuple(int(v) for v in p.split("x")) for p in a.prefill]
    run_model_bench(a.preset, a.layers, tuple(m for m in a.methods.split(",") if m), a.keep, prefills,
                    tuple(a.decode), a.context, prefills[-1] if a.share is None else tuple(int(v) for v in a.share.split("x")),
                    dtype=getattr(torch, a.dtype), use_graph=not a.no_graph, fuse=not a.no_fuse,
                    out=Path(a.out), timing={"warmup": 1, "iters": 1, "reps": 1} if a.quick else None)
    print(f"wrote {a.out}/model.md, model.png, model.json")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(out=Path(a.out), calib_n=a.calib_n, eval_tokens=a.eval_tokens, seq_len=a.seq_len,
             keeps=tuple(a.keep), sequential=not a.no_sequential, dtype=a.dtype)
    return 0


def cmd_sweep(a) -> int:
    from .sweep import run_sweep

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    keeps = [float(k) for k in a.keep.split(",") if k.strip()]
    options = {}
    for pair in a.option or []:            # METHOD.KEY=VALUE
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise SystemExit(f"structlin: error: --option expects METHOD.KEY=VALUE, got {pair!r}")
        key, v = pair.split("=", 1)
        m, k = key.split(".", 1)
        options.setdefault(m, {})[k] = _value(v)
    unknown = [m for m in list(options) + methods if m not in methods_available()]
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"unknown method(s) {unknown}; available methods: {methods_available()}")
    allocations = [x.strip() for x in a.allocations.split(",") if x.strip()]
    mixed_allocations = [x.strip() for x in a.mixed_allocations.split(",") if x.strip()] if a.mixed_allocations else None
    run_sweep(a.model, methods, keeps, options=options, allocations=allocations, mixed=not a.no_mixed,
              mixed_allocations=mixed_allocations,
              floor=a.floor, calib_text=a.calib, calib_n=a.calib_n, seq_len=a.seq_len, eval_text=a.eval_text,
              eval_tokens=a.eval_tokens, dtype=a.dtype, device=a.device, latency=a.latency, out=Path(a.out),
              name=a.name, progress=not a.no_progress)
    print(f"wrote {Path(a.out) / (a.name + '.md')} and {a.name}_params.png, {a.name}_flops.png")
    return 0


def methods_available() -> list[str]:
    from . import methods

    return methods.available()


def build_parser() -> argparse.ArgumentParser:
    from . import methods

    p = argparse.ArgumentParser(prog="structlin", description="Structured linear layers for transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it",
                       description="Compress MODEL (a directory, 'smollm2', 'minilm' or a transformers id).")
    c.add_argument("model")
    c.add_argument("--method", default="lowrank", choices=methods.available() + ["mixed"],
                   help="a structure, or 'mixed' with --option methods='[\"lowrank\",\"espace\"]'")
    c.add_argument("--allocation", default="uniform", choices=["uniform", "spectral", "fisher", "measured"],
                   help="how keep is split over layers")
    c.add_argument("--floor", type=float, default=0.0, help="non-uniform allocations: each layer keeps at least "
                   "floor × its uniform share")
    c.add_argument("--keep", type=float, default=0.5, help="fraction of the targeted linear params kept, in (0, 1]")
    c.add_argument("--variant", help="lowrank: svd | asvd | whiten")
    c.add_argument("--sequential", action="store_true", help="calibrate block by block")
    c.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    c.add_argument("--targets", nargs="+", help="'all-linear' (default), names/suffixes, or one regex")
    c.add_argument("--exclude", nargs="+")
    c.add_argument("--layers", nargs="+", type=int, help="transformer block indices")
    c.add_argument("--calib", default="austen-calib", help="calibration text (default austen-calib)")
    c.add_argument("--calib-n", type=int, default=32, help="calibration windows")
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--no-calib", action="store_true", help="no calibration data (variant svd only)")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="output directory")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--dry-run", action="store_true", help="list the modules that would be compressed")
    c.add_argument("--ranking", help="a `structlin sensitivity` output (dir or json): compress its least "
                   "sensitive units, with its method and options, until the targeted params are within --keep")
    c.set_defaults(func=cmd_compress)

    s = sub.add_parser("sensitivity", help="rank blocks/layers by the validation loss change when compressed alone",
                       description="Compress one block (or layer) of MODEL at a time, measure the loss increase on "
                                   "validation windows (after the calibration ones), write a ranked table and plot.")
    s.add_argument("model")
    s.add_argument("--method", default="ss1", choices=methods.available())
    s.add_argument("--r", type=int, default=0, help="ss1 reduction factor")
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    s.add_argument("--unit", default="block", choices=["block", "layer"])
    s.add_argument("--layer-keep", type=float, help="per-layer size (default 1/r for ss1, else 0.5)")
    s.add_argument("--targets", nargs="+", help="'all-linear' (default), names/suffixes, or one regex")
    s.add_argument("--exclude", nargs="+")
    s.add_argument("--calib", default="austen-calib")
    s.add_argument("--calib-n", type=int, default=16, help="calibration windows (input statistics)")
    s.add_argument("--val-n", type=int, default=4, help="validation windows (the loss), taken after the calibration ones")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--out", default="sensitivity", help="output directory")
    s.set_defaults(func=cmd_sensitivity)

    e = sub.add_parser("eval", help="perplexity of a (compressed) causal LM on held-out text")
    e.add_argument("model")
    e.add_argument("--text", nargs="+", default=["pride-and-prejudice", "sense-and-sensibility"])
    e.add_argument("--tokens", type=int, default=8192, help="first N tokens of each text")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    e.set_defaults(func=cmd_eval)

    h = sub.add_parser("heal", help="train a compressed model's structured layers (distillation + LM loss)",
                       description="Heal the structlin directory MODEL on text windows; resumes from its "
                                   "checkpoints if killed; saves the healed model to --out.")
    h.add_argument("model")
    h.add_argument("--steps", type=int, required=True, help="optimizer steps")
    h.add_argument("--out", required=True, help="output directory")
    h.add_argument("--teacher", help="dense model to distil from ('smollm2', a directory or a transformers id)")
    h.add_argument("--data", default="austen-calib", help="training text (default austen-calib)")
    h.add_argument("--windows", type=int, default=256, help="training windows of --seq-len tokens")
    h.add_argument("--skip", type=int, default=32, help="windows skipped at the start (the calibration ones)")
    h.add_argument("--seq-len", type=int, default=512)
    h.add_argument("--batch", type=int, default=1, help="windows per optimizer step (gradient accumulation)")
    h.add_argument("--lr", type=float, default=2e-4)
    h.add_argument("--lm-weight", type=float, default=1.0)
    h.add_argument("--kl-weight", type=float, default=1.0, help="used with --teacher")
    h.add_argument("--hidden-weight", type=float, default=0.0)
    h.add_argument("--temperature", type=float, default=1.0)
    h.add_argument("--train", default="structured", choices=["structured", "all"])
    h.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "float16", "none"])
    h.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    h.add_argument("--checkpoint-dir", help="default: OUT.checkpoints next to --out")
    h.add_argument("--checkpoint-every", type=int, default=50)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--overwrite", action="store_true")
    h.set_defaults(func=cmd_heal)

    b = sub.add_parser("bench", help="benchmarks (GPU)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bm = bsub.add_parser("model", help="prefill/decode tokens/s of a Llama built from a config, dense vs structures")
    bm.add_argument("--preset", default="llama-1b", help="llama-1b | llama3-8b | tiny")
    bm.add_argument("--layers", type=int, help="number of blocks (default: the preset's)")
    bm.add_argument("--methods", default="lowrank,ss1,espace")
    bm.add_argument("--keep", type=float, default=0.5)
    bm.add_argument("--prefill", nargs="+", default=["1x512", "4x512", "1x2048", "8x2048"], help="BxS shapes")
    bm.add_argument("--decode", nargs="+", type=int, default=[1, 16], help="decode batch sizes")
    bm.add_argument("--context", type=int, default=512, help="KV-cache length for decode")
    bm.add_argument("--share", help="BxS of the time-share table (default: the last prefill shape)")
    bm.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    bm.add_argument("--no-graph", action="store_true", help="time eagerly")
    bm.add_argument("--no-fuse", action="store_true", help="skip the sibling-fused rows")
    bm.add_argument("--allow-cpu", action="store_true")
    bm.add_argument("--quick", action="store_true", help="one timed call per shape (smoke test)")
    bm.add_argument("--out", default="docs/benchmarks")
    bm.set_defaults(func=cmd_bench_model)

    d = sub.add_parser("demo", help="compress SmolLM2 with low-rank variants; write a table and a plot")
    d.add_argument("--out", default="docs/demo")
    d.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.6])
    d.add_argument("--calib-n", type=int, default=32, help="calibration windows of --seq-len tokens")
    d.add_argument("--eval-tokens", type=int, default=8192, help="tokens of each held-out novel")
    d.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="CPU compute dtype (auto: bfloat16 where the CPU is fast at it)")
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--no-sequential", action="store_true", help="skip the sequential-mode rows")
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("sweep", help="compare methods, allocations and keeps on one model: table + plots",
                       description="Compress MODEL with each method at each keep (uniform and other allocations, "
                                   "plus the mixed structure), evaluate held-out perplexity (causal LMs) or probe "
                                   "accuracy (encoders), and write a markdown table and PNG plots against params "
                                   "and FLOPs.")
    w.add_argument("model", help="a directory, 'smollm2', 'minilm' or a transformers id")
    w.add_argument("--methods", default="lowrank,ss1,espace", help="comma-separated methods")
    w.add_argument("--keep", default="0.9,0.8,0.7,0.6,0.5", help="comma-separated keep fractions")
    w.add_argument("--allocations", default="uniform,fisher",
                   help="comma-separated: uniform, spectral, fisher, measured")
    w.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. lowrank.variant=whiten (repeatable)")
    w.add_argument("--floor", type=float, default=0.0, help="non-uniform allocations: each layer keeps at least "
                   "floor × its uniform share")
    w.add_argument("--no-mixed", action="store_true", help="skip the mixed-structure rows")
    w.add_argument("--mixed-allocations", help="allocations of the mixed rows (default: --allocations)")
    w.add_argument("--calib", default="austen-calib")
    w.add_argument("--calib-n", type=int, default=32, help="calibration windows (batches for encoders)")
    w.add_argument("--seq-len", type=int, default=512)
    w.add_argument("--eval-text", default="pride-and-prejudice")
    w.add_argument("--eval-tokens", type=int, default=8192)
    w.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    w.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    w.add_argument("--latency", action="store_true", help="measure forward latency (CUDA only; skipped on CPU)")
    w.add_argument("--out", default="docs/benchmarks")
    w.add_argument("--name", default="sweep", help="file stem of the table and plots")
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import StructlinError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (StructlinError, FileNotFoundError) as e:
        print(f"structlin: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # data helpers raise ValueError with a user-facing message
        print(f"structlin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
