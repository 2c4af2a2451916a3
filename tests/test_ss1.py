"""SS1: exact semantics (released formula, schemes), reference ops, Triton kernels under the interpreter,
projections, and the compress / save / load pipeline."""
import os
import sys

import pytest
import torch

# The Triton tests run the kernels through the interpreter on CPU; Triton reads this when it is imported.
TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import structlin
import structlin.methods.ss1 as ss1
from structlin.calibrate.stats import Stats
from structlin.kernels import ss1 as ops

from conftest import batches, tiny_llama

f64 = torch.float64


def layer(K, N, r, scheme="tied", bias=True, dtype=f64, seed=0, **kw):
    spec = ss1.SS1Spec(K, N, bias, r=r, scheme=scheme, **kw)
    L = ss1.SS1Linear(spec, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        L.weight.copy_(torch.randn(L.weight.shape, generator=g, dtype=f64))
        if bias:
            L.bias.copy_(torch.randn(N, generator=g, dtype=f64))
        if scheme == "table":  # an arbitrary assignment with uneven buckets, and scales
            L.bucket.copy_(torch.randint(0, spec.buckets, (K,), generator=g).to(torch.int32))
            L.scale.copy_(torch.rand(K, generator=g, dtype=f64) + 0.5)
            L.refresh()
    return L


def released_dense(w, K, r, bk, seed, bn):
    """The released kernel's virtual W (K × N), written out from the formula of reference §1.2."""
    R1, R2, R3 = ss1.released_hash(seed)
    N = w.shape[0]
    i = torch.arange(-(-K // (bk * r)) * bk * r)
    g, c, j = i // (bk * r), (i // bk) % r, i % bk
    nb = torch.arange(N) // bn
    h = R3 + R2 * nb[None, :] + R1 * (g + 1)[:, None] + ss1.R0 * (c + 1)[:, None]   # (Kp, N)
    s = (h * 8) % bk
    col = g[:, None] * bk + torch.remainder(j[:, None] - s, bk)
    return w.T.gather(0, col)[:K]  # W[i, n] = w[n, col[i, n]]


@pytest.mark.parametrize("K,N,r,bn", [(200, 70, 2, 32), (256, 64, 4, 16), (96, 33, 1, 64), (300, 40, 8, 8)])
def test_tied_equals_released_formula(K, N, r, bn):
    spec = ss1.SS1Spec(K, N, False, r=r, seed=7)
    w = torch.randn(N, spec.buckets, dtype=f64, generator=torch.Generator().manual_seed(1))
    W = released_dense(w, K, r, 32, 7, bn).T                      # (N × K)
    L = ss1.SS1Linear(spec, dtype=f64)
    with torch.no_grad():
        L.weight.copy_(ss1.from_released(w, spec, bn))
    assert torch.equal(L.to_dense(), W)
    # independent of the relabelling: averaging the released matrix onto the tied set is exact
    W0 = ss1.project_columns(W, L.bucket.long(), L.scale, spec.buckets)
    torch.testing.assert_close(W0[:, L.bucket.long()], W, rtol=1e-14, atol=1e-14)
    if K % (32 * r) == 0:  # exactly K/r distinct input columns
        assert torch.unique(W, dim=1).shape[1] == K // r


def test_tied_bucket_example():
    # reference §1.4: bk = 32, r = 4 ties input features {0, 56, 80, 104}
    b = ss1.tied_buckets(ss1.SS1Spec(128, 8, False, r=4))
    assert b[0] == b[56] == b[80] == b[104] and len(set(b.tolist())) == 32


def test_blockwise_is_not_row_tied():
    K, N, r = 256, 256, 4
    W = layer(K, N, r, "blockwise", bn=32).to_dense()
    T = layer(K, N, r, "tied").to_dense()
    assert torch.unique(T, dim=1).shape[1] == K // r
    assert torch.unique(W, dim=1).shape[1] == K  # no two input columns are tied across all column blocks
    # within one column block it is still a sketch: K/r distinct columns
    assert torch.unique(W[:32], dim=1).shape[1] == K // r


@pytest.mark.parametrize("scheme", ["tied", "blockwise", "table"])
@pytest.mark.parametrize("r", [1, 2, 4, 8, 16])
def test_forward_equals_dense(scheme, r):
    K, N = 77, 50  # K not a multiple of bk·r
    L = layer(K, N, r, scheme, bias=r % 2 == 0, bn=16)
    x = torch.randn(3, 11, 2 * K, dtype=f64)[..., ::2]           # 3-D, non-contiguous
    assert not x.is_contiguous()
    y = L(x)
    ref = x @ L.to_dense().T + (L.bias if L.bias is not None else 0)
    assert y.shape == (3, 11, N)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert L.num_params() == N * L.spec.buckets + N * (L.bias is not None) + K * (scheme == "table")
    assert ss1.SS1().spec_params(L.spec) == L.num_params()


@pytest.mark.parametrize("scheme", ["tied", "blockwise", "table"])
def test_gradcheck_reference(scheme):
    L = layer(37, 20, 4, scheme, bk=8, bn=16)
    x = torch.randn(5, 37, dtype=f64, requires_grad=True)
    fn = lambda x, w, b: torch.func.functional_call(L, {"weight": w, "bias": b}, (x,))
    assert torch.autograd.gradcheck(fn, (x, L.weight.detach().clone().requires_grad_(),
                                         L.bias.detach().clone().requires_grad_()))
    u = torch.randn(4, 37, dtype=f64, requires_grad=True)  # the sketch ops themselves, both directions
    args = (L.members, L.coef.double(), L.bucket, L.scale) if scheme != "blockwise" else None
    if args:
        assert torch.autograd.gradcheck(lambda u: ops.ss1_sketch(u, *args), (u,))
        g = torch.randn(4, L.spec.buckets, dtype=f64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda g: ops.ss1_sketch_t(g, *args), (g,))


def test_two_layers_same_shape_different_settings():
    x = torch.randn(4, 64, dtype=f64)
    a, b = layer(64, 32, 2, "tied"), layer(64, 32, 4, "blockwise", bn=16)
    torch.testing.assert_close(a(x), x @ a.to_dense().T + a.bias)
    torch.testing.assert_close(b(x), x @ b.to_dense().T + b.bias)


def test_table_state_dict_roundtrip():
    L = layer(50, 20, 2, "table")
    M = ss1.SS1Linear(L.spec, dtype=f64)
    M.load_state_dict(L.state_dict())
    assert {"bucket", "scale", "weight", "bias"} <= set(L.state_dict())
    x = torch.randn(3, 50, dtype=f64)
    assert torch.equal(L(x), M(x))


# ----------------------------------------------------------------------------- projections

def test_average_is_frobenius_optimal():
    W = torch.randn(32, 256, dtype=f64, generator=torch.Generator().manual_seed(3))  # K a multiple of BK_h·r
    for scheme in ("tied", "table", "blockwise"):
        spec = ss1.SS1Spec(256, 32, False, r=4, scheme=scheme, bn=16)
        L = ss1.SS1().project(W, None, spec, None, ss1.SS1Options(projection="average"), torch.Generator())
        E = W - L.to_dense()
        best = E.norm()
        for k in range(5):  # any move inside the structure makes it worse
            d = torch.randn(L.weight.shape, dtype=f64, generator=torch.Generator().manual_seed(k)) * 1e-3
            with torch.no_grad():
                L.weight += d
                assert (W - L.to_dense()).norm() > best
                L.weight -= d
        if scheme == "tied":  # for i.i.d. weights the error is √(1 − 1/r)
            assert abs(best / W.norm() - (1 - 1 / 4) ** 0.5) < 0.05


def test_lstsq_beats_average_on_correlated_data():
    g = torch.Generator().manual_seed(0)
    K, N, T = 64, 24, 2000
    X = torch.randn(T, 8, dtype=f64, generator=g) @ torch.randn(8, K, dtype=f64, generator=g) \
        + 0.05 * torch.randn(T, K, dtype=f64, generator=g)
    W = torch.randn(N, K, dtype=f64, generator=g)
    st = Stats("l", K, {"gram"})
    st.update(X)
    spec = ss1.SS1Spec(K, N, False, r=4, bk=8)
    errs = {}
    for p in ("average", "lstsq", "auto"):
        L = ss1.SS1().project(W, None, spec, st, ss1.SS1Options(projection=p), torch.Generator())
        errs[p] = ((X @ (W - L.to_dense()).T).norm() / (X @ W.T).norm()).item()
    assert errs["lstsq"] < 0.5 * errs["average"] and errs["auto"] == errs["lstsq"]
    assert ss1.SS1().stats_needed(ss1.SS1Options(projection="lstsq")) == {"gram"}


def test_candidates():
    m, o = ss1.SS1(), ss1.SS1Options()
    c = m.candidates(4096, 1024, False, o)
    sizes = [m.spec_params(s) for s in c]
    assert sizes == sorted(sizes) and [s.r for s in c][-1] == 2 and sizes[-1] == 4096 * 1024 // 2
    assert [s.r for s in m.candidates(512, 64, True, ss1.SS1Options(r=4))] == [4]


# ----------------------------------------------------------------------------- pipeline

def test_compress_save_load_roundtrip(tmp_path):
    model = tiny_llama()
    rep = structlin.compress(model, structlin.CompressConfig(method="ss1", keep=0.5), progress=False)
    layers = [m for m in model.modules() if isinstance(m, ss1.SS1Linear)]
    assert len(layers) >= 10 and rep.budget > 0
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(ids).logits
    structlin.save_pretrained(model, tmp_path / "m")
    back = structlin.from_pretrained(tmp_path / "m")
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, y)


def test_compress_table_lstsq_with_calibration(tmp_path):
    model = tiny_llama()
    cfg = structlin.CompressConfig(method="ss1", keep=0.5, options={"scheme": "table", "projection": "lstsq"})
    structlin.compress(model, cfg, calib=batches(n=2), progress=False)
    structlin.save_pretrained(model, tmp_path / "t")
    back = structlin.from_pretrained(tmp_path / "t")
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_torch_compile_no_graph_break():
    L = layer(40, 24, 2, "tied", dtype=torch.float32)
    B = layer(40, 24, 2, "blockwise", dtype=torch.float32, bn=16)
    x = torch.randn(3, 40)
    for m in (L, B):
        out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(out, m(x))


# ----------------------------------------------------------------------------- Triton (interpreter)

@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton kernels through the interpreter on CPU tensors (the ops dispatch to Triton)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or TRITON_PREIMPORTED:
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")
    pytest.importorskip("triton")
    monkeypatch.setattr(ops, "_use_triton", lambda t: t.dtype != torch.float64)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("scheme,r,K,N", [("tied", 2, 45, 19), ("tied", 16, 70, 33), ("table", 4, 37, 21),
                                          ("blockwise", 4, 45, 40), ("tied", 1, 33, 17)])
def test_triton_matches_float64(interpret, dtype, tol, scheme, r, K, N):
    L64 = layer(K, N, r, scheme, bk=16, bn=16)
    L = layer(K, N, r, scheme, bk=16, bn=16, dtype=dtype)
    L64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in L.state_dict().items()})
    x = torch.randn(2, 5, 2 * K)[..., ::2]
    x64 = x.to(dtype).double().requires_grad_()
    xd = x.to(dtype).requires_grad_()
    y, y64 = L(xd), L64(x64)
    gy = torch.randn_like(y64)
    y.backward(gy.to(dtype))
    y64.backward(gy)
    assert rel(y, y64) <= tol
    assert rel(xd.grad, x64.grad) <= tol
    assert rel(L.weight.grad, L64.weight.grad) <= tol
    if scheme == "tied":  # the fused sketch-in-A-load kernel computes the same function
        yf = ops.ss1_fused(xd.detach().reshape(-1, K), L.weight.detach(), ss1.tied_rotations(L.spec),
                           L.bias.detach(), 16, 16)
        assert rel(yf, y64.detach().reshape(-1, N)) <= tol


