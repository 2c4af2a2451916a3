"""The method registry: name -> `Method` (its Options, Spec, Layer and projection).

`compress` never names a method; it looks it up here. A new structure is one module in this package
that defines a `Method` subclass and calls `register` on import.
"""
from __future__ import annotations

from ..errors import ConfigError
from .base import Method, Spec, StructuredLinear

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available methods: {available()}") from None


def for_layer(layer: StructuredLinear) -> Method:
    """The registered method whose Layer class built `layer`."""
    for cls in type(layer).__mro__:  # the closest registered class (subclasses such as compat.SSL too)
        for m in _REGISTRY.values():
            if cls is m.Layer:
                return m
    raise ConfigError(f"{type(layer).__name__} is not a registered structured layer")


from . import espace, lowrank, ss1  # noqa: E402,F401  (each registers itself)
from . import gblr  # noqa: E402,F401

__all__ = ["Method", "Spec", "StructuredLinear", "register", "available", "get", "for_layer"]
from . import losparse  # noqa: E402,F401  (LoSparse: low-rank + row-structured sparse)
