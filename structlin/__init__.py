"""structlin: structured linear layers for transformer compression and acceleration.

    import structlin as sl
    cfg = sl.CompressConfig(method="lowrank", keep=0.6, options={"variant": "whiten"})
    report = sl.compress(model, cfg, calib=batches)
    sl.save_pretrained(model, "out/"); model = sl.from_pretrained("out/")
"""
from .compress import compress
from .config import CompressConfig
from .errors import CalibrationError, ConfigError, LoadError, StructlinError, TargetError
from .io import from_pretrained, save_pretrained
from .methods import StructuredLinear, available as available_methods
from .report import Report
from .targeting import dry_run

__version__ = "0.1.0"

__all__ = ["compress", "CompressConfig", "Report", "StructuredLinear", "available_methods", "dry_run",
           "save_pretrained", "from_pretrained", "StructlinError", "ConfigError", "TargetError",
           "CalibrationError", "LoadError", "__version__"]
