"""MHEX's network: the gated model, its attention gates and deep-supervision heads, its step.

Private to :mod:`captum_ext.explainers.mhex`. :class:`MHEXNetwork` wraps the user's model and
puts an attention gate ``F' = F * sigmoid(g(F))`` and a linear deep-supervision head at every
chosen stage; :func:`mhex_step` is its training step (``L(final) + sum_l lambda_l L(head_l)``).
Two layouts of features:

* maps ``(B, C, h, w)`` (CNN stages): the gate is a 1x1 convolution, the head a 1x1
  convolution, global average pooling and a linear layer;
* tokens ``(B, N, D)`` (transformer blocks): the gate is a linear layer over the width, the
  head one linear layer on every token, pooled with the network's pooling weights
  (:meth:`MHEXNetwork.pool_weights`).

No head has a nonlinearity after the gate, so each collapses to one affine map of the gated
features, its *equivalent matrix* ``W_eq (K, C)`` and bias ``b_eq (K,)``
(:meth:`MapHead.equivalent`, :meth:`TokenHead.equivalent`), and its class activation map
``W_eq F' + b_eq`` at every location or token pools to exactly the head's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from captum_ext._scores import model_output_to_tensor
from captum_ext.adapters.base import ModelAdapter, Point, TransformerAdapter
from captum_ext.capture import Hook, hooks

__all__ = [
    "EMBEDDINGS",
    "GateKind",
    "MHEXNetwork",
    "MapGate",
    "MapHead",
    "Objective",
    "Pass",
    "Pooling",
    "Stage",
    "Targets",
    "TokenGate",
    "TokenHead",
    "make_gate",
    "make_head",
    "mhex_step",
    "predicted_targets",
]

GateKind = Literal["spatial", "elementwise"]
Layout = Literal["map", "tokens"]
Objective = Literal["ce", "bce"]
Targets = Literal["labels", "predictions"]
Pooling = Literal["model", "mean"]
_METHOD = "MHEX"
EMBEDDINGS = "embeddings"
"""Transformer layer name of the token sequence entering the first block."""


# ------------------------------------------------------------------------------------------
# gates and heads


def _init_gate(layer: nn.Conv2d | nn.Linear, bias: float) -> None:
    """Zero weights and a constant bias: every gate starts at ``sigmoid(bias)``.

    A gate that starts near 1 leaves a trained backbone's function almost unchanged, so
    wrapping a trained model does not start from a damaged one.
    """
    nn.init.zeros_(layer.weight)
    nn.init.constant_(layer.bias, bias)


class MapGate(nn.Module):
    """Attention gate on feature maps: ``a = sigmoid(g(F))`` with ``g`` a 1x1 convolution.

    Args:
        channels: ``C`` of the feature map.
        kind: ``"spatial"`` (one coefficient per location, ``(B, 1, h, w)``, broadcast over the
            channels) or ``"elementwise"`` (one per location and channel, ``(B, C, h, w)``).
        bias: Initial value of the convolution's bias (its weights start at zero).
    """

    def __init__(self, channels: int, kind: GateKind = "spatial", bias: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1 if kind == "spatial" else channels, 1)
        _init_gate(self.conv, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The gate coefficients in (0, 1) for ``features (B, C, h, w)``."""
        return torch.sigmoid(self.conv(features))


