"""User-facing errors.

Anything a user can cause (a bad file, a bad key, a missing model) raises one of these with a
message that names the file, line or key. The CLI prints ``error: <message>`` on one line and
exits non-zero; a traceback means a bug in this package, never a user mistake.
"""

from __future__ import annotations


class LLMRecError(Exception):
    """Base class: the message is shown to the user as-is, on one line."""

    exit_code = 2


class ConfigError(LLMRecError):
    """A configuration key is unknown, has the wrong type or an out-of-range value."""


class DataError(LLMRecError):
    """An input file is missing, malformed, empty or leaves nothing after cleaning."""


class CheckpointError(LLMRecError):
    """A checkpoint folder is missing, incomplete, altered or of an unknown format."""


class ModelLoadError(LLMRecError):
    """A backbone cannot be found or loaded (offline, wrong path, unsupported file)."""


class TrainingError(LLMRecError):
    """Training cannot continue (for example a NaN or infinite loss)."""


def one_line(message: str, limit: int = 500) -> str:
    """Collapse a message to one line of at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
