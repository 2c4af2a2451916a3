"""Time converting a Llama-3-8B-shaped model (built from a config, random bf16 weights, on the GPU) to a
structure, projection included: `python benchmarks/convert_time.py --method ss1 --option r=4`.

Writes one markdown line per run to --out (default docs/benchmarks/convert_time.md) and prints it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

import structlin as sl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="ss1")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default="docs/benchmarks/convert_time.md")
    a = ap.parse_args()
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in a.option)}
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    build = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    report = sl.compress(model, sl.CompressConfig(method=a.method, keep=a.keep, options=options), progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    dev = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    line = (f"| {a.method} {options} keep {a.keep} | {a.layers} blocks, {len(report.rows)} layers | "
            f"{report.model_params_before / 1e9:.2f}B -> {report.model_params_after / 1e9:.2f}B params | "
            f"{secs:.1f} s convert (build {build:.1f} s) | {dev}, bf16, torch {torch.__version__} |")
    print(line, flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = ("# Conversion time\n\nWhole-model conversion, projection included (no calibration data: averaging "
            "projection for ss1, plain SVD for lowrank), timed by `benchmarks/convert_time.py`.\n\n"
            "| method | model | params | time | device |\n|---|---|---|---|---|\n")
    out.write_text((out.read_text() if out.exists() else head) + line + "\n")


if __name__ == "__main__":
    main()
