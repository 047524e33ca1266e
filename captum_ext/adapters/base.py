"""The adapter protocol: what a model family looks like inside.

An adapter is the only place in captum_ext that knows module paths of timm,
torchvision or transformers. Two protocols: :class:`ModelAdapter`, what every
model kind has (detection, the forward call, input checks, feature points by
layer name), and :class:`TransformerAdapter` on top of it, what only
transformers have (blocks, heads, prefix tokens, patch grid, attention
probabilities, readout). Methods ask :func:`adapter_for` for the kind they
need and get :class:`~captum_ext.errors.UnsupportedModelError` naming it
otherwise.
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
    "TransformerAdapter",
    "adapter_for",
    "as_tuple",
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


def as_tuple(args: Any) -> tuple:
    """``additional_forward_args`` as a tuple (``None`` -> ``()``, a single value -> ``(v,)``)."""
    if args is None:
        return ()
    if isinstance(args, tuple):
        return args
    return (args,)


class ModelAdapter:
    """What any model looks like inside: the protocol every model kind implements.

    One subclass per family. This base holds what every kind has — detection
    (:meth:`matches`), the forward call (:meth:`forward`), input checks
    (:meth:`check_inputs`) and *feature points*: a named layer's output read
    as a map ``(B, C, h, w)`` (:meth:`feature_point`, :meth:`feature_map`),
    which is what trainable explainers (T-TAME, MHEX) consume.
    :class:`TransformerAdapter` adds what only transformers have.

    Attributes:
        model: The module the user passed (wrappers removed), called for every
            forward pass.
        family: Short family name used in messages.
        kind: The model kind (``"transformer"``, ``"cnn"``); methods name the
            kind they need.
        modality: ``"image"`` or ``"text"``.
    """

    family: ClassVar[str] = ""
    kind: ClassVar[str] = "model"
    modality: ClassVar[Literal["image", "text"]] = "image"

    def __init__(self, model: nn.Module, readout: Readout | None = None) -> None:
        self.model = unwrap_model(model)

    # ------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` (unwrapped) belongs to this family, judged by structure."""
        raise NotImplementedError

    @classmethod
    def refusal(cls, model: nn.Module) -> str | None:
        """Why a model that looks like this family is nevertheless not supported, or ``None``."""
        return None

    # ------------------------------------------------------------------ calls
    def forward(self, inputs: torch.Tensor, additional_forward_args: Any = None) -> torch.Tensor:
        """Calls the model and returns its scores as one tensor ``(B, C)``."""
        return model_output_to_tensor(self.model(inputs, *as_tuple(additional_forward_args)))

    def check_inputs(
        self, inputs: torch.Tensor, method: str, additional_forward_args: Any = None
    ) -> None:
        """Validates device, rank, dtype, finiteness and size; raises ``ValueError`` saying what to do.

        Raises:
            TypeError: ``inputs`` is not a tensor.
            ValueError: Inputs (or a tensor in ``additional_forward_args``) on the meta
                device, an empty batch, or images of the wrong rank, dtype, values or size.
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"{method}: inputs must be a tensor; got {type(inputs).__name__}.")
        extra = as_tuple(additional_forward_args)
        meta = [
            "inputs" if t is inputs else f"additional_forward_args[{i - 1}]"
            for i, t in enumerate((inputs, *extra))
            if isinstance(t, torch.Tensor) and t.is_meta
        ]
        if meta:
            raise ValueError(
                f"{method}: {meta[0]}: inputs on the meta device cannot be explained (a meta "
                "tensor holds no values); pass them on a real device (cpu, cuda, ...)."
            )
        if inputs.shape[0] == 0:
            raise ValueError(f"{method}: the batch is empty; pass at least one example.")
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
            # A finite sum implies finite entries (NaN and inf propagate); the full check
            # runs only when the sum is not finite (bad entries, or an overflowing sum).
            if not torch.isfinite(inputs.sum()) and not torch.isfinite(inputs).all():
                raise ValueError(f"{method}: inputs contain NaN or inf values.")
            self._check_image_size(inputs, method)

    def _check_image_size(self, inputs: torch.Tensor, method: str) -> None:
        """Model-specific size checks (patch grid, fixed input size); none by default."""

    # ------------------------------------------------------------------ feature points
    def named_module(self, name: str, method: str = "captum_ext") -> nn.Module:
        """The submodule called ``name`` (as in ``model.named_modules()``).

        Raises:
            ValueError: No such module; the message lists candidate names.
        """
        modules = dict(self.model.named_modules())
        if name in modules and name:
            return modules[name]
        close = [n for n in modules if n and (name in n or n.endswith(name.split(".")[-1]))]
        candidates = close[:8] or [n for n in modules if n and "." not in n][:12]
        raise ValueError(
            f"{method}: {type(self.model).__name__} has no module named {name!r}; candidates: "
            f"{', '.join(candidates)}."
        )

    def default_feature_layers(self) -> list[str | int]:
        """The preset feature layers of this family (T-TAME's three branches), shallow to deep.

        Raises:
            ValueError: The family has no preset; pass ``layers=[...]``.
        """
        raise ValueError(
            f"{type(self.model).__name__} ({self.family}) has no preset feature layers; pass "
            "layers=[...] with module names."
        )

    def feature_point(self, layer: str | int, method: str = "captum_ext") -> Point:
        """The point whose tensor is the feature map of ``layer``: a module name's output."""
        if not isinstance(layer, str):
            raise ValueError(
                f"{method}: {self.family} layers are named by module name (str); got {layer!r}."
            )
        return Point(self.named_module(layer, method), "output", None, layer)

    def feature_map(self, tensor: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The captured tensor of a feature point as a map ``(B, C, h, w)``."""
        if tensor.dim() != 4:
            raise ValueError(
                f"expected a feature map (B, C, h, w) at the feature point; got shape "
                f"{tuple(tensor.shape)}."
            )
        return tensor


class TransformerAdapter(ModelAdapter):
    """What a transformer looks like inside: blocks, heads, prefix tokens, grid, attention, readout.

    Methods in :mod:`captum_ext.attr` use only this protocol. Points are read
    by the hook engine (:mod:`captum_ext.capture`); token removal belongs to
    TAM, which asks this protocol only which positions are special
    (:meth:`special_tokens`) and whether extra arguments follow the tokens
    (:attr:`slices_extra_args`).

    Attributes:
        readout: Which token rows the classifier reads: ``"cls"`` (first
            token), ``"cls_dist"`` (mean of CLS and distillation token) or
            ``"mean"`` (mean of the non-prefix tokens; for text, of the
            attended ones).
        readout_assumed: ``True`` when the readout could be neither read from
            the model's structure nor passed by the user, and was assumed.
    """

    kind: ClassVar[str] = "transformer"
    slices_extra_args: ClassVar[bool] = False
    """Whether ``(B, T, ...)`` extra arguments (the attention mask) are cut with the tokens."""

    def __init__(self, model: nn.Module, readout: Readout | None = None) -> None:
        super().__init__(model)
        if readout is not None and readout not in ("cls", "cls_dist", "mean"):
            raise ValueError(f"readout must be 'cls', 'cls_dist' or 'mean'; got {readout!r}.")
        self._readout_override = readout
        self.readout_assumed = False

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
    def readout_known(self) -> bool:
        """Whether the readout is settled; when not, methods detect it (see ``HFTextAdapter``)."""
        return True

    def readout_refusal(self) -> str | None:
        """Why no weighting of token rows reproduces how the model pools them, or ``None``.

        Methods that read the readout rows (attention map, rollout, relevance)
        refuse such a model with this reason; ``None`` when :attr:`readout` was
        given explicitly or the pooling is a row weighting (first row, CLS+DIST,
        mean).
        """
        return None

    def probe_inputs(self) -> tuple[torch.Tensor, tuple]:
        """Dummy ``(inputs, additional_forward_args)`` for detecting the readout."""
        raise NotImplementedError

    def settle_readout(self, detected: Readout | None) -> None:
        """Records a detected readout (see :attr:`readout_known`)."""

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

    def block_output_point(self, block: int = -1) -> Point:
        """The residual stream leaving ``block`` (first element of a tuple output)."""
        return Point(self.blocks[block], "output", None, f"block {block} output")

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

    def check_layer_index(self, layer: int, method: str, what: str = "layer") -> int:
        """``layer`` as a block index in ``0 .. L-1`` (negatives count from the end).

        Raises:
            TypeError: Not an int.
            ValueError: Out of range; the message gives the valid range.
        """
        n = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{method}: {what} must be an int; got {type(layer).__name__}.")
        if not -n <= layer < n:
            raise ValueError(
                f"{method}: {what} {layer} is out of range for a model with {n} blocks "
                f"(valid: {-n}..{n - 1})."
            )
        return layer % n

    def default_feature_layers(self) -> list[str | int]:
        """The pre-attention tokens of the last three blocks (T-TAME's ViT branches)."""
        n = self.num_layers
        return list(range(max(n - 3, 0), n))

    def feature_point(self, layer: str | int, method: str = "captum_ext") -> Point:
        """Block index -> that block's pre-attention tokens; a module name -> its output."""
        if isinstance(layer, int) and not isinstance(layer, bool):
            return self.pre_attention_point(self.check_layer_index(layer, method))
        return super().feature_point(layer, method)

    def feature_map(self, tensor: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` -> patch tokens on the grid ``(B, D, h, w)`` (images only)."""
        if tensor.dim() == 4:
            return tensor
        if self.modality != "image" or tensor.dim() != 3:
            raise ValueError(
                f"{self.family}: feature maps need image tokens (B, N, D); got "
                f"{tuple(tensor.shape)} for {self.modality} inputs."
            )
        h, w = self.grid_size(inputs)
        patches = tensor[:, self.num_prefix_tokens :]
        if patches.shape[1] != h * w:
            raise ValueError(
                f"{self.family}: {patches.shape[1]} patch tokens do not fill the {h}x{w} grid."
            )
        return patches.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], h, w)

    # ------------------------------------------------------------------ inputs
    def grid_size(self, inputs: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for image inputs ``(B, C, H, W)``."""
        ph, pw = self.patch_size
        return inputs.shape[-2] // ph, inputs.shape[-1] // pw

    def _check_image_size(self, inputs: torch.Tensor, method: str) -> None:
        ph, pw = self.patch_size
        h, w = inputs.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(
                f"{method}: image size {h}x{w} is not divisible by the patch size {ph}x{pw} "
                f"of this {self.family}. Resize or crop to a multiple, e.g. "
                f"{_nearest_multiple(h, ph)}x{_nearest_multiple(w, pw)}."
            )

    def attention_mask(self, inputs: torch.Tensor, additional_forward_args: Any = None):
        """The ``(B, T)`` bool mask of attended positions, or ``None`` (images, no mask)."""
        return None

    def special_tokens(
        self, inputs: torch.Tensor, additional_forward_args: Any = None
    ) -> torch.Tensor:
        """``(B, N)`` bool: positions at the token point that are never removed or explained.

        Images: the prefix tokens (CLS, DIST, registers).
        """
        h, w = self.grid_size(inputs)
        p = self.num_prefix_tokens
        special = torch.zeros(inputs.shape[0], p + h * w, dtype=torch.bool, device=inputs.device)
        special[:, :p] = True
        return special

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def attention_probabilities(self) -> Iterator[None]:
        """Makes attention probabilities materialise; restores every flag it changed."""
        raise NotImplementedError
        yield  # pragma: no cover

    def readout_weights(
        self,
        num_tokens: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weights over token rows that form the readout (each row sums to 1), in ``dtype``.

        Returns ``(N,)``, or ``(B, N)`` when a ``(B, N)`` attention ``mask`` is
        given and the readout is the mean (padding then gets no weight).
        """
        w = torch.zeros(num_tokens, device=device, dtype=dtype)
        if self.readout == "cls":
            w[0] = 1.0
        elif self.readout == "cls_dist":
            w[:2] = 0.5
        else:
            p = self.num_prefix_tokens
            if mask is not None:
                m = mask.to(device=device, dtype=dtype).clone()
                m[:, :p] = 0
                return m / m.sum(1, keepdim=True).clamp_min(1)
            w[p:] = 1.0 / max(num_tokens - p, 1)
        return w


def _nearest_multiple(size: int, step: int) -> int:
    """The multiple of ``step`` nearest to ``size`` (at least ``step``)."""
    return max(step, round(size / step) * step)


_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator adding an adapter to the families :func:`adapter_for` tries."""
    _REGISTRY.append(cls)
    return cls


def supported_families(kind: type[ModelAdapter] = ModelAdapter) -> str:
    """The families of ``kind``, comma-separated, for error messages."""
    return ", ".join(cls.family for cls in _REGISTRY if issubclass(cls, kind))


_KIND_WORDS = {TransformerAdapter: "a vision or text transformer"}


def adapter_for(
    model: nn.Module | ModelAdapter,
    readout: Readout | None = None,
    method: str = "captum_ext",
    kind: type[ModelAdapter] = ModelAdapter,
) -> ModelAdapter:
    """Picks the adapter for ``model`` by structure.

    Args:
        model: A timm ViT, a HuggingFace ViT or BERT-family model, a module
            wrapping one, a CNN (timm or torchvision ResNet, VGG, EfficientNet,
            ConvNeXt), or an adapter (returned as is).
        readout: Overrides the family's default readout (``"cls"``,
            ``"cls_dist"`` or ``"mean"``), e.g. for a mean-pooling wrapper.
        method: Name used in the error message.
        kind: The adapter kind the caller needs (e.g. :class:`TransformerAdapter`);
            a model of another kind is refused naming it.

    Raises:
        UnsupportedModelError: No adapter of ``kind`` recognises the model.
    """
    want = _KIND_WORDS.get(kind, "a supported model")
    if isinstance(model, ModelAdapter):
        if not isinstance(model, kind):
            raise UnsupportedModelError(
                f"{method} needs {want}; got a {model.family} adapter. "
                f"Supported: {supported_families(kind)}."
            )
        return model
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{method} needs a torch.nn.Module; got {type(model).__name__}."
        )
    inner = unwrap_model(model)
    for cls in _REGISTRY:
        if not cls.matches(inner):
            continue
        reason = cls.refusal(inner)
        if reason is not None:
            raise UnsupportedModelError(
                f"{method}: {reason} Supported: {supported_families(kind)}."
            )
        if not issubclass(cls, kind):
            raise UnsupportedModelError(
                f"{method} needs {want}; got {type(inner).__name__} ({cls.family}). "
                f"Supported: {supported_families(kind)}."
            )
        return cls(inner, readout=readout)
    raise UnsupportedModelError(
        f"{method} needs {want}; got {type(inner).__name__}. Supported: {supported_families(kind)}."
    )