# ----------------------------------------------------------------------------- tied kernels and dispatch

TIED_CASES = [(45, 2, 16), (70, 3, 24), (37, 5, 8), (200, 4, 32), (33, 1, 16)]   # (K, r, bk): odd K, r not 2^k


@pytest.mark.parametrize("K,r,bk", TIED_CASES)
def test_tied_ref_equals_gather_form(K, r, bk):
    L = layer(K, 9, r, "tied", bk=bk)
    x = torch.randn(6, K, dtype=f64)
    u = ops.tied_sketch_ref(x, L.rot_tied, bk, L.spec.buckets)
    torch.testing.assert_close(u, ops.sketch_ref(x, L.members, L.coef), rtol=0, atol=1e-13)
    g = torch.randn(6, L.spec.buckets, dtype=f64)
    torch.testing.assert_close(ops.tied_sketch_t_ref(g, L.rot_tied, bk, K),
                               ops.sketch_t_ref(g, L.bucket, L.scale, K), rtol=0, atol=0)


def test_path_rule_and_merged_cache():
    L = layer(64, 24, 2, "tied", dtype=torch.float32)
    x = torch.randn(5, 64)
    ref = x @ L.to_dense().T + L.bias
    L(x)
    assert L.last_path == "sketch"                           # CPU: never dense
    L.force_path = "dense"
    with torch.no_grad():
        torch.testing.assert_close(L(x), ref)
        assert L.last_path == "dense" and len(L._merged) == 1
        L.weight.mul_(2)                                     # in-place edit: the cached merge is rebuilt
        torch.testing.assert_close(L(x), x @ L.to_dense().T + L.bias)
    L.force_path = None
    big, small = ss1.SS1Spec(4096, 14336, False, r=4), ss1.SS1Spec(768, 3072, False, r=4)
    assert ss1.path_rule(big, 16384, True, weight_grad=True, any_grad=True) == "sketch"
    assert ss1.path_rule(big, 1, True, weight_grad=False, any_grad=False) in ("decode", "sketch")
    assert ss1.path_rule(small, 256, True, weight_grad=False, any_grad=False) == "dense"
    assert ss1.path_rule(ss1.SS1Spec(64, 8, False, r=2, scheme="blockwise"), 4, True, False, False) == "dense"
    assert ss1.path_rule(big, 1, False, weight_grad=False, any_grad=False) == "sketch"


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("K,r,bk", TIED_CASES)
def test_tied_kernels_match_float64(interpret, dtype, tol, K, r, bk):
    N, M = 19, 7
    L64 = layer(K, N, r, "tied", bk=bk)
    L = layer(K, N, r, "tied", bk=bk, dtype=dtype)
    L64.load_state_dict({k: v.double() for k, v in L.state_dict().items()})
    x = torch.randn(M, 2 * K)[:, ::2].to(dtype)
    x64 = x.double().requires_grad_()
    xd = x.clone().requires_grad_()
    y, y64 = L(xd), L64(x64)
    assert L.last_path == "sketch"
    gy = torch.randn_like(y64)
    y.backward(gy.to(dtype))
    y64.backward(gy)
    assert rel(y, y64) <= tol and rel(xd.grad, x64.grad) <= tol and rel(L.weight.grad, L64.weight.grad) <= tol
    # the ops themselves, every row and column written (outputs start as garbage: torch.empty)
    u = ops.ss1_tied_sketch(x.contiguous(), L.rot_tied, bk, L.spec.buckets)
    assert rel(u, ops.sketch_ref(x.double(), L64.members, L64.coef)) <= tol
    g = torch.randn(M, L.spec.buckets).to(dtype)
    gx = ops.ss1_tied_sketch_t(g, L.rot_tied, bk, K)
    assert torch.equal(gx, ops.sketch_t_ref(g, L.bucket, torch.ones(K, dtype=dtype), K))
    for m in (1, M):   # the one-launch decode kernel, M ≤ 16
        yd = ops.ss1_tied_decode(x[:m].contiguous(), L.rot_tied, L.weight.detach(), L.bias.detach(), bk)
        assert rel(yd, y64[:m].detach()) <= tol


