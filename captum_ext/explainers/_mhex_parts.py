"""The modules MHEX adds to a model: attention gates and linear deep-supervision heads.

Private to :mod:`captum_ext.explainers.mhex`. Two layouts of features:

* maps ``(B, C, h, w)`` (CNN stages): the gate is a 1x1 convolution, the head a 1x1
  convolution, global average pooling and a linear layer;
* tokens ``(B, N, D)`` (transformer blocks): the gate is a linear layer over the width, the
  head one linear layer on every token, pooled with the model's readout weights.

No head has a nonlinearity after the gate, so each collapses to one affine map of the gated
features, its *equivalent matrix* ``W_eq (K, C)`` and bias ``b_eq (K,)``
(:meth:`MapHead.equivalent`, :meth:`TokenHead.equivalent`), and its class activation map
``W_eq F' + b_eq`` at every location or token pools to exactly the head's logits.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GateKind", "MapGate", "MapHead", "TokenGate", "TokenHead", "make_gate", "make_head"]

GateKind = Literal["spatial", "elementwise"]
Layout = Literal["map", "tokens"]


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


def box_smooth_1d(scores: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Moving average of ``scores (B, T)`` over a window of ``window`` valid positions' span.

    Invalid positions (``valid`` false: special tokens, padding) neither contribute nor receive
    a value (they come back as 0); near the ends and gaps the average is over the valid
    positions inside the window.
    """
    if window <= 1:
        return scores * valid
    v = valid.to(scores.dtype)[:, None]
    kernel = scores.new_ones(1, 1, window)
    num = F.conv1d((scores * valid)[:, None], kernel, padding=window // 2)
    den = F.conv1d(v, kernel, padding=window // 2)
    out = num / den.clamp_min(1)
    return out[:, 0, : scores.shape[1]] * valid


def box_smooth_2d(grid: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window x window`` neighbourhood of ``grid (B, 1, h, w)`` (edges: fewer cells)."""
    if window <= 1:
        return grid
    return F.avg_pool2d(grid, window, stride=1, padding=window // 2, count_include_pad=False)
