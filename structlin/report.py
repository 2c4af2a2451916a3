"""The report `compress` returns: one row per targeted layer plus model totals, as text or markdown."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerRow:
    name: str
    in_features: int
    out_features: int
    structure: str           # e.g. "lowrank rank=192", or "dense"
    dense_params: int
    params: int
    flops_per_token: int
    weight_error: float | None = None   # ‖W − Ŵ‖_F / ‖W‖_F
    output_error: float | None = None   # ‖(W − Ŵ) X‖_F / ‖W X‖_F on the calibration inputs
    note: str = ""


@dataclass
class Report:
    method: str
    keep: float
    rows: list[LayerRow] = field(default_factory=list)
    budget: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    bytes_after: int = 0
    dtype: str = ""
    linear_flops_before: int = 0   # per token, all linear layers of the model
    linear_flops_after: int = 0
    seconds: float = 0.0
    calibration_tokens: int = 0

    @property
    def targeted_params(self) -> int:
        return sum(r.dense_params for r in self.rows)

    @property
    def kept_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def achieved_keep(self) -> float:
        return self.kept_params / max(self.targeted_params, 1)

    def dense_layers(self) -> list[LayerRow]:
        return [r for r in self.rows if r.structure == "dense"]

    def summary(self) -> dict:
        return {
            "method": self.method, "keep": self.keep, "achieved_keep": round(self.achieved_keep, 6),
            "targeted_params": self.targeted_params, "kept_params": self.kept_params, "budget": self.budget,
            "model_params_before": self.model_params_before, "model_params_after": self.model_params_after,
            "bytes_after": self.bytes_after, "dtype": self.dtype,
            "linear_flops_per_token_before": self.linear_flops_before,
            "linear_flops_per_token_after": self.linear_flops_after,
            "layers": len(self.rows), "layers_left_dense": len(self.dense_layers()),
            "calibration_tokens": self.calibration_tokens, "seconds": round(self.seconds, 2),
        }

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["layer", "shape", "structure", "params", "kept", "FLOPs/tok", "weight err", "output err"]
        body = []
        for r in self.rows:
            body.append([r.name, f"{r.out_features}×{r.in_features}",
                         r.structure + (f" ({r.note})" if r.note else ""), f"{r.params:,}",
                         f"{r.params / r.dense_params:.3f}", f"{r.flops_per_token:,}",
                         "—" if r.weight_error is None else f"{r.weight_error:.4f}",
                         "—" if r.output_error is None else f"{r.output_error:.4f}"])
        return head, body

    def _totals(self) -> list[str]:
        s = self.summary()
        return [
            f"method {self.method}, keep {self.keep:g} of targeted linear params; achieved "
            f"{s['achieved_keep']:.4f} ({s['kept_params']:,} of {s['targeted_params']:,}; budget {s['budget']:,})",
            f"model params {s['model_params_before']:,} -> {s['model_params_after']:,} "
            f"({s['bytes_after'] / 2**20:.1f} MiB at {self.dtype})",
            f"linear FLOPs per token {s['linear_flops_per_token_before']:,} -> {s['linear_flops_per_token_after']:,}",
            f"{s['layers']} layers targeted, {s['layers_left_dense']} left dense; "
            f"{s['calibration_tokens']:,} calibration tokens; {s['seconds']:.1f} s",
        ]

    def to_markdown(self) -> str:
        head, body = self._table()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n\n" + "\n".join(f"- {t}" for t in self._totals()) + "\n"

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda row: "  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        return "\n".join(lines + [""] + self._totals())
