"""Budget allocation: exactness after rounding, floors, Fisher / measured sensitivity, mixed structures."""
import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import structlin as sl
from structlin import budget, methods, sensitivity
from structlin.calibrate import Stats

from conftest import batches, tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: threads only contend on the shared CI cores
    yield
    torch.set_num_threads(n)


def _curve(g, n):
    """A random decreasing positive error curve of length n (not necessarily convex)."""
    steps = torch.rand(n + 1, generator=g, dtype=torch.float64) ** 3 + 1e-6
    tail = steps.flip(0).cumsum(0).flip(0)
    return (tail[1:] / tail[0]).tolist()


def _check_plan(plan, shapes, choices, keep, floor=0.0):
    used = 0
    for name, (k, n, b) in shapes.items():
        spec = plan.specs[name]
        if spec is None:
            used += budget.dense_params(k, n, b)
            continue
        m = methods.get(plan.methods[name])
        used += m.spec_params(spec)
        if hasattr(spec, "rank"):
            assert spec.rank % budget.tile_quantum(k, n) == 0
    floor_cost = sum(budget.pareto(choices[n], budget.dense_params(*s))[0].params for n, s in shapes.items())
    assert plan.budget == int(keep * plan.targeted + 1e-9)
    # never above the budget, unless even the cheapest form of every layer is (layers with no structure)
    assert used == plan.used <= max(plan.budget, floor_cost)
    assert plan.charged == pytest.approx(used / plan.targeted)
    left = plan.budget - used
    for name, (k, n, b) in shapes.items():  # tight: no layer can move to a larger Pareto point that fits
        front = budget.pareto(choices[name], budget.dense_params(k, n, b))
        cur = budget.dense_params(k, n, b) if plan.specs[name] is None else \
            methods.get(plan.methods[name]).spec_params(plan.specs[name])
        assert all(c.params - cur > left for c in front if c.params > cur)


shape_st = st.tuples(st.integers(8, 1200), st.integers(8, 1200), st.booleans())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(shape_st, min_size=1, max_size=6), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.integers(0, 10**6))
@example([(8, 8, False), (342, 8, False)], 0.1875, 0.0, 0)   # a dense-only layer pushed the uniform start over
def test_curve_allocation_never_exceeds_and_is_tight(shape_list, keep, floor, seed):
    g = torch.Generator().manual_seed(seed)
    lr, ss1 = methods.get("lowrank"), methods.get("ss1")
    shapes = {f"l{i}": s for i, s in enumerate(shape_list)}
    choices = {}
    for name, (k, n, b) in shapes.items():
        cs = []
        for m in (lr, ss1):
            o = m.Options()
            specs = m.candidates(k, n, b, o)
            cs += budget.choices_for(name, (k, n, b), m, o, _curve(g, len(specs)))
        choices[name] = cs
    plan = budget.allocate_curves(shapes, choices, keep, floor=floor * keep)
    _check_plan(plan, shapes, choices, keep)
    starts = sum(next(c.params for c in budget.pareto(choices[n], budget.dense_params(*shapes[n]))
                      if c.params >= floor * keep * budget.dense_params(*shapes[n]) - 1e-9) for n in shapes)
    if starts <= plan.budget:      # floors that fit are honoured
        for name, s in shapes.items():
            got = budget.dense_params(*s) if plan.specs[name] is None else \
                methods.get(plan.methods[name]).spec_params(plan.specs[name])
            assert got >= floor * keep * budget.dense_params(*s) - 1e-6
    uni = budget.allocate_mixed_uniform(shapes, choices, keep)
    assert uni.used <= max(uni.budget, sum(budget.pareto(choices[n], budget.dense_params(*s))[0].params
                                           for n, s in shapes.items()))


def test_mixed_uniform_takes_the_lower_error_structure_at_each_share():
    lr, ss1 = methods.get("lowrank"), methods.get("ss1")
    shapes = {"a": (1024, 1024, False), "b": (1024, 1024, False)}
    choices = {}
    for name, low in (("a", "lowrank"), ("b", "ss1")):
        cs = []
        for m in (lr, ss1):
            specs = m.candidates(1024, 1024, False, m.Options())
            errs = [0.1 * (1 - i / len(specs)) for i in range(len(specs))]
            if m.name != low:
                errs = [10 * e for e in errs]
            cs += budget.choices_for(name, shapes[name], m, m.Options(), errs)
        choices[name] = cs
    plan = budget.allocate_mixed_uniform(shapes, choices, 0.4)
    assert plan.methods == {"a": "lowrank", "b": "ss1"}
    _check_plan(plan, shapes, choices, 0.4)