class TokenGate(nn.Module):
    """Attention gate on tokens: ``a = sigmoid(g(F))`` with ``g`` a linear layer over the width.

    Args:
        channels: ``D`` of the tokens.
        kind: ``"spatial"`` (one coefficient per token, ``(B, N, 1)``) or ``"elementwise"``
            (``(B, N, D)``).
        bias: Initial value of the linear layer's bias (its weights start at zero).
    """

    def __init__(self, channels: int, kind: GateKind = "spatial", bias: float = 3.0) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 1 if kind == "spatial" else channels)
        _init_gate(self.linear, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The gate coefficients in (0, 1) for ``features (B, N, D)``."""
        return torch.sigmoid(self.linear(features))


class MapHead(nn.Module):
    """Deep-supervision head on feature maps: 1x1 convolution -> global average pool -> linear.

    Args:
        channels: ``C`` of the (gated) feature map.
        hidden: Output channels of the 1x1 convolution.
        num_classes: ``K``.
    """

    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 1)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of ``features (B, C, h, w)``, computed layer by layer."""
        return self.fc(self.conv(features).mean(dim=(2, 3)))

    def equivalent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_eq, b_eq)``: ``W_fc W_conv`` ``(K, C)`` and ``W_fc b_conv + b_fc`` ``(K,)``."""
        w_conv = self.conv.weight.flatten(1)
        return self.fc.weight @ w_conv, self.fc.weight @ self.conv.bias + self.fc.bias

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """Class activation maps ``(B, K, h, w)``: ``W_eq F'(x) + b_eq`` at every location.

        Their mean over the locations equals :meth:`forward` (linearity).
        """
        w, b = self.equivalent()
        return torch.einsum("kc,bchw->bkhw", w, features) + b[:, None, None]


class TokenHead(nn.Module):
    """Deep-supervision head on tokens: one linear layer, pooled as the model pools.

    Args:
        channels: ``D`` of the (gated) tokens.
        num_classes: ``K``.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)``: the linear layer on the pooled tokens.

        Args:
            features: Tokens ``(B, N, D)``.
            weights: Pooling weights over the tokens, ``(N,)`` or ``(B, N)``, each row summing
                to 1 (so pooling and the linear layer commute, bias included).
        """
        w = weights.to(features.dtype)
        pooled = torch.einsum("bn,bnd->bd", w.expand(features.shape[0], -1), features)
        return self.fc(pooled)

    def equivalent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_eq, b_eq)``: the linear layer's weight ``(K, D)`` and bias ``(K,)``."""
        return self.fc.weight, self.fc.bias

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """Token activation maps ``(B, K, N)``: ``W_eq F'_i + b_eq`` for every token ``i``.

        Pooled with the readout weights they equal :meth:`forward`.
        """
        w, b = self.equivalent()
        return torch.einsum("kd,bnd->bkn", w, features) + b[:, None]


def make_gate(layout: Layout, channels: int, kind: GateKind, bias: float) -> nn.Module:
    """A :class:`MapGate` or :class:`TokenGate`."""
    return (MapGate if layout == "map" else TokenGate)(channels, kind, bias)


def make_head(layout: Layout, channels: int, hidden: int | None, num_classes: int) -> nn.Module:
    """A :class:`MapHead` (``hidden`` defaults to ``channels``) or a :class:`TokenHead`."""
    if layout == "map":
        return MapHead(channels, hidden or channels, num_classes)
    return TokenHead(channels, num_classes)


# ------------------------------------------------------------------------------------------
# the network


@dataclass(frozen=True)
class Stage:
    """A gated stage: where its features are read and how they are laid out.

    Attributes:
        layer: The layer as the user named it (module name, or block index for transformers).
        point: The module output the gate reads (and, with ``gated_backbone``, replaces).
        layout: ``"map"`` for ``(B, C, h, w)`` features, ``"tokens"`` for ``(B, N, D)``.
        channels: ``C`` or ``D``.
    """

    layer: str | int
    point: Point = field(repr=False)
    layout: Literal["map", "tokens"]
    channels: int


@dataclass
class Pass:
    """What one forward pass of an :class:`MHEXNetwork` yields.

    Attributes:
        logits: The model's scores ``(B, K)``.
        features: The gated features ``F'`` of every stage, ``(B, C, h, w)`` or ``(B, N, D)``.
        gates: The gate coefficients of every stage, ``(B, 1|C, h, w)`` or ``(B, N, 1|D)``.
    """

    logits: torch.Tensor
    features: list[torch.Tensor]
    gates: list[torch.Tensor]


