"""Models, inputs and explanation calls of the performance suite (``benchmarks/suite.py``).

A *model key* names a model and its input: ``"shapes-vit"``, ``"shapes-cnn"``, ``"text-bert"``
(zoo entries, their own benchmark data), ``"vit-s16"`` / ``"vit-b16"`` / ``"vit-s8"`` (untrained
timm ViTs at 224 px), ``"vit-s16@320"`` (ViT-S/16 at another image size) and ``"tiny-vit@32"``
(a 2-block width-64 timm ViT with 8 px patches, for quick token curves) and ``"resnet50"`` (an
untrained torchvision ResNet-50 at 224 px: the CNN at ImageNet size). A *method key* names
one explanation call: ``"cdam"``, ``"ig"``, ... (:data:`METHODS`), ``"cdam_targets@8"`` (eight
targets at once), ``"tam_sizing@loop"`` (TAM with one of the pass sizings of :data:`SIZING`)
and so on.

:func:`build_case` builds the model and a batch; :func:`build_call` returns a closure that
explains the batch once, or raises :class:`Skip` with the reason a method does not apply.
Nothing here times or measures anything (``_suite_measure`` does).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

IG_STEPS = 50
PPE = 16
"""``perturbations_per_eval`` of TAM, Occlusion and FeatureAblation on 224 px models (TAM's
default); the zoo models evaluate every perturbation of an image in one pass."""


class Skip(Exception):
    """A method does not apply to a model; the message says why."""


@dataclass(frozen=True)
class MethodInfo:
    """What the suite shows about a method.

    Attributes:
        label: Display name.
        group: ``"baseline"``, ``"ours"``, ``"reference"`` (an exact slow alternative) or
            ``"peer"`` (what a user would pick instead).
        families: Model families it applies to (``"vit"``, ``"cnn"``, ``"bert"``).
        slow: Costs many forwards per example (gets small batches and one timed call on the
            224 px models).
        quality: Method name in ``report.json`` whose quality metrics the row shows.
    """

    label: str
    group: str
    families: tuple[str, ...]
    slow: bool = False
    quality: str | None = None


ALL = ("vit", "cnn", "bert")
TRANSFORMERS = ("vit", "bert")
METHODS: dict[str, MethodInfo] = {
    "forward": MethodInfo("forward (no grad)", "baseline", ALL),
    "forward_backward": MethodInfo("forward + backward", "baseline", ALL),
    "cdam": MethodInfo("CDAM", "ours", TRANSFORMERS, quality="cdam"),
    "concept_cdam": MethodInfo("concept-CDAM", "ours", ("vit",)),
    "tam": MethodInfo("TAM", "ours", TRANSFORMERS, slow=True, quality="tam"),
    "relevance": MethodInfo("RelevancePropagation", "ours", TRANSFORMERS, quality="relevance"),
    "rollout": MethodInfo("AttentionRollout", "ours", TRANSFORMERS, quality="rollout"),
    "attention_map": MethodInfo("AttentionMap", "ours", TRANSFORMERS, quality="attention_map"),
    "ttame": MethodInfo("T-TAME", "ours", ("vit", "cnn"), quality="ttame"),
    "mhex": MethodInfo("MHEX", "ours", ALL, quality="mhex"),
    "tam_loop": MethodInfo(
        "token loop (one token removed per forward, whole batch)", "reference", ("vit",), True
    ),
    "relevance_naive": MethodInfo(
        "RelevancePropagation, streaming=False (every layer's attention gradient kept)",
        "reference",
        TRANSFORMERS,
    ),
    "layer_gradcam": MethodInfo(
        "Captum LayerGradCam", "peer", ("vit", "cnn"), quality="Captum GradCAM (layer4)"
    ),
    "layer_gxa": MethodInfo(
        "Captum LayerGradientXActivation (last block's norm1)", "peer", ("vit",)
    ),
    "ig": MethodInfo(
        f"Captum IntegratedGradients ({IG_STEPS} steps)",
        "peer",
        ALL,
        True,
        quality="Captum IG (32 steps)",
    ),
    "occlusion": MethodInfo("Captum Occlusion (patch windows)", "peer", ALL, True),
    "feature_ablation": MethodInfo("Captum FeatureAblation (patch mask)", "peer", ALL, True),
    "gradcam": MethodInfo("pytorch-grad-cam GradCAM", "peer", ("vit", "cnn")),
}
"""Every method of the main table, in table order."""

TIMM = {
    "vit-s16": ("vit_small_patch16_224", {}),
    "vit-b16": ("vit_base_patch16_224", {}),
    "vit-s8": ("vit_small_patch8_224", {"num_classes": 1000}),  # timm's has no head
    "tiny-vit": (
        "vit_tiny_patch16_224",
        {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 16},
    ),
}
TORCHVISION = {"resnet50": "resnet50"}
"""Untrained torchvision CNNs at 224 px (model key -> ``torchvision.models`` builder)."""
ZOO = ("shapes-vit", "shapes-cnn", "text-bert")


def model_family(key: str) -> str:
    """``"vit"``, ``"cnn"`` or ``"bert"`` for a model key, without building the model."""
    base = key.split("@")[0]
    if base in TIMM:
        return "vit"
    if base in TORCHVISION:
        return "cnn"
    from captum_ext import zoo

    return str(zoo.info(base)["family"])


def model_label(key: str) -> str:
    """A short description of the model and its input size."""
    base, _, size = key.partition("@")
    if base in TIMM:
        arch, _ = TIMM[base]
        px = size or ("32" if base == "tiny-vit" else "224")
        return f"untrained timm {arch if base != 'tiny-vit' else 'tiny ViT (2 blocks, D=64, patch 8)'} at {px} px"
    if base in TORCHVISION:
        return f"untrained torchvision {TORCHVISION[base]} at 224 px"
    return f"zoo {base}"


@dataclass
class Case:
    """A model and one batch to explain.

    Attributes:
        key: Model key.
        family: ``"vit"``, ``"cnn"`` or ``"bert"``.
        model: The classifier (eval mode, on the device).
        inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)``.
        extra: ``additional_forward_args`` (``(attention_mask,)`` for text) or ``None``.
        target: One class per example ``(B,)``.
        num_classes: Number of logits.
        patch: Patch (occlusion window) size in pixels; 0 for text.
        tokens: Tokens a transformer sees (patch tokens + prefix; text: sequence length).
    """

    key: str
    family: str
    model: nn.Module
    inputs: torch.Tensor
    extra: tuple[torch.Tensor, ...] | None
    target: torch.Tensor
    num_classes: int
    patch: int
    tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.inputs.shape[0])

    def logits(self, inputs: torch.Tensor | None = None, *extra: torch.Tensor) -> torch.Tensor:
        """The model's logits (a plain tensor also for HF models)."""
        x = self.inputs if inputs is None else inputs
        if self.family == "bert":
            mask = extra[0] if extra else self.extra[0]
            return self.model(input_ids=x, attention_mask=mask).logits
        return self.model(x)

    def forward(self) -> None:
        with torch.no_grad():
            self.logits()

    def forward_backward(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.logits().gather(1, self.target[:, None]).sum().backward()


def build_case(key: str, batch: int, device: str) -> Case:
    """Builds model ``key`` on ``device`` and a batch of ``batch`` inputs (seeded)."""
    base, _, size = key.partition("@")
    torch.manual_seed(0)
    if base in TIMM:
        import timm

        arch, kwargs = TIMM[base]
        kwargs = dict(kwargs)
        if size:
            kwargs["img_size"] = int(size)
        model = timm.create_model(arch, pretrained=False, **kwargs).eval().to(device)
        h, w = model.patch_embed.img_size
        x = torch.rand(batch, 3, h, w, device=device)
        patch = int(model.patch_embed.patch_size[0])
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        return Case(
            key,
            "vit",
            model,
            x,
            None,
            _targets(batch, model.num_classes, device),
            model.num_classes,
            patch,
            tokens,
        )
    if base in TORCHVISION:
        import torchvision

        model = getattr(torchvision.models, TORCHVISION[base])(weights=None).eval().to(device)
        x = torch.rand(batch, 3, 224, 224, device=device)
        n = int(model.fc.out_features)
        return Case(key, "cnn", model, x, None, _targets(batch, n, device), n, 16)
    from captum_ext import zoo

    info = zoo.info(base)
    model = zoo.load(base, device=device).eval()
    kwargs = zoo.data_kwargs(base)
    if info["modality"] == "text":
        from captum_ext.data import text_rationales

        data = text_rationales(batch, 1, **kwargs)
        ids, mask = data.input_ids.to(device), data.attention_mask.to(device)
        n = int(model.config.num_labels)
        return Case(
            key, "bert", model, ids, (mask,), _targets(batch, n, device), n, 0, ids.shape[1]
        )
    from captum_ext.data import shapes

    data = shapes(batch, 1, **kwargs)
    x = data.images.to(device)
    n = len(info["classes"])
    patch = int(getattr(data, "patch", kwargs.get("patch", 8)))
    family = str(info["family"])
    tokens = 0
    if family == "vit":
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return Case(key, family, model, x, None, _targets(batch, n, device), n, patch, tokens)


def _targets(batch: int, num_classes: int, device: str) -> torch.Tensor:
    return torch.arange(batch, device=device) % num_classes


def _k_targets(case: Case, k: int) -> list[torch.Tensor]:
    return [(case.target + i) % case.num_classes for i in range(k)]


def build_call(method: str, case: Case) -> Callable[[], Any]:
    """A closure that explains ``case``'s batch once with ``method``.

    Raises:
        Skip: The method does not apply to the model (the message says why).
    """
    name, _, arg = method.partition("@")
    if name in ("forward", "forward_backward"):
        return getattr(case, name)
    if name.endswith("_targets") or name.endswith("_calls"):
        return _multi_target_call(name, int(arg), case)
    if name == "tam_sizing":
        return _tam_sizing(arg, case)
    info = METHODS.get(name)
    if info is None:
        raise ValueError(f"unknown method key {method!r}; known: {list(METHODS)}")
    if case.family not in info.families:
        raise Skip(f"{info.label} does not apply to a {case.family.upper()} model")
    return BUILDERS[name](case)


# ------------------------------------------------------------------------------ ours
def _ours(cls_name: str, **call_kwargs: Any) -> Callable[[Case], Callable[[], Any]]:
    def build(case: Case) -> Callable[[], Any]:
        import captum_ext

        attr = getattr(captum_ext, cls_name)(case.model)
        return lambda: attr.attribute(
            case.inputs, target=case.target, additional_forward_args=case.extra, **call_kwargs
        )

    return build


def _concept_cdam(case: Case) -> Callable[[], Any]:
    from captum_ext import ConceptCDAM

    embed = copy.deepcopy(case.model)
    embed.reset_classifier(0)
    cc = ConceptCDAM(embed)
    concept = cc.concept_from_examples(case.inputs)
    return lambda: cc.attribute(case.inputs, concept)


def _trained(kind: str) -> Callable[[Case], Callable[[], Any]]:
    def build(case: Case) -> Callable[[], Any]:
        from captum_ext import zoo

        entry = f"{case.key}-{kind}"
        if entry in zoo.available(kind="explainer"):
            explainer = zoo.load(entry, device=case.inputs.device)
        elif kind == "ttame" and case.key.split("@")[0] in (*TIMM, *TORCHVISION):
            from captum_ext import TTAME

            size = tuple(case.inputs.shape[-2:])
            explainer = TTAME(case.model, input_size=size).eval().to(case.inputs.device)
            case.info["note"] = "untrained T-TAME: time only"
        else:
            raise Skip(f"no trained {kind.upper()} in the zoo for {case.key}")
        return lambda: explainer.attribute(
            case.inputs, target=case.target, additional_forward_args=case.extra
        )

    return build


def token_loop(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TAM the plain exact way on a timm ViT: one forward per removed token, whole batch.

    Returns:
        ``(B, P)`` logit drops for the patch tokens.
    """
    p = model.num_prefix_tokens
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        def logit(t: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.norm(model.blocks(t)))[rows, target]

        full = logit(tokens)
        drops = [
            full - logit(torch.cat([tokens[:, :i], tokens[:, i + 1 :]], dim=1))
            for i in range(p, tokens.shape[1])
        ]
    return torch.stack(drops, dim=1)


def _relevance_naive(case: Case) -> Callable[[], Any]:
    """RP without streaming: all L attention gradients ``(B, H, N, N)`` are alive at once."""
    from captum_ext import RelevancePropagation

    m = case.model
    if case.family == "bert":
        layers, heads = m.config.num_hidden_layers, m.config.num_attention_heads
    else:
        layers, heads = len(m.blocks), m.blocks[0].attn.num_heads
    n = case.tokens
    case.info["attention_gradients_mib"] = layers * case.batch * heads * n * n * 4 / 2**20
    rp = RelevancePropagation(m, streaming=False)
    return lambda: rp.attribute(case.inputs, target=case.target, additional_forward_args=case.extra)


def _tam_loop(case: Case) -> Callable[[], Any]:
    if not hasattr(case.model, "_pos_embed"):
        raise Skip("the reference loop is written for timm ViTs")
    return lambda: token_loop(case.model, case.inputs, case.target)


# ------------------------------------------------------------------------------ peers
class _TokensToGrid(nn.Module):
    """``(B, N, D)`` tokens -> prefix ``(B, p, D)`` + patch grid ``(B, D, h, w)`` (identity)."""

    def __init__(self, prefix: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.prefix, self.grid = prefix, grid

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, _, d = t.shape
        return t[:, self.prefix :].transpose(1, 2).reshape(b, d, *self.grid)


class _GridNorm(nn.Module):
    """Wraps a block's ``norm1`` so that its patch tokens pass through a ``(B, D, h, w)`` layer."""

    def __init__(self, norm: nn.Module, prefix: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.norm = norm
        self.to_grid = _TokensToGrid(prefix, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(x)
        grid = self.to_grid(t)
        return torch.cat([t[:, : self.to_grid.prefix], grid.flatten(2).transpose(1, 2)], dim=1)


def _vit_grid(case: Case) -> tuple[int, tuple[int, int]]:
    m = case.model
    return int(m.num_prefix_tokens), tuple(m.patch_embed.grid_size)


def _layer_gradcam(case: Case) -> Callable[[], Any]:
    from captum.attr import LayerGradCam

    if case.family == "cnn":
        cam = LayerGradCam(case.model, case.model.layer4)
        return lambda: cam.attribute(case.inputs, target=case.target, relu_attributions=True)
    prefix, grid = _vit_grid(case)
    model = copy.deepcopy(case.model)  # the reshape layer goes into a copy, not the case's model
    model.blocks[-1].norm1 = _GridNorm(model.blocks[-1].norm1, prefix, grid)
    cam = LayerGradCam(model, model.blocks[-1].norm1.to_grid)
    return lambda: cam.attribute(case.inputs, target=case.target, relu_attributions=True)


def _layer_gxa(case: Case) -> Callable[[], Any]:
    """Captum's hooks computing CDAM's quantity (gradient x activation at the last block's input
    norm), summed over the channels: a gradient peer with one gradient to one layer."""
    from captum.attr import LayerGradientXActivation

    lgxa = LayerGradientXActivation(case.model, case.model.blocks[-1].norm1)
    return lambda: lgxa.attribute(case.inputs, target=case.target).sum(-1)


def _gradcam(case: Case) -> Callable[[], Any]:
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise Skip("pytorch-grad-cam is not installed (pip install captum-ext[bench])") from None
    model = copy.deepcopy(case.model)  # GradCAM keeps hooks on its model while it lives
    targets = [ClassifierOutputTarget(int(t)) for t in case.target]
    if case.family == "cnn":
        cam = GradCAM(model, [model.layer4[-1]])
    else:
        prefix, (h, w) = _vit_grid(case)

        def reshape(t: torch.Tensor) -> torch.Tensor:
            return t[:, prefix:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)

        cam = GradCAM(model, [model.blocks[-1].norm1], reshape_transform=reshape)
    return lambda: cam(input_tensor=case.inputs, targets=targets)


def _ig(case: Case) -> Callable[[], Any]:
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    # Rows per internal pass: all steps of the batch on the small models; 16 on 224 px models.
    ibs = IG_STEPS * case.batch if case.key in ZOO else 16
    case.info["internal_batch_size"] = ibs
    if case.family == "bert":
        lig = LayerIntegratedGradients(case.logits, case.model.bert.embeddings)
        base = torch.zeros_like(case.inputs)  # [PAD] everywhere
        return lambda: lig.attribute(
            case.inputs,
            baselines=base,
            target=case.target,
            additional_forward_args=case.extra,
            n_steps=IG_STEPS,
            internal_batch_size=ibs,
        )
    ig = IntegratedGradients(case.model)
    return lambda: ig.attribute(
        case.inputs, target=case.target, n_steps=IG_STEPS, internal_batch_size=ibs
    )


def _ppe(case: Case, windows: int) -> int:
    ppe = windows if case.key in ZOO else PPE
    case.info["perturbations_per_eval"] = ppe
    return ppe


def _occlusion(case: Case) -> Callable[[], Any]:
    from captum.attr import Occlusion

    if case.family == "bert":
        occ = Occlusion(case.logits)
        t = case.inputs.shape[1]
        ppe = _ppe(case, t)
        return lambda: occ.attribute(
            case.inputs,
            sliding_window_shapes=(1,),
            strides=(1,),
            baselines=0,
            target=case.target,
            additional_forward_args=case.extra,
            perturbations_per_eval=ppe,
        )
    occ = Occlusion(case.model)
    c, h, w = case.inputs.shape[1:]
    p = case.patch
    ppe = _ppe(case, (h // p) * (w // p))
    return lambda: occ.attribute(
        case.inputs,
        sliding_window_shapes=(c, p, p),
        strides=(c, p, p),
        baselines=0,
        target=case.target,
        perturbations_per_eval=ppe,
    )


def _feature_ablation(case: Case) -> Callable[[], Any]:
    from captum.attr import FeatureAblation

    dev = case.inputs.device
    if case.family == "bert":
        fa = FeatureAblation(case.logits)
        t = case.inputs.shape[1]
        mask = torch.arange(t, device=dev)[None]
        ppe = _ppe(case, t)
        return lambda: fa.attribute(
            case.inputs,
            baselines=0,
            target=case.target,
            additional_forward_args=case.extra,
            feature_mask=mask,
            perturbations_per_eval=ppe,
        )
    fa = FeatureAblation(case.model)
    c, h, w = case.inputs.shape[1:]
    p = case.patch
    cells = torch.arange((h // p) * (w // p), device=dev).reshape(1, 1, h // p, w // p)
    mask = cells.repeat_interleave(p, 2).repeat_interleave(p, 3).expand(1, c, -1, -1)
    ppe = _ppe(case, (h // p) * (w // p))
    return lambda: fa.attribute(
        case.inputs, baselines=0, target=case.target, feature_mask=mask, perturbations_per_eval=ppe
    )


BUILDERS: dict[str, Callable[[Case], Callable[[], Any]]] = {
    "cdam": _ours("CDAM"),
    "concept_cdam": _concept_cdam,
    "tam": _ours("TokenAblation", perturbations_per_eval=PPE),
    "relevance": _ours("RelevancePropagation"),
    "rollout": _ours("AttentionRollout"),
    "attention_map": _ours("AttentionMap"),
    "ttame": _trained("ttame"),
    "mhex": _trained("mhex"),
    "tam_loop": _tam_loop,
    "relevance_naive": _relevance_naive,
    "layer_gradcam": _layer_gradcam,
    "layer_gxa": _layer_gxa,
    "ig": _ig,
    "occlusion": _occlusion,
    "feature_ablation": _feature_ablation,
    "gradcam": _gradcam,
}


# ------------------------------------------------------------------------- K targets
MULTI = {
    "cdam_targets": "CDAM attribute_targets (one forward, K backwards)",
    "cdam_calls": "CDAM, K attribute calls",
    "relevance_calls": "RelevancePropagation, K attribute calls",
    "tam_targets": "TAM attribute_targets (same ablated passes)",
    "mhex_targets": "MHEX attribute_targets (one forward)",
}
"""Method keys of the targets curve (``NAME@K``)."""


def _multi_target_call(name: str, k: int, case: Case) -> Callable[[], Any]:
    import captum_ext

    targets = _k_targets(case, k)
    extra = case.extra
    if name == "cdam_targets":
        attr = captum_ext.CDAM(case.model)
        return lambda: attr.attribute_targets(case.inputs, targets, extra)
    if name == "tam_targets":
        attr = captum_ext.TokenAblation(case.model)
        return lambda: attr.attribute_targets(case.inputs, targets, extra, PPE)
    if name == "mhex_targets":
        call = _trained("mhex")(case)  # raises Skip without a trained MHEX
        del call
        from captum_ext import zoo

        mhex = zoo.load(f"{case.key}-mhex", device=case.inputs.device)
        return lambda: mhex.attribute_targets(case.inputs, targets, extra)
    cls = {"cdam_calls": "CDAM", "relevance_calls": "RelevancePropagation"}.get(name)
    if cls is None:
        raise ValueError(f"unknown multi-target method {name!r}; known: {list(MULTI)}")
    attr = getattr(captum_ext, cls)(case.model)
    return lambda: [
        attr.attribute(case.inputs, target=t, additional_forward_args=extra) for t in targets
    ]


# ------------------------------------------------------------------------- TAM pass sizing
_HUGE = 1 << 62
SIZING: dict[str, tuple[str, dict[str, Any]]] = {
    "before": (
        "B × 16 rows per pass, no memory cap (the plan before the token budget)",
        {"perturbations_per_eval": 16, "max_tokens_per_pass": _HUGE, "max_memory_bytes": _HUGE},
    ),
    "after": ("token budget per device (the default; on CPU the first call calibrates)", {}),
    "loop": (
        "B rows per pass (one removal of every example per forward)",
        {"perturbations_per_eval": 1, "max_tokens_per_pass": _HUGE, "max_memory_bytes": _HUGE},
    ),
    "stacked": (
        "all B × N rows in one pass",
        {"max_tokens_per_pass": _HUGE, "max_memory_bytes": _HUGE},
    ),
}
"""Pass sizings of TAM's sizing sweep (``tam_sizing@NAME``): label and ``attribute`` kwargs."""


def _tam_sizing(variant: str, case: Case) -> Callable[[], Any]:
    """TAM with the pass sizing ``variant``; ``case.info["passes"]`` gets the last call's
    ablated passes and their rows (the clean forward not counted)."""
    import captum_ext

    if variant not in SIZING:
        raise ValueError(f"unknown pass sizing {variant!r}; known: {list(SIZING)}")
    kwargs = SIZING[variant][1]
    tam = captum_ext.TokenAblation(case.model)
    rows: list[int] = []
    forward = tam.adapter.forward

    def counting(inputs: torch.Tensor, extra: Any = None) -> torch.Tensor:
        rows.append(int(inputs.shape[0]))
        return forward(inputs, extra)

    tam.adapter.forward = counting
    passes: dict[str, Any] = {}
    case.info["passes"] = passes  # the result keeps this dict; each call refills it

    def call() -> torch.Tensor:
        rows.clear()
        out = tam.attribute(
            case.inputs, target=case.target, additional_forward_args=case.extra, **kwargs
        )
        passes.update(ablated_passes=len(rows) - 1, rows_per_pass=sorted(set(rows[1:])))
        return out

    return call
