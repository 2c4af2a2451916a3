"""Calibration statistics are all-reduced across a torch.distributed process group (gloo, CPU)."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def _worker(rank, world, init, out):
    from conftest import batches, tiny_llama

    from structlin import calibrate, targeting

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        m = tiny_llama()
        shard = batches(n=4, pad=True)[rank::world]
        stats = calibrate.collect(m, targeting.select(m), shard, {"gram", "absmean"}, progress=False)
        if rank == 0:
            s = stats["model.layers.1.mlp.down_proj"]
            torch.save({"gram": s.gram, "abs": s.abs_sum, "tokens": s.tokens}, out)
    finally:
        dist.destroy_process_group()


def test_two_process_statistics_equal_single_process(tmp_path):
    from conftest import batches, tiny_llama

    from structlin import calibrate, targeting

    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2, join=True)
    got = torch.load(out)
    m = tiny_llama()
    ref = calibrate.collect(m, targeting.select(m), batches(n=4, pad=True), {"gram", "absmean"},
                            progress=False)["model.layers.1.mlp.down_proj"]
    assert got["tokens"] == ref.tokens
    assert torch.allclose(got["gram"], ref.gram, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got["abs"], ref.abs_sum, rtol=1e-12, atol=1e-12)
