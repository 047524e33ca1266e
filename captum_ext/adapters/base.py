"""The adapter protocol: what a model family looks like inside.

An adapter is the only place in captum_ext that knows module paths of timm or
transformers. Methods ask it for *points* (a module and which of its tensors to
read), for the token layout (prefix tokens, readout, patch grid) and for a
context manager that makes attention probabilities materialise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from captum_ext._scores import model_output_to_tensor
from captum_ext.errors import UnsupportedModelError

__all__ = [
    "ModelAdapter",
    "Point",
    "TokenRemoval",
    "adapter_for",
    "model_output_to_tensor",
    "register_adapter",
    "unwrap_model",
]

Readout = Literal["cls", "cls_dist", "mean"]


@dataclass(frozen=True)
class Point:
    """A tensor inside a model, read by a forward hook.

    Attributes:
        module: The module whose input or output holds the tensor.
        where: ``"output"`` reads the module's output, ``"input"`` its first
            positional argument (or ``hidden_states`` keyword).
        index: For tuple outputs, which element holds the tensor.
        name: Human-readable label used in error messages.
    """

    module: nn.Module
    where: Literal["output", "input"] = "output"
    index: int | None = None
    name: str = ""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strips ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(
            model, nn.DataParallel | nn.parallel.DistributedDataParallel
        ) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


class ModelAdapter:
    """What a model family looks like inside. One subclass per family.

    Subclasses implement :meth:`matches` and the structural properties; the
    methods in :mod:`captum_ext.attr` use only this protocol.

    Attributes:
        model: The module the user passed (wrappers removed), called for every
            forward pass.
        family: Short family name used in messages.
        modality: ``"image"`` or ``"text"``.
        readout: Which token rows the classifier reads: ``"cls"`` (first
            token), ``"cls_dist"`` (mean of CLS and distillation token) or
            ``"mean"`` (mean of the non-prefix tokens).
    """

    family: ClassVar[str] = ""
    modality: ClassVar[Literal["image", "text"]] = "image"

    def __init__(self, model: nn.Module, readout: Readout | None = None) -> None:
        self.model = unwrap_model(model)
        if readout is not None and readout not in ("cls", "cls_dist", "mean"):
            raise ValueError(f"readout must be 'cls', 'cls_dist' or 'mean'; got {readout!r}.")
        self._readout_override = readout

    # ------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` (unwrapped) belongs to this family, judged by structure."""
        raise NotImplementedError

    # ------------------------------------------------------------------ structure
    @property
    def blocks(self) -> Sequence[nn.Module]:
        """The encoder blocks in forward order."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS, DIST, registers); 0 for text."""
        return 0

    @property
    def readout(self) -> Readout:
        return self._readout_override or self._default_readout()

    def _default_readout(self) -> Readout:
        return "cls"

    @property
    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------ points
    def pre_attention_point(self, block: int = -1) -> Point:
        """The tokens entering the self-attention of ``block`` (after its norm, if pre-LN)."""
        raise NotImplementedError

    def attention_point(self, block: int) -> Point:
        """The post-softmax attention probabilities ``(B, H, N, N)`` of ``block``."""
        raise NotImplementedError

    def token_point(self) -> Point:
        """The token sequence after position embeddings, before the first block."""
        raise NotImplementedError

    def pixel_embedding(self) -> nn.Module | None:
        """The module turning pixels into patch embeddings, or ``None`` (text).

        Its output for an example depends on that example alone, so token
        ablation computes it once per batch and replays it for every
        shortened copy instead of recomputing it (a convolutional stem can
        cost more than the blocks of a small ViT).
        """
        return None

    def block_input_point(self, block: int = -1) -> Point:
        """The residual stream entering ``block``."""
        return Point(self.blocks[block], "input", None, f"block {block} input")

    def resolve_layer(self, layer: nn.Module | None) -> Point:
        """Maps the user's ``layer`` argument to a point.

        ``None`` gives the final block's pre-attention point; a block of the
        model gives that block's pre-attention point; any other module gives
        its output.
        """
        if layer is None:
            return self.pre_attention_point(-1)
        for i, blk in enumerate(self.blocks):
            if layer is blk:
                return self.pre_attention_point(i)
        if not any(m is layer for m in self.model.modules()):
            raise ValueError(
                f"layer {type(layer).__name__} is not a submodule of the model; pass a block "
                "of the model, the module whose output are the tokens, or None."
            )
        return Point(layer, "output", None, type(layer).__name__)

    # ------------------------------------------------------------------ inputs
    def grid_size(self, inputs: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for image inputs ``(B, C, H, W)``."""
        ph, pw = self.patch_size
        return inputs.shape[-2] // ph, inputs.shape[-1] // pw

    def check_inputs(self, inputs: torch.Tensor, method: str) -> None:
        """Validates rank, dtype, finiteness and size; raises ``ValueError`` with what to do."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"{method}: inputs must be a tensor; got {type(inputs).__name__}.")
        if self.modality == "image":
            if inputs.dim() != 4:
                raise ValueError(
                    f"{method}: {self.family} expects images (B, C, H, W); got shape "
                    f"{tuple(inputs.shape)}."
                )
            if not inputs.is_floating_point():
                raise ValueError(
                    f"{method}: images must be floating point; got {inputs.dtype}. "
                    "Convert with inputs.float() after normalisation."
                )
            if not torch.isfinite(inputs).all():
                raise ValueError(f"{method}: inputs contain NaN or inf values.")
            self._check_image_size(inputs, method)
        else:
            if inputs.dim() != 2:
                raise ValueError(
                    f"{method}: {self.family} expects input_ids (B, T); got shape "
                    f"{tuple(inputs.shape)}."
                )
            if inputs.is_floating_point() or inputs.is_complex():
                raise ValueError(
                    f"{method}: {self.family} expects integer input_ids (B, T); got "
                    f"{inputs.dtype}. Pass token ids, and the attention mask through "
                    "additional_forward_args=(attention_mask,)."
                )

    def _check_image_size(self, inputs: torch.Tensor, method: str) -> None:
        ph, pw = self.patch_size
        h, w = inputs.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(
                f"{method}: image size {h}x{w} is not divisible by the patch size {ph}x{pw} "
                f"of this {self.family}. Resize or crop to a multiple, e.g. "
                f"{(h // ph) * ph}x{(w // pw) * pw}."
            )

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def attention_probabilities(self) -> Iterator[None]:
        """Makes attention probabilities materialise; restores every flag it changed."""
        raise NotImplementedError
        yield  # pragma: no cover

    def forward(self, inputs: torch.Tensor, additional_forward_args: Any = None) -> torch.Tensor:
        """Calls the model and returns its scores as one tensor (B, C)."""
        args = _as_tuple(additional_forward_args)
        return model_output_to_tensor(self.model(inputs, *args))

    # ------------------------------------------------------------------ token removal (TAM)
    def token_removal(
        self, inputs: torch.Tensor, additional_forward_args: Any = None
    ) -> TokenRemoval:
        """Which tokens may be removed, and what to feed the model when they are.

        Tokens are removed at :meth:`token_point` (after position embeddings,
        before the first block) by a hook that the method installs; this
        describes the rest. Images: every token but the prefix tokens (CLS,
        DIST, registers) may go, and each shortened row is fed the whole
        image (the hook replaces its tokens). Text: every attended position
        but the first and the last attended ones ([CLS]/<s> and [SEP]/</s>)
        may go, padding never; each row is fed ``input_ids`` and every
        ``(B, T, ...)`` extra argument (the attention mask) with the removed
        positions cut out, so that the model's own shapes (its attention mask,
        a wrapper's pooling) agree with the shortened sequence. The attention
        mask is read from ``additional_forward_args[0]``.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)``.
            additional_forward_args: Extra positional model arguments.

        Returns:
            A :class:`TokenRemoval` with ``removable (B, N)``.
        """
        extra = _as_tuple(additional_forward_args)
        b = inputs.shape[0]
        if self.modality == "image":
            h, w = self.grid_size(inputs)
            p = self.num_prefix_tokens
            removable = torch.ones(b, p + h * w, dtype=torch.bool, device=inputs.device)
            removable[:, :p] = False
            return TokenRemoval(inputs, extra, removable, slice_tokens=False)
        t = inputs.shape[1]
        mask = extra[0] if extra else None
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (b, t):
            attended = mask.to(inputs.device) != 0
        else:
            attended = torch.ones(b, t, dtype=torch.bool, device=inputs.device)
        pos = torch.arange(t, device=inputs.device).expand(b, t)
        first = attended.int().argmax(1, keepdim=True)
        last = t - 1 - attended.flip(1).int().argmax(1, keepdim=True)
        removable = attended & (pos != first) & (pos != last)
        return TokenRemoval(inputs, extra, removable, slice_tokens=True)

    def readout_weights(
        self, num_tokens: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Weights ``(N,)`` over token rows that form the readout (sum to 1), in ``dtype``."""
        w = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.readout == "cls":
            w[0] = 1.0
        elif self.readout == "cls_dist":
            w[:2] = 0.5
        else:
            p = self.num_prefix_tokens
            w[p:] = 1.0 / max(num_tokens - p, 1)
        return w


@dataclass(frozen=True)
class TokenRemoval:
    """Model arguments for copies of a batch with tokens removed.

    Built by :meth:`ModelAdapter.token_removal`; used by token ablation (TAM).

    Attributes:
        inputs: The batch: images ``(B, C, H, W)`` or ``input_ids (B, T)``.
        additional_forward_args: The extra positional model arguments.
        removable: ``(B, N)`` bool, the tokens at the token point that may be
            removed (never prefix tokens, special text tokens or padding).
        slice_tokens: ``True`` (text) when ``inputs`` and the ``(B, T, ...)``
            extra tensors are cut along the token axis like the tokens;
            ``False`` (images) when each row gets its whole example.
    """

    inputs: torch.Tensor
    additional_forward_args: tuple
    removable: torch.Tensor
    slice_tokens: bool

    def model_args(
        self, rows: torch.Tensor, keep_index: torch.Tensor
    ) -> tuple[torch.Tensor, tuple]:
        """Inputs and extra arguments for R shortened rows.

        Args:
            rows: ``(R,)`` example of each row.
            keep_index: ``(R, L)`` ascending token positions each row keeps.

        Returns:
            ``(inputs, additional_forward_args)`` with R rows: tensors whose
            first axis is the batch are indexed with ``rows`` (and, when
            ``slice_tokens``, those of shape ``(B, T, ...)`` are cut to
            ``keep_index``); other arguments are passed unchanged.
        """
        b = self.inputs.shape[0]
        t = self.inputs.shape[1] if self.slice_tokens else -1

        def pick(v: Any) -> Any:
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != b:
                return v
            rows_v = rows.to(v.device)
            if self.slice_tokens and v.dim() >= 2 and v.shape[1] == t:
                return v[rows_v[:, None], keep_index.to(v.device)]
            return v[rows_v]

        return pick(self.inputs), tuple(pick(v) for v in self.additional_forward_args)


def _as_tuple(args: Any) -> tuple:
    if args is None:
        return ()
    if isinstance(args, tuple):
        return args
    return (args,)


_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator adding an adapter to the families :func:`adapter_for` tries."""
    _REGISTRY.append(cls)
    return cls


def supported_families() -> str:
    return ", ".join(cls.family for cls in _REGISTRY)


def adapter_for(
    model: nn.Module | ModelAdapter, readout: Readout | None = None, method: str = "captum_ext"
) -> ModelAdapter:
    """Picks the adapter for ``model`` by structure.

    Args:
        model: A timm ViT, a HuggingFace ViT or BERT-family model, a module
            wrapping one, or an adapter (returned as is).
        readout: Overrides the family's default readout (``"cls"``,
            ``"cls_dist"`` or ``"mean"``), e.g. for a mean-pooling wrapper.
        method: Name used in the error message.

    Raises:
        UnsupportedModelError: No adapter recognises the model.
    """
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{method} needs a torch.nn.Module; got {type(model).__name__}."
        )
    inner = unwrap_model(model)
    for cls in _REGISTRY:
        if cls.matches(inner):
            return cls(inner, readout=readout)
    raise UnsupportedModelError(
        f"{method} needs a vision or text transformer; got {type(inner).__name__}. "
        f"Supported: {supported_families()}."
    )
