"""MHEX: multi-head explainer (Sun & Liò), reconstructed from the published description.

MHEX is built into the model: at chosen stages (ResNet stages, ViT blocks, BERT layers) an
attention gate ``F' = F * sigmoid(g(F))`` re-weights the features, and a linear
deep-supervision head classifies ``F'``. Both are trained with the model (``fit``: loss
``L(final) + sum_l lambda_l L(head_l)``). A head has no nonlinearity after the gate, so it
collapses to one matrix ``W_eq = W_fc W_conv`` ``(K, C)`` and its class activation map
``W_eq[c] F'`` at every location or token is exactly what the head pools into its logit. The
saliency of a class integrates these maps over the stages, from the same forward pass that
gives the logits. The network, gates, heads and training step are in ``_mhex_network.py``,
the saliency and fusion in ``_mhex_saliency.py``.
"""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from captum_ext import zoo
from captum_ext._scores import normalise_target
from captum_ext.adapters.base import (
    ModelAdapter,
    Readout,
    TransformerAdapter,
    adapter_for,
)
from captum_ext.capture import no_checkpointing, probe_readout
from captum_ext.checkpoint import model_fingerprint
from captum_ext.errors import CheckpointError, UnsupportedModelError
from captum_ext.explainers._mhex_network import (
    _METHOD,
    EMBEDDINGS,
    GateKind,
    MHEXNetwork,
    Objective,
    Pass,
    Pooling,
    Targets,
    _correct,
    _num_classes,
    _objective_loss,
    _plain_logits,
    _stages,
    mhex_step,
    predicted_targets,
)
from captum_ext.explainers._mhex_network import Stage as Stage
from captum_ext.explainers._mhex_network import make_gate as make_gate
from captum_ext.explainers._mhex_network import make_head as make_head
from captum_ext.explainers._mhex_saliency import (
    OUTPUTS,
    OutputKind,
    fusion_weights,
    head_cams,
    saliency,
    target_cams,
    valid_tokens,
)
from captum_ext.explainers._mhex_saliency import box_smooth_1d as box_smooth_1d
from captum_ext.explainers._mhex_saliency import box_smooth_2d as box_smooth_2d
from captum_ext.explainers._training import requires_grad, schedule
from captum_ext.explainers.base import (
    TrainableExplainer,
    TrainingRecipe,
    _finite_number,
    backbone_model,
    check_backbone_layout,
)

__all__ = ["AGREEMENT_WARNING", "MHEX", "MHEXNetwork", "mhex_step"]

AGREEMENT_WARNING = 0.99
"""``MHEX.fit`` warns when, with the model frozen, the gated network predicts what the plain
model predicts on less than this share of the last epoch's examples."""


