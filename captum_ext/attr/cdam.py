"""CDAM: class-discriminative attention maps (Brocki & Chung, 2023).

S_i = sum_j T_ij * df/dT_ij, where T (B, N, D) are the tokens entering the
final self-attention (after its LayerNorm in pre-LN ViTs) and f is the raw
target logit, or the dot product of the model's latent with a concept vector.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import nn

from captum_ext._scores import normalise_target, select_target
from captum_ext.adapters.base import Readout, TransformerAdapter
from captum_ext.attr._precision import accumulation_dtype
from captum_ext.attr.base import OutputKind, TokenMapMethod, check_targets
from captum_ext.capture import Hook, as_leaf, hooks, model_state

__all__ = ["CDAM", "ConceptCDAM"]

Variant = Literal["plain", "smooth", "integrated"]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


class CDAM(TokenMapMethod, LayerAttribution, GradientAttribution):
    """Class-discriminative attention maps (Brocki & Chung, 2023, arXiv:2312.02364).

    For tokens T ``(B, N, D)`` entering the self-attention of the final block
    (the output of its LayerNorm: timm ``blocks[-1].norm1``, HF ViT
    ``layernorm_before``; BERT-family post-LN encoders: the hidden state
    entering the last layer), the score of patch token i is
    ``S_i = sum_j T_ij * df/dT_ij`` with f the raw target logit. Scores are
    signed (positive = evidence for the class, negative = counter-evidence)
    and neither rectified nor normalised. This equals Captum's
    ``LayerGradientXActivation`` on that layer summed over the width.

    Differences from the authors' code: the gradient is taken with
    ``torch.autograd.grad`` on the captured tokens (their module backward hook
    does not fire when nothing upstream requires grad), the model is not
    forked, batches of any size are exact, and several targets share one
    forward pass (:meth:`attribute_targets`).

    Variants (from the authors' later code), chosen in the constructor:
    ``"smooth"`` adds Gaussian noise with std ``noise_level * (max - min)``
    (per example) to the residual stream entering the final block and
    averages ``n_samples`` maps; ``"integrated"`` scales that stream by
    ``k / n_samples`` for ``k = 1 .. n_samples - 1`` and averages the maps.
    Every sample explains the same class: with ``target=None`` the class
    predicted on the clean input (one extra forward pass without grad). The
    noise of every example is drawn from ``seed`` alone, so an example's map
    does not depend on the batch it is in.

    Args:
        model: A timm ViT, HF ViT, HF BERT-family model, a module wrapping
            one, or a :class:`~captum_ext.adapters.ModelAdapter`.
        layer: ``None`` (the final block's pre-attention tokens), a block of
            the model (its pre-attention tokens), or the module whose output
            are the tokens ``(B, N, D)``.
        variant: ``"plain"``, ``"smooth"`` or ``"integrated"``.
        n_samples: Samples for the smooth and integrated variants (an int, at
            least 2 for them, at least 1 for ``"plain"``, where it is unused).
        noise_level: Noise std relative to the stream's range (smooth), a
            finite number >= 0.
        seed: Seed of the noise (smooth), an int; the same seed gives the same map.
        readout: Overrides the adapter's readout; CDAM uses it only for a
            bare encoder whose output has no logits (``"mean"``: the
            attention-masked mean of ``last_hidden_state``; ``"cls"``:
            ``pooler_output``).

    Raises:
        ValueError: (construction) ``variant``, ``n_samples``, ``noise_level`` or
            ``seed`` out of range, named with its range; (call) a map that is not
            finite (the model's activations overflowed for the inputs).
    """

    _method = "CDAM"
    _multiplies_by_inputs = True

    def __init__(
        self,
        model: nn.Module | TransformerAdapter,
        layer: nn.Module | None = None,
        variant: Variant = "plain",
        n_samples: int = 50,
        noise_level: float = 0.05,
        seed: int = 0,
        readout: Readout | None = None,
    ) -> None:
        super().__init__(model, readout)
        self._point = self.adapter.resolve_layer(layer)
        m = self._method
        if variant not in ("plain", "smooth", "integrated"):
            raise ValueError(
                f"{m}: variant must be 'plain', 'smooth' or 'integrated'; got {variant!r}."
            )
        least = 1 if variant == "plain" else 2
        if not _is_int(n_samples) or n_samples < least:
            raise ValueError(
                f"{m}: n_samples must be an int of at least {least} for variant {variant!r}; "
                f"got {n_samples!r}."
            )
        if (
            isinstance(noise_level, bool)
            or not isinstance(noise_level, numbers.Real)
            or not math.isfinite(noise_level)
            or noise_level < 0
        ):
            raise ValueError(
                f"{m}: noise_level must be a finite number >= 0 (noise std relative to the "
                f"stream's range, e.g. 0.05); got {noise_level!r}."
            )
        if not _is_int(seed) or not -(2**63) <= seed < 2**64:
            raise ValueError(
                f"{m}: seed must be an int (as torch.manual_seed takes); got {seed!r}."
            )
        self.variant = variant
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        self.seed = int(seed)
        LayerAttribution.__init__(self, self.adapter.model, self._point.module)

    def _token_scores(self, x: torch.Tensor, target: Any, extra: Any) -> torch.Tensor:
        """Signed CDAM scores ``(B, N)`` over all tokens for one target per example."""
        (target,) = self._fixed_targets(x, extra, [target])
        return self._run(x, extra, [_class_score(target, self._method)])[0]

    def attribute_targets(
        self,
        inputs: torch.Tensor,
        targets: Sequence[Any],
        additional_forward_args: Any = None,
        output: OutputKind = "input",
    ) -> torch.Tensor:
        """CDAM for several targets with one forward pass.

        Args:
            inputs: As in :meth:`attribute` (a tensor).
            targets: K Captum targets (each an int, a list or a tensor ``(B,)``).
            additional_forward_args: As in :meth:`attribute`.
            output: As in :meth:`attribute`.

        Returns:
            ``(K, ...)``: the map of each target stacked on a leading axis.
        """
        x, _ = self._inputs(inputs, additional_forward_args)
        self._check_output(x, output)
        targets = self._fixed_targets(
            x, additional_forward_args, check_targets(targets, self._method)
        )
        fns = [_class_score(t, self._method) for t in targets]
        maps = self._run(x, additional_forward_args, fns)
        return torch.stack([self._format(m, x, output) for m in maps])

    # ---------------------------------------------------------------- internals
    def _fixed_targets(self, x: torch.Tensor, extra: Any, targets: list[Any]) -> list[Any]:
        """``None`` targets of the smooth/integrated variants become the clean prediction.

        Each noisy or scaled pass would otherwise explain its own predicted
        class; one forward without grad on the clean input fixes the class.
        """
        if self.variant == "plain" or all(t is not None for t in targets):
            return targets
        with model_state(self.adapter.model, grad=False):
            out = self.adapter.forward(x, extra)
        pred = normalise_target(None, out, self._method)
        return [pred if t is None else t for t in targets]

    def _run(self, x: torch.Tensor, extra: Any, score_fns: Sequence[ScoreFn]) -> list[torch.Tensor]:
        """Token scores ``(B, N)`` for each score function, averaged over the variant's samples."""
        if self.variant == "plain":
            return self._one_pass(x, extra, score_fns, None)
        stream = self.adapter.block_input_point(-1)
        gen = torch.Generator().manual_seed(self.seed)  # CPU: same noise on every device
        total: list[torch.Tensor] | None = None
        if self.variant == "smooth":
            transforms = [_noise(self.noise_level, gen) for _ in range(self.n_samples)]
        else:
            m = self.n_samples
            transforms = [_scale(k / m) for k in range(1, m)]
        for tf in transforms:
            maps = self._one_pass(x, extra, score_fns, Hook(stream, tf, record=False))
            total = maps if total is None else [a + b for a, b in zip(total, maps)]
        return [t / len(transforms) for t in total]

    def _one_pass(
        self, x: torch.Tensor, extra: Any, score_fns: Sequence[ScoreFn], pre: Hook | None
    ) -> list[torch.Tensor]:
        # Grad is off until the hooked tokens: the blocks before them build no graph (the
        # gradient w.r.t. the detached leaf never reaches them), so the forward costs
        # about what an inference forward does, and only the last block's graph is kept.
        leaf = Hook(self._point, as_leaf, enable_grad=True)
        specs = [pre, leaf] if pre is not None else [leaf]
        with model_state(self.adapter.model, grad="from_hook"), hooks(specs):
            out = self.adapter.forward(x, extra)
            tokens = leaf.tensor
            if tokens.dim() != 3:
                raise ValueError(
                    f"{self._method}: the layer output has shape {tuple(tokens.shape)}; expected "
                    "tokens (B, N, D). Pass the module whose output are the tokens."
                )
            maps = []
            for i, fn in enumerate(score_fns):
                score = fn(out).sum()
                grad = None
                if score.requires_grad:
                    (grad,) = torch.autograd.grad(
                        score, tokens, retain_graph=i < len(score_fns) - 1, allow_unused=True
                    )
                if grad is None:
                    raise RuntimeError(
                        f"{self._method}: the score does not depend on {self._point.name}; "
                        "pass a layer whose tokens reach the output."
                    )
                acc = accumulation_dtype(tokens)  # float32 at least, also under autocast
                maps.append((tokens.detach().to(acc) * grad.to(acc)).sum(-1))
        return maps


class ConceptCDAM(CDAM):
    """CDAM for a concept: the score is the dot product of the latent with a concept vector.

    Brocki & Chung (2023), similarity variant. ``embed_model`` returns the
    latent z ``(B, D)`` the classifier would read (timm ViT with
    ``num_classes=0``: the pooled, normed CLS token; a mean-pooling wrapper
    around a ``BertModel``: the mean token). The concept c ``(D,)`` is the mean
    latent of a few examples (:meth:`concept_from_examples`, no grad), and
    ``S_i = sum_j T_ij * d<z(x), c>/dT_ij``.

    Args:
        embed_model: Encoder whose forward returns ``(B, D)`` (or a
            ``ModelOutput`` with ``pooler_output``).
        layer: As in :class:`CDAM`.
        variant, n_samples, noise_level, seed, readout: As in :class:`CDAM`.

    Raises:
        ValueError: As :class:`CDAM`; a concept that is not a tensor ``(D,)`` or
            ``(B, D)`` or holds NaN or inf; latents of examples that are not finite.
    """

    _method = "ConceptCDAM"

    @torch.no_grad()
    def concept_from_examples(
        self, examples: torch.Tensor, additional_forward_args: Any = None
    ) -> torch.Tensor:
        """Mean latent ``(D,)`` of ``examples`` (images or input_ids), computed without grad.

        Raises:
            ValueError: The model's latents of the examples are not finite (overflow).
        """
        x, _ = self._inputs(examples, additional_forward_args)
        with model_state(self.adapter.model, grad=False):
            z = self.adapter.forward(x, additional_forward_args)
        if not bool(torch.isfinite(z).all()):
            raise ValueError(
                f"{self._method}: the model's latents of these examples are not finite (NaN or "
                "inf): its activations overflowed; pass examples in the model's usual range."
            )
        return z.detach().mean(dim=0)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        concept: torch.Tensor,
        additional_forward_args: Any = None,
        output: OutputKind = "input",
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Scores of each token for the similarity ``<z(x), concept>``.

        Args:
            inputs: Images ``(B, C, H, W)`` or ``input_ids (B, T)`` (or a 1-tuple).
            concept: Concept vector ``(D,)`` (or ``(B, D)``, one per example).
            additional_forward_args: As in :meth:`CDAM.attribute`.
            output: As in :meth:`CDAM.attribute`.
        """
        x, was_tuple = self._inputs(inputs, additional_forward_args)
        self._check_output(x, output)
        score = _concept_score(concept, x.shape[0], self._method)
        maps = self._run(x, additional_forward_args, [score])
        return self._outputs(maps[0], x, output, was_tuple)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _class_score(target: Any, method: str) -> ScoreFn:
    def fn(out: torch.Tensor) -> torch.Tensor:
        return select_target(out, normalise_target(target, out, method))

    return fn


def _concept_score(concept: torch.Tensor, batch: int, method: str) -> ScoreFn:
    if not isinstance(concept, torch.Tensor) or concept.dim() not in (1, 2):
        raise ValueError(f"{method}: concept must be a tensor (D,) or (B, D).")
    if (concept.is_floating_point() or concept.is_complex()) and not bool(
        torch.isfinite(concept).all()
    ):
        raise ValueError(
            f"{method}: the concept holds NaN or inf values; build it from finite latents "
            "(concept_from_examples)."
        )
    if concept.dim() == 2 and concept.shape[0] not in (1, batch):
        raise ValueError(
            f"{method}: concept has shape {tuple(concept.shape)} for a batch of {batch}; pass "
            f"one concept (D,) or one per example ({batch}, D)."
        )

    def fn(z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[-1] != concept.shape[-1]:
            raise ValueError(
                f"{method}: the model returns latents of shape {tuple(z.shape)} but the concept "
                f"has width {concept.shape[-1]}; build the concept with concept_from_examples."
            )
        return (z * concept.to(z)).sum(-1)

    return fn


def _noise(level: float, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    def tf(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().flatten(1)
        sigma = level * (flat.amax(1) - flat.amin(1))
        # One draw per example shape, shared by the batch: every example sees the noise it
        # would see alone (the same seed), so a batch equals its single calls.
        # Drawn on the CPU on purpose (the generator's device): the same map on every device.
        noise = torch.randn(x.shape[1:], generator=gen, dtype=x.dtype, device="cpu")
        noise = noise.to(x.device)
        return x + noise * sigma.view(-1, *([1] * (x.dim() - 1)))

    return tf


def _scale(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * alpha