# ----------------------------------------------------------------------------- data-aware sharing (table)

def _correlated(K, N, T, seed=0, sample_seed=None):
    """Inputs from a low-dimensional latent plus noise, features rescaled (mixing fixed by `seed`, the draw by
    `sample_seed`), a random W and the calibration Stats of the draw."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K // 6, K, dtype=f64, generator=g)
    sc = torch.rand(K, dtype=f64, generator=g) * 3 + 0.2
    W = torch.randn(N, K, dtype=f64, generator=g)
    gs = torch.Generator().manual_seed(seed + 1 if sample_seed is None else sample_seed)
    X = (torch.randn(T, K // 6, dtype=f64, generator=gs) @ A + 0.2 * torch.randn(T, K, dtype=f64, generator=gs)) * sc
    st = Stats("l", K, {"gram"})
    st.update(X)
    return X, W, st


def test_share_beats_lstsq_and_average_on_fresh_inputs():
    K, N = 96, 40
    _, W, st = _correlated(K, N, 3000)
    Xt, _, _ = _correlated(K, N, 2000, sample_seed=99)          # fresh inputs of the same distribution
    errs = {}
    for p in ("average", "lstsq", "share", "auto"):
        spec = ss1.SS1Spec(K, N, False, r=2, bk=8, scheme="table")
        L = ss1.SS1().project(W, None, spec, st, ss1.SS1Options(projection=p), torch.Generator())
        errs[p] = ((Xt @ (W - L.to_dense()).T).norm() / (Xt @ W.T).norm()).item()
        if p == "share":
            # exactly K/r buckets, all used; the layer's forward applies the chosen table
            used = torch.unique(L.bucket[L.scale != 0].long())
            assert spec.buckets == K // 2 and used.numel() == spec.buckets
            assert int(L.bucket.min()) >= 0 and int(L.bucket.max()) < spec.buckets
            x = torch.randn(7, K, dtype=f64)
            torch.testing.assert_close(L(x), x @ L.to_dense().T)
            assert L.share_info["err"] <= L.share_info["err_select"] + 1e-12
    assert errs["share"] < 0.85 * errs["lstsq"] and errs["lstsq"] < errs["average"]
    assert errs["auto"] == errs["share"]


def test_share_selection_gain_matches_brute_force():
    """The factored greedy step picks the feature whose addition explains the most energy (checked by solving
    every candidate's least squares directly), and 'share' on another scheme is a clear error."""
    K, N = 24, 10
    X, W, st = _correlated(K, N, 500, seed=2)
    C = st.gram_mean()
    M = W @ C
    order = ss1.greedy_select(M, C, 5).tolist()
    chosen = []
    for t in range(5):
        def explained(T):
            return torch.trace(M[:, T] @ torch.linalg.solve(C[T][:, T], M[:, T].T)).item()
        best = max((i for i in range(K) if i not in chosen), key=lambda i: explained(chosen + [i]))
        assert order[t] == best
        chosen.append(best)
    with pytest.raises(structlin.ConfigError, match="scheme='table'"):
        ss1.SS1().project(W, None, ss1.SS1Spec(K, N, False, r=2, bk=8), st, ss1.SS1Options(projection="share"),
                          torch.Generator())


def test_compress_table_share_roundtrip(tmp_path):
    model = tiny_llama()
    cfg = structlin.CompressConfig(method="ss1", keep=0.6, options={"scheme": "table"})
    rep = structlin.compress(model, cfg, calib=batches(n=2), progress=False)
    layers = [m for m in model.modules() if isinstance(m, ss1.SS1Linear)]
    assert layers and all(hasattr(m, "share_info") for m in layers)
    assert any(not torch.equal(m.bucket.long(), ss1.tied_buckets(m.spec)) for m in layers)
    structlin.save_pretrained(model, tmp_path / "s")
    back = structlin.from_pretrained(tmp_path / "s")
    for m in back.modules():
        if isinstance(m, ss1.SS1Linear):
            assert torch.unique(m.bucket).numel() == m.spec.buckets
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert rep.kept_params <= rep.budget


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("K,r,bk", [(45, 2, 16), (37, 5, 8), (200, 4, 32)])
def test_tied_one_launch_kernels(interpret, dtype, tol, K, r, bk):
    """The one-shot M = 1 GEMV, the K-looped decode kernel in both forms (CUDA-core and tensor-core), the tiled
    fused GEMM (M > 16, grouped tiles, N and K tails) and the R = 1 plain GEMM of a precomputed sketch, each
    against float64 on fresh inputs (outputs start as torch.empty garbage: every element must be written)."""
    tm = ops.triton_module()
    N = 23
    L = layer(K, N, r, "tied", bk=bk)
    W, b, rot = L.weight.detach().to(dtype), L.bias.detach().to(dtype), L.rot_tied
    Wv = W.double()[:, L.bucket.long()]
    g = torch.Generator().manual_seed(K + r)
    fma, dot = dict(BM=1, BN=8, BC=16, DOT=False, GROUP_M=1), dict(BM=16, BN=16, BC=16, DOT=True, GROUP_M=1)
    for M, cfg in [(1, fma), (1, dot), (6, None), (40, None), (40, dict(BM=16, BN=8, BC=32, DOT=True, GROUP_M=3))]:
        x = torch.randn(M, K, generator=g).to(dtype)
        ref = x.double() @ Wv.T + b.double()
        assert rel(tm.tied_mm(x, rot, W, b, bk, cfg), ref) <= tol, (M, cfg)
        if M == 1:
            for bn in (1, 8, 32):
                assert rel(tm.tied_gemv1(x, rot, W, b, bk, BN=bn), ref) <= tol, bn
    u = torch.randn(7, L.spec.buckets, generator=g).to(dtype)
    zero = torch.zeros(1, dtype=torch.int32)
    assert rel(tm.tied_mm(u, zero, W, None, bk), u.double() @ W.double().T) <= tol
    assert rel(tm.tied_gemv1(u[:1], zero, W, None, bk, BN=4), u[:1].double() @ W.double().T) <= tol


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_tied_sketch_once_kernel(interpret, dtype, tol):
    """The 2 ≤ M ≤ 16 sketch-once kernel (tied_sk16): one launch (ticket roles, u built once, counters reset
    after each call), and the GEMM alone on a given sketch, on odd shapes (K not a multiple of BK·r, N and Kc
    tails) against float64; two calls bitwise equal (deterministic)."""
    tm = ops.triton_module()
    g = torch.Generator().manual_seed(5)
    for K, N, r, bk, M in [(200, 37, 2, 32, 5), (300, 23, 4, 16, 16), (133, 19, 8, 8, 2)]:
        L = layer(K, N, r, "tied", bk=bk)
        W, b, rot = L.weight.detach().to(dtype), L.bias.detach().to(dtype), L.rot_tied
        x = torch.randn(M, K, generator=g).to(dtype)
        ref = x.double() @ W.double()[:, L.bucket.long()].T + b.double()
        y = tm.tied_sk16(x, rot, W, b, bk, "one")
        assert rel(y, ref) <= tol, (K, r, M)
        assert torch.equal(tm.tied_sk16(x, rot, W, b, bk, "one"), y)
        assert rel(tm.tied_sk16(x, rot, W, b, bk, "one", dict(BN=8, BC=32, SBC=32)), ref) <= tol
        u = ops.ss1_tied_sketch(x, rot, bk, L.spec.buckets)
        assert rel(tm.tied_sk16(x, rot, W, None, bk, "gemm", u=u), ref - b.double()) <= tol
    assert tm.sk16_timeouts("cpu") == 0 and not tm._sk16_sync("cpu")[:3].any()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
def test_weight_streaming_decode_kernel(interpret, dtype, tol):
    """The 2 ≤ M ≤ 16 weight-streaming kernel (_ss1_wgemm, swap-AB TMA GEMM): the fused form (sketch summed in
    the B-operand load) and the GEMM on a given u, host- and device-made descriptors, with and without split-K,
    on odd shapes (N tails, K not a multiple of BK·r, Kc not a multiple of BK) against float64; two calls
    bitwise equal, fused == two-pass bitwise, the split-K counters back to zero."""
    wg = pytest.importorskip("structlin.kernels._ss1_wgemm")
    g = torch.Generator().manual_seed(6)
    for K, N, r, M, split in [(200, 37, 2, 5, 1), (300, 150, 4, 16, 3), (264, 19, 8, 2, 2)]:
        L = layer(K, N, r, "tied")
        W, b, rot, bk = L.weight.detach().to(dtype), L.bias.detach().to(dtype), L.rot_tied, L.spec.bk
        x = torch.randn(M, K, generator=g).to(dtype)
        ref = x.double() @ W.double()[:, L.bucket.long()].T + b.double()
        for host in (True, False):
            c = dict(BK=32, SPLIT=split, HOST=host, STAGES=2)
            y = wg.fused(x, rot, W, b, bk, c)
            assert rel(y, ref) <= tol, (K, r, M, split, host)
            assert torch.equal(wg.fused(x, rot, W, b, bk, c), y)
            assert torch.equal(wg.sketch_wgemm(x, rot, W, b, bk, c), y)
            u = ops.ss1_tied_sketch(x, rot, bk, L.spec.buckets)
            assert rel(wg.wgemm(u, W, None, c), ref - b.double()) <= tol
    assert all(not c.any() for c in wg._CNT.values())
    with pytest.raises(ValueError, match="16-byte"):
        wg.wgemm(torch.zeros(17, 64, dtype=dtype), torch.zeros(8, 64, dtype=dtype))


def test_decode_rule(monkeypatch):
    """Without the sm_90 weight-streaming kernel the decode path is offered at M = 1 only (the K-looped kernel
    loses to sketch + cuBLAS at M = 16 on every measured shape); with it, at 2 ≤ M ≤ 16 where the cost model
    says it is faster (Llama rows; not the small gpt2.fc1, where dense wins). Never for training, never past the
    one-shot kernel's Kc limit at M = 1."""
    monkeypatch.setattr(ops, "_WG16", [False])
    up = ss1.SS1Spec(4096, 14336, False, r=4)
    assert ss1.path_rule(up, 1, True, weight_grad=False, any_grad=False) == "decode"
    assert ss1.path_rule(up, 16, True, weight_grad=False, any_grad=False) == "sketch"
    assert ss1.path_rule(up, 1, True, weight_grad=False, any_grad=True) == "sketch"
    # narrow outputs: cuBLAS's small-M GEMM is short of tiles there, the sketch path wins (measured, gpt2.fc2)
    assert ss1.path_rule(ss1.SS1Spec(3072, 768, False, r=4), 16, True, weight_grad=False, any_grad=False) == "sketch"
    wide = ss1.SS1Spec(2 * ops.GEMV1_MAX_KC * 2, 64, False, r=2)
    assert ss1.path_rule(wide, 1, True, weight_grad=False, any_grad=False) != "decode"
    monkeypatch.setattr(ops, "_WG16", [True])
    for M in (2, 16):
        assert ss1.path_rule(up, M, True, weight_grad=False, any_grad=False) == "decode"
        assert ss1.path_rule(ss1.SS1Spec(14336, 4096, False, r=2), M, True, False, False) == "decode"
        assert ss1.path_rule(up, M, True, weight_grad=False, any_grad=True) == "sketch"
    assert ss1.path_rule(up, 17, True, weight_grad=False, any_grad=False) == "sketch"
    assert ss1.path_rule(ss1.SS1Spec(768, 3072, False, r=2), 16, True, False, False) == "dense"