class MHEX(TrainableExplainer):
    """Multi-head explainer (Sun & Liò): gates and linear heads built into the model.

    At every chosen stage ``l`` the network gets

    * an **attention gate** ``F'_l = F_l * sigmoid(g_l(F_l))``: ``g_l`` is a 1x1 convolution
      on feature maps ``(B, C, h, w)``, a linear layer on tokens ``(B, N, D)``; one
      coefficient per location or token (``gate="spatial"``, broadcast over the channels), or
      one per channel too (``gate="elementwise"``). Its weights start at zero and its bias at
      ``gate_bias`` (default 3: every gate starts at ``sigmoid(3)``, 0.95);
    * a **deep-supervision head** without nonlinearity after the gate: feature maps: 1x1
      convolution (to ``head_channels`` channels, default ``C``) -> global average pooling ->
      linear; tokens: one linear layer on every token, pooled (``pooling``).

    With ``gated_backbone=False`` (default) the gates only feed the heads and the network
    computes exactly what the model computes without MHEX: fitting MHEX to a trained model
    keeps its predictions whatever the data, learning rate or number of steps. With
    ``gated_backbone=True`` (the paper's architecture) the gated features replace the stage's
    output and continue through the network; that is meant for a model trained with its gates
    (``fit(train_backbone=True)``): fitted gates in a frozen model's path change what the
    frozen layers after them see, and a short fit with untrained heads can change its
    predictions (``fit`` then reports the agreement and warns).

    **Equivalent matrix.** A head is affine in ``F'``: it collapses to
    ``W_eq = W_fc W_conv`` ``(K, C)`` and ``b_eq = W_fc b_conv + b_fc`` (token heads: the
    linear layer's own weight and bias). The class activation map of stage ``l`` for class
    ``c`` is ``CAM_l[c](x) = W_eq[c] . F'_l(x) + b_eq[c]`` at every location or token ``x``:
    the bias is spread evenly over the locations, so that the head's pooling of the map
    equals the head's logit exactly. :meth:`stage_cams` returns these maps and
    :meth:`equivalent_matrices` the matrices.

    **Saliency** (:meth:`attribute`) for class ``c``, from the forward pass that gives the
    logits: each stage's ``CAM_l[c]`` is rectified (``nonneg=True``), divided by its maximum
    per example (all-zero maps stay zero), and the stages are fused by a weighted geometric
    mean (``fusion="geometric"``, weights ``stage_weights``, default equal; maps floored at
    1e-3, then shifted back so that 0 stays 0) or a weighted arithmetic mean
    (``fusion="mean"``, the only choice with ``nonneg=False``, which keeps the sign). CNN maps
    are bilinearly upsampled to the finest stage's grid before fusing (``output="grid"``) and
    the result bilinearly to the input (``output="input"``). Transformers: the patch tokens
    (prefix removed) or word-piece tokens (special tokens and padding set to 0 and left out of
    the normalisation) of every stage, fused, then smoothed along the token axis by a box
    window of ``window`` tokens (text: a moving average over the valid tokens; images: a
    ``window x window`` mean over the patch grid; ``window=1``: no smoothing). Values lie in
    ``[0, 1]`` (``[-1, 1]`` with ``nonneg=False``).

    **Training** (:meth:`fit`): ``L(final) + sum_l lambda_l L(head_l)`` on labels (or, with
    ``targets="predictions"``, on the plain model's own predictions, no labels needed), ``L``
    softmax cross-entropy (``objective="ce"``, class indices) or sigmoid binary cross-entropy
    per class (``"bce"``, multi-hot labels), ``lambda_l = 1`` by default, with the package's
    one training loop. By default the model's own weights are frozen and it stays in eval
    mode, and the gates and heads learn from the heads' losses (``L(final)`` reaches the
    gates only with ``gated_backbone=True``); ``train_backbone=True`` trains everything
    together.

    **Collaboration analysis** (:meth:`gradient_similarity`): the cosine similarity of the
    gradients each head's loss sends into the shared backbone parameters.

    **Differences from the authors' description.** The paper's full text and code are not
    available to this project, so this class is a reconstruction: the gate initialisation,
    the token heads' pooling, the default stages, the normalisation, fusion and smoothing of
    the saliency, and the reading of the gradient-based collaboration analysis are this
    package's choices (listed with their measurements in the MHEX guide, :doc:`/mhex`). The
    paper's SAD and EAD metrics have no published definition available to this project and
    are not provided; Average Drop is :func:`captum_ext.metrics.average_drop`.

    Args:
        model: A residual CNN (timm/torchvision ResNet), a timm or HF ViT, or an HF
            BERT-family classifier (or a module wrapping one); wrappers (DDP,
            ``torch.compile``) are removed.
        layers: The gated stages, shallow to deep. CNNs: module names (default: the adapter's
            preset, ResNet ``layer2``, ``layer3``, ``layer4``). Transformers: ``"embeddings"``
            (the tokens entering block 0), block indices (the block's output, the residual
            stream leaving it; negatives count from the end) or module names (their output
            tokens); default ``["embeddings", 0]``.
        num_classes: ``K``; default read from the model (``num_classes``,
            ``config.num_labels``, or its last linear layer).
        gated_backbone: Whether the gated features continue through the network (``True``)
            or feed the heads only (``False``, default: the model's function is unchanged).
        gate: ``"spatial"`` or ``"elementwise"`` gate coefficients.
        gate_bias: Initial bias of every gate's layer (its weights start at zero).
        head_channels: Output channels of each map head's 1x1 convolution (one per stage, or
            one int for all); default the stage's own channel count. Ignored for token heads.
        pooling: Token heads: ``"mean"`` or ``"model"`` (the model's readout).
        nonneg: Rectify the stage maps (the non-negativity constraint).
        window: Smoothing window along the token axis (odd; 1 = none). Ignored for CNNs.
        stage_weights: Weight of each stage in the fusion (default equal).
        fusion: ``"geometric"`` or ``"mean"`` (weighted means of the normalised stage maps).
        readout: Transformers: overrides the adapter's readout (``"cls"``, ``"mean"``, ...).

    Attributes:
        network: The gated :class:`MHEXNetwork`, an ``nn.Module`` whose forward returns the
            logits; use it for training and inference like the model (``MHEX.forward`` is the
            same).
        adapter: The model's adapter.
        stages: The gated stages, in order.
        num_classes: ``K``.
        head_names: The stages' layer names, then ``"final"`` (the model's own classifier).
        backbone_trained: Whether :meth:`fit` trained the model's own weights.
    """

    _method: ClassVar[str] = _METHOD
    _record_method: ClassVar[str] = "mhex"
    _label: ClassVar[str] = "MHEX"
    _outputs: ClassVar[tuple[str, ...]] = OUTPUTS
    _move_hint: ClassVar[str] = "move it there first (mhex.to"
    default_recipe: ClassVar[TrainingRecipe] = TrainingRecipe(epochs=4, batch_size=128, lr=0.05)
    """The recipe measured on the package's benchmark: 4 epochs, batch 128, peak lr 0.05."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str | int] | None = None,
        num_classes: int | None = None,
        *,
        gated_backbone: bool = False,
        gate: GateKind = "spatial",
        gate_bias: float = 3.0,
        head_channels: int | Sequence[int | None] | None = None,
        pooling: Pooling = "mean",
        nonneg: bool = True,
        window: int = 1,
        stage_weights: Sequence[float] | None = None,
        fusion: Literal["geometric", "mean"] = "geometric",
        readout: Readout | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, MHEXNetwork):
            raise ValueError("MHEX: pass the plain model, not an MHEXNetwork (already wrapped).")
        adapter = adapter_for(model, readout=readout, method=_METHOD)
        if isinstance(adapter, TransformerAdapter) and not adapter.readout_known:
            adapter.settle_readout(probe_readout(adapter))
        _check_choices(gate, pooling, fusion, nonneg, window)
        why = adapter.readout_refusal() if pooling == "model" else None
        if why is not None:
            raise UnsupportedModelError(f"MHEX(pooling='model'): {why}; or use pooling='mean'")
        stages, num_classes = _stages_and_classes(adapter, layers, num_classes)
        head_channels = _head_channels(head_channels, len(stages))
        stage_weights = _stage_weights(stage_weights, len(stages))
        self.adapter = adapter
        self.stages = tuple(stages)
        self.num_classes = int(num_classes)
        self.nonneg = nonneg
        self.window = window
        self.stage_weights = stage_weights
        self.fusion = fusion
        self.network = MHEXNetwork(
            adapter, stages, self.num_classes, gated_backbone, gate, gate_bias, head_channels,
            pooling,
        )  # fmt: skip
        ref = next(adapter.model.parameters(), None)
        if ref is not None:
            self.network.gates.to(device=ref.device, dtype=ref.dtype)
            self.network.heads.to(device=ref.device, dtype=ref.dtype)
        self._config = {
            "layers": [s.layer for s in stages],
            "num_classes": self.num_classes,
            "gated_backbone": gated_backbone,
            "gate": gate,
            "gate_bias": gate_bias,
            "head_channels": [
                h.conv.out_channels if s.layout == "map" else None
                for s, h in zip(stages, self.network.heads, strict=True)
            ],
            "pooling": pooling,
            "nonneg": nonneg,
            "window": window,
            "stage_weights": stage_weights,
            "fusion": fusion,
            "readout": readout,
        }
        self.backbone_trained = False
        self.training_record: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def head_names(self) -> list[str]:
        return [str(s.layer) for s in self.stages] + ["final"]

    @property
    def forward_func(self) -> nn.Module:
        """The gated network (Captum's ``forward_func``)."""
        return self.network

    def forward(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The gated network's forward: logits ``(B, K)`` (see :meth:`MHEXNetwork.forward`)."""
        return self.network(inputs, *args, **kwargs)

    def equivalent_matrices(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(W_eq (K, C), b_eq (K,))`` of every head, in stage order."""
        return [head.equivalent() for head in self.network.heads]

    # ------------------------------------------------------------------ explaining
    def stage_cams(
        self, inputs: torch.Tensor, additional_forward_args: Any = None
    ) -> list[torch.Tensor]:
        """The raw class activation maps of every stage, all classes, in head units.

        Returns:
            Per stage ``W_eq F' + b_eq``: ``(B, K, h, w)`` for feature maps, ``(B, K, N)`` for
            tokens (prefix tokens included). Pooled as the head pools, they equal its logits.
        """
        x, _ = self._checked(inputs, additional_forward_args, "input")
        p = self._forward(x, additional_forward_args)
        with torch.no_grad():
            return head_cams(self.network.heads, p.features)

    def _explain(
        self, x: torch.Tensor, targets: list[Any], extra: Any, output: str
    ) -> list[torch.Tensor]:
        p = self._forward(x, extra)
        maps = []
        with torch.no_grad():
            valid = valid_tokens(self.adapter, x, extra, p.features[0])
            for t in targets:
                idx = normalise_target(t, p.logits, _METHOD)
                picked = target_cams(self.network.heads, p.features, idx)
                maps.append(self._saliency(picked, valid, x, output))
        return maps

    def _check_output(self, output: str) -> None:
        if output == "tokens" and not isinstance(self.adapter, TransformerAdapter):
            raise ValueError(
                f"{_METHOD}: output='tokens' is for transformers; a CNN has no tokens. Use "
                "'grid' (the finest stage's map) or 'input'."
            )

    def _forward(self, x: torch.Tensor, extra: Any) -> Pass:
        from captum_ext.adapters.base import as_tuple

        with self._model_state(grad=False):
            return self.network.run(x, *as_tuple(extra))

    def _saliency(
        self,
        picked: list[torch.Tensor],
        valid: torch.Tensor | None,
        x: torch.Tensor,
        output: OutputKind,
    ) -> torch.Tensor:
        return saliency(
            picked,
            valid,
            x,
            output,
            adapter=self.adapter,
            weights=fusion_weights(self.stage_weights, len(self.stages)),
            nonneg=self.nonneg,
            fusion=self.fusion,
            window=self.window,
        )

    # ------------------------------------------------------------------ training
    def loss(
        self,
        batch: Sequence[torch.Tensor],
        objective: Objective = "ce",
        head_weights: Sequence[float] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training loss terms of one batch (see :func:`mhex_step`).

        Raises:
            ValueError: ``head_weights`` not finite numbers >= 0 (one per head, or one).
        """
        return mhex_step(
            self.network,
            batch,
            objective=objective,
            head_weights=self._lambdas(head_weights, "MHEX.loss"),
        )

    def _lambdas(
        self, head_weights: Sequence[float] | float | None, where: str = "MHEX.fit"
    ) -> list[float]:
        """``lambda_l`` of every head; refuses NaN, inf, negative and non-numeric values."""
        n = len(self.stages)
        if head_weights is None:
            return [1.0] * n
        values = _values(head_weights)
        if not all(_finite_number(v) and v >= 0 for v in values):
            raise ValueError(
                f"{where}: head_weights must be finite numbers >= 0, one per head ({n}) or one "
                f"for all; got {head_weights!r}."
            )
        if len(values) == 1 and _number(head_weights):
            return [float(head_weights)] * n
        if len(values) != n:
            raise ValueError(
                f"{where}: head_weights has {len(values)} values for {n} heads; pass one per "
                "head or one for all."
            )
        return [float(v) for v in values]

    def _step(
        self,
        module: nn.Module,
        batch: Any,
        objective: Objective,
        head_weights: list[float],
        agreement: bool = False,
        targets: Targets = "labels",
    ) -> dict[str, torch.Tensor]:
        """:func:`mhex_step` on a batch checked to be ``(inputs, *extra_args, labels)`` (or,
        with ``targets="predictions"``, the model's inputs: :meth:`_model_inputs`)."""
        if targets == "predictions":
            batch = self._model_inputs(batch, "MHEX.fit: each batch")
            inputs, *extra = batch
        else:
            _check_batch(batch, "MHEX.fit: each batch")
            inputs, *extra, _ = batch
        self.adapter.check_inputs(inputs, "MHEX.fit", tuple(extra) or None)
        return mhex_step(
            module,
            batch,
            objective=objective,
            head_weights=head_weights,
            agreement=agreement,
            targets=targets,
        )

    def _model_inputs(self, batch: Any, what: str) -> tuple[torch.Tensor, ...]:
        """A batch without labels as the model's inputs: images (of an image model only the
        first item is used, labels or paths after it are ignored, as T-TAME reads batches), or
        text ``(input_ids, *extra_args)`` (every item goes to the model)."""
        items = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(items, tuple | list) or not items:
            raise ValueError(f"{what} must be a tensor or a tuple of tensors; got {batch!r}.")
        if self.adapter.modality == "image":
            items = items[:1]
        if not all(isinstance(t, torch.Tensor) and t.dim() for t in items):
            kinds = ", ".join(type(t).__name__ for t in items)
            raise ValueError(f"{what} must hold the model's input tensors; got ({kinds}).")
        if len({t.shape[0] for t in items}) != 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in items)
            raise ValueError(f"{what}: the inputs differ in batch size; got shapes {shapes}.")
        return tuple(items)

    def fit(
        self,
        data: Any,
        recipe: TrainingRecipe | None = None,
        *,
        val_data: Any = None,
        objective: Objective = "ce",
        head_weights: Sequence[float] | float | None = None,
        train_backbone: bool = False,
        targets: Targets = "labels",
    ) -> list[dict[str, Any]]:
        """Trains the gates and heads (and, with ``train_backbone``, the model).

        Loss ``L(final) + sum_l lambda_l L(head_l)`` (:func:`mhex_step`), trained with the
        package's one training loop (:class:`~captum_ext.explainers.TrainingRecipe`: SGD with
        Nesterov momentum, one-cycle schedule, progress bar, epoch checkpoints and resume,
        ``torchrun``/DDP with ``batch_size`` the global batch, autocast on CUDA). The model's
        ``requires_grad`` flags, train/eval modes and gradient-checkpointing flags (off while
        training: checkpointed blocks would run around the gates) are restored afterwards,
        also when training raises.

        By default the model's own weights stay as they are and it stays in eval mode. The
        network then keeps the model's predictions: by construction with the default
        ``gated_backbone=False`` (the gates feed the heads only); with ``gated_backbone=True``
        the gates sit in the frozen model's path and also learn from ``L(final)``, and ``fit``
        measures, at every step, the share of the batch on which the gated network predicts
        what the plain model predicts (``agreement`` in the history, the epoch's mean) and
        warns in one line when the last epoch's is below :data:`AGREEMENT_WARNING` (0.99).
        ``train_backbone=True`` trains everything together (e.g. a model trained with MHEX
        from the start); its weights then change, and no agreement is reported.

        Targets: the data's labels (``targets="labels"``), or the plain model's own
        predictions (``"predictions"``: its top-1 class for ``"ce"``, its predicted set for
        ``"bce"``), computed on every batch as T-TAME trains, so that no labels are needed --
        e.g. for a pretrained 1000-class network and a folder of unlabelled photos. The heads
        then learn to explain what the model predicts.

        Args:
            data: ``Dataset``, ``DataLoader`` or tuple of tensors yielding
                ``(inputs, *extra_args, labels)``: images and labels, or ``input_ids``,
                ``attention_mask`` and labels. With ``targets="predictions"``: images (a
                tensor, or a tuple whose first item is the images; the rest, e.g. labels, is
                ignored), or ``(input_ids, *extra_args)`` for text.
            recipe: The training options; unset ``epochs``, ``batch_size`` and ``lr`` come
                from :attr:`default_recipe` (4, 128, 0.05).
            val_data: ``(inputs, *extra_args, labels)`` tensors (or a ``Dataset``) scored after
                every epoch: ``val_final`` and ``val_<layer>`` accuracies (set accuracy for
                ``"bce"``, argmax accuracy for ``"ce"``); with ``targets="predictions"`` laid
                out as ``data`` and scored against the plain model's predictions.
            objective: ``"ce"`` (softmax cross-entropy; class indices ``(B,)``) or ``"bce"``
                (sigmoid binary cross-entropy per class; multi-hot labels ``(B, K)``).
            head_weights: ``lambda_l`` per head (or one value for all), finite and ``>= 0``;
                default 1.
            train_backbone: Train the model's parameters too (model in train mode).
            targets: ``"labels"`` or ``"predictions"`` (see above).

        Returns:
            One dict per epoch: ``epoch``, ``loss``, ``final``, ``head0``, ... (epoch means,
            unweighted terms), ``agreement`` (frozen model only), ``lr``, ``steps``,
            ``images``, ``time_s`` and the validation numbers.

        Raises:
            ValueError: A bad ``objective``, ``head_weights``, ``train_backbone`` or
                ``targets`` (``"predictions"`` with ``train_backbone=True``); batches
                or ``val_data`` that are not ``(inputs, *extra_args, labels)``; images that
                are not floating point (MHEX trains on float images as the model takes them,
                e.g. normalised: convert uint8 images first) or hold NaN or inf; empty data.
            TypeError: ``data`` or ``val_data`` is not a tensor tuple, Dataset or DataLoader
                (e.g. a folder name: wrap the folder in a Dataset such as torchvision's
                ``ImageFolder``).
            FloatingPointError: A step's loss, or the trained parameters after a step, are not
                finite (inputs far outside the model's range, a learning rate too high):
                training stops with the network and optimiser as they were before that step.
            RuntimeError: Under ``torch.inference_mode()`` (``torch.no_grad()`` is fine: fit
                enables gradients itself).
        """
        if objective not in ("ce", "bce"):
            raise ValueError(f"MHEX.fit: objective must be 'ce' or 'bce'; got {objective!r}.")
        if not isinstance(train_backbone, bool):
            raise ValueError(
                f"MHEX.fit: train_backbone must be True or False; got {train_backbone!r}."
            )
        if targets not in ("labels", "predictions"):
            raise ValueError(
                f"MHEX.fit: targets must be 'labels' or 'predictions'; got {targets!r}."
            )
        if targets == "predictions" and train_backbone:
            raise ValueError(
                "MHEX.fit: targets='predictions' trains on the frozen model's own predictions; "
                "with train_backbone=True the model changes while it sets the targets: give "
                "labels (targets='labels')."
            )
        lam = self._lambdas(head_weights)
        if isinstance(data, torch.Tensor) and targets == "predictions":
            data = TensorDataset(data)
        if isinstance(data, tuple) and all(isinstance(t, torch.Tensor) for t in data):
            data = TensorDataset(*data)
        if targets == "labels":
            _check_val_data(val_data)
        elif val_data is not None and not isinstance(
            val_data, torch.Tensor | tuple | list | Dataset | DataLoader
        ):
            raise TypeError(
                "MHEX.fit: val_data must be image tensors, a tuple of tensors, a Dataset or a "
                f"DataLoader; got {type(val_data).__name__}."
            )
        recipe = self._recipe(recipe)
        loss = {"objective": objective, "head_weights": lam, "targets": targets}
        identity = {
            "method": "mhex",
            "format": self._format,
            "config": self._config,
            "backbone": self._backbone_identity(),
            "loss": loss,
            "train_backbone": bool(train_backbone),
        }
        step = functools.partial(
            self._step,
            objective=objective,
            head_weights=lam,
            agreement=not train_backbone,
            targets=targets,
        )
        validate = None
        if val_data is not None:
            validate = functools.partial(
                self._validate, val_data, recipe.batch_size, objective, targets
            )
        net = self.network
        own = [*net.gates.parameters(), *net.heads.parameters()]
        backbone = list(net.model.parameters())
        with self._fitting():  # the modes are read under the lock: no other call changed them
            modes = [(m, m.training) for m in net.modules()]
            try:
                with (
                    no_checkpointing(net.model),
                    requires_grad(
                        on=own + (backbone if train_backbone else []),
                        off=[] if train_backbone else backbone,
                    ),
                ):
                    net.backbone_trainable = train_backbone
                    history = self._train(net, step, data, recipe, identity, validate)
            finally:
                net.backbone_trainable = True
                for m, mode in modes:
                    m.training = mode
        agreement = history[-1].get("agreement") if history else None
        if agreement is not None and agreement < AGREEMENT_WARNING:
            warnings.warn(
                f"MHEX.fit: the gated network predicts what the plain model predicts on only "
                f"{agreement:.1%} of the last epoch's examples (gates in the frozen model's "
                "path); fit with gated_backbone=False to keep its predictions, or a lower lr.",
                stacklevel=2,
            )
        self.backbone_trained = self.backbone_trained or bool(train_backbone)
        self.training_record = {
            "recipe": schedule(recipe),
            "loss": loss,
            "train_backbone": bool(train_backbone),
            "history": history,
        }
        return history

    def _validate(
        self,
        val_data: Any,
        batch_size: int,
        objective: Objective,
        targets: Targets,
        module: nn.Module,
    ) -> dict[str, float]:
        """Accuracy of the final classifier and of every head on ``val_data`` (against its
        labels, or the plain model's predictions)."""
        if isinstance(val_data, torch.Tensor):
            val_data = TensorDataset(val_data)
        if isinstance(val_data, tuple | list) and all(
            isinstance(t, torch.Tensor) for t in val_data
        ):
            val_data = TensorDataset(*val_data)
        loader = DataLoader(val_data, batch_size=batch_size)
        device = next(module.parameters()).device
        hits = torch.zeros(len(self.stages) + 1, dtype=torch.float64, device=device)
        n = 0
        with torch.no_grad():
            for batch in loader:
                if targets == "predictions":
                    batch = self._model_inputs(batch, "MHEX.fit: val_data")
                    inputs, *extra = [t.to(device) for t in batch]
                    logits, heads = module(inputs, *extra, return_heads=True)
                    labels = predicted_targets(
                        _plain_logits(module, logits, inputs, extra), objective
                    )
                else:
                    inputs, *extra, labels = [t.to(device) for t in batch]
                    logits, heads = module(inputs, *extra, return_heads=True)
                for i, lg in enumerate([*heads, logits]):
                    hits[i] += _correct(lg, labels, objective)
                n += labels.shape[0]
        names = [f"val_{s.layer}" for s in self.stages] + ["val_final"]
        rates = (hits / max(n, 1)).tolist()  # one host copy, after the loop
        return dict(zip(names, rates, strict=True))

    # ------------------------------------------------------------------ analysis
    def gradient_similarity(
        self,
        batch: Sequence[torch.Tensor],
        objective: Objective = "ce",
        include_final: bool = True,
    ) -> torch.Tensor:
        """Cosine similarity of the gradients that each head's loss sends into the backbone.

        This project's reading of the paper's gradient-based collaboration analysis: for each
        head ``l`` (and the model's own classifier, ``"final"``) the gradient of its loss
        ``L(head_l)`` on ``batch`` with respect to the backbone parameters that every one of
        these losses reaches (the parameters before the first gated stage, with
        ``gated_backbone``), flattened; entry ``(i, j)`` is the cosine similarity of the
        gradients of heads ``i`` and ``j``. Positive: the heads pull the shared layers the same
        way (collaboration); negative: they conflict. The model is evaluated in eval mode and
        left unchanged (no ``.grad`` is written; ``requires_grad`` flags are restored).

        Args:
            batch: ``(inputs, *extra_args, labels)`` as in :meth:`fit`.
            objective: ``"ce"`` or ``"bce"``, as the heads were trained.
            include_final: Add the model's own classifier as the last row and column.

        Returns:
            ``(H, H)`` float64, rows and columns in the order of :attr:`head_names` (without
            ``"final"`` when ``include_final`` is false).

        Raises:
            ValueError: No backbone parameter is reached by every loss.
        """
        inputs, *extra, labels = batch
        params = [p for p in self.network.model.parameters()]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            with self._model_state(grad=True):
                p_ = self.network.run(inputs, *extra)
                heads = self.network.head_logits(p_, inputs, tuple(extra))
                losses = [_objective_loss(h, labels, objective) for h in heads]
                if include_final:
                    losses.append(_objective_loss(p_.logits, labels, objective))
                grads = [
                    torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    for loss in losses
                ]
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
        shared = [i for i in range(len(params)) if all(g[i] is not None for g in grads)]
        if not shared:
            raise ValueError(
                "MHEX: no backbone parameter receives gradient from every head; nothing shared "
                "to compare."
            )
        vecs = torch.stack([torch.cat([g[i].double().flatten() for i in shared]) for g in grads])
        unit = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return unit @ unit.T

    # ------------------------------------------------------------------ checkpoints
    def _backbone_identity(self) -> dict[str, Any]:
        """The wrapped model's class, family, size, stage widths and parameter layout."""
        model = self.network.model
        return {
            "class": type(model).__name__,
            "family": self.adapter.family,
            "params": sum(p.numel() for p in model.parameters()),
            "widths": [s.channels for s in self.stages],
            "layout_sha256": model_fingerprint(model, values=False),
        }

    def _config_record(self) -> dict[str, Any]:
        return dict(self._config)

    def _backbone_record(self) -> dict[str, Any]:
        """:meth:`_backbone_identity` with ``weights_sha256``, the fingerprint of the model's
        weights as they are now, and ``weights_stored``: whether the checkpoint holds them
        (after ``fit(train_backbone=True)``)."""
        return {
            **self._backbone_identity(),
            "weights_stored": self.backbone_trained,
            "weights_sha256": model_fingerprint(self.network.model),
        }

    def _extra_record(self) -> dict[str, Any]:
        return {"training": self.training_record}

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The gates' and heads' tensors, and the model's own weights when :meth:`fit`
        trained them (else only their fingerprint is recorded, so that :meth:`load` refuses
        other weights)."""
        keep = ("gates.", "heads.") + (("model.",) if self.backbone_trained else ())
        return {
            k: v.detach().clone()
            for k, v in self.network.state_dict().items()
            if k.startswith(keep)
        }

    @classmethod
    def load(
        cls,
        path: Any,
        model: nn.Module,
        *,
        layers: Sequence[str | int] | None = None,
        num_classes: int | None = None,
    ) -> MHEX:
        """Rebuilds MHEX around ``model`` from a checkpoint, verified, never unpickled.

        Args:
            path: Base path of the checkpoint pair (or either file).
            model: The model the checkpoint was made for. When the checkpoint holds the
                model's trained weights, they are loaded into it; otherwise its weights must be
                the ones the gates and heads were trained with.
            layers: If given, must equal the checkpoint's layers.
            num_classes: If given, must equal the checkpoint's class count.

        Returns:
            The fitted explainer, in eval mode, on the model's device and dtype.

        Raises:
            CheckpointError: The files are missing, damaged or edited; or the checkpoint is
                not an MHEX one, or was made for another model class, parameter count or
                layout, other weights, other layers, stage widths or class count.
        """
        return super().load(path, model, layers=layers, num_classes=num_classes)

    @classmethod
    def _restore(cls, where, tensors, record, model, *, layers=None, num_classes=None) -> MHEX:
        cfg, bb = dict(record["config"]), record["backbone"]
        remedy = "load it with the model, layers and classes it was made for, or fit a new MHEX"
        if layers is not None and list(layers) != cfg["layers"]:
            raise CheckpointError(
                where, f"made for layers {cfg['layers']}, not {list(layers)}", remedy
            )
        if num_classes is not None and num_classes != cfg["num_classes"]:
            raise CheckpointError(
                where, f"made for {cfg['num_classes']} classes, not {num_classes}", remedy
            )
        inner = backbone_model(model)
        params = sum(p.numel() for p in inner.parameters())
        if bb["class"] != type(inner).__name__ or bb["params"] != params:
            raise CheckpointError(
                where,
                f"made for a {bb['class']} with {bb['params']:,} parameters, not a "
                f"{type(inner).__name__} with {params:,}",
                remedy,
            )
        check_backbone_layout(where, bb, "layout_sha256", inner, remedy)
        own = _num_classes(inner)
        if own is not None and own != cfg["num_classes"]:
            raise CheckpointError(
                where, f"made for {cfg['num_classes']} classes; the model has {own}", remedy
            )
        mhex = cls._from_config(where, model, cfg, remedy)
        widths = [s.channels for s in mhex.stages]
        if widths != bb["widths"]:
            raise CheckpointError(
                where, f"made for stage widths {bb['widths']}; the model's are {widths}", remedy
            )
        mhex._load_weights(where, tensors, bb, remedy)
        mhex.training_record = record.get("training")
        return mhex

    @classmethod
    def _from_config(cls, where: Any, model: nn.Module, cfg: dict[str, Any], remedy: str) -> MHEX:
        try:
            return cls(
                model,
                cfg["layers"],
                cfg["num_classes"],
                gated_backbone=cfg["gated_backbone"],
                gate=cfg["gate"],
                gate_bias=cfg["gate_bias"],
                head_channels=cfg["head_channels"],
                pooling=cfg["pooling"],
                nonneg=cfg["nonneg"],
                window=cfg["window"],
                stage_weights=cfg["stage_weights"],
                fusion=cfg["fusion"],
                readout=cfg["readout"],
            )
        except (ValueError, TypeError) as err:
            raise CheckpointError(where, f"does not fit the model ({err})", remedy) from err

    def _load_weights(
        self, where: Any, tensors: dict[str, torch.Tensor], bb: dict[str, Any], remedy: str
    ) -> None:
        """The model's stored weights (if any), then the gates' and heads' tensors (the base
        class's ``load`` then checks the model's weights against ``weights_sha256``)."""
        net = self.network
        ref = next(net.model.parameters())
        own_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if bb["weights_stored"]:
            try:
                net.model.load_state_dict(own_state, strict=True)
            except RuntimeError as err:
                raise CheckpointError(
                    where, f"its model weights do not fit the model ({err})", remedy
                ) from err
            self.backbone_trained = True
        elif own_state:
            raise CheckpointError(where, "holds model weights it does not declare", remedy)
        state = {
            k: v.to(device=ref.device, dtype=ref.dtype)
            for k, v in tensors.items()
            if not k.startswith("model.")
        }
        try:
            net.gates.load_state_dict(_sub(state, "gates."), strict=True)
            net.heads.load_state_dict(_sub(state, "heads."), strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                where, f"its gate/head tensors do not fit ({err})", remedy
            ) from err
        extra = (
            set(state)
            - {f"gates.{k}" for k in net.gates.state_dict()}
            - {f"heads.{k}" for k in net.heads.state_dict()}
        )
        if extra:
            raise CheckpointError(where, f"holds unknown tensors {sorted(extra)[:3]}", remedy)


def _check_choices(gate: Any, pooling: Any, fusion: Any, nonneg: bool, window: Any) -> None:
    """Refuses an unknown gate, pooling or fusion, geometric fusion of signed maps, and a
    window that is not an odd positive int."""
    if gate not in ("spatial", "elementwise"):
        raise ValueError(f"MHEX: gate must be 'spatial' or 'elementwise'; got {gate!r}.")
    if pooling not in ("model", "mean"):
        raise ValueError(f"MHEX: pooling must be 'model' or 'mean'; got {pooling!r}.")
    if fusion not in ("geometric", "mean"):
        raise ValueError(f"MHEX: fusion must be 'geometric' or 'mean'; got {fusion!r}.")
    if fusion == "geometric" and not nonneg:
        raise ValueError(
            "MHEX: fusion='geometric' needs non-negative maps; with nonneg=False use fusion='mean'."
        )
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"MHEX: window must be an odd positive int; got {window!r}.")


def _stages_and_classes(
    adapter: ModelAdapter, layers: Sequence[str | int] | None, num_classes: int | None
) -> tuple[list[Stage], int]:
    """The stages of ``layers`` (default: the family's) and the class count (default: read
    from the model)."""
    if layers is None:
        transformer = isinstance(adapter, TransformerAdapter)
        layers = [EMBEDDINGS, 0] if transformer else adapter.default_feature_layers()
    layers = list(layers)
    if not layers:
        raise ValueError("MHEX: layers is empty; pass at least one stage.")
    if num_classes is None:
        num_classes = _num_classes(adapter.model)
        if num_classes is None:
            raise ValueError(
                f"MHEX: cannot read the number of classes of {type(adapter.model).__name__}; "
                "pass num_classes=K."
            )
    return _stages(adapter, layers), num_classes


def _head_channels(
    head_channels: int | Sequence[int | None] | None, n: int
) -> list[int | None] | None:
    if isinstance(head_channels, int):
        return [head_channels] * n
    if head_channels is not None and len(head_channels) != n:
        raise ValueError(f"MHEX: head_channels has {len(head_channels)} entries for {n} layers.")
    return None if head_channels is None else list(head_channels)


def _stage_weights(stage_weights: Sequence[float] | None, n: int) -> list[float] | None:
    if stage_weights is None:
        return None
    values = _values(stage_weights)
    if len(values) != n or not all(_finite_number(w) and w >= 0 for w in values) or not any(values):
        shown = [float(w) for w in values] if values and all(map(_number, values)) else None
        raise ValueError(
            f"MHEX: stage_weights needs {n} finite non-negative values, not all 0; got "
            f"{shown if shown is not None else stage_weights!r}."
        )
    return [float(w) for w in values]


def _number(value: Any) -> bool:
    """A real number (int, float, NumPy scalar; not bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _values(value: Any) -> list[Any]:
    """A number as ``[value]``; a list, tuple, 1-D tensor or array as a list; else
    ``[value]`` (refused by the caller)."""
    if _number(value) or isinstance(value, str | bytes):
        return [value]
    if hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()
    return list(value) if isinstance(value, Sequence) else [value]


def _check_batch(batch: Any, what: str) -> None:
    """Refuses a batch that is not ``(inputs, *extra_args, labels)`` tensors of one size."""
    hint = (
        f"{what} must be (inputs, *extra_args, labels) tensors, e.g. from TensorDataset(images, "
        "labels) or the tuple (images, labels)"
    )
    if isinstance(batch, torch.Tensor):
        raise ValueError(f"{hint}; got a single tensor {tuple(batch.shape)} (no labels).")
    if not isinstance(batch, tuple | list) or len(batch) < 2:
        got = f"{len(batch)} item" if isinstance(batch, tuple | list) else type(batch).__name__
        raise ValueError(f"{hint}; got {got} (no labels).")
    if not all(isinstance(t, torch.Tensor) for t in batch):
        kinds = ", ".join(type(t).__name__ for t in batch)
        raise ValueError(f"{hint}; got ({kinds}).")
    sizes = {t.shape[0] if t.dim() else None for t in batch}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(str(tuple(t.shape)) for t in batch)
        raise ValueError(f"{hint}, all with the same batch size; got shapes {shapes}.")


def _check_val_data(val_data: Any) -> None:
    """Refuses ``val_data`` that is not ``(inputs, *extra_args, labels)`` tensors or a
    Dataset / DataLoader of such tuples (its first item is looked at)."""
    what = "MHEX.fit: val_data"
    if val_data is None:
        return
    if isinstance(val_data, tuple | list) and all(isinstance(t, torch.Tensor) for t in val_data):
        _check_batch(tuple(val_data), what)
        return
    if isinstance(val_data, torch.Tensor):
        _check_batch(val_data, what)
    data = val_data.dataset if isinstance(val_data, DataLoader) else val_data
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{what} is empty.")
        first = data[0]
        if not isinstance(first, tuple | list) or len(first) < 2:
            got = type(first).__name__ if not isinstance(first, tuple | list) else "1 item"
            raise ValueError(
                f"{what}'s examples must be (inputs, *extra_args, labels) tuples, e.g. from "
                f"TensorDataset(images, labels); got {got} (no labels)."
            )
        return
    if isinstance(val_data, DataLoader):
        return
    shown = f" ({val_data!r})" if isinstance(val_data, str | bytes | os.PathLike) else ""
    raise TypeError(
        f"{what} must be (inputs, *extra_args, labels) tensors, a Dataset or a DataLoader of "
        f"such tuples; got {type(val_data).__name__}{shown}."
    )


def _sub(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


zoo.register_explainer("mhex", MHEX.load)