def _stats(x, name="layer"):
    s = Stats(name, x.shape[1], {"gram", "absmean"})
    s.update(x)
    return s


@pytest.mark.parametrize("variant", ["svd", "asvd", "whiten"])
def test_lowrank_curves_match_projection_exactly(variant):
    g = torch.Generator().manual_seed(3)
    n, k = 24, 40
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(300, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64) * 3
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    cg = a @ a.T / n
    st_ = _stats(x)
    m = methods.get("lowrank")
    opts = m.Options(variant=variant, damp=0.0)
    from structlin.methods.lowrank import LowRankSpec

    specs = [LowRankSpec(k, n, False, r) for r in (2, 5, 11, 17)]
    for cgrad in (None, cg):
        fast = sensitivity.error_curve(m, W, st_, opts, specs, cgrad)
        for spec, got in zip(specs, fast):
            layer = m.project(W, None, spec, st_, opts, torch.Generator())
            want = sensitivity.weighted_error(W, layer.to_dense().double(), st_.gram_mean(), cgrad)
            assert got == pytest.approx(want, rel=1e-7, abs=1e-12)
        assert fast == sorted(fast, reverse=True)


def test_output_grad_grams_match_autograd():
    model = tiny_llama().float()
    data = batches(n=2, t=12, pad=True)
    name = "model.layers.1.mlp.down_proj"
    got = sensitivity.output_grad_grams(model, {name: model.get_submodule(name)}, data, progress=False)[name]
    want, tokens = torch.zeros_like(got), 0
    for b in data:
        held = {}
        h = model.get_submodule(name).register_forward_hook(lambda m, i, o: held.setdefault("y", o))
        ids, mask = b["input_ids"], b["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        with torch.enable_grad():
            model.get_input_embeddings().weight.requires_grad_(True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            n = int((labels[:, 1:] != -100).sum())
            (gy,) = torch.autograd.grad(out.loss * n, held["y"])
        h.remove()
        rows = gy.reshape(-1, gy.shape[-1])[mask.reshape(-1).bool()].double()
        want += rows.T @ rows
        tokens += rows.shape[0]
    want /= tokens
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9 * want.abs().max())
    assert want.abs().max() > 0


class TwoBranch(nn.Module):
    """y = [L1(x), s·L2(x)]: two layers with the same spectrum, one of them barely feeding the loss."""

    def __init__(self, k=96, s=0.02, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(k, k, bias=False), nn.Linear(k, k, bias=False)
        with torch.no_grad():
            w = torch.randn(k, k, generator=g) / k ** 0.5
            self.l1.weight.copy_(w)
            self.l2.weight.copy_(w.flip(0))   # same singular values
        self.s = s

    def forward(self, x, t=None):
        return torch.cat([self.l1(x), self.s * self.l2(x)], -1)


def test_fisher_allocation_beats_uniform_where_layers_matter_unequally():
    g = torch.Generator().manual_seed(1)
    k = 96
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    dense = TwoBranch(k)

    def batch(n):
        x = torch.randn(n, k, generator=g) @ mix
        with torch.no_grad():
            t = dense(x) + 0.1 * torch.randn(n, 2 * k, generator=g)
        return {"x": x, "t": t}

    calib = [batch(256) for _ in range(4)]
    loss_fn = lambda out, b: ((out - b["t"]) ** 2).sum(-1).mean()  # noqa: E731
    fresh = batch(2048)
    losses, ranks = {}, {}
    for allocation in ("uniform", "spectral", "fisher"):
        model = TwoBranch(k)
        cfg = sl.CompressConfig(keep=0.4, targets=["l1", "l2"], allocation=allocation, options={"variant": "whiten"})
        rep = sl.compress(model, cfg, calib=calib, loss_fn=loss_fn, progress=False)
        assert rep.kept_params <= rep.budget
        with torch.no_grad():
            losses[allocation] = loss_fn(model(fresh["x"]), fresh).item()
        ranks[allocation] = [getattr(getattr(model, n), "spec", None) for n in ("l1", "l2")]
    r1, r2 = (s.rank if s is not None else k for s in ranks["fisher"])
    assert r1 > r2                       # the layer the loss listens to gets the parameters
    assert losses["fisher"] < 0.7 * losses["uniform"]
    assert losses["fisher"] < 0.7 * losses["spectral"]


def test_tail_runner_replays_earlier_blocks_exactly_and_measure_is_cached(tmp_path, monkeypatch):
    model = tiny_llama().float()
    data = batches(n=2, t=16)
    targets = sl.targeting.select(model)
    runner = sensitivity.TailRunner(model, data, list(targets))
    name = "model.layers.1.self_attn.o_proj"
    mod = model.get_submodule(name)
    with torch.no_grad():
        mod.weight.mul_(0.5)
    assert runner.block_of(name) == 1
    assert runner.loss(1) == pytest.approx(runner.loss(None), rel=1e-6)
    assert abs(runner.loss(1) - runner.base) > 1e-6
    with torch.no_grad():
        mod.weight.mul_(2.0)

    m = methods.get("lowrank")
    opts = m.Options(variant="whiten")
    stats = sl.calibrate.collect(model, targets, data, {"gram"}, progress=False)
    first = sensitivity.measure(model, targets, m, opts, stats, data, cache_dir=tmp_path, progress=False)
    assert set(first) == set(targets)
    assert all(len(v["params"]) == len(v["delta"]) >= 1 for v in first.values())
    monkeypatch.setattr(sensitivity, "TailRunner", None)   # a second call must not run the model
    again = sensitivity.measure(model, targets, m, opts, stats, data, cache_dir=tmp_path, progress=False)
    assert again == first
    assert len(list(tmp_path.glob("lowrank-*.json"))) == 1


class Branches(nn.Sequential):
    """Layers applied side by side to the same input (each sees full-rank inputs)."""

    def forward(self, x):
        return sum(layer(x) for layer in self)


def test_espace_spectral_beats_uniform_on_unequal_spectra():
    """Generic (projected) error curves: ESPACE's output projection through the spectral allocator."""
    g = torch.Generator().manual_seed(0)
    model = Branches(nn.Linear(128, 128, bias=False), nn.Linear(128, 128, bias=False))
    with torch.no_grad():
        low = torch.randn(128, 16, generator=g) @ torch.randn(16, 128, generator=g) / 16
        model[0].weight.copy_(low + 1e-3 * torch.randn(128, 128, generator=g))
        model[1].weight.copy_(torch.randn(128, 128, generator=g) / 128 ** 0.5)
    calib = [torch.randn(64, 128, generator=g) for _ in range(8)]
    errors = {}
    for allocation in ("uniform", "spectral"):
        m = Branches(*[nn.Linear(128, 128, bias=False) for _ in range(2)])
        m.load_state_dict(model.state_dict())
        cfg = sl.CompressConfig(method="espace", keep=0.4, targets=["0", "1"], allocation=allocation,
                                options={"calibrator": "output"})
        rep = sl.compress(m, cfg, calib=calib, progress=False)
        assert rep.kept_params <= rep.budget
        errors[allocation] = sum(r.output_error ** 2 for r in rep.rows)
    assert errors["spectral"] < 0.8 * errors["uniform"]


def test_mixed_config_round_trips_saves_and_reloads(tmp_path):
    cfg = sl.CompressConfig(method="mixed", keep=0.5, allocation="fisher", floor=0.5,
                            options={"methods": {"lowrank": {"variant": "whiten"}, "ss1": {}}})
    again = sl.CompressConfig.from_json(cfg.to_json())
    assert again == cfg and [n for n, _ in again.method_list()] == ["lowrank", "ss1"]
    assert sl.CompressConfig(method="mixed", options={"methods": ["lowrank", "ss1"]}).method_list()[1][0] == "ss1"
    model = tiny_llama()
    rep = sl.compress(model, cfg, calib=batches(n=4, t=32), progress=False)
    assert rep.kept_params <= rep.budget
    kinds = {r.structure.split()[0] for r in rep.rows}
    assert kinds <= {"lowrank", "ss1", "dense"} and kinds & {"lowrank", "ss1"}
    sl.save_pretrained(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "structlin.json").read_text())
    assert meta["history"][-1]["method"] == "mixed"
    loaded = sl.from_pretrained(tmp_path / "m")
    assert sl.io.structure_of(loaded) == sl.io.structure_of(model)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("kw,needle", [
    (dict(method="mixed", options={"methods": ["lowrank", "nope"]}), "unknown method 'nope'"),
    (dict(method="mixed", options={"methods": []}), "method 'mixed' needs options"),
    (dict(method="mixed", options={"methods": {"lowrank": {"rank": 3}}}), "unknown option(s) ['rank']"),
    (dict(method="mixed", options={"other": 1}), "unknown option(s) ['other'] for method 'mixed'"),
    (dict(allocation="greedy"), "allocation must be one of"),
    (dict(floor=1.5), "floor must be a number in [0, 1]"),
])
def test_bad_allocation_configs_are_clear_errors(kw, needle):
    with pytest.raises(sl.ConfigError) as e:
        sl.CompressConfig(**kw)
    assert needle in str(e.value)
