"""Evaluation engine: every method on a model, every metric, with bootstrap intervals.

:func:`evaluate` runs the attribution methods of :mod:`captum_ext.registry` (plus two
class-agnostic baselines and any custom maps) on a held-out set of the procedural benchmark
(:mod:`captum_ext.data`) and scores them with :mod:`captum_ext.metrics`:

* images (``shapes``): one map per present class of every image (a two-object image gives two
  maps); pointing game (two columns, below), relevance mass and rank accuracy against that
  class's mask, sparsity,
  class-discrimination ``D`` on two-object images, RISE deletion / insertion AUC for the class,
  Average Drop / Increase in Confidence at 100/50/15 % kept (T-TAME preset), ROAD MoRF / LeRF
  (T-TAME preset; only when asked: :data:`OPTIONAL_METRICS`) and the Pearson correlation with
  TAM's map (the CDAM paper's comparison). Trained explainers the zoo ships for the model
  (:data:`TRAINED`: ``NAME-ttame``, ``NAME-mhex``) are evaluated next to the methods, through
  the same loop;
* text (``text_rationales``): ERASER comprehensiveness and sufficiency (AOPC) and token AUPRC
  against the planted rationale, for the target ``label``.

Localisation, sparsity, ``D`` and the correlation are computed on the model's patch grid by
default (``resolution="grid"``): token maps are used as they are, pixel maps (baselines, custom
maps) are average-pooled over each patch, and a patch belongs to a class's mask when it holds
any pixel of the object. On the patch-aligned layout this is the exact token ground truth;
at pixel resolution a perfect token map could not exceed the share of its patch the object
covers. RISE always runs at pixel resolution on the upsampled maps.

The pointing game has two columns. ``pointing_game`` ("pointing (15 px @224)") is Zhang et
al.'s (2016) protocol, the one published numbers use: on the pixel maps and masks, a hit when
the map's maximum lies within 15 px of the object at 224-px input, the tolerance scaled with
the image's shorter side (:func:`captum_ext.metrics.standard_tolerance`: 2 px on the 32-px
benchmark). ``pointing_game_grid`` ("pointing (patch grid)") is the maximum on the evaluation
grid inside the pooled mask, without tolerance (at pixel resolution with
``resolution="pixel"``). Tied maxima count as the share of them that hits, in both.
``peak_dx`` / ``peak_dy`` ("peak dx (px)", "peak dy (px)") are the signed offset of the map's
peak from the object's centre (mask centroid) in pixels (:func:`captum_ext.metrics.peak_offset`;
``dx > 0``: right of the centre, ``dy > 0``: below it); their mean is a systematic shift of the
maps, which a tolerance-free grid protocol punishes and the 15-px one forgives.

Every value is aggregated into its mean and a percentile bootstrap 95 % interval (Efron &
Tibshirani 1993) that resamples *images* (a cluster bootstrap: the two maps of a two-object
image are not independent), with a fixed seed.

What the room holds, one concern per module:

* ``_engine`` — :func:`evaluate`: a loop over models, and for each model a loop over its maps
  through the metric table;
* ``_config`` — :class:`EvalConfig`, every setting, checked in one place;
* ``_table`` — the metric table: one entry per metric, naming its
  :data:`captum_ext.metrics.METRICS` function, its direction and how it reads a map;
* ``_images`` / ``_text`` — a model's held-out set as the metrics read it, and how its maps are
  produced (methods, baselines, custom maps);
* ``_trained`` — :data:`TRAINED` (from :mod:`captum_ext.registry`), the trained explainer kinds, and
  :func:`zoo_explainers`, which loads those fitted to a zoo model;
* ``_maps`` — chunked attribution calls, grid <-> pixels, the model's grid
  (:func:`~captum_ext.evaluation._maps.model_grid`);
* ``_baselines``, ``_bootstrap``, ``_result`` — the baseline maps, the cluster bootstrap and
  :class:`EvalResult` with its markdown / JSON tables;
* ``_datasets`` / ``_sharded`` — whole datasets (a folder of images, an ``ImageFolder`` tree,
  the shapes benchmark) explained (:func:`explain_dataset`) or evaluated
  (:func:`evaluate_dataset`) in one process or under ``torchrun``, written as resumable
  shards with one index.
"""

from __future__ import annotations

from ._baselines import BASELINES, centre_gaussian_map, random_map
from ._bootstrap import bootstrap_ci
from ._config import DEFAULT_SEED, EvalConfig
from ._datasets import ImageFiles, ShapesSource, image_dataset
from ._engine import evaluate
from ._maps import MapFn
from ._result import EvalResult
from ._sharded import (
    ShardedOutput,
    ShardedOutputError,
    evaluate_dataset,
    explain_dataset,
    load_maps,
)
from ._table import IMAGE_METRICS, OPTIONAL_METRICS, TEXT_METRICS
from ._trained import TRAINED, zoo_explainers

__all__ = [
    "BASELINES",
    "DEFAULT_SEED",
    "IMAGE_METRICS",
    "OPTIONAL_METRICS",
    "TEXT_METRICS",
    "TRAINED",
    "EvalConfig",
    "EvalResult",
    "ImageFiles",
    "MapFn",
    "ShapesSource",
    "ShardedOutput",
    "ShardedOutputError",
    "bootstrap_ci",
    "centre_gaussian_map",
    "evaluate",
    "evaluate_dataset",
    "explain_dataset",
    "image_dataset",
    "load_maps",
    "random_map",
    "zoo_explainers",
]
