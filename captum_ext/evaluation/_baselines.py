"""The class-agnostic baseline maps every evaluation adds: uniform noise and a centred bump."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BASELINES", "BASELINE_LABELS", "baseline_map", "centre_gaussian_map", "random_map"]


def random_map(inputs: Tensor, seed: int = 0) -> Tensor:
    """Uniform noise in ``[0, 1)``: the chance level of every metric (class-agnostic).

    Drawn on the CPU from a generator seeded with ``seed``, so the map is the same on every
    device; every example of the batch gets its own noise.

    Args:
        inputs: Images ``(B, C, H, W)`` or token ids ``(B, T)``.
        seed: Seed of the noise.

    Returns:
        ``(B, 1, H, W)`` for images, ``(B, T)`` for token ids, float32 on ``inputs.device``.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (inputs.shape[0], 1, *inputs.shape[-2:]) if inputs.dim() == 4 else inputs.shape[:2]
    return torch.rand(tuple(shape), generator=g, device="cpu").to(inputs.device)


def centre_gaussian_map(images: Tensor, sigma: float = 0.25) -> Tensor:
    """A fixed Gaussian bump at the image centre: the "objects are central" prior.

    ``exp(-((y - 1/2)^2 + (x - 1/2)^2) / (2 sigma^2))`` at the pixel centres, with ``y`` and
    ``x`` in units of the image height and width. Class-agnostic and input-agnostic.

    Args:
        images: Images ``(B, C, H, W)`` (only the shape and device are used).
        sigma: Standard deviation as a fraction of the image side.

    Returns:
        ``(B, 1, H, W)`` float32 on ``images.device``.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    b, _, h, w = images.shape
    dev = images.device
    y = (2 * torch.arange(h, dtype=torch.float32, device=dev) + 1 - h) / (2 * h)  # symmetric
    x = (2 * torch.arange(w, dtype=torch.float32, device=dev) + 1 - w) / (2 * w)
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return g.expand(b, 1, h, w)


BASELINES: dict[str, str] = {
    "random": "uniform noise",
    "centre-gaussian": "centred Gaussian (sigma = 0.25 of the side)",
}
"""The baseline maps every evaluation adds (name -> description); both class-agnostic."""

BASELINE_LABELS: dict[str, str] = {"random": "random", "centre-gaussian": "centre Gaussian"}
"""Display names of the baselines in the result tables."""


def baseline_map(name: str, inputs: Tensor, seed: int) -> Tensor:
    """The baseline ``name`` of :data:`BASELINES` for ``inputs`` (``seed`` seeds the noise)."""
    if name == "random":
        return random_map(inputs, seed)
    if name == "centre-gaussian":
        return centre_gaussian_map(inputs)
    raise KeyError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINES)}")
