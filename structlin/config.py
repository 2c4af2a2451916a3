"""`CompressConfig` and the validation of per-method option dataclasses.

A config round-trips through JSON (`to_json` / `from_json`), so a saved model records exactly how it was
made. Method options live in `options` as a plain dict and are checked against the method's own option
dataclass (see `parse_options`), so a typo is an error that lists the valid names, never a silent default.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import ConfigError

Targets = Union[str, list, tuple]
ALLOCATIONS = ("uniform", "spectral", "fisher", "measured")
MIXED = "mixed"   # CompressConfig.method choosing a structure per layer among options["methods"]


def choice(default, choices, help=""):
    """A dataclass field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def option(default, help="", low=None, high=None):
    """A dataclass field with an optional numeric range [low, high]."""
    return field(default=default, metadata={"help": help, "low": low, "high": high})


def parse_options(cls, given: dict | None, method: str):
    """Build option dataclass `cls` from a dict, rejecting unknown names, wrong types and bad values."""
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for method '{method}'; valid options: "
            + ", ".join(f"{n} (default {f.default!r})" for n, f in fields.items()))
    values = {}
    for name, f in fields.items():
        if name not in given:
            continue
        v = given[name]
        kind = type(f.default)
        if kind is bool and not isinstance(v, bool):
            raise ConfigError(f"option '{name}' of method '{method}' must be true or false, got {v!r}")
        if kind in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"option '{name}' of method '{method}' must be a number, got {v!r}")
        if kind is int and not float(v).is_integer():
            raise ConfigError(f"option '{name}' of method '{method}' must be an integer, got {v!r}")
        if kind is int:
            v = int(v)
        if kind is float:
            v = float(v)
            if not math.isfinite(v):
                raise ConfigError(f"option '{name}' of method '{method}' must be finite, got {v!r}")
        if "choices" in f.metadata and v not in f.metadata["choices"]:
            raise ConfigError(f"option '{name}' of method '{method}' must be one of "
                              f"{list(f.metadata['choices'])}, got {v!r}")
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if low is not None and v < low or high is not None and v > high:
            raise ConfigError(f"option '{name}' of method '{method}' must lie in "
                              f"[{low}, {high}], got {v!r}")
        values[name] = v
    return cls(**values)


@dataclass
class CompressConfig:
    """What to compress and how.

    method:  a registered structure ("lowrank", ...); see `structlin.methods.available()`.
    keep:    fraction in (0, 1] of the *targeted* linear parameters kept after compression.
    targets: "all-linear" (every nn.Linear / Conv1D but the output head), a list of exact names or
             dotted suffixes, a regex (full match on the module name), or an ESPACE expression
             ("a__AND__b__OR__c__NOT__d", substring semantics).
    exclude: names, suffixes or a regex to leave out (same forms as `targets`).
    layers:  indices of transformer blocks to touch (BERT `layer.N.`, GPT-2 `h.N.`, Llama `layers.N.`).
    options: the method's own settings, validated against its option dataclass.
    seed:    seed for any randomness in projection (a local generator; the global RNG is never touched).
    allocation: how keep is split over the layers (see `structlin.budget`): "uniform" (each layer keeps the
             same fraction), "spectral" (greedy on the relative calibration output error removed per
             parameter, from the statistics alone), "fisher" (greedy on the Fisher-weighted output error, an
             estimate of the loss increase; one extra forward+backward pass) or "measured" (spectral curves
             rescaled per layer by its measured loss increase, one layer at a time, cached on disk).
    floor:   every layer keeps at least floor × its uniform share (keep × its dense params), in [0, 1];
             only non-uniform allocations use it.
    method="mixed": per layer, the structure (and size) of lowest estimated error among
             options["methods"]: a list of method names (default options) or a dict name -> options, e.g.
             {"methods": {"lowrank": {"variant": "whiten"}, "espace": {"calibrator": "auto"}}}.
    """

    method: str = "lowrank"
    keep: float = 0.5
    targets: Targets = "all-linear"
    exclude: Targets | None = None
    layers: list | None = None
    options: dict = field(default_factory=dict)
    seed: int = 0
    allocation: str = "uniform"
    floor: float = 0.0

    def __post_init__(self):
        from . import methods  # registry; imported late so config stays import-light

        if not isinstance(self.method, str) or self.method not in methods.available() + [MIXED]:
            raise ConfigError(f"unknown method {self.method!r}; available methods: {methods.available()}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not (0 < self.keep <= 1):
            raise ConfigError(f"keep must be a fraction in (0, 1] of the targeted linear parameters, got {self.keep!r}")
        self.keep = float(self.keep)
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        for name in ("targets", "exclude"):
            v = getattr(self, name)
            if v is None and name == "exclude":
                continue
            if isinstance(v, str):
                if v != "all-linear" and "__" not in v:
                    try:
                        re.compile(v)
                    except re.error as e:
                        raise ConfigError(f"{name}={v!r} is not a valid regular expression: {e}") from None
            elif not (isinstance(v, list) and v and all(isinstance(s, str) and s for s in v)):
                raise ConfigError(f"{name} must be 'all-linear', a regex string or a non-empty list of module "
                                  f"names/suffixes, got {v!r}")
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = [self.layers]
            if not (isinstance(self.layers, (list, tuple)) and self.layers
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
                raise ConfigError(f"layers must be a non-empty list of block indices >= 0, got {self.layers!r}")
            self.layers = sorted(set(self.layers))
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a dict of the method's settings, got {type(self.options).__name__}")
        self.method_options()  # validate now, not halfway through compression
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 <= self.floor <= 1:
            raise ConfigError(f"floor must be a number in [0, 1] (a fraction of each layer's uniform share), "
                              f"got {self.floor!r}")
        self.floor = float(self.floor)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def method_options(self):
        """The validated option dataclass of this config's method (for "mixed": a `MixedOptions`)."""
        from . import methods

        if self.method == MIXED:
            return MixedOptions.parse(self.options)
        return parse_options(methods.get(self.method).Options, self.options, self.method)

    def method_list(self) -> list[tuple[str, Any]]:
        """[(method name, validated options)]: the one method, or the methods a mixed config allows."""
        opts = self.method_options()
        return list(opts.methods.items()) if self.method == MIXED else [(self.method, opts)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CompressConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "CompressConfig":
        return cls.from_dict(json.loads(text))


@dataclass
class MixedOptions:
    """Options of method="mixed": `methods` maps each allowed method to its validated option dataclass."""

    methods: dict

    @classmethod
    def parse(cls, options: dict) -> "MixedOptions":
        from . import methods as registry

        unknown = sorted(set(options) - {"methods"})
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for method 'mixed'; its one option is 'methods': a "
                              f"list of method names or a dict name -> that method's options")
        given = options.get("methods")
        if isinstance(given, (list, tuple)) and all(isinstance(m, str) for m in given):
            given = {m: {} for m in given}
        if not (isinstance(given, dict) and given and all(isinstance(v, dict) for v in given.values())):
            raise ConfigError(f"method 'mixed' needs options={{'methods': [names]}} or {{'methods': {{name: "
                              f"options}}}} with at least one of {registry.available()}, got {given!r}")
        out = {}
        for name, opts in given.items():
            if name == MIXED or name not in registry.available():
                raise ConfigError(f"method 'mixed': unknown method {name!r}; available methods: "
                                  f"{registry.available()}")
            out[name] = parse_options(registry.get(name).Options, opts, name)
        return cls(out)
