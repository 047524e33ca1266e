"""Evaluation metrics for (class-discriminative) explanations.

Every metric returns one value per example (a ``(B,)`` tensor, or ``(B, F)`` for ROAD). Maps
are ``(B, H, W)`` / ``(B, 1, H, W)`` (``(B, C, H, W)`` is summed over channels), token maps
``(B, P)``; masks are ``(B, H, W)`` bool. Wherever a metric needs attributions it accepts a
tensor or a Captum ``Attribution`` object plus ``attribute_kwargs``.

Metrics that call a model (an ``nn.Module``) run it in eval mode under its lock and restore it
exactly afterwards (:func:`captum_ext.capture.model_state`); an ``Attribution`` object is
called with the model in eval mode too. Numeric options are checked (one-line ``ValueError`` /
``TypeError`` naming the argument and its range), as are non-finite inputs and maps, NaN model
scores and targets outside ``0 .. K - 1``. An empty batch (``B = 0``) gives an empty result of
the documented shape, without calling the model or an ``Attribution`` object.

Metadata (direction, category, reference) is available declaratively through
:func:`metric_info` / :data:`METRICS` and the ``fn.metric_info`` attribute.
"""

from __future__ import annotations

from ._common import METRICS, MetricInfo, metric_info
from .complexity import sparsity
from .discrimination import discrimination_score
from .faithfulness import (
    TTAME_KEEP,
    average_drop,
    average_drop_ttame,
    deletion_auc,
    gaussian_blur,
    increase_in_confidence,
    insertion_auc,
    token_perturbation_auc,
)
from .localisation import (
    STANDARD_TOLERANCE_PX,
    STANDARD_TOLERANCE_SIZE,
    peak_offset,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    standard_tolerance,
)
from .road import ROAD_TTAME_PERCENTAGES, noisy_linear_imputation, road
from .sanity import model_randomisation
from .similarity import pearson, spearman
from .text import ERASER_FRACTIONS, comprehensiveness, sufficiency, token_auprc

__all__ = [
    "ERASER_FRACTIONS",
    "METRICS",
    "ROAD_TTAME_PERCENTAGES",
    "STANDARD_TOLERANCE_PX",
    "STANDARD_TOLERANCE_SIZE",
    "TTAME_KEEP",
    "MetricInfo",
    "average_drop",
    "average_drop_ttame",
    "comprehensiveness",
    "deletion_auc",
    "discrimination_score",
    "gaussian_blur",
    "increase_in_confidence",
    "insertion_auc",
    "metric_info",
    "model_randomisation",
    "noisy_linear_imputation",
    "peak_offset",
    "pearson",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road",
    "sparsity",
    "spearman",
    "standard_tolerance",
    "sufficiency",
    "token_auprc",
    "token_perturbation_auc",
]
