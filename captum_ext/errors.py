"""Exceptions raised by captum_ext, each naming what was wrong and what is supported."""

from __future__ import annotations

__all__ = ["MissingAttentionError", "ReentrantCallError", "UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """The model is not of a family captum_ext has an adapter for."""


class MissingAttentionError(RuntimeError):
    """Attention probabilities were needed but the model did not materialise them."""


class ReentrantCallError(RuntimeError):
    """A captum_ext call on a model from inside another captum_ext call on the same model."""
