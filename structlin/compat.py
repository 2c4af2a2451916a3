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


# ----------------------------------------------------------------------------- LoSparse (Li et al., ICML 2023)
#
# The released three-step recipe runs unchanged:
#
#     compat.substitute_layer_weights(module=model, allow_name=allow_name, block_name=block_name,
#                                     parameter_ratio=0.05, do_svd=True)
#     pruner = compat.Pruner(model=model, args=args, total_step=T, mask_param_name=['sparse'],
#                            pruner_name='PLATON', structured_method='mean', structured_direction='row')
#     ... loss.backward(); optimizer.step()
#     threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)
#     ... optimizer.zero_grad()
#
# Differences from the released code, all deliberate: layers with a released-style name match are
# `LoSparseLinear`s (stacked rank-(r+k) storage, any batch shape and dtype, save/load through structlin.io);
# the rank is the released ceil(p·N·K/(N+K)) (no tile rounding, so released checkpoints' shapes hold);
# a bias exists only where the dense layer had one; nothing is printed, and matching nothing warns;
# `args.beta2` must lie in (0, 1] (the released 2.0 branch crashed); a pruned row never regrows; pass
# `optimizer=` to `Pruner` and pruned rows leave memory during training (else `prune(model)` drops them).

def _losparse_layer(linear: nn.Linear, ratio: float, has_sparse: bool, do_svd: bool):
    from .methods.losparse import LoSparseLinear, LoSparseSpec, build_layer

    N, K = linear.out_features, linear.in_features
    if not (isinstance(ratio, (int, float)) and 0 <= ratio <= 1):
        raise ConfigError(f"parameter_ratio must be a fraction in [0, 1], got {ratio!r}")
    r = min(math.ceil(ratio * N * K / (N + K)), min(N, K))
    bias = linear.bias is not None
    spec = LoSparseSpec(K, N, bias, rank=r, kept=N if has_sparse else 0, target=N if has_sparse else 0)
    w = linear.weight.detach()
    if not do_svd:  # the released do_svd=False: L, R, S all zero
        layer = LoSparseLinear(spec, dtype=w.dtype, device=w.device)
        if bias:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer
    w64 = w.to(torch.float64)
    U, S, Vh = torch.linalg.svd(w64, full_matrices=False)
    root = S[:r].sqrt()
    u, v = U[:, :r] * root, root[:, None] * Vh[:r]
    lines = torch.arange(spec.kept, device=w.device)
    b64 = None if not bias else linear.bias.detach().to(torch.float64)
    layer = build_layer(w64, b64, spec, u, v, lines)
    return layer.to(dtype=w.dtype).train(linear.training)


def substitute_layer_weights(module: nn.Module, allow_name=None, block_name=None, parameter_ratio: float = 0.15,
                             has_sparse: bool = True, do_svd: bool = True, **kwargs) -> nn.Module:
    """Replace, in place, every `nn.Linear` child whose attribute name is a substring of an entry of
    `allow_name` by a LoSparse layer W ≈ L R + S (S = the full SVD residual, so the model is unchanged),
    recursing into children whose name is not a substring of an entry of `block_name` (the released
    matching rules and defaults). Returns `module`."""
    unknown = sorted(set(kwargs) - {"remove_criteria", "log_level", "return_dict"})
    if unknown:
        raise TypeError(f"substitute_layer_weights() got unexpected keyword argument(s) {unknown}")
    if kwargs.get("remove_criteria", "max_eigenvalue") != "max_eigenvalue":
        raise ConfigError("substitute_layer_weights: only remove_criteria='max_eigenvalue' (the released "
                          "scripts' choice) is supported")
    allow = list(allow_name) if allow_name is not None else ["query", "key", "value", "dense", "attention"]
    block = list(block_name) if block_name is not None else ["pooler", "classifier", "LayerNorm", "embeddings"]
    replaced: list[str] = []

    def walk(mod: nn.Module, prefix: str):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear and any(name in a for a in allow):
                setattr(mod, name, _losparse_layer(child, parameter_ratio, has_sparse, do_svd))
                replaced.append(prefix + name)
            elif not any(name in b for b in block):
                walk(child, prefix + name + ".")

    walk(module, "")
    if not replaced:
        warnings.warn(f"substitute_layer_weights: no nn.Linear matched allow_name={allow}; the model is "
                      f"unchanged", stacklevel=2)
    module.structlin_losparse_replaced = replaced
    return module


