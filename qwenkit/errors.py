"""The errors a user can act on, with one base.

Every error that comes from bad input (a file, a flag, a checkpoint, a prompt that does not fit)
is a `QwenkitError`. It may say where the problem is (the file, the line, the field), and the CLI
catches the base once and prints it as one line. Bugs stay ordinary Python exceptions. The
subclasses also derive from the builtin a caller would expect (ValueError, RuntimeError), so
`except ValueError` keeps working.
"""

from __future__ import annotations

import os


class QwenkitError(Exception):
    """An error the user can fix. `file`, `line` and `field` locate it where they are known; a
    message given with them is shown after "file:line: field:"."""

    def __init__(
        self, message: str, *, file: str | os.PathLike | None = None, line: int | None = None, field: str | None = None
    ):
        super().__init__(message)
        self.message, self.file, self.line, self.field = message, file, line, field

    def __str__(self) -> str:
        where = ":".join(str(part) for part in (self.file, self.line) if part is not None)
        prefix = "".join(f"{part}: " for part in (where, self.field) if part)
        return prefix + self.message


class UserError(QwenkitError, ValueError):
    """A flag or argument that cannot be used as given."""


class ConfigError(QwenkitError, ValueError):
    """A config.json (or a preset) that does not describe a network qwenkit builds."""


class CheckpointError(QwenkitError, ValueError):
    """A checkpoint folder that cannot be loaded as it is."""


class GGUFError(QwenkitError, ValueError):
    """A GGUF file that cannot be read or converted."""


class AdapterError(QwenkitError, ValueError):
    """A LoRA adapter that does not fit the model, or a bad LoRA setting."""


class DataError(QwenkitError, ValueError):
    """A training or evaluation data file with a bad row."""


class RecipeError(QwenkitError, ValueError):
    """A fine-tuning recipe (YAML, flags, key=value) that cannot be used."""


class ContextLengthError(QwenkitError, ValueError):
    """A prompt that alone does not fit in the model's context."""


class ModelError(QwenkitError, RuntimeError):
    """A model named by `--model` that could not be fetched, checked or converted."""
