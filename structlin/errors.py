"""Errors structlin raises on bad input.

Every message names what is wrong (the module, the shape, the option) and what would be valid, so the
CLI can print it as one line and a user can act on it without reading a traceback.
"""


class StructlinError(Exception):
    """Base class of every error structlin raises on purpose."""


class ConfigError(StructlinError, ValueError):
    """An option, method name or value that structlin cannot accept."""


class TargetError(StructlinError, ValueError):
    """Targeting that matches nothing, or a module a structure cannot apply to."""


class CalibrationError(StructlinError, ValueError):
    """Calibration data that cannot be used (empty, wrong dtype or device, NaN/inf activations)."""


class LoadError(StructlinError, OSError):
    """A saved directory that cannot be loaded (missing files, newer format, shape mismatch, corruption)."""
