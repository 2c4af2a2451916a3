"""SS1 — sketch-structured linear layers (Desai et al., NeurIPS 2024), as y = (x S) W0ᵀ + b.

Shapes: x (M × K), S (K × Kc) with one non-zero per row (input feature i goes to bucket b_i with scale s_i),
W0 = `weight` (N × Kc), Kc = ceil(K / (bk·r))·bk ≈ K/r. Parameters N·Kc (+N), MACs M·N·Kc. K is
conceptually padded with zeros to Kp = Kc·r; padded features belong to no stored input.

Schemes (a spec field; `version` 1 for all three):

* ``tied``      the released SS1 kernel's function. Feature i = (g·r + c)·bk + j (group g, member c,
                offset j) goes to bucket g·bk + ((j − δ_c) mod bk), δ_c = (R0·c·q) mod bk, R0 = 45007,
                q = rotation quantum 8. (The released hash h = R3 + R2·nb + R1·(g+1) + R0·(c+1) is linear,
                so R1..R3 and the column block only relabel the stored parameters; see `from_released`.)
* ``blockwise`` an independent rotation rot[nb, g, c] ∈ q·[0, bk/q) per (column block of width bn, group,
                member), from a seeded table kept as buffer `rot`: the sketch differs per column block, W is
                not row-tied. Computed by the fused per-tile kernel.
* ``table``     any bucket b_i and scale s_i per feature, kept as buffers `bucket` and `scale` (initialised
                to the tied assignment); same sketch kernels with the table as a runtime argument.

Projection of a dense W (N × K, float64): ``average`` — W0 = W S diag(1/‖S_:b‖²), the Frobenius-optimal
choice among matrices of the structure (for the tied scheme: the mean of the r tied columns); ``lstsq`` —
W0 = W C S (Sᵀ C S + λ I)⁻¹ with C = E[x xᵀ], which minimises E‖(W − W0 Sᵀ) x‖² for the given S; ``share``
(table scheme) — data-aware sharing: S itself (which features share a bucket, and their scales) is chosen
from the calibration Gram too (`share_table`: greedy pivoted-Cholesky anchor selection, then bucket
assignment by residual correlation and alternating least squares for scales and W0); ``auto`` — with
calibration statistics ``share`` for the table scheme and ``lstsq`` for tied/blockwise, else average.

Execution paths (``SS1Linear.forward``; the one taken is recorded in ``layer.last_path``, and
``layer.choose_path(x)`` says which one a call would take; set ``layer.force_path`` to override):

* ``sketch``  tied scheme: the tied sketch kernel (contiguous rotated runs, vectorised) + cuBLAS GEMM of depth
              Kc; backward = the transposed tied sketch + two cuBLAS GEMMs of depth Kc. Training always runs it.
* ``decode``  tied, inference, M ≤ 16 on CUDA: one Triton launch, the sketch folded into the operand load.
              M = 1 runs a one-shot GEMV (each program builds the whole sketch of x from L2 and loads its rows
              of W0 at once: weight streaming at ~3 TB/s); 2 ≤ M ≤ 16 on sm_90+ the weight-streaming kernel
              (`kernels/_ss1_wgemm.py`: yᵀ = W0 uᵀ with 128 rows of W0 per program through pipelined TMA loads,
              wgmma, deterministic split-K, u's 16-row tile summed from x in the B-operand load; as fast as
              cuBLAS on the weight, and it saves the sketch launch). Without sm_90 the rule offers `decode` at
              M = 1 only (the older K-looped kernel and the session-5 `tied_sk16` lose to sketch + cuBLAS).
* ``dense``   inference (no gradient wanted for weight/bias) where SS1 would be slower than dense: a cuBLAS GEMM
              with the merged weight W = W0 Sᵀ (N × K), materialised once per (device, dtype) and rebuilt
              when weight/bucket/scale change (keyed on their `_version` and storage). Costs N·K extra memory
              while cached; `layer.clear_merged()` drops it.
* ``gather``  table scheme (or tied with r > 16): the generic gather-form sketch + cuBLAS GEMM.
* ``fused``   blockwise scheme: the per-column-block fused Triton GEMM.

The rule (`path_rule`): on CUDA, for inference, the cheapest of the available paths by a roofline cost model
(`cost_ms`) whose constants were fitted to the H100 table in docs/benchmarks/ss1.md; table and blockwise
inference always take ``dense`` there (their kernels are slower than dense at every measured shape). On CPU:
the sketch path (torch reference ops), never dense.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import choice, option
from ..errors import ConfigError
from ..kernels import ss1 as K_ops
from .base import Method, Spec, StructuredLinear

R0 = 45007            # the released kernel's fixed first hash constant (a prime)
VERSION = 1


@dataclass
class SS1Options:
    scheme: str = choice("tied", ("tied", "blockwise", "table"), "how input features share parameters")
    r: int = option(0, "reduction factor; 0 = derive from keep", low=0, high=1024)
    bk: int = option(32, "hash block BK_h (multiple of the rotation quantum 8)", low=8, high=4096)
    bn: int = option(128, "blockwise: column block width of the rotation table", low=16, high=65536)
    projection: str = choice("auto", ("auto", "average", "lstsq", "share"),
                             "projection of the dense weight (share: data-aware table, scheme 'table' only)")
    damp: float = option(1e-6, "lstsq ridge, as a fraction of the mean diagonal of Sᵀ C S", low=0.0, high=1.0)
    share_rounds: int = option(2, "share: bucket-assignment rounds after the greedy anchors", low=0, high=20)
    share_iters: int = option(3, "share: scale / W0 alternations per assignment round", low=1, high=50)


@dataclass(frozen=True)
class SS1Spec(Spec):
    r: int = 2
    bk: int = 32
    bn: int = 128
    quantum: int = 8
    seed: int = 1024
    scheme: str = "tied"
    version: int = VERSION
    method = "ss1"

    def __post_init__(self):
        if self.r < 1 or self.bk % self.quantum or self.scheme not in ("tied", "blockwise", "table"):
            raise ConfigError(f"invalid SS1 spec {self}")
        if self.version != VERSION:
            raise ConfigError(f"SS1 spec version {self.version} is not supported (this structlin: {VERSION})")

    @property
    def groups(self) -> int:
        return -(-self.in_features // (self.bk * self.r))

    @property
    def buckets(self) -> int:
        """Kc: stored input width (a multiple of bk)."""
        return self.groups * self.bk

    @property
    def col_blocks(self) -> int:
        return -(-self.out_features // self.bn)


def tied_rotations(spec: SS1Spec) -> torch.Tensor:
    """(1, G, r) int32: δ_c = (R0·c·q) mod bk, the same for every group and column block."""
    c = torch.arange(spec.r, dtype=torch.int64)
    return ((R0 * c * spec.quantum) % spec.bk).to(torch.int32).expand(spec.groups, -1)[None].contiguous()


def blockwise_rotations(spec: SS1Spec) -> torch.Tensor:
    """(NB, G, r) int32 drawn from a local generator seeded by spec.seed: multiples of q in [0, bk)."""
    gen = torch.Generator().manual_seed(spec.seed)
    steps = torch.randint(0, spec.bk // spec.quantum, (spec.col_blocks, spec.groups, spec.r), generator=gen)
    return (steps * spec.quantum).to(torch.int32)


def tied_buckets(spec: SS1Spec) -> torch.Tensor:
    """(K,) int64 bucket of every input feature under the tied scheme."""
    return K_ops.rotation_index(tied_rotations(spec), spec.in_features, spec.bk)[0]


def gather_form(bucket: torch.Tensor, scale: torch.Tensor, kc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of an assignment: members (Kc × D) int32 (-1 = empty) and coef (Kc × D), D = largest bucket."""
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=kc)
    start = torch.cumsum(counts, 0) - counts
    sb = bucket[order]
    slot = torch.arange(bucket.numel(), device=bucket.device) - start[sb]
    D = max(int(counts.max()) if counts.numel() else 1, 1)
    members = torch.full((kc, D), -1, dtype=torch.int32, device=bucket.device)
    coef = torch.zeros(kc, D, dtype=scale.dtype, device=bucket.device)
    members[sb, slot] = order.to(torch.int32)
    coef[sb, slot] = scale[order]
    return members, coef


