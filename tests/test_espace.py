"""ESPACE: calibrator statistics against direct float64 computations, projection math, layer/export,
compress + save/load round trip, and the nl refusal on a model without a loss."""
import pytest
import torch
import transformers

import structlin as sl
import structlin.methods.espace as es
from structlin.errors import CalibrationError

from conftest import tiny_llama


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
