"""Gaudi-GBLR — generalized block low-rank layers (Lee & Kim, ICLR 2024) under an exact FLOP budget.

    W = Σ_k (m_out,k ⊙ U_k)(m_in,k ⊙ V_k)ᵀ,   U_k (N × s), V_k (K × s),  k = 1..C

Each component k has an input box (width w_in,k, location l_in,k) and an output box (w_out,k, l_out,k), all
fractions of the side length. Its cost per token is s·(n_in,k + n_out,k) multiply-adds with n = round(w·dim)
(gather the box of x, s dot products, scatter into the box of y), so

    FLOPs per token = 2·Σ_k s·(n_in,k + n_out,k),   params = Σ_k s·(n_in,k + n_out,k) (+ bias)

— the same number per token: for GBLR, `keep` (a fraction of the targeted params) is also the fraction of
the targeted FLOPs. `spec.budget` is that cost in multiply-adds per token.

**Gaudi mask** (length n, f = 0..⌊n/2⌋, sinc(x) = sin(πx)/(πx)):

    M̂(f) = w·sinc(f w)/sinc(f/n) · exp(−f²/2σ²) · exp(j[−2πf l + πf(1/n − w)]),   m = irfft(M̂, n) without 1/n

an exact 0/1 boxcar on [l·n, l·n + w·n) (cyclic) for integer w·n, l·n and σ = ∞; smooth in w and l
otherwise. Analytic gradients (`GaudiMask`): ∂M̂/∂w = exp(−f²/2σ²)/sinc(f/n) · exp(j[−2πf(l + w) + πf/n]),
∂M̂/∂l = −j2πf·M̂, each one more inverse FFT. In the forward, widths and locations are rounded to multiples of
q/n (q = `layer.quantum` elements, 1 by default, the export tile for snap-aware training) with a
straight-through backward. σ (`layer.sigma`, a buffer; inf = no Gaussian) is annealed by the training hook.

**Two forms, one layer class** (`spec.tile`):

* training form (`tile == 0`): parameters `weight_in` V (C, s, K), `weight_out` U (N, C, s), `widths` and
  `locations` (2, C; row 0 input side, row 1 output side; kept in float32 whatever the model dtype). The
  forward never builds the dense W: y = ((x (V⊙m_in)ᵀ) (U⊙m_out)ᵀ), restricted to the active components
  (both rounded widths > 0), i.e. 2·M·A·s·(K + N) FLOPs for A active components. `flops()` reports the
  structure's cost (what the exported form executes at tile 1), not this.
* exported form (`tile > 0`): boxes snapped to a tile grid and stored in the spec as integer tuples
  (a_in, n_in, a_out, n_out) in tiles; parameters `w_in` (Σ n_in·tile × s) and `w_out` (s·Σ n_out × tile,
  tile-major). Forward = two chunk-list GEMMs (`structlin.kernels.gblr`) whose work is exactly the snapped
  FLOPs; Triton on CUDA, torch reference on CPU; dense (merged weight) where that is faster (`choose_path`).

**Projection of a pretrained W** (`GBLR.project`): SVD (plain, or whitened by the calibration Gram as in
SVD-LLM) split into C components of s consecutive singular triplets; start as low-rank (the first components
at full width up to the budget, the rest at width 0) or all at full width; then `init_steps` of Adam on the
(whitened) reconstruction error ‖(Ŵ − W)L‖²/‖WL‖², projected onto the budget after every step, keeping the
best iterate. Budget projection and the structure optimizer group: `structlin.heal.gblr`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import choice, option
from ..errors import ConfigError, LoadError
from ..kernels import gblr as K_ops
from . import register
from .base import Method, Spec, StructuredLinear

VERSION = 1
STRUCTURE = ("widths", "locations")


@dataclass
class GBLROptions:
    rank: int = option(16, "rank s of every component (s >= 16 and a multiple of 16 for the GPU kernel)",
                       low=1, high=4096)
    capacity: float = option(2.0, "total rank C·s as a multiple of the budget's low-rank rank (capped at "
                                  "min(N, K) rounded up to s)", low=1.0, high=64.0)
    init: str = choice("lowrank", ("lowrank", "svd"), "start as low-rank (first components full width) or "
                       "every component at full width, then projected onto the budget")
    whiten: bool = option(True, "fit the calibration outputs (whitened SVD and objective) when statistics exist")
    init_steps: int = option(100, "Adam steps on the reconstruction error after the SVD split", low=0,
                             high=100000)
    init_lr: float = option(1e-3, "Adam lr of the factors, relative to each factor's RMS", low=0.0, high=1.0)
    init_structure_lr: float = option(5e-3, "Adam lr of widths/locations (no momentum) during init",
                                      low=0.0, high=1.0)
    sigma: float = option(0.0, "Gaussian bandwidth σ of the masks after projection (0 = none)", low=0.0)
    tile: int = option(64, "tile of the export grid (64-aligned for wide layers; 8 allowed for narrow)",
                       low=1, high=4096)
    damp: float = option(1e-6, "whiten: Cholesky damping, as a fraction of the mean Gram diagonal",
                         low=0.0, high=1.0)


@dataclass(frozen=True)
class GBLRSpec(Spec):
    components: int = 1
    rank: int = 1
    budget: int = 0                 # multiply-adds per token of the structure (Σ_k s·(n_in + n_out))
    tile: int = 0                   # 0: training form; > 0: exported, boxes snapped to this tile grid
    boxes: tuple = ()               # exported form: ((a_in, n_in, a_out, n_out), ...) in tiles
    version: int = VERSION
    method = "gblr"

    def __post_init__(self):
        where = f"gblr spec {self.out_features}×{self.in_features}"
        if self.version != VERSION:
            raise ConfigError(f"{where}: version {self.version} is not supported (this structlin: {VERSION})")
        if self.components < 1 or self.rank < 1 or self.budget < 0 or self.tile < 0:
            raise ConfigError(f"{where}: components and rank must be >= 1, budget and tile >= 0; got "
                              f"components={self.components}, rank={self.rank}, budget={self.budget}, tile={self.tile}")
        object.__setattr__(self, "boxes", tuple(tuple(int(v) for v in b) for b in self.boxes))
        if self.tile == 0:
            if self.boxes:
                raise ConfigError(f"{where}: boxes are only stored for the exported form (tile > 0)")
            return
        nti, nto = self.tiles_in, self.tiles_out
        if len(self.boxes) != self.components:
            raise ConfigError(f"{where}: {len(self.boxes)} boxes for {self.components} components")
        for b in self.boxes:
            if len(b) != 4 or not (0 <= b[0] < nti and 1 <= b[1] <= nti and 0 <= b[2] < nto and 1 <= b[3] <= nto):
                raise ConfigError(f"{where}: box {b} is not (a_in < {nti}, 1 <= n_in <= {nti}, a_out < {nto}, "
                                  f"1 <= n_out <= {nto}) in tiles of {self.tile}")
        cost = self.rank * self.tile * sum(b[1] + b[3] for b in self.boxes)
        if cost != self.budget:
            raise ConfigError(f"{where}: budget {self.budget} differs from the boxes' cost {cost}")

    @property
    def tiles_in(self) -> int:
        return -(-self.in_features // self.tile)

    @property
    def tiles_out(self) -> int:
        return -(-self.out_features // self.tile)

    @classmethod
    def from_dict(cls, d: dict) -> "GBLRSpec":
        d = dict(d)
        if "boxes" in d:
            if not isinstance(d["boxes"], (list, tuple)):
                raise LoadError(f"GBLRSpec boxes must be a list of [a_in, n_in, a_out, n_out], got {d['boxes']!r}")
            d["boxes"] = tuple(tuple(b) for b in d["boxes"])
        return super().from_dict(d)


# ----------------------------------------------------------------------------- the Gaudi mask

def _spectra(w: torch.Tensor, l: torch.Tensor, n: int, sigma: float):
    """(M̂, ∂M̂/∂w) for widths w and locations l of shape (C,), as (C, ⌊n/2⌋+1) complex tensors."""
    f = torch.arange(n // 2 + 1, dtype=w.dtype, device=w.device)
    env = 1.0 / torch.sinc(f / n)
    if math.isfinite(sigma) and sigma > 0:
        env = env * torch.exp(-f * f / (2.0 * sigma * sigma))
    wc, lc = w[:, None], l[:, None]
    amp = wc * torch.sinc(f * wc) * env
    spec = torch.polar(amp, -2 * math.pi * f * lc + math.pi * f * (1.0 / n - wc))
    dspec_w = torch.polar(env.expand_as(amp), -2 * math.pi * f * (lc + wc) + math.pi * f / n)
    return spec, dspec_w, f


class GaudiMask(torch.autograd.Function):
    """m (C × n) = irfft(M̂(w, l), n) without the 1/n factor, with the analytic backward (two inverse FFTs)."""

    @staticmethod
    def forward(ctx, w, l, n: int, sigma: float):
        spec, dspec_w, f = _spectra(w, l, n, sigma)
        ctx.save_for_backward(spec, dspec_w, f)
        ctx.n = n
        return torch.fft.irfft(spec, n=n, norm="forward")

    @staticmethod
    def backward(ctx, grad):
        spec, dspec_w, f = ctx.saved_tensors
        n = ctx.n
        gw = gl = None
        if ctx.needs_input_grad[0]:
            gw = (grad * torch.fft.irfft(dspec_w, n=n, norm="forward")).sum(-1)
        if ctx.needs_input_grad[1]:
            dspec_l = spec * (-2j * math.pi) * f
            gl = (grad * torch.fft.irfft(dspec_l, n=n, norm="forward")).sum(-1)
        return gw, gl, None, None


def gaudi_mask(w: torch.Tensor, l: torch.Tensor, n: int, sigma: float = math.inf) -> torch.Tensor:
    """Masks (C × n) of boxes with widths w and locations l (fractions, shape (C,)); see the module docstring."""
    if w.shape != l.shape or w.dim() != 1:
        raise ConfigError(f"gaudi_mask: widths {tuple(w.shape)} and locations {tuple(l.shape)} must be equal 1-D")
    return GaudiMask.apply(w, l, int(n), float(sigma))


def ste_round(v: torch.Tensor, scale: float) -> torch.Tensor:
    """round(v·scale)/scale in the forward (rounded in float64), identity in the backward."""
    q = (torch.round(v.detach().double() * scale) / scale).to(v.dtype)
    return v + (q - v).detach()


def counts(widths: torch.Tensor, dims: tuple[int, int], quantum: int = 1) -> torch.Tensor:
    """(2, C) int64: elements each rounded width covers, n = min(round(w·dim/q)·q, dim)."""
    out = []
    for side, dim in enumerate(dims):
        units = torch.round(widths[side].detach().double().clamp(0, 1) * (dim / quantum))
        out.append(torch.clamp(units.long() * quantum, max=dim))
    return torch.stack(out)


# ----------------------------------------------------------------------------- exported-form tables

def tile_tables(spec: GBLRSpec) -> dict[str, torch.Tensor]:
    """Chunk lists of the two stages of an exported layer (int32), derived from the spec's boxes."""
    T, s = spec.tile, spec.rank
    nti, nto = spec.tiles_in, spec.tiles_out
    ptr1, acol1, brow1, comp1, tile1 = [0], [], [], [], []
    cover: list[list[int]] = [[] for _ in range(nto)]
    row = 0
    for k, (ai, ni, ao, no) in enumerate(spec.boxes):
        for i in range(ni):
            t = (ai + i) % nti
            acol1.append(t * T)
            brow1.append(row)
            comp1.append(k)
            tile1.append(t)
            row += T
        ptr1.append(len(acol1))
        for i in range(no):
            cover[(ao + i) % nto].append(k)
    ptr2, acol2, comp2, tile2 = [0], [], [], []
    for j in range(nto):
        for k in cover[j]:
            acol2.append(k * s)
            comp2.append(k)
            tile2.append(j)
        ptr2.append(len(acol2))
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)
    return {"ptr1": i32(ptr1), "acol1": i32(acol1), "brow1": i32(brow1), "comp1": i32(comp1),
            "tile1": i32(tile1), "ptr2": i32(ptr2), "acol2": i32(acol2),
            "brow2": torch.arange(len(acol2), dtype=torch.int32) * s, "comp2": i32(comp2), "tile2": i32(tile2)}


