"""User-facing error types.

Every error a user can cause (bad spec, bad tolerance, missing data, corrupt checkpoint) is raised
as a subclass of :class:`VlmpressError` with a message saying what was wrong and what is expected.
The CLI turns these into a one-line message and exit code 2 instead of a traceback.
"""


class VlmpressError(Exception):
    """Base class for errors caused by user input or user-provided files."""


class ConfigError(VlmpressError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnknownModelSpecError(VlmpressError, KeyError):
    """No registered adapter accepts a model spec string."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CalibrationError(VlmpressError, RuntimeError):
    """Calibration data is missing, empty, or did not reach every target layer."""


class CheckpointError(VlmpressError, RuntimeError):
    """A saved vlmpress checkpoint is missing, corrupt or does not match its config."""


class DatasetError(VlmpressError, RuntimeError):
    """A dataset is missing or incomplete on disk."""


class AdapterContractError(VlmpressError, TypeError):
    """A (plugin) adapter returned something its interface does not allow, e.g. per-token encoder outputs."""


class OutputError(VlmpressError, RuntimeError):
    """An output could not be written (disk full, no permission); what existed before is kept."""
