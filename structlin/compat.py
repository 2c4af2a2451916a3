"""The seed papers' APIs, mapped onto structlin, so seed users keep their code.

SS1 (Desai et al., NeurIPS 2024, released package):

* ``SSL(in_features, out_features, bias=True, redn_factor=2, seed=1024, device=None, dtype=None, **kwargs)``
  — a tied-scheme `SS1Linear` (the released kernel's function, ``redn_factor`` = r, hash block bk = 32 =
  the released default BLOCK_SIZE_K). Differences from the released module, all deliberate:

  - ``device`` is honoured (the released one always built on CPU), as is ``dtype``;
  - the global RNG is never touched (the released constructor calls ``torch.manual_seed(seed)``): the
    Xavier-uniform init over the stored (N × K/r) weight draws from a local generator seeded with ``seed``.
    As in the released module, same seed and shape ⇒ same initial weights;
  - the released tile kwargs ``BLOCK_SIZE_M/K/N``, ``batch_size`` (autotune) and ``layer_idx`` are accepted
    and ignored with a warning: in structlin tile sizes never change the function. (In the released code
    BLOCK_SIZE_K *did* change the function, so checkpoints silently changed meaning when autotuning picked
    another BK; ``layer_idx`` never had an effect.) To import released weights, use
    `structlin.methods.ss1.from_released(weight, spec, bn)` with the released seed and BLOCK_SIZE_N;
  - ``saving`` is the released property's value, K_c / K: the *stored* fraction of the dense weight's
    input width (≈ 1/r), despite the name.

  ``isinstance(m, SSL)`` is true for every tied-scheme `SS1Linear` (e.g. the layers `convert_to_ss_linear`
  builds), so released code that counts converted layers that way keeps working.

* ``convert_to_ss_linear(model, reduction_factor, layer_indices=None, skip_attention=False, init_seed=42,
  skip_pattern=None, *, calib=None, options=None, progress=False)`` — the released meaning:

  - ``layer_indices``: transformer blocks to keep **dense** (BERT ``layer.N.``, GPT-2 ``h.N.``, Llama
    ``layers.N.``, ``block(s).N.``; the released code matched only BERT's ``layer.N.``);
  - ``skip_attention``: keep attention linears dense — any module whose dotted path has a component
    containing ``attention`` or ``attn`` (BERT ``attention``, GPT-2 ``attn``/``crossattention``, Llama
    ``self_attn``);
  - ``skip_pattern``: keep dense every module whose dotted path contains any of the given substrings;
  - every other ``nn.Linear`` and transformers ``Conv1D`` is converted, classifier heads included (as
    released), bias or not, on the old layer's device and dtype — except the output head (``lm_head`` /
    ``get_output_embeddings()``), which is never converted.

  It builds the exact list of modules and calls `structlin.compress` with the ``ss1`` method
  (``scheme="tied"``, ``r=reduction_factor``), so the report, `save_pretrained` and `from_pretrained` all
  work. Projection: averaging of the tied entries (the released projection) unless ``calib`` (batches of
  ``input_ids`` or dicts of model kwargs) is given, then calibration least squares. ``options`` adds or
  overrides ss1 options (e.g. ``{"scheme": "table"}``). Returns the model, modified in place, with the
  `Report` as ``model.structlin_report``.

  Seeds: the released function gave the k-th converted layer seed ``init_seed + k``. For the tied scheme
  the seed does not change the function (reference ss1 §1.4: it only relabels stored parameters) and the
  projection overwrites the initial weights, so structlin stores no per-layer seed; ``init_seed`` is
  recorded as the compression seed (``CompressConfig.seed``, kept in the saved history), from which each
  layer of a seeded scheme (``blockwise``) gets its own seed via `structlin.compress.layer_generator`.

  Layers too narrow for the reduction factor (ss1 needs in_features ≥ r; K is padded to a multiple of r·bk) or that would not get
  smaller stay dense, with a warning naming them.
"""
from __future__ import annotations

import math
import re
import warnings

import torch
from torch import nn

from . import methods, targeting
from .compress import compress
from .config import CompressConfig
from .errors import ConfigError, StructlinError
from .methods.ss1 import SS1Linear, SS1Spec
from .modules import linear_shape

__all__ = ["SSL", "convert_to_ss_linear"]

RELEASED_BK = 32  # the released SSL's default BLOCK_SIZE_K, i.e. its hash block
_IGNORED_KWARGS = ("BLOCK_SIZE_M", "BLOCK_SIZE_K", "BLOCK_SIZE_N", "batch_size", "layer_idx")


class _SSLType(type(SS1Linear)):
    def __instancecheck__(cls, obj) -> bool:
        if type(obj) is cls or super().__instancecheck__(obj):
            return True
        return cls is SSL and isinstance(obj, SS1Linear) and obj.spec.scheme == "tied"