class MHEXNetwork(nn.Module):
    """The gated network: the user's model with MHEX's gates and heads at its stages.

    ``forward`` returns the model's logits ``(B, K)`` with the gates in effect (HuggingFace
    outputs are reduced to their ``logits``), so the network trains and predicts like the
    model; ``forward(..., return_heads=True)`` also returns the heads' logits. The gates act
    through forward hooks of the hook engine (:func:`captum_ext.capture.hooks`) that exist only
    during a forward pass, so the model's code is unchanged and no hook outlives a call.

    Attributes:
        model: The wrapped model (wrappers such as DDP removed), a submodule.
        gates: One gate per stage (:class:`MapGate` or :class:`TokenGate`).
        heads: One deep-supervision head per stage.
        stages: Where each gate sits.
        gated_backbone: ``True``: the gated features replace the stage's output in the model;
            ``False``: the model runs unchanged and the gated features feed the heads only.
        backbone_trainable: ``False`` keeps the model in eval mode when the network is put in
            train mode (frozen BatchNorm statistics while only gates and heads learn).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        stages: Sequence[Stage],
        num_classes: int,
        gated_backbone: bool = False,
        gate: GateKind = "spatial",
        gate_bias: float = 3.0,
        head_channels: Sequence[int | None] | None = None,
        pooling: Pooling = "mean",
    ) -> None:
        super().__init__()
        self.model = adapter.model
        self._adapter = adapter
        self.stages = tuple(stages)
        self.gated_backbone = gated_backbone
        self.pooling = pooling
        self.backbone_trainable = True
        hidden = list(head_channels) if head_channels is not None else [None] * len(stages)
        self.gates = nn.ModuleList(make_gate(s.layout, s.channels, gate, gate_bias) for s in stages)
        self.heads = nn.ModuleList(
            make_head(s.layout, s.channels, h, num_classes)
            for s, h in zip(stages, hidden, strict=True)
        )

    def train(self, mode: bool = True) -> MHEXNetwork:
        """Sets the mode; the model stays in eval mode while ``backbone_trainable`` is false."""
        super().train(mode)
        if mode and not self.backbone_trainable:
            self.model.train(False)
        return self

    def run(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Pass:
        """One forward pass of the gated model; the hooks are removed when it returns or raises."""
        gate_values: list[torch.Tensor | None] = [None] * len(self.stages)

        def gated(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def transform(t: torch.Tensor) -> torch.Tensor:
                self._check_layout(i, t)
                a = self.gates[i](t)
                gate_values[i] = a
                return t * a

            return transform

        specs = [
            Hook(s.point, gated(i) if self.gated_backbone else None)
            for i, s in enumerate(self.stages)
        ]
        with hooks(specs):
            logits = model_output_to_tensor(self.model(inputs, *args, **kwargs))
        features = []
        for i, h in enumerate(specs):
            t = h.tensor
            if not self.gated_backbone:
                self._check_layout(i, t)
                gate_values[i] = self.gates[i](t)
                t = t * gate_values[i]
            features.append(t)
        return Pass(logits, features, [a for a in gate_values if a is not None])

    def forward(
        self, inputs: torch.Tensor, *args: Any, return_heads: bool = False, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The model's logits ``(B, K)``; with ``return_heads``, also each head's ``(B, K)``.

        Args:
            inputs: What the model takes first (images, ``input_ids``).
            *args: Further positional model arguments (e.g. the attention mask).
            return_heads: Also return the heads' logits, in stage order.
            **kwargs: Keyword model arguments (e.g. ``attention_mask=``).
        """
        p = self.run(inputs, *args, **kwargs)
        if not return_heads:
            return p.logits
        return p.logits, self.head_logits(p, inputs, args, kwargs)

    def head_logits(
        self, p: Pass, inputs: torch.Tensor, args: tuple = (), kwargs: Mapping[str, Any] = {}
    ) -> list[torch.Tensor]:
        """Each head's logits ``(B, K)`` from the gated features of ``p``."""
        out = []
        for s, head, f in zip(self.stages, self.heads, p.features, strict=True):
            if s.layout == "map":
                out.append(head(f))
            else:
                out.append(head(f, self.pool_weights(f.shape[1], inputs, args, kwargs, f.dtype)))
        return out

    def pool_weights(
        self,
        num_tokens: int,
        inputs: torch.Tensor,
        args: tuple = (),
        kwargs: Mapping[str, Any] = {},
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Pooling weights of the token heads, ``(N,)`` or ``(B, N)``, rows summing to 1.

        ``pooling="model"``: the model's own readout (CLS row, CLS+DIST mean, or the mean of
        the non-prefix tokens, attended ones only for text); ``"mean"``: the mean of the
        non-prefix tokens (attended ones only for text) whatever the model reads.
        """
        adapter = self._adapter
        if not isinstance(adapter, TransformerAdapter):
            raise TypeError("MHEX: token pooling weights exist for transformers only.")
        mask = self._attention_mask(inputs, args, kwargs)
        device = inputs.device
        if self.pooling == "model":
            return adapter.readout_weights(num_tokens, device, dtype, mask)
        w = torch.ones(num_tokens, device=device, dtype=dtype)
        w[: adapter.num_prefix_tokens] = 0
        if mask is not None:
            w = mask.to(dtype) * w
            return w / w.sum(1, keepdim=True).clamp_min(1)
        return w / w.sum().clamp_min(1)

    def _attention_mask(
        self, inputs: torch.Tensor, args: tuple, kwargs: Mapping[str, Any]
    ) -> torch.Tensor | None:
        extra = (
            args if args else ((kwargs["attention_mask"],) if "attention_mask" in kwargs else ())
        )
        return self._adapter.attention_mask(inputs, extra) if extra else None

    def _check_layout(self, i: int, t: torch.Tensor) -> None:
        s = self.stages[i]
        want = 4 if s.layout == "map" else 3
        if t.dim() != want or t.shape[1 if want == 4 else 2] != s.channels:
            shape = "(B, C, h, w)" if want == 4 else "(B, N, D)"
            raise ValueError(
                f"MHEX: layer {s.layer!r} gave a tensor of shape {tuple(t.shape)}; its gate "
                f"expects {shape} with {s.channels} channels. Pass layers whose output is a "
                "feature map (CNN stage) or the tokens of a block."
            )


# ------------------------------------------------------------------------------------------
# structure


def _width(module: nn.Module) -> int | None:
    """The channel count a module outputs, read from its last norm, convolution or linear layer."""
    for m in reversed(list(module.modules())):
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return int(m.num_features)
        if isinstance(m, nn.GroupNorm):
            return int(m.num_channels)
        if isinstance(m, nn.Conv2d):
            return int(m.out_channels)
        if isinstance(m, nn.Linear):
            return int(m.out_features)
    return None


def _num_classes(model: nn.Module) -> int | None:
    """The model's output count from its structure: ``num_classes``, ``config.num_labels``,
    else the last linear layer's outputs."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(model, "classifier") and isinstance(cfg.num_labels, int):
        return int(cfg.num_labels)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def _stages(adapter: ModelAdapter, layers: Sequence[str | int]) -> list[Stage]:
    stages = []
    transformer = isinstance(adapter, TransformerAdapter)
    for layer in layers:
        if transformer and layer == EMBEDDINGS:
            point, module, layout = adapter.block_input_point(0), adapter.blocks[0], "tokens"
        elif transformer and isinstance(layer, int) and not isinstance(layer, bool):
            i = adapter.check_layer_index(layer, _METHOD)
            block = adapter.blocks[i]
            point = Point(block, "output", 0, f"block {i} output")
            module, layout = block, "tokens"
        else:
            point = adapter.feature_point(layer, _METHOD)
            module, layout = point.module, "tokens" if transformer else "map"
        width = _width(adapter.blocks[-1] if transformer else module)
        if width is None:
            raise ValueError(
                f"MHEX: cannot tell the channel count of layer {layer!r} ({type(module).__name__}) "
                "from its modules (no norm, convolution or linear layer inside); pass a stage "
                "or block that ends in one."
            )
        stages.append(Stage(layer, point, layout, width))
    return stages


