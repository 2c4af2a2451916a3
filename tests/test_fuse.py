"""Sibling fusion: q/k/v and gate/up run as one wider layer and give the same logits."""
import copy

import pytest
import torch

import structlin as sl
from structlin.fuse import SiblingSlice, find_siblings, fuse_siblings

from conftest import batches, tiny_llama


@pytest.mark.parametrize("method,opts,kind", [(None, {}, "dense"), ("lowrank", {"variant": "whiten"}, "lowrank"),
                                              ("ss1", {"r": 2}, "ss1"), ("espace", {}, "espace")])
def test_fused_model_gives_the_same_logits(method, opts, kind):
    model = tiny_llama()
    if method:
        sl.compress(model, sl.CompressConfig(method=method, keep=0.5, options=opts), calib=batches(n=4, b=4),
                    progress=False)
    x = batches(n=1, seed=3)[0]
    groups = find_siblings(model, x)
    names = sorted(tuple(sorted(n.rsplit(".", 1)[-1] for n in g)) for g in groups)
    assert names == [("gate_proj", "up_proj")] * 2 + [("k_proj", "q_proj", "v_proj")] * 2
    ref = copy.deepcopy(model)
    fused = fuse_siblings(model, x)
    assert len(fused) == 4 and all(k.startswith(kind) for k, _ in fused)
    assert isinstance(model.model.layers[0].self_attn.k_proj, SiblingSlice)
    calls = []
    group = model.model.layers[0].self_attn.q_proj.group
    group.stacked.register_forward_hook(lambda *a: calls.append(1))
    x2 = batches(n=1, seed=4, b=3)[0]                                # fresh random input
    with torch.no_grad():
        torch.testing.assert_close(model(**x2).logits, ref(**x2).logits, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1                                           # one wide call serves q, k and v


def test_mixed_groups_are_left_alone():
    model = tiny_llama()
    sl.compress(model, sl.CompressConfig(method="lowrank", keep=0.5, targets=["q_proj"], options={"variant": "svd"}),
                progress=False)
    fused = fuse_siblings(model, batches(n=1)[0])
    assert [k for k, _ in fused] == ["dense", "dense"]                # only gate/up; q (low-rank) + k, v (dense) stay


def test_bench_model_command_runs_on_cpu(tmp_path, capsys):
    """The whole-model benchmark's pipeline (build, structure, fuse, check, time, report) on a tiny preset."""
    import json

    from structlin.cli import main

    assert main(["bench", "model", "--preset", "tiny", "--methods", "lowrank,ss1", "--prefill", "1x16",
                 "--decode", "1", "--context", "16", "--dtype", "float32", "--allow-cpu", "--quick",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "model.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "dense (served)", "lowrank", "lowrank (served)", "ss1", "ss1 (served)"}
    assert all(r["rel_err"] < 1e-4 and r["rel_err_fp32"] < 1e-5 for r in rows.values())  # fast path == reference
    assert 0.45 < rows["lowrank"]["flops_ratio"] <= 0.5 and rows["lowrank"]["prefill"]["1x16"] > 0
    assert (tmp_path / "model.png").stat().st_size > 0 and "| lowrank (served) |" in (tmp_path / "model.md").read_text()
