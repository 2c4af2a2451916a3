"""Run under `torchrun --nproc_per_node=N` (or with N=1 as a plain process) by tests/test_distributed.py.

    dist_worker.py compress OUT   each rank calibrates on its shard; compress (plain and sequential
                                  whitened low-rank); rank 0 saves both models and one layer's statistics
    dist_worker.py heal OUT       healing under `accelerate` (DDP on CPU/gloo); rank 0 saves the losses
                                  and the trained weights
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from conftest import batches, tiny_llama  # noqa: E402

import structlin as sl  # noqa: E402
from structlin import calibrate, distributed, targeting  # noqa: E402


def compress(out: Path):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    world, rank = distributed.world(), distributed.rank()
    data = batches(n=8, b=2, t=16, pad=True)
    shard = data[rank::world]
    m = tiny_llama()
    stats = calibrate.collect(m, targeting.select(m), shard, {"gram", "absmean"}, progress=False)
    if rank == 0:
        s = stats["model.layers.1.mlp.down_proj"]
        torch.save({"gram": s.gram, "tokens": s.tokens, "world": world}, out / "stats.pt")
    for name, seq in (("plain", False), ("sequential", True)):
        m = tiny_llama()
        cfg = sl.CompressConfig(method="lowrank", keep=0.5, options={"variant": "whiten", "sequential": seq})
        sl.compress(m, cfg, calib=shard, progress=False)
        sl.save_pretrained(m, out / name, overwrite=True)
    if world > 1:
        dist.destroy_process_group()


def heal(out: Path):
    from accelerate import Accelerator

    from structlin.heal import heal as run

    acc = Accelerator(cpu=True)
    m = tiny_llama()
    teacher = tiny_llama()
    sl.compress(m, sl.CompressConfig(method="lowrank", keep=0.5, options={"variant": "whiten"}),
                calib=batches(n=8, b=2), progress=False)
    res = run(m, batches(n=8, b=2, seed=7, pad=True), steps=4, teacher=teacher, lr=3e-3,
              grad_accum=2 // acc.num_processes, progress=False, seed=1, accelerator=acc)
    if acc.is_main_process:
        (out / "losses.json").write_text(json.dumps({"losses": res.losses, "world": acc.num_processes}))
        torch.save({n: p.detach() for n, p in m.named_parameters() if p.requires_grad}, out / "weights.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"compress": compress, "heal": heal}[mode](out)