# ------------------------------------------------------------------------------------------
# training


def _objective_loss(logits: torch.Tensor, labels: torch.Tensor, objective: Objective):
    if objective == "ce":
        if labels.is_floating_point():
            raise ValueError(
                "MHEX: objective='ce' needs class indices (B,); got floating-point labels of "
                f"shape {tuple(labels.shape)}. For multi-hot labels use objective='bce'."
            )
        return F.cross_entropy(logits, labels.reshape(-1).long())
    if objective == "bce":
        if not labels.is_floating_point():
            labels = F.one_hot(labels.reshape(-1).long(), logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"MHEX: objective must be 'ce' or 'bce'; got {objective!r}.")


def _correct(logits: torch.Tensor, labels: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Correct examples (a 0-dim tensor on the logits' device): the predicted set (``"bce"``:
    sigmoid > 0.5) or class (``"ce"``)."""
    if objective == "bce":
        if not labels.is_floating_point():
            labels = F.one_hot(labels.reshape(-1).long(), logits.shape[1])
        return ((logits > 0) == (labels > 0.5)).all(dim=1).sum()
    return (logits.argmax(1) == labels.reshape(-1)).sum()


def predicted_targets(plain: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Training targets from the plain model's scores ``(B, K)``: its top-1 class ``(B,)``
    (``"ce"``) or its predicted set, multi-hot ``(B, K)`` with sigmoid > 0.5 (``"bce"``)."""
    if objective == "bce":
        return (plain > 0).to(plain.dtype)
    return plain.argmax(1)


def _plain_logits(
    module: nn.Module, p_logits: torch.Tensor, inputs: torch.Tensor, extra: Sequence[Any]
) -> torch.Tensor:
    """The wrapped model's own scores without the gates: the pass's own when the gates feed
    the heads only, else one more forward pass of the model (no gradient)."""
    net = getattr(module, "module", module)  # a DDP wrapper's network
    if not net.gated_backbone:
        return p_logits.detach()
    with torch.no_grad():
        return model_output_to_tensor(net.model(inputs, *extra)).detach()


def mhex_step(
    module: nn.Module,
    batch: Sequence[torch.Tensor],
    *,
    objective: Objective = "ce",
    head_weights: Sequence[float],
    agreement: bool = False,
    targets: Targets = "labels",
) -> dict[str, torch.Tensor]:
    """One training step's loss terms: ``L(final) + sum_l lambda_l L(head_l)``.

    The step of the shared training loop (``step(module, batch) -> {"loss": total, ...}``).

    Args:
        module: The :class:`MHEXNetwork` (or a DDP wrapper of it).
        batch: ``(inputs, *extra_args, labels)``: images and labels, or ``input_ids``,
            ``attention_mask`` and labels. Labels are class indices ``(B,)`` or multi-hot
            ``(B, K)`` (``objective="bce"``). With ``targets="predictions"``:
            ``(inputs, *extra_args)``, no labels.
        objective: ``"ce"`` (softmax cross-entropy, one class per example) or ``"bce"``
            (sigmoid binary cross-entropy per class, multi-label; index labels are one-hot
            encoded).
        head_weights: ``lambda_l`` of every head, in stage order.
        agreement: Also return ``agreement``: the share of the batch on which the network
            predicts what the plain model predicts (the same class for ``"ce"``, the same set
            for ``"bce"``), measured before the step's update. With ``gated_backbone`` this
            costs one more forward pass of the model (no gradient); without, the network's
            scores are the model's and the share is 1.
        targets: ``"labels"`` (the batch's last item) or ``"predictions"``: the plain model's
            own predictions on the batch (:func:`predicted_targets`), as T-TAME trains.

    Returns:
        ``{"loss": total, "final": L(final), "head0": L(head_0), ...}`` (and ``agreement``).
    """
    if targets == "predictions":
        inputs, *extra = batch
    else:
        inputs, *extra, labels = batch
    logits, heads = module(inputs, *extra, return_heads=True)
    plain = None
    if targets == "predictions" or agreement:
        plain = _plain_logits(module, logits, inputs, extra)
    if targets == "predictions":
        labels = predicted_targets(plain, objective)
    final = _objective_loss(logits, labels, objective)
    terms = {"final": final}
    if agreement:  # the network predicts the plain model's class (ce) or set (bce)
        same = _correct(logits.detach(), predicted_targets(plain, objective), objective)
        terms["agreement"] = same.to(logits.dtype) / logits.shape[0]
    total = final
    for i, (lam, h) in enumerate(zip(head_weights, heads, strict=True)):
        terms[f"head{i}"] = _objective_loss(h, labels, objective)
        total = total + lam * terms[f"head{i}"]
    return {"loss": total, **terms}
