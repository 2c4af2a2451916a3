"""Healing: distillation losses, the training loop (resume = uninterrupted), hooks in HF Trainer, LoRA."""
import copy
import math

import pytest
import torch

import structlin as sl
from structlin.heal import TrainingHook, heal, hidden_mse, kl_distill
from structlin.heal.loop import cosine_schedule, lm_loss, micro_batch_order
from structlin.heal.lora import LoRAStructured, add_lora, merge_lora

from conftest import batches, tiny_llama


def test_kl_distill_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    T = 2.0
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            zs = [v / T for v in s[b, i].double().tolist()]
            zt = [v / T for v in t[b, i].double().tolist()]
            ls = [z - math.log(sum(math.exp(u) for u in zs)) for z in zs]
            lt = [z - math.log(sum(math.exp(u) for u in zt)) for z in zt]
            total += sum(math.exp(a) * (a - c) for a, c in zip(lt, ls))
            count += 1
    expected = T * T * total / count
    assert kl_distill(s, t, T, mask).item() == pytest.approx(expected, rel=1e-5)
    assert kl_distill(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_mse_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(2, 4, 3, generator=g) for _ in range(2)]
    ht = [torch.randn(2, 4, 3, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    per_layer = []
    for a, b in zip(hs, ht):
        vals = [((a[i, j] - b[i, j]) ** 2).mean().item() for i in range(2) for j in range(4) if mask[i, j]]
        per_layer.append(sum(vals) / len(vals))
    assert hidden_mse(hs, ht, mask).item() == pytest.approx(sum(per_layer) / 2, rel=1e-6)


def test_lm_loss_ignores_padding():
    g = torch.Generator().manual_seed(2)
    logits, ids = torch.randn(1, 5, 7, generator=g), torch.randint(0, 7, (1, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    lp = torch.log_softmax(logits.double(), -1)
    expected = -(lp[0, 0, ids[0, 1]] + lp[0, 1, ids[0, 2]]) / 2
    assert lm_loss(logits, ids, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_schedule_and_order():
    assert cosine_schedule(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_schedule(100, 100, 10, 0.1) == pytest.approx(0.1)
    full = micro_batch_order(5, 12, seed=3)
    assert sorted(full[:5]) == list(range(5)) and sorted(full[5:10]) == list(range(5))
    assert micro_batch_order(5, 4, seed=3, start=7) == full[7:11]


def _compressed(method="lowrank", keep=0.5, **opts):
    model = tiny_llama()
    teacher = copy.deepcopy(model)
    sl.compress(model, sl.CompressConfig(method=method, keep=keep, options=opts), calib=batches(n=8, b=4),
                progress=False)
    return model, teacher


class Counter(TrainingHook):
    """Records what hooks see; its state must survive a resume."""

    def __init__(self):
        self.calls, self.grad_seen = 0, []

    def after_backward(self, model, step):
        self.grad_seen.append(any(p.grad is not None for p in model.parameters()))

    def after_optimizer_step(self, model, step):
        assert step == self.calls
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_heal_resume_equals_uninterrupted(tmp_path):
    data = batches(n=6, b=2, seed=5, pad=True)
    kw = dict(steps=7, lr=3e-3, grad_accum=2, hidden_weight=0.5, progress=False, seed=4, checkpoint_every=2)

    a, teacher = _compressed()
    ha = Counter()
    full = heal(a, data, teacher=teacher, hooks=[ha], checkpoint_dir=tmp_path / "a", **kw)

    b, _ = _compressed()
    hb = Counter()
    part = heal(b, data, teacher=teacher, hooks=[hb], checkpoint_dir=tmp_path / "b", stop_after=5, **kw)
    assert part.steps == 5
    b2, _ = _compressed()                          # a fresh process: the model as compressed, new hook
    hb2 = Counter()
    rest = heal(b2, data, teacher=teacher, hooks=[hb2], checkpoint_dir=tmp_path / "b", **kw)
    assert rest.resumed_from == 4 and rest.steps == 7
    assert hb2.calls == ha.calls == 7
    assert rest.losses == full.losses
    for (n, p), (_, q) in zip(a.named_parameters(), b2.named_parameters()):
        assert torch.equal(p, q), n
    assert all(ha.grad_seen)
    assert full.losses[-1] < full.losses[0]


def test_heal_errors():
    model, teacher = _compressed()
    with pytest.raises(ValueError, match="teacher"):
        heal(model, batches(n=2), steps=1, hidden_weight=1.0, progress=False)
    with pytest.raises(ValueError, match="steps"):
        heal(model, batches(n=2), steps=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        heal(model, [], steps=1, progress=False)


def test_heal_refuses_a_checkpoint_of_another_run(tmp_path):
    model, teacher = _compressed()
    heal(model, batches(n=2), steps=2, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(ValueError, match="different run"):
        heal(model, batches(n=2), steps=3, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)


def test_hooks_run_inside_hf_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from structlin.heal import make_optimizer
    from structlin.heal.callback import StructlinCallback

    model, _ = _compressed()
    hook = Counter()
    rows = [{"input_ids": b["input_ids"][0], "labels": b["input_ids"][0]} for b in batches(n=8, seed=6)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no")
    opt = make_optimizer(model, [hook], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[StructlinCallback([hook])],
                                   optimizers=(opt, None))
    trainer.train()
    assert hook.calls == 3 and hook.grad_seen == [True] * 3
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("method,opts", [("lowrank", {"variant": "whiten"}), ("ss1", {"r": 2}),
                                         ("ss1", {"r": 2, "scheme": "table"}), ("espace", {})])
def test_lora_on_structure_trains_and_merges_exactly(method, opts):
    model, _ = _compressed(method, keep=0.6, **opts) if method != "ss1" else _compressed(method, keep=0.5, **opts)
    params_before = sum(p.numel() for p in model.parameters())
    x = batches(n=1, seed=9)[0]
    with torch.no_grad():
        y0 = model(**x).logits
    adapters = add_lora(model, rank=4)
    assert adapters and all(isinstance(a, LoRAStructured) for a in adapters.values())
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, y0, atol=1e-5)      # B = 0: the adapter starts as identity
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    res = heal(model, batches(n=4, seed=10), steps=6, lr=5e-3, train="none",
               hooks=[_Unfreeze()], progress=False)
    assert res.losses[-1] < res.losses[0]
    with torch.no_grad():
        y_adapted = model(**x).logits
    assert not torch.allclose(y_adapted, y0, atol=1e-4)
    assert merge_lora(model) == len(adapters)
    assert not any(isinstance(m, LoRAStructured) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == params_before
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, y_adapted, atol=2e-5, rtol=1e-4)


class _Unfreeze(TrainingHook):
    """Trains only the LoRA factors (train="none" + this group)."""

    def param_groups(self, model):
        return [{"params": [p for n, p in model.named_parameters() if "lora_" in n]}]


def test_lora_refuses_structures_without_a_split():
    model, _ = _compressed("ss1", keep=0.5, r=2, scheme="blockwise")
    with pytest.raises(ValueError, match="blockwise"):
        add_lora(model)
    with pytest.raises(ValueError, match="no structured layer"):
        add_lora(_compressed()[0], targets=["nothing_here"])


def test_peft_lora_targets_the_dense_factors_and_merges():
    peft = pytest.importorskip("peft")
    model, _ = _compressed("lowrank", keep=0.5, variant="whiten")
    structure = sl.io.structure_of(model) if hasattr(sl, "io") else None
    x = batches(n=1, seed=11)[0]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    for b in batches(n=3, seed=12):
        out = pm(**b, labels=b["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        y_adapted = pm(**x).logits
    merged = pm.merge_and_unload()
    from structlin.io import structure_of
    from structlin.methods.lowrank import LowRankLinear
    assert all(isinstance(m, LowRankLinear) for n, m in merged.named_modules() if n.endswith(("q_proj", "up_proj")))
    if structure is not None:
        assert structure_of(merged) == structure                     # same specs: the structure survived
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, y_adapted, atol=2e-5, rtol=1e-4)
