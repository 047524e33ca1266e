"""Slow, literal references written from the papers' equations, used only by tests."""

from __future__ import annotations

import torch
from torch import nn


def token_module(model: nn.Module, family: str) -> tuple[nn.Module, str]:
    """The module and hook kind at which CDAM's tokens T live, named explicitly per family."""
    if family.startswith("timm"):
        return model.blocks[-1].norm1, "output"
    if family == "hf_vit":
        return model.vit.layers[-1].layernorm_before, "output"
    if family in ("bert", "roberta"):
        base = model.bert if family == "bert" else model.roberta
        return base.encoder.layer[-1], "input"
    if family == "distilbert":
        return model.distilbert.transformer.layer[-1], "input"
    if family == "meanpool_bert":
        return model.encoder.encoder.layer[-1], "input"
    raise KeyError(family)


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def cdam_finite_difference(
    model: nn.Module,
    family: str,
    x: torch.Tensor,
    extra: tuple,
    score,
    h: float = 1e-5,
) -> torch.Tensor:
    """CDAM from its definition, without autograd: S_i = sum_j T_ij df/dT_ij.

    The sum is the directional derivative of f along T_i itself, so
    S_i = d/de f(T with token i scaled by (1 + e)) at e = 0, taken by a
    central difference in float64 (error O(h^2)). One example at a time.

    Returns:
        (N,) scores over all tokens of the single example ``x[0:1]``.
    """
    module, kind = token_module(model, family)
    state = {"i": None, "e": 0.0}

    def scale(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, state["i"]] *= 1.0 + state["e"]
        return t

    if kind == "output":
        handle = module.register_forward_hook(lambda m, a, o: scale(o))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: (scale(a[0]), *a[1:]))
    try:
        with torch.no_grad():
            state["i"], state["e"] = 0, 0.0
            n = _count_tokens(model, module, kind, x, extra)
            out = torch.zeros(n, dtype=torch.float64)
            for i in range(n):
                state["i"] = i
                state["e"] = h
                up = score(_logits(model(x, *extra)))
                state["e"] = -h
                down = score(_logits(model(x, *extra)))
                out[i] = (up - down).item() / (2 * h)
    finally:
        handle.remove()
    return out


def _count_tokens(model, module, kind, x, extra) -> int:
    seen = {}

    def grab(m, a, o=None):
        seen["n"] = (o if kind == "output" else a[0]).shape[1]

    handle = (
        module.register_forward_hook(grab)
        if kind == "output"
        else module.register_forward_pre_hook(lambda m, a: grab(m, a))
    )
    try:
        model(x, *extra)
    finally:
        handle.remove()
    return seen["n"]


def cdam_timm_manual(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """CDAM on a timm ViT by re-implementing its forward by hand; returns (B, N)."""
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.patch_drop(t)
    t = model.norm_pre(t)
    for blk in model.blocks[:-1]:
        t = blk(t)
    last = model.blocks[-1]
    tokens = last.norm1(t).detach().requires_grad_(True)
    t = t + last.ls1(last.attn(tokens))
    t = t + last.ls2(last.mlp(last.norm2(t)))
    logits = model.forward_head(model.norm(t))
    (grad,) = torch.autograd.grad(logits[:, target].sum(), tokens)
    return (tokens * grad).sum(-1).detach()
