"""GPU check of sequential compression with the model on the CPU and each block run on the GPU.

    python benchmarks/offload_check.py     # prints max weight difference and peak GPU memory

A Llama with 4 blocks of hidden 1024 stays on the CPU; `compress(..., exec_device="cuda", offload=True)`
moves one block at a time to the GPU. The result must equal the all-CPU run to float32 rounding of the
float64 projections, and the GPU must never hold more than about one block plus one batch.
"""
import copy
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import structlin as sl  # noqa: E402

cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(1)
calib = [{"input_ids": torch.randint(0, 2048, (2, 256), generator=g)} for _ in range(4)]
c = sl.CompressConfig(method="lowrank", keep=0.5, options={"variant": "whiten", "sequential": True})
a, b = model, copy.deepcopy(model)
sl.compress(a, c, calib=calib, progress=False)
torch.cuda.reset_peak_memory_stats()
sl.compress(b, c, calib=calib, progress=False, exec_device="cuda", offload=True)
peak = torch.cuda.max_memory_allocated() / 2**20
assert next(b.parameters()).device.type == "cpu"
# compare what each layer computes (singular vectors may differ in sign between CPU and GPU SVDs)
from structlin.methods import StructuredLinear  # noqa: E402

diff = 0.0
for (n, la), lb in zip([(n, m) for n, m in a.named_modules() if isinstance(m, StructuredLinear)],
                       [m for m in b.modules() if isinstance(m, StructuredLinear)]):
    wa, wb = la.to_dense().double(), lb.to_dense().double()
    diff = max(diff, ((wa - wb).norm() / wa.norm()).item())
with torch.no_grad():
    ya, yb = a(**calib[0]).logits, b(**calib[0]).logits
logit_diff = ((ya - yb).norm() / ya.norm()).item()
block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**20
total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(f"offload check: max relative layer difference {diff:.2e}, logits {logit_diff:.2e}; peak GPU memory {peak:.0f} MiB "
      f"(one dense block {block:.0f} MiB, whole model {total:.0f} MiB)")
assert diff < 1e-4 and logit_diff < 1e-4, (diff, logit_diff)