def _arg(args, name, default=None):
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


class Pruner:
    """The released `utils.Pruner` on `structlin.heal.losparse.LoSparsePruner`.

    Reads beta1, beta2, deltaT, initial_threshold, final_threshold, initial_warmup, final_warmup and
    warmup_steps from `args` (a namespace or dict): t_i = initial_warmup·warmup_steps, t_f =
    final_warmup·warmup_steps, r_f = final_threshold, ρ₀ = initial_threshold. `pruner_name`: 'PLATON' or
    'Magnitude'; `structured_method`: 'mean', 'sum' or 'max'; `structured_direction` must match the
    layers ('row' for `substitute_layer_weights`)."""

    def __init__(self, model, args, total_step, tb_writer=None, mask_param_name=None, non_mask_name=None,
                 use_no_mask=False, pruner_name="PLATON", structured_method="mean", structured_direction="row",
                 optimizer=None):
        from .heal.losparse import LoSparsePruner
        from .methods.losparse import LoSparseLinear

        if mask_param_name not in (None, ["sparse"], ("sparse",)) or use_no_mask:
            raise ConfigError("Pruner: only the sparse part of LoSparse layers is pruned (mask_param_name="
                              "['sparse'], use_no_mask=False)")
        names = {"PLATON": "platon", "Magnitude": "magnitude"}
        if pruner_name not in names:
            raise ConfigError(f"Pruner: pruner_name must be one of {list(names)}, got {pruner_name!r}")
        if structured_direction not in ("row", "col"):
            raise ConfigError(f"Pruner: structured_direction must be 'row' or 'col' ('row_col' is not supported: "
                              f"it chose by single letters of parameter names), got {structured_direction!r}")
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoSparseLinear)}
        if not layers:
            raise ConfigError("Pruner: the model has no LoSparse layer; call substitute_layer_weights first")
        wrong = [n for n, m in layers.items() if m.spec.direction != structured_direction]
        if wrong:
            raise ConfigError(f"Pruner: structured_direction={structured_direction!r} but layers such as "
                              f"{wrong[0]!r} were built for direction {layers[wrong[0]].spec.direction!r}")
        unit = int(_arg(args, "warmup_steps", 0) or 0)
        self.total_step = int(total_step)
        self.hook = LoSparsePruner(
            layers, total_steps=self.total_step,
            initial_warmup=int(_arg(args, "initial_warmup", 1)) * unit,
            final_warmup=int(_arg(args, "final_warmup", 3)) * unit,
            delta_t=int(_arg(args, "deltaT", 10)),
            final_keep=float(_arg(args, "final_threshold", 0.1)),
            initial_keep=float(_arg(args, "initial_threshold", 1.0)),
            beta1=float(_arg(args, "beta1", 0.85)), beta2=float(_arg(args, "beta2", 1.0)),
            score=names[pruner_name], aggregate=structured_method, ranking="global", optimizer=optimizer)

    def update_and_pruning(self, model, global_step):
        """After `optimizer.step()`, before `zero_grad()`: returns (kept fraction ρ(t), score cut or None)."""
        return self.hook.step(model, int(global_step))


def prune(module: nn.Module) -> nn.Module:
    """The released `utils.prune`: drop the pruned rows of every LoSparse layer (keeps the kept rows only)."""
    from .methods.losparse import compact

    compact(module)
    return module


__all__ += ["substitute_layer_weights", "Pruner", "prune"]
