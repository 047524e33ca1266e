"""What every token-map method shares: the class shell, inputs in, token maps out.

Public for authors of new methods and for the trainable explainers, which format their maps
with the same functions.

:class:`TokenMapMethod` is the first base of every method in
:mod:`captum_ext.attr`: it looks up the transformer adapter (detecting the
readout when the structure does not tell), validates inputs, formats
per-token scores into Captum-shaped maps and declares Captum's flags once,
where they differ from Captum's defaults.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal

import torch
from captum.attr import Attribution, GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import nn

from captum_ext.adapters.base import Readout, TransformerAdapter, adapter_for
from captum_ext.capture import probe_readout
from captum_ext.errors import UnsupportedModelError

__all__ = [
    "DocumentedInit",
    "OutputKind",
    "TokenMapMethod",
    "check_finite_map",
    "check_output",
    "check_targets",
    "format_token_map",
    "transformer_adapter",
    "unpack_inputs",
    "upsample_nearest",
]

OutputKind = Literal["input", "like_input", "grid", "tokens"]
"""Layouts a map can be returned in (the ``output`` argument of every method)."""
_OUTPUTS = ("input", "like_input", "grid", "tokens")


def transformer_adapter(
    model: nn.Module | TransformerAdapter, readout: Readout | None, method: str
) -> TransformerAdapter:
    """The transformer adapter of ``model``, its readout settled (detected when unknown)."""
    adapter = adapter_for(model, readout=readout, method=method, kind=TransformerAdapter)
    if not adapter.readout_known:
        adapter.settle_readout(probe_readout(adapter))
    return adapter


def check_targets(targets: Any, method: str) -> list[Any]:
    """The K targets of an ``attribute_targets`` call as a non-empty list.

    Raises:
        ValueError: ``targets`` is a single value (an int, a string, a tensor)
            or empty.
    """
    if isinstance(targets, str | int | torch.Tensor) or not hasattr(targets, "__iter__"):
        raise ValueError(
            f"{method}: targets must be a list of Captum targets (e.g. [0, 3]); got "
            f"{type(targets).__name__}. For one target use attribute(..., target=...)."
        )
    targets = list(targets)
    if not targets:
        raise ValueError(f"{method}: targets is empty; pass at least one target.")
    return targets


class DocumentedInit:
    """Mixin: a subclass's own ``__init__`` without a docstring gets the class's.

    Captum's bases document ``forward_func`` and ``device_ids``; with this mixin
    first among the bases, ``help(CDAM)`` and editors show the method's own
    constructor arguments (written in the class docstring) instead.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not init.__doc__ and cls.__doc__:
            init.__doc__ = cls.__doc__


