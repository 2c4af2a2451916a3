"""Multi-process runs on CPU (gloo) equal single-process runs on the same data.

The workers are launched the way users launch them, with `torchrun --nproc_per_node=2`
(`tests/dist_worker.py`); the single-process reference is the same script without torchrun.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import structlin as sl

WORKER = Path(__file__).parent / "dist_worker.py"


def _run(mode: str, out: Path, nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), mode, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_calibration_and_compression_equal_single_process(tmp_path):
    _run("compress", tmp_path / "one", 1)
    _run("compress", tmp_path / "two", 2)
    a, b = torch.load(tmp_path / "one" / "stats.pt"), torch.load(tmp_path / "two" / "stats.pt")
    assert (a["world"], b["world"]) == (1, 2)
    assert a["tokens"] == b["tokens"]
    torch.testing.assert_close(b["gram"], a["gram"], rtol=1e-12, atol=1e-12)
    for name in ("plain", "sequential"):
        ma, mb = sl.from_pretrained(tmp_path / "one" / name), sl.from_pretrained(tmp_path / "two" / name)
        assert sl.io.structure_of(ma) == sl.io.structure_of(mb)
        for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
            # float64 projections of statistics equal to float64 rounding, stored in float32
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")
    # only rank 0 wrote: no stray temporary directories from the other rank
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_accelerate_healing_matches_single_process_loss_curve(tmp_path):
    pytest.importorskip("accelerate")
    _run("heal", tmp_path / "one", 1)
    _run("heal", tmp_path / "two", 2)
    ra = json.loads((tmp_path / "one" / "losses.json").read_text())
    rb = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert (ra["world"], rb["world"]) == (1, 2)
    la, lb = ra["losses"], rb["losses"]
    assert len(la) == len(lb) == 4
    assert lb == pytest.approx(la, rel=1e-5)
    wa, wb = torch.load(tmp_path / "one" / "weights.pt"), torch.load(tmp_path / "two" / "weights.pt")
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-4, atol=1e-5, msg=n)
