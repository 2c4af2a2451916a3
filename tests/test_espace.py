"""ESPACE: calibrator statistics against direct float64 computations, projection math, layer/export,
compress + save/load round trip, and the nl refusal on a model without a loss."""
import pytest
import torch
import transformers

import structlin as sl
import structlin.methods.espace as es
from structlin.errors import CalibrationError

from conftest import batches, tiny_llama


def ragged_batches(n=4, vocab=96, seed=1):
    """Batches of different sizes with left and right padding: token weighting and masking matter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, t = 1 + i % 3, 8 + 4 * i
        ids = torch.randint(0, vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 3 - i:] = 0          # right padding
        if b > 1:
            mask[1, :2] = 0              # left padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def direct(model, names, batches, holdout):
    """Per module: per-batch (x rows, g rows, split) by plain autograd, padding removed, float64."""
    rec = {n: [] for n in names}
    for i, batch in enumerate(batches):
        views = {}

        def pre(name):
            def hook(mod, args):
                v = args[0].view_as(args[0])     # this module's share of ∂loss/∂x (graph kept intact)
                views[name] = v
                return (v,)
            return hook

        hs = [model.get_submodule(n).register_forward_pre_hook(pre(n)) for n in names]
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        loss = model(**batch, labels=labels, use_cache=False).loss
        for h in hs:
            h.remove()
        grads = torch.autograd.grad(loss, [views[n] for n in names])
        keep = batch["attention_mask"].bool().reshape(-1)
        n_pred = int((labels[:, 1:] != -100).sum())
        for n, g in zip(names, grads):
            x = views[n].detach().reshape(-1, g.shape[-1])[keep].double()
            rec[n].append((x, g.reshape(-1, g.shape[-1])[keep].double() * n_pred,
                           int(holdout and i % holdout == holdout - 1)))
    return rec


def unit(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)   # zero rows (e.g. unscored last token) stay 0


def test_calibrator_statistics_match_direct_float64():
    model = tiny_llama()
    cal = ragged_batches()
    cfg = sl.CompressConfig(method="espace", options={"calibrator": "nl", "holdout": 3})
    stats = es.calibrate(model, cfg, cal, progress=False)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    rec = direct(model, names, cal, holdout=3)
    q, k = stats[names[0]], stats[names[1]]
    assert q.moments is k.moments and names[1] in q.modules      # q/k/v share one input
    for name in names:
        st, batches = stats[name], rec[name]
        for split in ("fit", "hold", "all"):
            sel = [b for b in batches if split == "all" or b[2] == {"fit": 0, "hold": 1}[split]]
            X = torch.cat([b[0] for b in sel])
            T = X.shape[0]
            torch.testing.assert_close(st.mean("gram", split), X.T @ X / T, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(st.mean("l2", split), unit(X).T @ unit(X) / T, rtol=1e-10, atol=1e-12)
            nl = nl2 = 0
            for x, g, _ in sel:      # Σ_b T_b (C_x^b C_g^b + C_g^b C_x^b) / Σ_b T_b
                cx, cg = x.T @ x / len(x), g.T @ g / len(x)
                nl = nl + len(x) * (cx @ cg + cg @ cx)
                cx, cg = unit(x).T @ unit(x) / len(x), unit(g).T @ unit(g) / len(x)
                nl2 = nl2 + len(x) * (cx @ cg + cg @ cx)
            torch.testing.assert_close(st.mean("nl", split), nl / T, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(st.mean("nl_l2", split), nl2 / T, rtol=1e-6, atol=1e-9)
        # GO calibrators from the weight and the statistics
        w = model.get_submodule(name).weight.detach().double()
        cx = st.mean("gram")
        cw = w.T @ w / w.shape[0]
        torch.testing.assert_close(es.calibrator_matrix("go", w, st), cw @ cx + cx @ cw)
        wn = unit(w)
        cw, cx = wn.T @ wn / w.shape[0], st.mean("l2")
        torch.testing.assert_close(es.calibrator_matrix("go_l2", w, st), cw @ cx + cx @ cw)
        assert st.tokens == sum(len(b[0]) for b in batches)
        torch.testing.assert_close(st.gram, sum(b[0].T @ b[0] for b in batches))
    # nl is per module (each module's own share of the gradient), not per shared input
    assert not torch.allclose(q.mean("nl"), k.mean("nl"))


def correlated(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64) * torch.logspace(0, -2, k, dtype=torch.float64)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ a


def test_mse_residual_is_sum_of_discarded_eigenvalues():
    x = correlated(3000, 40)
    C = x.T @ x / len(x)
    P, lam = es.top_eigvecs(C, 12)
    resid = ((x - x @ P @ P.T) ** 2).sum(1).mean()
    all_lam = torch.linalg.eigvalsh(C)
    torch.testing.assert_close(resid, all_lam.sum() - lam.sum(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resid, torch.sort(all_lam).values[:28].sum(), rtol=1e-9, atol=1e-12)


def test_indefinite_order_and_output_side_optimality():
    x = correlated(2000, 48, seed=1)
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    class St:                       # the plain pipeline's Stats: Gram only
        name = "t"
        gram = x.T @ x

        def gram_mean(self):
            return self.gram / len(x)

    st, G = St(), St().gram_mean()
    S = es.calibrator_matrix("go", w, st)
    assert torch.linalg.eigvalsh(S).min() < 0         # GO is indefinite
    P_s, lam_s = es.top_eigvecs(S, 8, "signed")
    P_a, lam_a = es.top_eigvecs(S, 8, "abs")
    assert (lam_s.diff() <= 0).all() and (lam_a.abs().diff() <= 0).all()
    errs = {c: es.output_error(w, *es.fit(w, 8, c, "abs", st), G) for c in ("mse", "go", "output")}
    # output-side PCA is the exact optimum among rank-8 maps (Eckart–Young on W C^½)
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(G))
    assert abs(errs["output"] ** 2 - ((s[8:] ** 2).sum() / (s ** 2).sum()).item()) < 1e-9
    assert errs["output"] <= min(errs.values()) + 1e-12
    with pytest.raises(CalibrationError, match="espace.calibrate"):
        es.fit(w, 8, "mse_l2", "abs", st)


def test_layer_forward_dense_and_export_agree():
    g = torch.Generator().manual_seed(0)
    spec = es.EspaceSpec(48, 40, True, 16)
    layer = es.EspaceLinear(spec)
    with torch.no_grad():
        layer.P.copy_(torch.linalg.qr(torch.randn(48, 16, generator=g))[0])
        layer.proj_out.weight.copy_(torch.randn(40, 16, generator=g))
        layer.proj_out.bias.copy_(torch.randn(40, generator=g))
    x = torch.randn(3, 5, 48, generator=g)
    y = layer(x)
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.proj_out.bias, rtol=1e-5, atol=1e-5)
    exp = layer.export()
    assert all(type(m) is torch.nn.Linear for m in exp) and exp[0].bias is None
    torch.testing.assert_close(exp(x), y)
    method = sl.methods.get("espace")
    assert layer.num_params() == method.spec_params(spec) == 16 * (48 + 40) + 40
    assert "P" in layer.state_dict() and all(p is not layer.P for p in layer.parameters())
    # candidates shrink the layer and use the tile quantum
    cands = method.candidates(576, 1536, False, method.Options())
    assert cands and all(c.rank % 64 == 0 and method.spec_params(c) < 576 * 1536 for c in cands)


def test_compress_auto_and_save_load_roundtrip(tmp_path):
    model = tiny_llama()
    cal = ragged_batches(n=8, seed=3)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    cfg = sl.CompressConfig(method="espace", keep=0.6, options={"calibrator": "auto", "auto_nl": False})
    stats = es.calibrate(model, cfg, cal, progress=False)
    rep = sl.compress(model, cfg, stats=stats, progress=False)
    assert rep.kept_params <= rep.budget
    layers = [m for m in model.modules() if isinstance(m, es.EspaceLinear)]
    assert layers
    for m in layers:
        scores = m.espace_choice["heldout_error"]
        assert f"{m.espace_choice['calibrator']}/{m.espace_choice['order']}" == min(scores, key=scores.get)
    with torch.no_grad():
        before = model(ids).logits
    sl.save_pretrained(model, tmp_path / "out")
    loaded = sl.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert isinstance(loaded.get_submodule(rep.rows[0].name), es.EspaceLinear) or rep.rows[0].structure == "dense"
    # the plain pipeline (input Gram only) serves mse / go / output
    m2 = tiny_llama()
    sl.compress(m2, sl.CompressConfig(method="espace", keep=0.6, options={"calibrator": "go"}), calib=cal,
                progress=False)
    assert any(isinstance(m, es.EspaceLinear) for m in m2.modules())


def test_nl_without_loss_is_refused():
    base = transformers.LlamaModel(tiny_llama().config).eval()       # no LM head, no labels, no loss
    cfg = sl.CompressConfig(method="espace", options={"calibrator": "nl"})
    with pytest.raises(CalibrationError, match="loss_fn"):
        es.calibrate(base, cfg, ragged_batches(2), progress=False)
    # with a loss_fn it runs
    st = es.calibrate(base, cfg, ragged_batches(2), loss_fn=lambda out, b: out.last_hidden_state.pow(2).mean(),
                      progress=False)
    assert all(s.has("nl") for s in st.values())


# ------------------------------------------------------------------------------------------- shared P

def test_shared_p_accounting_save_load_and_copies(tmp_path):
    import copy

    from structlin.modules import set_submodule  # noqa: F401  (the pipeline's own replacement path)

    model = tiny_llama()
    cal = ragged_batches(n=6, seed=4)
    cfg = sl.CompressConfig(method="espace", keep=0.5, options={"calibrator": "mse"})
    rep = sl.compress(model, cfg, calib=cal, progress=False)
    pre = "model.layers.0."
    q, k, v = (model.get_submodule(pre + f"self_attn.{n}_proj") for n in "qkv")
    gate, up = model.get_submodule(pre + "mlp.gate_proj"), model.get_submodule(pre + "mlp.up_proj")
    assert all(isinstance(m, es.EspaceLinear) for m in (q, k, v, gate, up))
    assert q.spec.owns_p and not k.spec.owns_p and k.spec.p_owner == pre + "self_attn.q_proj"
    assert k.P is q.P and v.P is q.P and up.P is gate.P            # one tensor per group
    assert "P" in q.state_dict() and "P" not in k.state_dict()
    # exact charge: the group stores L·(K + Σ N) once; the plan equals what is stored and fits the budget
    L, K = q.spec.rank, q.in_features
    assert q.num_params() + k.num_params() + v.num_params() == L * (K + q.out_features + k.out_features
                                                                   + v.out_features)
    method = sl.methods.get("espace")
    targets = [r.name for r in rep.rows]
    stored = {}
    for name in targets:
        m = model.get_submodule(name)
        for t in list(m.parameters()) + ([m.P] if isinstance(m, es.EspaceLinear) else []):
            stored[t.data_ptr()] = t.numel()
    assert sum(stored.values()) == rep.kept_params <= rep.budget
    assert rep.kept_params == sum(method.spec_params(m.spec) if isinstance(m, es.EspaceLinear) else
                                  m.weight.numel() for m in map(model.get_submodule, targets))
    # sharing frees budget: per-layer P at the same keep gives the group a smaller (or equal) rank
    m2 = tiny_llama()
    sl.compress(m2, sl.CompressConfig(method="espace", keep=0.5, options={"calibrator": "mse", "share": False}),
                calib=cal, progress=False)
    assert m2.get_submodule(pre + "self_attn.k_proj").P is not m2.get_submodule(pre + "self_attn.q_proj").P
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).logits
        # deepcopy and dtype casts keep one P per group
        cp = copy.deepcopy(model)
        assert cp.get_submodule(pre + "self_attn.k_proj").P is cp.get_submodule(pre + "self_attn.q_proj").P
        torch.testing.assert_close(cp(ids).logits, ref, rtol=0, atol=0)
        cp.double()
        assert cp.get_submodule(pre + "self_attn.v_proj").P.dtype == torch.float64
        sl.save_pretrained(model, tmp_path / "out")
        loaded = sl.from_pretrained(tmp_path / "out")
        assert loaded.get_submodule(pre + "mlp.up_proj").P is loaded.get_submodule(pre + "mlp.gate_proj").P
        assert torch.equal(loaded(ids).logits, ref)
    # an unlinked shared layer says what to do
    lone = es.EspaceLinear(k.spec)
    with pytest.raises(CalibrationError, match="link_shared"):
        lone(torch.randn(2, K))


def test_joint_whitened_beats_separate_whitened_lowrank_at_equal_params():
    """For every shared group of a tiny model, the joint whitened P (rank L, charged L·(K + Σ N)) has a lower
    summed output error Σ_j ‖(W_j − Ŵ_j) X‖² than separate whitened low-rank layers with the best split of
    ranks whose params fit the same budget (Eckart–Young per layer: the discarded whitened σ²)."""
    import itertools

    model = tiny_llama()
    cfg = sl.CompressConfig(method="espace", options={"calibrator": "output"})
    st = es.calibrate(model, cfg, ragged_batches(n=6, seed=5), progress=False)
    groups = es.input_groups(st)
    assert len(groups) == 4 and all(len(g) in (2, 3) for g in groups)      # q/k/v and gate/up in 2 blocks
    for group in groups:
        s0 = st[group[0]]
        W = es.group_weights(s0)
        C = s0.mean("gram")
        R = torch.linalg.cholesky(C)
        sig2 = {n: torch.linalg.svdvals(w @ R) ** 2 for n, w in W.items()}
        K = C.shape[0]
        for L in (8, 16):
            P, Bts = es.group_fit(W, L, "output", "signed", s0)
            torch.testing.assert_close(P.T @ P, torch.eye(L, dtype=P.dtype), rtol=0, atol=1e-10)
            joint = sum(((w - Bts[n] @ P.T) @ C * (w - Bts[n] @ P.T)).sum().item() for n, w in W.items())
            # the joint error is the tail of the stacked whitened spectrum (exact optimum for a shared P)
            tail = (torch.linalg.svdvals(torch.cat(list(W.values())) @ R) ** 2)[L:].sum().item()
            assert abs(joint - tail) <= 1e-8 * tail
            budget = L * (K + sum(w.shape[0] for w in W.values()))
            best = min(sum(sig2[n][r:].sum().item() for r, n in zip(rs, W))
                       for rs in itertools.product(*[range(min(K, w.shape[0]) + 1) for w in W.values()])
                       if sum(r * (K + w.shape[0]) for r, w in zip(rs, W.values())) <= budget)
            assert joint < best
    # and through the pipeline: auto (with the joint candidates) beats whitened low-rank in summed output error
    errs = {}
    for label, c in [("lowrank", sl.CompressConfig(method="lowrank", keep=0.5, options={"variant": "whiten"})),
                     ("auto", sl.CompressConfig(method="espace", keep=0.5, options={"calibrator": "auto"}))]:
        m = tiny_llama()
        rep = sl.compress(m, c, stats=st if label == "auto" else None,
                          calib=None if label == "auto" else ragged_batches(n=6, seed=5), progress=False)
        assert rep.kept_params <= rep.budget
        errs[label] = sum(r.output_error ** 2 * ((st[r.name].mean("gram") @ es.group_weights(st[r.name])[r.name].T)
                          * es.group_weights(st[r.name])[r.name].T).sum().item() for r in rep.rows)
    assert errs["auto"] < errs["lowrank"]


def test_bf16_export_refits_b_and_statistics_to_numpy():
    g = torch.Generator().manual_seed(0)
    spec = es.EspaceSpec(96, 80, True, 64)
    layer = es.EspaceLinear(spec, dtype=torch.float64)
    with torch.no_grad():
        layer.P.copy_(torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64))[0])
        layer.proj_out.weight.copy_(torch.randn(80, 64, generator=g, dtype=torch.float64))
        layer.proj_out.bias.copy_(torch.randn(80, generator=g, dtype=torch.float64))
    w_hat = layer.to_dense()
    exp = layer.export(torch.bfloat16)
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in exp)
    refit = exp[1].weight.double() @ exp[0].weight.double()
    naive = layer.proj_out.weight.to(torch.bfloat16).double() @ layer.P.T.to(torch.bfloat16).double()
    b_only = layer.proj_out.weight.to(torch.bfloat16).double() @ layer.P.T      # rounding of B alone (floor)
    e_refit, e_naive, e_floor = ((a - w_hat).norm() / w_hat.norm() for a in (refit, naive, b_only))
    # the naive cast adds P's rounding to B's; the refit removes its in-span part (here L/K = 2/3 of it)
    assert e_refit < 0.9 * e_naive and e_refit < 1.25 * e_floor
    x = torch.randn(4, 96, generator=g, dtype=torch.float64)
    y = exp(x.to(torch.bfloat16)).double()
    torch.testing.assert_close(y, layer(x), rtol=0.05, atol=0.1)
    # statistics and eigenvalues for plotting
    st = es.calibrate(tiny_llama(), sl.CompressConfig(method="espace"), ragged_batches(n=3), progress=False)
    arr = st["model.layers.0.mlp.down_proj"].to_numpy()
    import numpy as np

    assert isinstance(arr["gram"], np.ndarray) and arr["gram"].dtype == np.float64
    assert np.all(np.diff(arr["eig_gram"]) <= 1e-12)
    np.testing.assert_allclose(np.sort(arr["eig_gram"]), np.linalg.eigvalsh(arr["gram"]), rtol=1e-9, atol=1e-12)


def test_training_forms_b_default_and_full_w_parity():
    from structlin.heal.optim import trainable_parameters

    model = tiny_llama()
    sl.compress(model, sl.CompressConfig(method="espace", keep=0.5, options={"calibrator": "go"}),
                calib=batches(n=6, b=2, t=32), progress=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    names = trainable_parameters(model)
    assert any(n.endswith("proj_out.weight") for n in names) and not any(n.endswith(".P") for n in names)
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    P, bt = layer.P.clone(), layer.proj_out.weight.detach().clone()
    assert es.set_training_form(model, "W") > 0
    W = layer.proj_out.parametrizations.weight.original
    assert W.shape == (layer.out_features, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
    # one SGD step on W: the ESPACE update, B moves by (η ∂L/∂B Pᵀ) P = η ∂L/∂B (P orthonormal)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "original" in n], lr=0.1)
    model(ids, labels=ids).loss.backward()
    gW = W.grad.clone()
    opt.step()
    assert es.set_training_form(model, "B") > 0
    torch.testing.assert_close(layer.proj_out.weight.detach(), bt - 0.1 * gW @ P, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.P, P)


def test_sensitivity_mixer_and_reconstruction_curves(tmp_path):
    from structlin import espace_mixer as mx

    model = tiny_llama()
    cfg = sl.CompressConfig(method="espace", options={"calibrator": "auto"})
    st = es.calibrate(model, cfg, batches(n=6, b=2, t=32), progress=False)
    val = batches(n=2, b=1, t=24, seed=8)
    cache = tmp_path / "sens.json"
    table = mx.sensitivity(model, st, val, unit_keep=0.4, calibrators=("mse/signed", "output/signed"),
                           cache=cache, progress=False)
    assert len(table["units"]) == 2 * 4 and all(len(e["loss"]) == 2 for e in table["units"].values())
    # one unit by hand: the loss with only that unit projected
    first = "model.layers.1.mlp.gate_proj"
    e = table["units"][first]
    specs = mx.unit_specs(model, e["members"], 0.4)
    dense_mods = {n: model.get_submodule(n) for n in e["members"]}
    for n, layer in mx.project_unit(model, st, specs, "output/signed").items():
        sl.modules.set_submodule(model, n, layer)
    with torch.no_grad():
        losses = [model(**b, labels=b["input_ids"]).loss.item() for b in val]
    for n, m in dense_mods.items():
        sl.modules.set_submodule(model, n, m)
    assert abs(e["loss"]["output/signed"] - sum(losses) / 2) < 1e-5      # equal-length batches
    # cached: a second call computes nothing
    t = mx.sensitivity(model, st, val, unit_keep=0.4, calibrators=("mse/signed", "output/signed"), cache=cache,
                       progress=False)
    assert t == table
    targeted = sum(u["dense"] for u in table["units"].values())
    plan = mx.mixer_plan(table, 0.8, targeted)
    assert plan["kept"] <= plan["budget"] and plan["units"]
    deltas = [d for _, _, d in plan["order"]]
    assert deltas == sorted(deltas)
    for first, cal in plan["units"].items():
        losses = table["units"][first]["loss"]
        assert losses[cal] == min(losses.values())
    m2 = tiny_llama()
    mx.apply_plan(m2, st, table, plan)
    stored = sum(m.num_params() if isinstance(m, es.EspaceLinear) else m.weight.numel()
                 for n in st for m in [m2.get_submodule(n)])
    assert stored == plan["kept"]
    # reconstruction analysis from eigenvalues equals the errors of the fitted projections
    curves = mx.reconstruction_curves(st, ranks=[8, 16])
    for first, c in curves.items():
        s0 = st[first]
        C = s0.mean("gram")
        W = es.group_weights(s0)
        for i, L in enumerate(c["ranks"]):
            P, _ = es.top_eigvecs(C, L)
            resid = torch.trace(C - P @ P.T @ C @ P @ P.T) / torch.trace(C)
            assert abs(resid.item() - c["input_mse"][i]) < 1e-9
            P, Bts = es.group_fit({n: W[n] for n in c["members"]}, L, "output", "signed", s0)
            num = sum(((W[n] - Bts[n] @ P.T) @ C * (W[n] - Bts[n] @ P.T)).sum() for n in c["members"])
            den = sum((W[n] @ C * W[n]).sum() for n in c["members"])
            assert abs((num / den).item() - c["output"][i]) < 1e-6
