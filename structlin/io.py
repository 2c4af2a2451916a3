"""Save and load compressed models: base `config.json` + `structlin.json` + `model.safetensors`.

`structlin.json` holds the format version and, per structured module, its method and spec. Loading builds
the base architecture from its config, swaps in empty structured modules rebuilt from the specs, checks
every tensor's name and shape against the file's header, then loads the weights. Nothing is unpickled.
Saving is atomic: everything is written into a temporary sibling directory that is renamed into place
only when complete, so an interrupted save leaves the previous model intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from . import methods
from .errors import LoadError, StructlinError
from .methods.base import StructuredLinear
from .modules import is_linear, linear_shape, set_submodule

FORMAT_VERSION = 1
META = "structlin.json"
WEIGHTS = "model.safetensors"


def structure_of(model: nn.Module) -> dict[str, dict]:
    """name -> {"method", "spec"} for every structured module of `model`."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, StructuredLinear):
            out[name] = {"method": methods.for_layer(mod).name, "spec": mod.spec.to_dict()}
    return out


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_pretrained(model: nn.Module, path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` (compressed or not) to directory `path`; refuse to replace it unless `overwrite`.

    Under a torch.distributed process group only rank 0 writes; every rank returns once the files exist."""
    from . import distributed

    path = Path(path)
    if distributed.active():
        error = None
        if distributed.is_main():
            try:
                _save(model, path, tokenizer, overwrite)
            except BaseException as e:  # tell the other ranks, then raise here
                error = e
        flag = [error is not None]
        import torch.distributed as dist
        dist.broadcast_object_list(flag, src=0)
        if error is not None:
            raise error
        if flag[0]:
            raise StructlinError(f"rank 0 failed to save {path}; see its error")
        return path
    return _save(model, path, tokenizer, overwrite)


def _save(model: nn.Module, path: Path, tokenizer, overwrite: bool) -> Path:
    from safetensors.torch import save_model

    import structlin

    if path.exists() and not overwrite:
        raise StructlinError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if path.exists() and not path.is_dir():
        raise StructlinError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            if _is_transformers_model(model):   # as transformers' own save: the class saved is the class loaded
                config.architectures = [type(model).__name__]
            config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            with contextlib.suppress(Exception):
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights = tmp / WEIGHTS
        save_model(model, str(weights), metadata={"format": "pt", "structlin_format": str(FORMAT_VERSION)})
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        meta = {
            "format_version": FORMAT_VERSION,
            "structlin_version": structlin.__version__,
            "torch_dtype": str(dtype).replace("torch.", ""),
            "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
            "weights_bytes": weights.stat().st_size,
            "modules": structure_of(model),
            "history": getattr(model, "structlin_history", []),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path) -> dict:
    """The parsed `structlin.json` of a saved directory, with its files and version checked."""
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path} is not a directory saved by structlin.save_pretrained")
    missing = [f for f in (META, WEIGHTS) if not (path / f).is_file()]
    if missing:
        raise LoadError(f"{path} is missing {', '.join(missing)}; a structlin directory holds config.json, "
                        f"{META} and {WEIGHTS}")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path / META} is not valid JSON ({e})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise LoadError(f"{path / META} has no integer format_version")
    if version > FORMAT_VERSION:
        raise LoadError(f"{path} was written in structlin format {version}; this structlin reads format "
                        f"<= {FORMAT_VERSION}: upgrade structlin")
    size = (path / WEIGHTS).stat().st_size
    if "weights_bytes" in meta and size != meta["weights_bytes"]:
        raise LoadError(f"{path / WEIGHTS} is {size} bytes but was saved as {meta['weights_bytes']}: the file is "
                        f"truncated or was replaced; re-save the model")
    return meta


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.PreTrainedModel) and hasattr(transformers, type(model).__name__)


def _build_base(path: Path, meta: dict, dtype):
    import transformers

    if not (path / "config.json").is_file():
        raise LoadError(f"{path} has no config.json; pass model= (an instance of the dense architecture) to "
                        f"structlin.from_pretrained")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (meta.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
        build = lambda: cls.from_config(config)
    else:
        build = lambda: cls._from_config(config)
    # A plain build: skipping initialisation (transformers' no_init_weights) leaves some non-persistent
    # buffers uninitialised in some architectures, which the weights file cannot repair.
    return build().to(dtype)


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError has no stable import path across versions
        raise LoadError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); it is corrupted "
                        f"or truncated") from None


def from_pretrained(path, *, model: nn.Module | None = None, dtype=None, device=None) -> nn.Module:
    """Rebuild a model saved by `save_pretrained`: architecture, structured modules from specs, weights.

    model: optional dense skeleton to load into (for models without a transformers config).
    dtype: cast after loading (default: the saved dtype, bit-identical). device: where to load.
    """
    from safetensors.torch import load_model

    path = Path(path)
    meta = read_meta(path)
    saved_dtype = getattr(torch, meta.get("torch_dtype", "float32"), torch.float32)
    if model is None:
        model = _build_base(path, meta, saved_dtype)
    for name, entry in meta.get("modules", {}).items():
        try:
            method = methods.get(entry["method"])
            spec = method.Spec.from_dict(entry["spec"])
        except (KeyError, TypeError, StructlinError) as e:
            raise LoadError(f"{path / META}: module '{name}' has an unusable entry ({e})") from None
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise LoadError(f"{path / META} names module '{name}', which the {type(model).__name__} architecture "
                            f"does not have") from None
        if isinstance(dense, StructuredLinear) and dense.spec == spec:
            continue
        if not is_linear(dense) or linear_shape(dense)[:2] != (spec.in_features, spec.out_features):
            raise LoadError(f"module '{name}': saved as {spec.out_features}×{spec.in_features} "
                            f"{entry['method']}, but the architecture has {type(dense).__name__} "
                            f"{tuple(getattr(dense, 'weight', torch.empty(0)).shape)}")
        ref = next(dense.parameters())
        set_submodule(model, name, method.build(spec, dtype=ref.dtype, device=ref.device))
    weights = path / WEIGHTS
    header = _header(weights)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unexpected = sorted(set(header) - set(state))
    if unexpected:
        raise LoadError(f"{weights} holds tensors the model does not have: {unexpected[:6]}")
    bad = [(k, header[k], state[k]) for k in header if header[k] != state[k]]
    if bad:
        k, got, want = bad[0]
        raise LoadError(f"{weights}: tensor '{k}' has shape {got} but the model expects {want} "
                        f"({len(bad)} mismatches)")
    try:
        missing, _ = load_model(model, str(weights), strict=False, device=str(device or "cpu"))
    except Exception as e:
        raise LoadError(f"{weights} could not be read ({type(e).__name__}: {e}); it is corrupted or "
                        f"truncated") from None
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()  # tied aliases (lm_head / embeddings) are saved once
        loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in header}
        missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()  # tied aliases (lm_head / embeddings) are saved once
        loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in header}
        missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if missing:
        raise LoadError(f"{weights} lacks tensors the model needs: {sorted(missing)[:6]}")
    for mname in sorted({e.get("method") for e in meta.get("modules", {}).values()}):
        if hasattr(methods.get(mname), "link"):  # layers sharing a tensor (ESPACE's shared P) connect to it
            methods.get(mname).link(model)
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    model.structlin_history = meta.get("history", [])
    return model.eval()