class SS1Linear(StructuredLinear):
    """y = (x S) weightᵀ + bias; weight (N × Kc). See the module docstring for S per scheme."""

    spec_class = SS1Spec

    def __init__(self, spec: SS1Spec, dtype=None, device=None):
        super().__init__(spec)
        self.force_path: str | None = None   # None = path_rule; else one of PATHS
        self.last_path: str | None = None
        self._merged: dict = {}
        self.weight = nn.Parameter(torch.empty(spec.out_features, spec.buckets, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=dtype, device=device)) if spec.bias else None
        if self.weight.device.type != "meta":  # fan-in of the virtual matrix; projection or loading overwrites it
            bound = spec.in_features ** -0.5
            g = torch.Generator().manual_seed(spec.seed)
            with torch.no_grad():
                self.weight.copy_(torch.empty(self.weight.shape).uniform_(-bound, bound, generator=g))
        if spec.scheme == "blockwise":
            self.register_buffer("rot", blockwise_rotations(spec).to(device))
            return
        if spec.scheme == "tied":
            c = torch.arange(spec.r, dtype=torch.int64)
            self.register_buffer("rot_tied", ((R0 * c * spec.quantum) % spec.bk).to(torch.int32).to(device),
                                 persistent=False)
        persistent = spec.scheme == "table"
        self.register_buffer("bucket", tied_buckets(spec).to(torch.int32).to(device), persistent=persistent)
        self.register_buffer("scale", torch.ones(spec.in_features, dtype=dtype, device=device),
                             persistent=persistent)
        self.register_buffer("members", None, persistent=False)
        self.register_buffer("coef", None, persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    def num_params(self) -> int:
        """weight + bias, and for the table scheme the per-feature scales (the int bucket table is an
        index, like the spec, and is not counted)."""
        extra = self.spec.in_features if self.spec.scheme == "table" else 0
        return sum(p.numel() for p in self.parameters()) + extra

    def refresh(self) -> None:
        """Rebuild the gather form (members, coef) from bucket/scale; call after editing the table."""
        if self.spec.scheme != "blockwise":
            self.members, self.coef = gather_form(self.bucket.long(), self.scale, self.spec.buckets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, lead = self.spec, x.shape[:-1]
        x2 = x.reshape(-1, s.in_features)
        path = self.choose_path(x2)
        self.last_path = path
        if path == "dense":
            y = F.linear(x2, self.merged_weight(x2.device, x2.dtype), self.bias)
        elif path == "decode":
            y = K_ops.ss1_tied_decode(x2.contiguous(), self.rot_tied, self.weight, self.bias, s.bk)
        elif path == "sketch":
            u = K_ops.ss1_tied_sketch(x2.contiguous(), self.rot_tied, s.bk, s.buckets)
            y = F.linear(u, self.weight, self.bias)
        elif path == "fused":
            y = K_ops.ss1_fused(x2.contiguous(), self.weight, self.rot, self.bias, s.bk, s.bn)
        else:
            u = K_ops.ss1_sketch(x2.contiguous(), self.members, self.coef, self.bucket, self.scale)
            y = F.linear(u, self.weight, self.bias)
        return y.reshape(*lead, s.out_features)

    def choose_path(self, x2: torch.Tensor) -> str:
        """The path forward takes for a (M × K) input under the current grad mode (see the module docstring)."""
        if self.force_path is not None:
            return self.force_path
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        grad = torch.is_grad_enabled()
        return path_rule(self.spec, x2.shape[0], x2.is_cuda,
                         weight_grad=grad and any(p.requires_grad for p in params),
                         any_grad=grad and (x2.requires_grad or any(p.requires_grad for p in params)))

    def _merged_key(self):
        ts = [self.weight] + [getattr(self, n) for n in ("bucket", "scale", "rot") if getattr(self, n, None)
                              is not None]
        return tuple((t.data_ptr(), t._version) for t in ts)

    @torch.compiler.disable
    def merged_weight(self, device, dtype) -> torch.Tensor:
        """W = W0 Sᵀ (N × K) in (device, dtype), cached; rebuilt when weight/bucket/scale/rot change."""
        key, ver = (torch.device(device), dtype), self._merged_key()
        hit = self._merged.get(key)
        if hit is None or hit[0] != ver:
            with torch.no_grad():
                if self.spec.scheme == "blockwise":
                    W = self.to_dense()
                else:
                    W = self.weight.index_select(1, self.bucket.long())
                    if self.spec.scheme == "table":
                        W = W * self.scale.to(W.dtype)
                W = W.to(device=device, dtype=dtype).contiguous()
            self._merged[key] = hit = (ver, W)
        return hit[1]

    def clear_merged(self) -> None:
        self._merged.clear()

    def virtual_index(self) -> torch.Tensor:
        """(N × K) int64: the stored column of `weight` that each entry of the virtual W reads."""
        s = self.spec
        if s.scheme == "blockwise":
            nb = torch.arange(s.out_features, device=self.rot.device) // s.bn
            return K_ops.rotation_index(self.rot, s.in_features, s.bk)[nb]
        return self.bucket.long()[None].expand(s.out_features, -1)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """The sketch u = x S (…, buckets); y = u weightᵀ + bias. Not defined for the blockwise scheme,
        whose sketch differs per output block."""
        s = self.spec
        if s.scheme == "blockwise":
            raise NotImplementedError("SS1 blockwise has no single input sketch (it differs per output block); "
                                      "LoRA-on-structure needs scheme 'tied' or 'table'")
        x2 = x.reshape(-1, s.in_features).contiguous()
        if s.scheme == "tied":
            u = K_ops.ss1_tied_sketch(x2, self.rot_tied, s.bk, s.buckets)
        else:
            u = K_ops.ss1_sketch(x2, self.members, self.coef, self.bucket, self.scale)
        return u.reshape(*x.shape[:-1], s.buckets)

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias)

    def outer_weight(self) -> torch.Tensor:
        if self.spec.scheme == "blockwise":
            self.inner(torch.empty(0, self.spec.in_features))   # raises the explanation
        return self.weight

    def to_dense(self) -> torch.Tensor:
        W = torch.gather(self.weight, 1, self.virtual_index())
        return W if self.spec.scheme == "blockwise" else W * self.scale.to(W.dtype)

    def flops(self, tokens: int = 1) -> int:
        return 2 * tokens * self.spec.out_features * self.spec.buckets


# ----------------------------------------------------------------------------- dispatch

PATHS = ("sketch", "decode", "dense", "gather", "fused")

# Roofline cost model (ms) fitted to the H100 bf16 runs of benchmarks/ss1_layer.py and benchmarks/ss1_probe.py
# (CUDA-graph GPU times, one call per replay, see docs/benchmarks/NOTES.md): effective cuBLAS rate and operand
# bandwidth, the tied sketch kernel's bandwidth, a fixed cost per launch, and for the one-shot M = 1 decode
# kernel (fused sketch + GEMV) its weight-streaming bandwidth, fixed cost, and a term per r·K (each program
# rebuilds the whole sketch of x from L2 in its critical path). n_sat: below N = 1536 output columns cuBLAS's
# bandwidth falls in proportion to N (too few tiles; gpt2.fc2 / bert fc2 at M ≤ 256). Session 5 refit
# (n_sat, sketch_launch 2.8 → 2.0 µs) on the session-4 grid: 12 → 3 of 105 rows off the fastest path, worst
# 1.24× → 1.025× slower than the fastest. Session 6: wg_bw / wg_launch = the 2 ≤ M ≤ 16 weight-streaming decode
# kernel (fitted on the session-6 grid: 9 of 105 rows off the fastest path, worst 1.037×). Only ratios matter.
COST = dict(flops=700e12, gemm_bw=2.2e12, launch=6.3e-3, sketch_bw=2.7e12, sketch_launch=2.0e-3,
            decode_bw=3.05e12, decode_launch=7.0e-3, decode_per_rk=1.67e-8, n_sat=1536,
            wg_bw=2.3e12, wg_launch=8.4e-3, wg_per_r=0.0)


def cost_ms(path: str, M: int, K: int, N: int, kc: int, c=COST) -> float:
    def gemm(k):   # narrow outputs (N < n_sat) leave cuBLAS's small-M kernels short of tiles: less bandwidth
        bw = c["gemm_bw"] * min(1.0, N / c["n_sat"]) if c.get("n_sat") else c["gemm_bw"]
        return max(2 * M * N * k / c["flops"], 2 * (M * k + N * k + M * N) / bw) * 1e3 + c["launch"]
    if path == "dense":
        return gemm(K)
    if path == "sketch":
        return gemm(kc) + 2 * (M * K + M * kc) / c["sketch_bw"] * 1e3 + c["sketch_launch"]
    if path == "decode" and M == 1:
        r = -(-K // kc)
        return 2 * N * kc / c["decode_bw"] * 1e3 + c["decode_launch"] + c["decode_per_rk"] * r * K
    if path == "decode" and 2 <= M <= 16:   # the weight-streaming TMA kernel (session 6): no n_sat (split-K)
        r = -(-K // kc)
        return 2 * (N * kc + M * K) / c["wg_bw"] * 1e3 + c["wg_launch"] + c.get("wg_per_r", 0.0) * r
    return float("inf")


def path_rule(spec: SS1Spec, M: int, cuda: bool, weight_grad: bool, any_grad: bool) -> str:
    """Which path a call takes: see the module docstring. Pure function of (spec, M, device, grad needs)."""
    own = {"tied": "sketch" if spec.r <= K_ops.TIED_MAX_R else "gather", "table": "gather",
           "blockwise": "fused"}[spec.scheme]
    if not cuda or weight_grad:
        return own
    if own != "sketch":
        return "dense"
    K, N, kc = spec.in_features, spec.out_features, spec.buckets
    decode = not any_grad and ((M == 1 and kc <= K_ops.GEMV1_MAX_KC) or (2 <= M <= 16 and K_ops.wg16_available()))
    cands = ["sketch", "dense"] + (["decode"] if decode else [])
    return min(cands, key=lambda p: cost_ms(p, M, K, N, kc))


# ----------------------------------------------------------------------------- projection

def _bucket_sums(A: torch.Tensor, bucket: torch.Tensor, scale: torch.Tensor, kc: int) -> torch.Tensor:
    """A S for A (· × K): column i of A added, times scale_i, into column bucket_i."""
    out = torch.zeros(A.shape[0], kc, dtype=A.dtype, device=A.device)
    return out.index_add_(1, bucket, A * scale)


def project_columns(W, bucket, scale, kc, gram=None, damp=1e-6):
    """W0 (N × Kc) for the one-sketch form W ≈ W0 Sᵀ: averaging (gram None) or ridge least squares."""
    scale = scale.to(W)
    if gram is None:
        norm = torch.zeros(kc, dtype=W.dtype, device=W.device).index_add_(0, bucket, scale * scale)
        return _bucket_sums(W, bucket, scale, kc) / torch.where(norm > 0, norm, 1.0)
    C = gram.to(W)
    StCS = _bucket_sums(_bucket_sums(C, bucket, scale, kc).T.contiguous(), bucket, scale, kc)  # Sᵀ C S
    lam = damp * StCS.diagonal().mean().clamp_min(1e-300)
    A = StCS + lam * torch.eye(kc, dtype=W.dtype, device=W.device)
    B = _bucket_sums(W @ C, bucket, scale, kc)                                                # W C S
    return torch.linalg.solve(A, B.T).T


# ----------------------------------------------------------------------------- data-aware sharing (table)

def _table_energy(W0, M, StCS, bucket, scale, kc):
    """2·tr(Ŵ C Wᵀ) − tr(Ŵ C Ŵᵀ) for Ŵ = W0 Sᵀ: the explained part of tr(W C Wᵀ) (error = total − this)."""
    MS = _bucket_sums(M, bucket, scale, kc)
    return 2 * (W0 * MS).sum() - ((W0 @ StCS) * W0).sum()


def _sts(C, bucket, scale, kc):
    return _bucket_sums(_bucket_sums(C, bucket, scale, kc).T.contiguous(), bucket, scale, kc)


def _fit_w0(M, C, bucket, scale, kc, lam):
    """W0 = W C S (Sᵀ C S + λ I)⁻¹ (least squares given the table); also returns Sᵀ C S."""
    StCS = _sts(C, bucket, scale, kc)
    A = StCS + lam * torch.eye(kc, dtype=C.dtype, device=C.device)
    return torch.linalg.solve(A, _bucket_sums(M, bucket, scale, kc).T).T, StCS


def _fit_scales(W0, M, C, bucket, lam):
    """Scales s minimising tr((W − W0 Sᵀ) C (·)ᵀ) for fixed buckets and W0: with A_i = W0[:, b_i],
    Ŵ = Σ_i s_i A_i e_iᵀ, so (H + λI) s = g, H_ij = (A_iᵀA_j) C_ij, g_i = A_iᵀ (W C)_{:,i} (K × K solve)."""
    A = W0.index_select(1, bucket)                       # N × K
    H = (W0.T @ W0)[bucket][:, bucket] * C
    g = (A * M).sum(0)
    H.diagonal().add_(lam * H.diagonal().mean().clamp_min(1e-300))
    return torch.linalg.solve(H, g)


def greedy_select(M, C, m, tol=1e-10):
    """Forward selection of m input features maximising the explained output energy tr(M_T C_TT⁻¹ M_Tᵀ),
    M = W C: a pivoted Cholesky of C whose pivot is the feature with the largest gain ‖M_res e_i‖² / C_res,ii
    (M_res = M − M_T C_TT⁻¹ C_T:, C_res the Schur complement). Kept in factored form (C_res = C − V Vᵀ,
    M_res = M − U Vᵀ); step t costs O(N·K + (N + K)·t), so m steps cost about one N×K×m GEMM."""
    N, K = M.shape
    V = torch.zeros(K, m, dtype=C.dtype, device=C.device)
    U = torch.zeros(N, m, dtype=C.dtype, device=C.device)
    d = C.diagonal().clone()
    floor = tol * d.clamp_min(0)
    colsq = (M * M).sum(0)                                # ‖M_res e_i‖²
    chosen = torch.zeros(K, dtype=torch.bool, device=C.device)
    order = []
    for t in range(m):
        gain = torch.where((d > floor) & ~chosen, colsq / d.clamp_min(1e-300), colsq.new_tensor(-1.0))
        j = int(torch.argmax(gain))
        if gain[j] < 0:                                   # C exhausted (rank-deficient): take any unchosen
            j = int(torch.nonzero(~chosen)[0])
            order.append(j)
            chosen[j] = True
            continue
        sd = d[j].sqrt()
        v = (C[:, j] - V[:, :t] @ V[j, :t]) / sd
        u = (M[:, j] - U[:, :t] @ V[j, :t]) / sd
        w = M.T @ u - V[:, :t] @ (U[:, :t].T @ u)        # uᵀ M_res (before this step)
        colsq = (colsq - 2 * v * w + v * v * (u @ u)).clamp_min(0)
        d = d - v * v
        V[:, t], U[:, t] = v, u
        chosen[j] = True
        order.append(j)
    return torch.tensor(order, dtype=torch.long, device=C.device)


def share_table(W, gram, kc, damp=1e-6, iters=3, assign_rounds=2):
    """Data-aware table SS1: buckets, scales and W0 minimising the calibration output error
    ‖(W − W0 Sᵀ) X‖² = tr((W − W0 Sᵀ) C (W − W0 Sᵀ)ᵀ), C the (ridge-damped) input Gram. Returns
    (bucket (K,) int64, scale (K,), W0 (N × kc), info) with every one of the kc buckets used.

    1. Anchors: greedy forward selection of min(kc, K) features (`greedy_select`); anchor t alone in bucket t
       with scale 1 and every other feature at scale 0 is column-subset selection, whose least-squares W0
       regresses the dropped features on the kept ones through their correlations.
    2. Assignment (`assign_rounds` rounds): with W0 fixed and h_i = (W C − Ŵ_{−i} C)_{:,i} (residual
       correlation with feature i's own contribution removed), putting feature i in bucket b with the best scale
       gains (W0_bᵀ h_i)² / (‖W0_b‖² C_ii); every non-anchor feature goes to its best bucket (anchors stay, so no
       bucket empties). Then alternate least squares for the scales given (buckets, W0) (`_fit_scales`, one
       K × K solve) and for W0 given the table (`_fit_w0`), `iters` times. Each alternation step is an exact
       block minimisation; a round is kept only if it lowers the error.

    Cost: forming M = W C (N·K²), the selection (≈ N·K·kc), per round one kc×N×K product for the gains, a K×K
    and a kc×kc solve per alternation (K³/3 + kc³/3). About 4096 × 14336 on a GPU: seconds.
    """
    N, K = W.shape
    C = gram.to(W).clone()
    C.diagonal().add_(damp * C.diagonal().mean().clamp_min(1e-300))
    lam = 1e-10 * float(C.diagonal().mean())
    M = W @ C
    total = (M * W).sum()
    dev = W.device
    m = min(kc, K)
    info = {"total": float(total)}
    anchors = greedy_select(M, C, m)
    bucket = torch.zeros(K, dtype=torch.long, device=dev)
    scale = torch.zeros(K, dtype=W.dtype, device=dev)
    if m < kc or m == K:   # more buckets than features: each feature alone, exact
        bucket = torch.arange(K, device=dev)
        scale = torch.ones(K, dtype=W.dtype, device=dev)
        W0 = torch.zeros(N, kc, dtype=W.dtype, device=dev)
        W0[:, :K] = W
        info["err_select"] = info["err"] = 0.0
        return bucket, scale, W0, info
    bucket[anchors] = torch.arange(m, device=dev)
    scale[anchors] = 1.0
    is_anchor = torch.zeros(K, dtype=torch.bool, device=dev)
    is_anchor[anchors] = True
    rest = torch.nonzero(~is_anchor).squeeze(1)
    bucket[rest] = 0
    W0, StCS = _fit_w0(M, C, bucket, scale, kc, lam)
    err = float(total - _table_energy(W0, M, StCS, bucket, scale, kc))
    info["err_select"] = err / info["total"]
    Cd = C.diagonal()
    for rnd in range(assign_rounds):
        What_C = W0 @ _bucket_sums(C, bucket, scale, kc).T            # Ŵ C = W0 (C S)ᵀ, N × K
        H = (M - What_C)[:, rest] + W0[:, bucket[rest]] * (scale[rest] * Cd[rest])   # h_i, N × |rest|
        Q = W0.T @ H                                                   # kc × |rest|
        nrm = (W0 * W0).sum(0).clamp_min(1e-300)
        gain = Q * Q / (nrm[:, None] * Cd[rest][None, :])
        best = gain.argmax(0)
        nb, ns = bucket.clone(), scale.clone()
        nb[rest] = best
        ns[rest] = Q[best, torch.arange(rest.numel(), device=dev)] / (nrm[best] * Cd[rest])
        W0n = W0
        for _ in range(iters):
            ns = _fit_scales(W0n, M, C, nb, 1e-9)
            W0n, StCSn = _fit_w0(M, C, nb, ns, kc, lam)
        e = float(total - _table_energy(W0n, M, StCSn, nb, ns, kc))
        info[f"err_round{rnd + 1}"] = e / info["total"]
        if e < err:
            err, bucket, scale, W0 = e, nb, ns, W0n
        else:
            break
    info["err"] = err / info["total"]
    return bucket, scale, W0, info


def from_released(weight: torch.Tensor, spec: SS1Spec, bn: int) -> torch.Tensor:
    """Our `weight` (bucket order) from a released SSL weight (N × Kc) with seed spec.seed and column block bn.

    Released: W[(g·r+c)·bk + j, n] = w[n, g·bk + ((j − s(nb, g, c)) mod bk)], s = (h·q) mod bk,
    h = R3 + R2·nb + R1·(g+1) + R0·(c+1), R1..R3 drawn from a local generator seeded with spec.seed. Ours:
    W0[n, g·bk + t] = w[n, g·bk + ((t − s(nb, g, 0)) mod bk)]."""
    R1, R2, R3 = released_hash(spec.seed)
    n = torch.arange(spec.out_features)
    g = torch.arange(spec.groups)
    h = R3 + R2 * (n // bn)[:, None] + R1 * (g + 1)[None, :] + R0                 # (N, G), c = 0
    s0 = (h * spec.quantum) % spec.bk
    t = torch.arange(spec.bk)
    idx = g[None, :, None] * spec.bk + torch.remainder(t[None, None, :] - s0[:, :, None], spec.bk)
    return torch.gather(weight, 1, idx.reshape(spec.out_features, -1).to(weight.device))


def released_hash(seed: int) -> tuple[int, int, int]:
    """(R1, R2, R3) uniform in [0, R0) from a local generator (the released code reseeds the global RNG)."""
    return tuple(int(v) for v in torch.randint(0, R0, (3,), generator=torch.Generator().manual_seed(seed)))


class SS1(Method):
    name = "ss1"
    Options = SS1Options
    Spec = SS1Spec
    Layer = SS1Linear

    def stats_needed(self, opts) -> set[str]:
        # "auto" uses the Gram when compress collects one (it always does when calib is given).
        return {"gram"} if opts.projection in ("lstsq", "share") else set()

    def candidates(self, in_features, out_features, bias, opts):
        if opts.r > in_features:
            raise ConfigError(f"ss1 r={opts.r} is larger than the layer's {in_features} input features: each "
                              f"stored input row must tie at least one real input; choose r <= {in_features} "
                              f"or exclude this layer")
        rs = [opts.r] if opts.r > 0 else [16, 12, 8, 6, 5, 4, 3, 2]
        dense = in_features * out_features + out_features * bias
        out = []
        for r in rs:
            spec = SS1Spec(in_features, out_features, bias, r=r, bk=opts.bk, bn=opts.bn, scheme=opts.scheme)
            if self.spec_params(spec) < dense and (not out or self.spec_params(spec) > self.spec_params(out[-1])):
                out.append(spec)
        return out

    def spec_params(self, spec):
        table = spec.in_features if spec.scheme == "table" else 0
        return spec.out_features * spec.buckets + spec.out_features * spec.bias + table

    def spec_flops(self, spec, tokens=1):
        return 2 * tokens * spec.out_features * spec.buckets

    def project(self, weight, bias, spec, stats, opts, generator):
        if spec.scheme == "blockwise":
            spec = dataclasses.replace(spec, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        have_gram = stats is not None and getattr(stats, "gram", None) is not None
        proj = opts.projection
        if proj == "auto":
            proj = ("share" if spec.scheme == "table" else "lstsq") if have_gram else "average"
        if proj == "share" and spec.scheme != "table":
            raise ConfigError(f"ss1 projection 'share' chooses the bucket table, so it needs scheme='table' "
                              f"(got scheme={spec.scheme!r}); use projection 'lstsq' or 'average' for it")
        if proj in ("lstsq", "share") and not have_gram:
            raise ConfigError(f"ss1 projection {proj!r} needs calibration statistics (the input Gram) for "
                              f"layer {getattr(stats, 'name', '')!r}: pass calib=... to compress")
        gram = stats.gram_mean() if proj in ("lstsq", "share") else None
        layer = SS1Linear(spec, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            kc = spec.buckets
            if proj == "share":
                bucket, scale, W0, info = share_table(weight, gram, kc, opts.damp, opts.share_iters,
                                                      opts.share_rounds)
                layer.bucket.copy_(bucket.to(torch.int32))
                layer.scale.copy_(scale.to(layer.scale.dtype))
                layer.refresh()
                layer.weight.copy_(W0)
                layer.share_info = info
            elif spec.scheme == "blockwise":
                idx = K_ops.rotation_index(layer.rot, spec.in_features, spec.bk)
                one = torch.ones(spec.in_features, dtype=weight.dtype, device=weight.device)
                for nb in range(spec.col_blocks):
                    rows = slice(nb * spec.bn, (nb + 1) * spec.bn)
                    layer.weight[rows] = project_columns(weight[rows], idx[nb], one, kc, gram, opts.damp)
            else:
                layer.weight.copy_(project_columns(weight, layer.bucket.long(), layer.scale, kc, gram, opts.damp))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer


def _register():
    from . import _REGISTRY, register
    if SS1.name not in _REGISTRY:
        register(SS1())


_register()
