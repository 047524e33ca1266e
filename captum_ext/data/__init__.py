"""Procedural ground-truth benchmark data for class-discriminative explanations.

* :func:`shapes` / :class:`ShapesDataset`: multi-label images of simple shapes on smooth
  random backgrounds with exact per-class object masks, in a patch-aligned or a free layout;
  :func:`render_without` re-renders an image without one object, :func:`recolour` with new
  colours and noise.
* :func:`text_rationales` / :class:`TextDataset`: binary sentiment token sequences with
  token-level rationales and counter evidence, over the small vocabulary ``TEXT_VOCAB``.
"""

from __future__ import annotations

from captum_ext.data.images import (
    SHAPE_CLASSES,
    ImageParams,
    ShapeObject,
    ShapesBatch,
    ShapesDataset,
    recolour,
    render_without,
    shapes,
)
from captum_ext.data.text import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    TEXT_VOCAB,
    TextBatch,
    TextDataset,
    text_rationales,
)

__all__ = [
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "SHAPE_CLASSES",
    "TEXT_VOCAB",
    "ImageParams",
    "ShapeObject",
    "ShapesBatch",
    "ShapesDataset",
    "TextBatch",
    "TextDataset",
    "recolour",
    "render_without",
    "shapes",
    "text_rationales",
]