class SSL(SS1Linear, metaclass=_SSLType):
    """The released SS1 module's constructor on structlin's tied `SS1Linear` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, redn_factor: int = 2,
                 seed: int = 1024, device=None, dtype=None, **kwargs):
        unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS))
        if unknown:
            raise TypeError(f"SSL() got unexpected keyword argument(s) {unknown}; the released SSL also takes "
                            f"{list(_IGNORED_KWARGS)} (accepted and ignored)")
        given = [k for k in _IGNORED_KWARGS if k in kwargs]
        if given:
            warnings.warn(f"SSL: ignoring the released tile/autotune argument(s) {given}: in structlin tile sizes "
                          f"never change the function (the hash block is fixed at bk={RELEASED_BK}, the released "
                          f"default BLOCK_SIZE_K)", UserWarning, stacklevel=2)
        if isinstance(redn_factor, bool) or not isinstance(redn_factor, int) or redn_factor < 1:
            raise ConfigError(f"SSL: redn_factor must be an integer >= 1, got {redn_factor!r}")
        spec = SS1Spec(int(in_features), int(out_features), bool(bias), r=redn_factor, bk=RELEASED_BK,
                       seed=int(seed), scheme="tied")
        super().__init__(spec, dtype=dtype, device=device)
        with torch.no_grad():  # the released init: Xavier-uniform over the stored (N × K_c) weight, bias 0
            bound = math.sqrt(6.0 / (spec.buckets + spec.out_features))
            gen = torch.Generator(device=self.weight.device).manual_seed(int(seed))
            self.weight.uniform_(-bound, bound, generator=gen)

    @property
    def redn_factor(self) -> int:
        return self.spec.r

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def saving(self) -> float:
        """As released: K_c / K, the stored fraction of the dense weight's input width (≈ 1/r)."""
        return self.spec.buckets / self.spec.in_features


def _is_attention(name: str) -> bool:
    return any("attention" in part or "attn" in part for part in name.lower().split("."))


def convert_to_ss_linear(model: nn.Module, reduction_factor: int, layer_indices=None, skip_attention: bool = False,
                         init_seed: int = 42, skip_pattern=None, *, calib=None, options: dict | None = None,
                         progress: bool = False) -> nn.Module:
    """Replace the model's linear layers by SS1 ones, in place, with the released function's meaning.

    See the module docstring. Returns `model` (with the `Report` as ``model.structlin_report``).
    """
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 1:
        raise ConfigError(f"reduction_factor must be an integer >= 1, got {reduction_factor!r}")
    if isinstance(skip_pattern, str):
        skip_pattern = [skip_pattern]
    patterns = list(skip_pattern or [])
    if isinstance(layer_indices, int) and not isinstance(layer_indices, bool):
        layer_indices = [layer_indices]
    keep_dense_blocks = {int(i) for i in (layer_indices or [])}

    opts_dict = {"r": reduction_factor, "scheme": "tied", "bk": RELEASED_BK,
                 "projection": "average" if calib is None else "lstsq"}
    opts_dict.update(options or {})
    probe = CompressConfig(method="ss1", keep=1.0, options=opts_dict, seed=int(init_seed))  # validates options
    method, opts = methods.get("ss1"), probe.method_options()

    heads = targeting.output_head_names(model)
    names, skipped_small = [], []
    structured, dense_params = 0, 0
    for name, module in targeting.linear_modules(model).items():
        if name in heads or any(p in name for p in patterns):
            continue
        if targeting.block_index(name) in keep_dense_blocks:
            continue
        if skip_attention and _is_attention(name):
            continue
        k, n, b = linear_shape(module)
        try:
            cands = method.candidates(k, n, b, opts)
        except StructlinError:
            cands = []
        if not cands:
            skipped_small.append(f"{name} ({n}×{k})")
            continue
        names.append(name)
        structured += method.spec_params(cands[0])
        dense_params += k * n + n * b
    if skipped_small:
        warnings.warn(f"convert_to_ss_linear: {len(skipped_small)} layer(s) stay dense because SS1 at "
                      f"reduction_factor={reduction_factor} (hash block {opts.bk}) would not make them smaller "
                      f"or needs in_features >= {reduction_factor}: "
                      f"{', '.join(skipped_small[:8])}{' …' if len(skipped_small) > 8 else ''}", stacklevel=2)
    if not names:
        warnings.warn("convert_to_ss_linear: no layer to convert (all skipped); the model is unchanged",
                      stacklevel=2)
        model.structlin_report = None
        return model

    # One candidate per layer (r is fixed); a keep equal to their total makes compress take exactly it.
    keep = min(structured / dense_params, 1.0)
    targets: list | str = names
    if list(targeting.select(model, names)) != names:  # a full name that is also a dotted suffix of another
        targets = "|".join(re.escape(n) for n in names)
    cfg = CompressConfig(method="ss1", keep=keep, targets=targets, options=opts_dict, seed=int(init_seed))
    report = compress(model, cfg, calib=calib, progress=progress)
    left = [row.name for row in report.rows if not row.structure.startswith("ss1")]
    if left:  # cannot happen with one candidate per layer; guard the keep arithmetic above
        raise StructlinError(f"convert_to_ss_linear: internal error, layers left dense: {left[:6]}")
    model.structlin_report = report
    return model