# ----------------------------------------------------------------------------- the layer

class GBLRLinear(StructuredLinear):
    """A GBLR layer, training form (spec.tile == 0) or exported tile form (spec.tile > 0)."""

    spec_class = GBLRSpec
    PATHS = ("tiles", "dense")

    def __init__(self, spec: GBLRSpec, dtype=None, device=None):
        super().__init__(spec)
        N, K, C, s = spec.out_features, spec.in_features, spec.components, spec.rank
        self.quantum = 1                      # STE rounding unit in elements (training form)
        self.force_path: str | None = None
        self.last_path: str | None = None
        self._merged: dict = {}
        self._kcache: dict = {}               # fused kernel: job orders and counters per (M, tiles, device)
        self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device)) if spec.bias else None
        meta = torch.device(device).type == "meta" if device is not None else False
        if spec.tile == 0:
            self.weight_in = nn.Parameter(torch.empty(C, s, K, dtype=dtype, device=device))
            self.weight_out = nn.Parameter(torch.empty(N, C, s, dtype=dtype, device=device))
            self.widths = nn.Parameter(torch.zeros(2, C, dtype=torch.float32, device=device))
            self.locations = nn.Parameter(torch.zeros(2, C, dtype=torch.float32, device=device))
            self.register_buffer("sigma", torch.tensor(math.inf, dtype=torch.float32, device=device))
            if not meta:
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    self.weight_in.copy_(torch.randn(C, s, K, generator=g) * K ** -0.5)
                    self.weight_out.copy_(torch.randn(N, C, s, generator=g) * (C * s) ** -0.5)
                    self.widths.copy_(lowrank_widths(spec))
                    self.locations.copy_(torch.rand(2, C, generator=g))
        else:
            tabs = tile_tables(spec)
            for name, t in tabs.items():
                self.register_buffer(name, t.to(device) if device is not None and not meta else t,
                                     persistent=False)
            r_in, r_out = int(tabs["brow1"].numel()) * spec.tile, int(tabs["acol2"].numel()) * s
            self.w_in = nn.Parameter(torch.zeros(r_in, s, dtype=dtype, device=device))
            self.w_out = nn.Parameter(torch.zeros(r_out, spec.tile, dtype=dtype, device=device))

    # keep the structure parameters in float32 whatever dtype the model is cast to
    def _apply(self, fn, recurse=True):
        saved = {n: self._parameters.pop(n) for n in STRUCTURE if self._parameters.get(n) is not None}
        sigma = self._buffers.pop("sigma", None)
        super()._apply(fn, recurse)
        for n, p in saved.items():
            moved = fn(p.data)
            p.data = moved.float() if moved.is_floating_point() else moved
            if p.grad is not None:
                p.grad = fn(p.grad).float()
            self._parameters[n] = p
        if sigma is not None:
            self._buffers["sigma"] = fn(sigma).float()
        return self

    @property
    def trained(self) -> bool:
        return self.spec.tile == 0

    # ---- training form
    def dims(self) -> tuple[int, int]:
        return self.spec.in_features, self.spec.out_features

    def counts(self) -> torch.Tensor:
        """(2, C) elements covered by each rounded box (training form)."""
        return counts(self.widths, self.dims(), self.quantum)

    def active(self) -> torch.Tensor:
        c = self.counts()
        return (c[0] > 0) & (c[1] > 0)

    def masks(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_in (A × K), m_out (A × N)) at the rounded widths/locations of components `index` (all if None)."""
        K, N = self.dims()
        w, l = self.widths, self.locations
        if index is not None:
            w, l = w[:, index], l[:, index]
        dt = torch.float64 if self.weight_in.dtype == torch.float64 else torch.float32
        w, l = w.to(dt).clamp(0, 1), l.to(dt)
        sig = float(self.sigma)
        out = []
        for side, dim in enumerate((K, N)):
            scale = dim / self.quantum
            wq = ste_round(w[side], scale).clamp(max=1.0)
            lq = ste_round(l[side], scale)
            out.append(gaudi_mask(wq, lq, dim, sig))
        return out[0], out[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Vm (A·s × K), Um (N × A·s)): the masked factors of the active components."""
        idx = self.active().nonzero().squeeze(1)
        m_in, m_out = self.masks(idx)
        V = self.weight_in[idx] * m_in[:, None, :].to(self.weight_in.dtype)
        U = self.weight_out[:, idx, :] * m_out.T[:, :, None].to(self.weight_out.dtype)
        return V.reshape(-1, self.spec.in_features), U.reshape(self.spec.out_features, -1)

    # ---- both forms
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, lead = self.spec, x.shape[:-1]
        x2 = x.reshape(-1, s.in_features)
        if self.trained:
            V, U = self.factors()
            self.last_path = "factored"
            y = F.linear(F.linear(x2, V), U, self.bias)
        else:
            path = self.choose_path(x2)
            self.last_path = path
            if path == "dense":
                y = F.linear(x2, self.merged_weight(x2.device, x2.dtype), self.bias)
            else:
                y = self.tiles_forward(x2)
        return y.reshape(*lead, s.out_features)

    def tiles_forward(self, x2: torch.Tensor, use_triton: bool | None = None, configs=(None, None),
                      config: dict | None = None, fused: bool | None = None) -> torch.Tensor:
        """The tile form. Triton (CUDA by default; `use_triton=True` forces it, also under the interpreter):
        on Hopper in fp16/bf16 the persistent warp-specialised kernels, elsewhere the fused two-stage kernel
        (`config["kernel"]` = "ws" / "fused" picks one, the rest of `config` = its tiles),
        unless `fused=False`, which runs two `chunk_gemm` launches (`configs` = their tiles); otherwise the
        torch reference — also whenever autograd needs a backward (the kernels have none)."""
        s = self.spec
        C = s.components
        grad = self._records_grad(x2)
        if use_triton is None:     # the Triton kernels have no backward: autograd takes the torch path
            use_triton = not grad and x2.is_cuda and K_ops.triton_supported(x2, s.tile, s.rank) and \
                K_ops.triton_supported(x2, s.rank, s.tile)
        elif use_triton and grad:
            raise ConfigError(f"gblr layer {s.out_features}×{s.in_features}: the Triton tile kernels have no "
                              "backward; call them under torch.no_grad() (or with parameters that do not require "
                              "grad), or pass use_triton=False for the differentiable torch path")
        if use_triton and fused is not False:
            tabs = {n: getattr(self, n) for n in ("ptr1", "acol1", "brow1", "ptr2", "acol2", "brow2")}
            cfg = dict(config or {})
            kind = cfg.pop("kernel", None)
            if kind is None:
                kind = "ws" if x2.is_cuda and K_ops.ws_supported(x2, s.tile, s.rank, s.out_features) else "fused"
            if kind == "ws":
                return K_ops.gblr_forward_ws(x2, self.w_in, self.w_out, tabs, s.tile, s.rank, s.out_features,
                                             self.bias, cfg, self._kcache)
            if K_ops.fused_supported(x2.dtype, s.tile, s.rank):
                return K_ops.gblr_forward(x2, self.w_in, self.w_out, tabs, s.tile, s.rank, s.out_features,
                                          self.bias, config, self._kcache)
        h = K_ops.chunk_gemm(x2, self.w_in, self.ptr1, self.acol1, self.brow1, s.tile, C * s.rank,
                             use_triton=use_triton, config=configs[0], affine_width=s.tiles_in * s.tile)
        return K_ops.chunk_gemm(h, self.w_out, self.ptr2, self.acol2, self.brow2, s.rank, s.out_features,
                                self.bias, use_triton=use_triton, config=configs[1])

    def choose_path(self, x2: torch.Tensor) -> str:
        """Exported form: `tiles` (chunk-list GEMMs) or `dense` (cuBLAS on the merged weight, cached).
        Dense is taken for inference on CUDA where the tile kernels are not faster (see `path_rule`); the
        CPU always runs the tile reference (its cost follows the snapped FLOPs there too)."""
        if self.force_path is not None:
            return self.force_path
        return path_rule(self.spec, x2.shape[0], x2.device.type, self._records_grad(), x2.dtype)

    def _records_grad(self, x: torch.Tensor | None = None) -> bool:
        """Whether autograd records this call (grad mode on and a parameter — or `x` — requires grad)."""
        return torch.is_grad_enabled() and ((x is not None and x.requires_grad) or
                                            any(p.requires_grad for p in self.parameters()))

    def merged_weight(self, device, dtype) -> torch.Tensor:
        key = (device, dtype)
        ver = tuple((p._version, p.data_ptr()) for p in self.parameters())
        hit = self._merged.get(key)
        if hit is None or hit[0] != ver:
            with torch.no_grad():
                hit = (ver, self.to_dense().to(device=device, dtype=dtype))
            self._merged = {key: hit}
        return hit[1]

    def to_dense(self) -> torch.Tensor:
        if self.trained:
            V, U = self.factors()
            return U @ V
        V, U = self.tile_factors()
        return (U.reshape(self.spec.out_features, -1) @ V.reshape(-1, self.spec.in_features))

    def tile_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exported form as zero-filled factors (V (C, s, K), U (N, C, s)); for to_dense and tests."""
        s = self.spec
        T, r, C, K, N = s.tile, s.rank, s.components, s.in_features, s.out_features
        dt, dev = self.w_in.dtype, self.w_in.device
        ar = torch.arange(T, device=dev)
        V = torch.zeros(C, r, s.tiles_in * T, dtype=dt, device=dev)
        cols = (self.tile1.long()[:, None] * T + ar).reshape(-1)
        comp = self.comp1.long()[:, None].expand(-1, T).reshape(-1)
        V[comp, :, cols] = self.w_in
        U = torch.zeros(s.tiles_out * T, C, r, dtype=dt, device=dev)
        rows = (self.tile2.long()[:, None] * T + ar).reshape(-1)           # (E2·T)
        comp2 = self.comp2.long()[:, None].expand(-1, T).reshape(-1)
        blocks = self.w_out.reshape(-1, r, T).permute(0, 2, 1).reshape(-1, r)  # (E2·T, s)
        U[rows, comp2, :] = blocks
        return V[:, :, :K], U[:N]

    def flops(self, tokens: int = 1) -> int:
        return 2 * tokens * self.cost()

    def cost(self) -> int:
        """Multiply-adds per token of the structure: Σ_k s·(n_in,k + n_out,k) over active components."""
        if not self.trained:
            return self.spec.budget
        c = self.counts()
        act = (c[0] > 0) & (c[1] > 0)
        return int(self.spec.rank * (c[0][act].sum() + c[1][act].sum()))

    def extra_repr(self) -> str:
        s = self.spec
        form = "training" if self.trained else f"tiles of {s.tile}"
        return (f"in_features={s.in_features}, out_features={s.out_features}, components={s.components}, "
                f"rank={s.rank}, budget={s.budget}, form={form}, bias={s.bias}")


# Dispatch constants of the exported form on CUDA, from the H100 runs in docs/benchmarks/gblr_layer.md (40%
# FLOPs, Llama-7B shapes, the warp-specialised kernels): at M = 512 the tiles lose in 5 of 6 rows (0.58-1.05x),
# at M = 2048 they win (1.32-2.10x), at 4096 1.62-2.20x. The kernels run at 0.65-0.8 of cuBLAS's rate (the fused
# kernel of pre-Hopper GPUs at 0.55-0.66), so above half the dense FLOPs dense is taken.
PATH_MIN_TOKENS = 2048
PATH_MAX_FRACTION = 0.5


def path_rule(spec: GBLRSpec, M: int, device_type: str, training: bool, dtype) -> str:
    if device_type != "cuda" or training:
        return "tiles"
    frac = spec.budget / (spec.in_features * spec.out_features)
    ok = K_ops.triton_supported(torch.empty(0, dtype=dtype), spec.tile, spec.rank) and \
        K_ops.triton_supported(torch.empty(0, dtype=dtype), spec.rank, spec.tile)
    if not ok or M < PATH_MIN_TOKENS or frac > PATH_MAX_FRACTION:
        return "dense"
    return "tiles"


# ----------------------------------------------------------------------------- structure helpers

def lowrank_widths(spec: GBLRSpec) -> torch.Tensor:
    """(2, C) widths of the start-as-low-rank structure: the first components at full width on both sides
    while the budget allows, then one component at the width the remainder buys, the rest at 0."""
    K, N, s, C = spec.in_features, spec.out_features, spec.rank, spec.components
    w = torch.zeros(2, C)
    per = s * (K + N)
    full = min(C, spec.budget // per)
    w[:, :full] = 1.0
    if full < C:
        rem = spec.budget - full * per
        frac = rem / per
        # floor to whole elements so the rounded cost stays within the budget
        w[0, full] = math.floor(frac * K) / K
        w[1, full] = math.floor(frac * N) / N
    return w


def components_for(in_features: int, out_features: int, budget: int, opts) -> int:
    s = opts.rank
    r_eq = budget / (in_features + out_features)
    cap = -(-min(in_features, out_features) // s)
    return max(1, min(max(math.ceil(opts.capacity * r_eq / s), math.ceil(r_eq / s)), cap))


def gblr_layers(model: nn.Module, trained: bool | None = True) -> dict[str, GBLRLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)
            and (trained is None or m.trained == trained)}


def _wrap_locations(layer: GBLRLinear) -> None:
    with torch.no_grad():
        layer.locations.sub_(torch.floor(layer.locations))


# ----------------------------------------------------------------------------- init from a dense weight

def init_from_dense(layer: GBLRLinear, weight: torch.Tensor, bias, stats, opts, generator) -> dict:
    """Fill a training-form `layer` from the dense (N × K) float64 `weight` under `layer.spec.budget`.
    Returns {"objective": [...], "best": float, "lowrank_objective": float}."""
    from ..heal.gblr import project_layers
    from .lowrank import transform

    spec = layer.spec
    N, K, C, s = spec.out_features, spec.in_features, spec.components, spec.rank
    where = getattr(stats, "name", "") or f"gblr {N}×{K}"
    whiten = bool(opts.whiten and stats is not None and getattr(stats, "gram", None) is not None)
    a, undo = transform(weight, "whiten" if whiten else "svd", stats, damp=opts.damp, where=where)
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    R = min(C * s, S.numel())
    r = S[:R].sqrt()
    left = torch.zeros(N, C * s, dtype=weight.dtype)
    right = torch.zeros(C * s, K, dtype=weight.dtype)
    left[:, :R] = U[:, :R] * r
    right[:R] = undo(r[:, None] * Vh[:R])
    with torch.no_grad():
        layer.weight_out.copy_(left.reshape(N, C, s))
        layer.weight_in.copy_(right.reshape(C, s, K))
        if opts.init == "lowrank":
            layer.widths.copy_(lowrank_widths(spec))
        else:
            layer.widths.fill_(1.0)
        layer.locations.copy_(torch.rand(2, C, generator=generator, dtype=torch.float64).float())
        if layer.bias is not None and bias is not None:
            layer.bias.copy_(bias)
    project_layers({"": layer}, integer=True)
    info = {"objective": []}
    if whiten:
        from .lowrank import damped_cholesky

        Lw = damped_cholesky(stats.gram_mean().to(weight), opts.damp, where)
    else:
        Lw = None
    if opts.init_steps > 0:
        with torch.enable_grad():
            _refine(layer, weight, Lw, opts, info)
    if opts.sigma > 0:
        layer.sigma.fill_(opts.sigma)
    return info


def _objective(layer, target, Lw, norm2):
    V, U = layer.factors()
    if Lw is None:
        E = U @ V - target
    elif V.shape[0] < U.shape[0]:
        E = U @ (V @ Lw) - target
    else:
        E = (U @ V) @ Lw - target
    return (E * E).sum() / norm2


def _refine(layer: GBLRLinear, weight, Lw, opts, info) -> None:
    """Adam (factors: betas (0.9, 0.999), lr relative to each factor's RMS; structure: betas (0, 0.999))
    on the (whitened) reconstruction error, projected onto the budget after every step; keeps the best."""
    from ..heal.gblr import project_layers

    dt = torch.float32
    orig = layer.weight_in.dtype
    layer.to(dt)
    W = weight.to(dt)
    L32 = None if Lw is None else Lw.to(dt)
    target = W if L32 is None else W @ L32
    norm2 = (target * target).sum().clamp_min(1e-30)
    groups = []
    for p in (layer.weight_in, layer.weight_out):
        rms = float(p.detach().pow(2).mean().sqrt()) or 1.0
        groups.append({"params": [p], "lr": opts.init_lr * rms})
    groups.append({"params": [layer.widths, layer.locations], "lr": opts.init_structure_lr, "betas": (0.0, 0.999)})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    best, best_state = math.inf, None
    for step in range(opts.init_steps + 1):
        loss = _objective(layer, target, L32, norm2)
        val = float(loss.detach())
        info["objective"].append(val)
        if val < best:
            best = val
            best_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        if step == opts.init_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        project_layers({"": layer}, integer=True)
    layer.load_state_dict(best_state)
    for p in layer.parameters():
        p.grad = None
    info["best"] = best
    info["start"] = info["objective"][0]
    layer.to(orig)


# ----------------------------------------------------------------------------- export

def snapped_boxes(layer: GBLRLinear, tile: int) -> list[tuple[int, int, int, int, int]]:
    """[(k, a_in, n_in, a_out, n_out)] in tiles for the components with both snapped widths > 0."""
    K, N = layer.dims()
    out = []
    w = layer.widths.detach().double().clamp(0, 1)
    l = layer.locations.detach().double()
    nti, nto = -(-K // tile), -(-N // tile)
    for k in range(layer.spec.components):
        ni = min(int(torch.round(w[0, k] * K / tile)), nti)
        no = min(int(torch.round(w[1, k] * N / tile)), nto)
        if ni == 0 or no == 0:
            continue
        ai = int(torch.round(l[0, k] * K / tile)) % nti
        ao = int(torch.round(l[1, k] * N / tile)) % nto
        out.append((k, ai, ni, ao, no))
    return out


def export_layer(layer: GBLRLinear, tile: int | None = None) -> GBLRLinear:
    """The exported (tile-form) layer of a training-form `layer`, boxes snapped to `tile` as they stand
    (call `export` to charge the budget after snapping first). Components with an empty box are dropped."""
    if not layer.trained:
        raise ConfigError("export_layer: the layer is already exported")
    s = layer.spec
    T = tile or layer.quantum
    if T < 1:
        raise ConfigError(f"export tile must be >= 1, got {T}")
    found = snapped_boxes(layer, T)
    if not found:
        raise ConfigError(f"gblr layer {s.out_features}×{s.in_features}: every component has an empty box at "
                          f"tile {T}; the budget is too small for one tile — keep the layer dense or use a smaller tile")
    found.sort(key=lambda b: -b[2])  # longest input boxes first (load balance of stage 1)
    boxes = tuple(b[1:] for b in found)
    spec = GBLRSpec(s.in_features, s.out_features, s.bias, components=len(boxes), rank=s.rank,
                    budget=s.rank * T * sum(b[1] + b[3] for b in boxes), tile=T, boxes=boxes)
    dev, dt = layer.weight_in.device, layer.weight_in.dtype
    new = GBLRLinear(spec, dtype=dt, device=dev)
    ids = torch.tensor([b[0] for b in found], device=dev)
    with torch.no_grad():
        V = F.pad(layer.weight_in[ids], (0, spec.tiles_in * T - s.in_features))      # (C', s, Kp)
        U = F.pad(layer.weight_out[:, ids], (0, 0, 0, 0, 0, spec.tiles_out * T - s.out_features))  # (Np, C', s)
        ar = torch.arange(T, device=dev)
        cols = new.tile1.long()[:, None] * T + ar                                  # (E1, T)
        new.w_in.copy_(V[new.comp1.long()[:, None], :, cols].reshape(-1, s.rank))
        rows = new.tile2.long()[:, None] * T + ar                                  # (E2, T)
        blk = U[rows, new.comp2.long()[:, None], :]                                # (E2, T, s)
        new.w_out.copy_(blk.permute(0, 2, 1).reshape(-1, T))
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def export(model: nn.Module, tile: int = 64, budget: str = "layer", floor: float = 0.25) -> dict:
    """Snap every training-form GBLR layer of `model` to `tile` (in place). Widths are first projected so
    that the *snapped* cost fits the budget (`budget="layer"`: each layer its spec budget; `"network"`: the
    sum, with per-layer floors), then each layer is replaced by its exported form. Returns name -> summary."""
    from ..heal.gblr import project_layers
    from ..modules import set_submodule

    layers = gblr_layers(model)
    if not layers:
        raise ConfigError("export: the model has no training-form gblr layers")
    for layer in layers.values():
        layer.quantum = tile
    project_layers(layers, budget=budget, floor=floor, integer=True)
    out = {}
    for name, layer in layers.items():
        new = export_layer(layer, tile)
        set_submodule(model, name, new)
        out[name] = {"budget": layer.spec.budget, "snapped": new.spec.budget, "components": new.spec.components}
    return out


# ----------------------------------------------------------------------------- the method

class GBLR(Method):
    name = "gblr"
    Options = GBLROptions
    Spec = GBLRSpec
    Layer = GBLRLinear

    def stats_needed(self, opts) -> set[str]:
        return {"gram"} if opts.whiten else set()

    def candidates(self, in_features, out_features, bias, opts):
        def make(r):
            b = r * (in_features + out_features)
            return GBLRSpec(in_features, out_features, bias, components=components_for(in_features, out_features,
                                                                                        b, opts),
                            rank=opts.rank, budget=b)

        return self.rank_ladder(make, in_features, out_features, bias)

    def spec_params(self, spec):
        return spec.budget + spec.out_features * spec.bias

    def spec_flops(self, spec, tokens=1):
        return 2 * tokens * spec.budget

    def project(self, weight, bias, spec, stats, opts, generator):
        if spec.tile:
            raise ConfigError("gblr: project builds the training form; export afterwards with "
                              "structlin.methods.gblr.export")
        layer = GBLRLinear(spec, dtype=weight.dtype, device=weight.device)
        layer.init_info = init_from_dense(layer, weight, bias, stats, opts, generator)
        return layer

    def training_hooks(self, model, layers, options):
        from ..heal.gblr import GBLRHook

        trained = {n: m for n, m in layers.items() if m.trained}
        unknown = sorted(set(options) - set(GBLRHook.OPTIONS))
        if unknown:
            raise ConfigError(f"unknown gblr hook option(s) {unknown}; valid options: {list(GBLRHook.OPTIONS)}")
        return [GBLRHook(trained, **options)] if trained else []


register(GBLR())
