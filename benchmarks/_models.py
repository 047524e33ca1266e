"""Models for the benchmark scripts: a zoo model when shipped, else the same architecture in code."""

from __future__ import annotations

import timm
import torch
from torch import nn


def shapes_vit(name: str = "shapes-vit") -> tuple[nn.Module, str]:
    """The zoo ViT ``name`` (trained) or, before the zoo is installed, a random one of its size."""
    try:
        from captum_ext import zoo

        return zoo.load(name), f"zoo:{name}"
    except (ImportError, AttributeError, ValueError, FileNotFoundError):
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=96,
            depth=4,
            num_heads=3,
            num_classes=4,
        ).eval()
        return model, "random ViT (32 px, patch 8, D=96, 4 blocks)"