class TokenMapMethod(DocumentedInit):
    """Class shell of a method that scores the tokens of a transformer.

    Subclasses put it first among their bases (before the Captum base they
    are: ``GradientAttribution``, ``PerturbationAttribution``, ...), set
    ``_multiplies_by_inputs`` when their scores multiply by the activations,
    call ``super().__init__(model, readout)`` and implement
    :meth:`_token_scores`; :meth:`attribute` (Captum's signature) does the
    rest. Captum's ``has_convergence_delta`` default (``False``) holds for
    every method. A method that reads the model's readout rows (attention
    map, rollout, relevance) sets ``_reads_readout``: a model whose pooling
    no weighting of token rows reproduces (timm ``global_pool='max'``,
    ``'avgmax'``, ``'map'``) is then refused at construction, unless
    ``readout`` is given. Every map is checked before it is returned: a map
    with NaN or inf values (the model's activations overflowed) is refused.

    Attributes:
        adapter: The model's :class:`~captum_ext.adapters.TransformerAdapter`.

    Raises:
        UnsupportedModelError: (construction) The model is not a supported
            transformer, or its pooling cannot be followed (see above).
        ValueError: (every call) The map is not finite.
    """

    _method: ClassVar[str] = ""
    _multiplies_by_inputs: ClassVar[bool] = False
    _reads_readout: ClassVar[bool] = False

    def __init__(self, model: nn.Module | TransformerAdapter, readout: Readout | None = None):
        self.adapter = transformer_adapter(model, readout, self._method)
        why = self.adapter.readout_refusal() if self._reads_readout else None
        if why is not None:
            raise UnsupportedModelError(
                f"{self._method}: {why}; it weighs token rows as the model reads them, so it "
                "cannot follow this pool (CDAM and TokenAblation follow any pool)."
            )
        Attribution.__init__(self, self.adapter.model)  # type: ignore[arg-type]
        if isinstance(self, GradientAttribution):
            GradientAttribution.__init__(self, self.adapter.model)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiplies_by_inputs

    @log_usage()
    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: Any = None,
        additional_forward_args: Any = None,
        output: OutputKind = "input",
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Scores every patch (or word-piece) token for one target per example.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)`` (or a 1-tuple,
                as Captum's metrics pass them).
            target: Captum target: an int, a list of B ints, a tensor ``(B,)``
                or ``(B, 1)``, or ``None`` for the predicted class. Ignored by
                class-agnostic methods (attention map, rollout).
            additional_forward_args: Extra positional model arguments, e.g.
                ``(attention_mask,)`` for text.
            output: ``"input"``: images ``(B, 1, H, W)`` (nearest-upsampled
                patch grid), text ``(B, T)``; ``"like_input"``: images
                ``(B, C, H, W)``; ``"grid"``: ``(B, 1, h, w)``; ``"tokens"``:
                ``(B, P)`` patch tokens in row-major order, prefix removed
                (text ``(B, T)``). Per-head maps put a head axis after the
                batch axis.

        Returns:
            The scores in the requested layout (a 1-tuple if ``inputs`` was
            one); their sign and scale are the method's (see its class).
        """
        x, was_tuple = self._inputs(inputs, additional_forward_args)
        self._check_output(x, output)
        scores = self._token_scores(x, target, additional_forward_args)
        return self._outputs(scores, x, output, was_tuple)

    def _token_scores(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        """Scores ``(B, N)`` (or ``(B, K, N)``) over all tokens, prefix included."""
        raise NotImplementedError

    def _inputs(
        self, inputs: Any, additional_forward_args: Any = None
    ) -> tuple[torch.Tensor, bool]:
        """Unpacks a tensor or a 1-tuple (Captum's metrics pass tuples) and validates it."""
        x, was_tuple = unpack_inputs(inputs, self._method)
        self.adapter.check_inputs(x, self._method, additional_forward_args)
        return x, was_tuple

    def _format(self, scores: torch.Tensor, x: torch.Tensor, output: OutputKind) -> torch.Tensor:
        """``scores`` in the ``output`` layout, after :func:`check_finite_map`."""
        check_finite_map(scores, x, self._method)
        return format_token_map(scores, self.adapter, x, output, self._method)

    def _outputs(
        self, scores: torch.Tensor, x: torch.Tensor, output: OutputKind, was_tuple: bool
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Formats ``scores`` and packs them as the inputs came (a 1-tuple for a 1-tuple)."""
        attr = self._format(scores, x, output)
        return (attr,) if was_tuple else attr

    def _check_output(self, x: torch.Tensor, output: Any) -> None:
        """Fails early on a bad ``output`` argument, before any forward pass."""
        check_output(output, _OUTPUTS, self.adapter.modality, self._method)


def unpack_inputs(inputs: Any, method: str) -> tuple[torch.Tensor, bool]:
    """The input tensor of ``inputs`` and whether it came as a 1-tuple (as Captum's metrics pass).

    Raises:
        ValueError: A tuple of more than one tensor (extra model arguments belong in
            ``additional_forward_args``).
    """
    if not isinstance(inputs, tuple):
        return inputs, False
    if len(inputs) != 1:
        raise ValueError(
            f"{method}: expected one input tensor (images or input_ids); got a tuple of "
            f"{len(inputs)}. Pass extra model arguments through additional_forward_args."
        )
    return inputs[0], True


def check_finite_map(
    scores: torch.Tensor,
    inputs: torch.Tensor,
    method: str,
    *,
    noun: str = "the map is",
    cause: str = "the model's activations or scores overflowed",
) -> None:
    """Refuses a map holding NaN or inf: the model overflowed on these (finite) inputs.

    Args:
        noun: Subject of the message (``"the maps are"`` for a stack of maps).
        cause: What makes the values non-finite (a trained explainer adds its own
            parameters).

    Raises:
        ValueError: Naming the method, the cause and, for floating inputs, the
            largest input magnitude.
    """
    if bool(torch.isfinite(scores).all()):
        return
    size = ""
    if inputs.is_floating_point() and inputs.numel():
        size = f" (largest |input| {float(inputs.detach().abs().amax()):.3g})"
    raise ValueError(
        f"{method}: {noun} not finite (NaN or inf): {cause} for these inputs{size}; pass "
        "inputs in the model's usual range (e.g. normalised images) or run the model in a "
        "wider dtype."
    )


def check_output(output: Any, allowed: tuple[str, ...], modality: str, method: str) -> None:
    """Refuses an ``output`` layout not in ``allowed``, and ``"grid"`` for text models.

    Raises:
        ValueError: Naming the layout and the ones ``method`` supports.
    """
    if output not in allowed:
        raise ValueError(f"{method}: output must be one of {allowed}; got {output!r}.")
    if output == "grid" and modality == "text":
        raise ValueError(f"{method}: output='grid' is for images; text maps are (B, T).")


def format_token_map(
    scores: torch.Tensor,
    adapter: TransformerAdapter,
    inputs: torch.Tensor,
    output: OutputKind,
    method: str,
) -> torch.Tensor:
    """Turns per-token scores into the requested output.

    Args:
        scores: ``(B, N)`` or ``(B, K, N)`` scores over all tokens incl. prefix
            (``K`` e.g. heads).
        adapter: The model's adapter.
        inputs: The images ``(B, C, H, W)`` or ``input_ids (B, T)``.
        output: ``"input"``: images ``(B, 1|K, H, W)`` (nearest upsampling of
            the patch grid, cropped when the model pads), text ``(B, T)``;
            ``"like_input"``: images ``(B, C, H, W)``, the input-space map
            repeated over the channels (what ``captum.metrics.infidelity``
            multiplies with the perturbation), text ``(B, T)``;
            ``"grid"``: ``(B, 1|K, h, w)``; ``"tokens"``: ``(B, [K,] P)``
            patch tokens in row-major order, prefix removed.
        method: Method name for error messages.
    """
    if output not in _OUTPUTS:
        raise ValueError(f"{method}: output must be one of {_OUTPUTS}; got {output!r}.")
    squeeze = scores.dim() == 2
    if squeeze:
        scores = scores[:, None]
    if adapter.modality == "text":
        if output == "grid":
            raise ValueError(f"{method}: output='grid' is for images; text maps are (B, T).")
        return scores[:, 0] if squeeze else scores
    p = adapter.num_prefix_tokens
    tokens = scores[..., p:]
    if output == "tokens":
        return tokens[:, 0] if squeeze else tokens
    h, w = adapter.grid_size(inputs)
    if tokens.shape[-1] != h * w:
        raise ValueError(
            f"{method}: the layer holds {tokens.shape[-1]} patch tokens but the input has a "
            f"{h}x{w} patch grid; pass the module whose output are the tokens of the last block."
        )
    grid = tokens.reshape(*tokens.shape[:2], h, w)
    if output == "grid":
        return grid
    ph, pw = adapter.patch_size
    up = upsample_nearest(grid, ph, pw)
    up = up[..., : inputs.shape[-2], : inputs.shape[-1]]
    if output == "like_input":
        if up.shape[1] != 1:
            raise ValueError(
                f"{method}: output='like_input' needs one map per example; per-head maps "
                f"({up.shape[1]}) cannot take the input's shape."
            )
        return up.expand(-1, inputs.shape[1], -1, -1).contiguous()
    return up


def upsample_nearest(grid: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Nearest upsampling of ``grid (..., h, w)`` by integer factors: each cell a patch.

    Cell expansion (a view expanded and copied once) instead of
    ``F.interpolate``: the same values at a fraction of the cost. Where
    ``F.interpolate``'s float index arithmetic maps a pixel to a neighbouring
    cell (some factors, e.g. 41), it is used instead, so results never change.
    """
    h, w = grid.shape[-2:]
    if not (_expands_like_interpolate(h, ph) and _expands_like_interpolate(w, pw)):
        return LayerAttribution.interpolate(grid, (h * ph, w * pw), interpolate_mode="nearest")
    lead = grid.shape[:-2]
    cells = grid[..., :, None, :, None].expand(*lead, h, ph, w, pw)
    return cells.reshape(*lead, h * ph, w * pw)


@functools.lru_cache(maxsize=256)
def _expands_like_interpolate(size: int, factor: int) -> bool:
    """Whether nearest interpolation of ``size`` cells to ``size * factor`` repeats each cell."""
    cells = torch.arange(size, dtype=torch.float32)
    up = torch.nn.functional.interpolate(cells[None, None], size=size * factor, mode="nearest")
    return torch.equal(up[0, 0], cells.repeat_interleave(factor))
