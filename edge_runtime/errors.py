"""The errors a user can act on: str() of each is one line that says what to do (the CLI prints it, exit 2)."""

from __future__ import annotations


class ModelError(Exception):
    """A model that cannot be loaded or run."""


class SettingsError(ValueError):
    """Settings (budget, policy, positions) that cannot work with this model or this memory."""


class MemoryFull(Exception):
    """The video memory cannot take the next frame (the full cache reached its context)."""


class QuestionTooLong(ModelError):
    """A question (with its history and answer room) that does not fit the cells kept free for it."""


class MissingDependency(ImportError):
    """A package the runtime needs is not installed (OpenCV on a Termux install, say): one line on how to get it."""
