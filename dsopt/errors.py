"""The exceptions dsopt raises; the CLI maps each class to an exit code."""

from __future__ import annotations

import enum

__all__ = [
    "DsoptError",
    "ExitCode",
    "LoweringError",
    "ModelError",
    "PassError",
    "PluginError",
    "UsageError",
    "VerificationError",
]


class ExitCode(enum.IntEnum):
    """Process exit codes of the `dsopt` command (documented in README)."""

    OK = 0
    CHECK_FAILED = 1
    USAGE_ERROR = 2
    INTERNAL_ERROR = 3


class DsoptError(Exception):
    """Base of every error dsopt reports to users as one line, without a traceback.

    Args:
        message: One line saying what is wrong, naming the file, node or option.
        hint: Optional second line saying what to do about it.
    """

    exit_code = ExitCode.USAGE_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    @property
    def message(self) -> str:
        """The one-line message, without the hint."""
        return str(self.args[0]) if self.args else ""


class UsageError(DsoptError):
    """A bad command line, option, option value or configuration file."""


class ModelError(DsoptError):
    """The input model cannot be read or is not a model dsopt can work on."""


class PluginError(DsoptError):
    """A plugin failed to import, registered a duplicate name, or broke the plugin contract."""


class PassError(DsoptError):
    """A pass failed; names the pass, its position and the passes before it."""

    exit_code = ExitCode.INTERNAL_ERROR


class VerificationError(PassError):
    """The model is invalid after a pass (`--verify each|end`)."""


class LoweringError(DsoptError):
    """A target could not lower or build the model; names the target and quotes the cause."""


class NotRunnableHere(UsageError):
    """A compiled library is for another machine (ISA, CPU features or device) than this one."""


class CheckFailed(DsoptError):
    """Numerical equivalence check found outputs outside tolerance."""

    exit_code = ExitCode.CHECK_FAILED


__all__ += ["CheckFailed", "NotRunnableHere"]
