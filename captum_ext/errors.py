"""Exceptions raised by captum_ext, each naming what was wrong and what is supported."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "MissingAttentionError",
    "ModelFileNotFoundError",
    "ModelLoadError",
    "NotFittedError",
    "ReentrantCallError",
    "UnsupportedModelError",
]


class UnsupportedModelError(TypeError):
    """The model is not of a family captum_ext has an adapter for."""


class MissingAttentionError(RuntimeError):
    """Attention probabilities were needed but the model did not materialise them."""


class NotFittedError(ValueError):
    """A trainable explainer was asked to explain (or save) before ``fit`` or ``load``.

    A ``ValueError`` (as scikit-learn's ``NotFittedError`` is), so ``except ValueError`` code
    keeps working.
    """


class ReentrantCallError(RuntimeError):
    """A captum_ext call on a model from inside another captum_ext call on the same model."""


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, inconsistent or not the one the caller asked for.

    The message is one line: the file, what was wrong, what to do.

    Args:
        path: The file the problem was found in.
        problem: What was wrong.
        remedy: What to do about it.
    """

    def __init__(self, path: object, problem: str, remedy: str) -> None:
        super().__init__(path, problem, remedy)  # args keep the exception picklable
        self.path = str(path)
        self.problem = problem
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.remedy}"


class ModelLoadError(ValueError):
    """The spec, the weights or the folder do not give a model to explain.

    The message is one line: what was wrong and what to do.
    """


class ModelFileNotFoundError(ModelLoadError, FileNotFoundError):
    """A file or folder named by the spec or the weights does not exist."""
