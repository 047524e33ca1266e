"""Adapter for HuggingFace BERT-family text encoders (BERT, RoBERTa, DistilBERT)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from captum_ext._scores import model_output_to_tensor
from captum_ext.adapters._hf import HFAdapter
from captum_ext.adapters.base import Point, Readout, as_tuple, register_adapter

__all__ = ["HFTextAdapter"]


@register_adapter
class HFTextAdapter(HFAdapter):
    """HuggingFace BERT, RoBERTa and DistilBERT encoders, bare or with a head, or wrapped.

    Inputs are ``input_ids (B, T)``; the attention mask goes through
    ``additional_forward_args=(attention_mask,)`` and the model is called as
    ``model(input_ids, attention_mask)``. These encoders are post-LN: no norm
    sits between the residual stream and the self-attention, so the CDAM point
    is the hidden state entering the last layer — the input of its
    self-attention — and the gradient there includes the layer's residual path.
    All positions are kept (special tokens included, no prefix removal).

    Readout: an HF model with a head (``*ForSequenceClassification``) or a
    pooler reads the first token ([CLS] / <s>). For a user's wrapper module
    the readout is unknown (:attr:`readout_known` is false) until the methods
    detect it once with :func:`captum_ext.capture.probe_readout` (which rows
    of the last layer's output the scores depend on, for a 4-token dummy
    sequence): only the first row -> ``"cls"``, every row alike -> ``"mean"``;
    otherwise ``"cls"`` is assumed with a warning naming the assumption
    (:meth:`settle_readout`). ``readout=`` overrides all of this. A bare
    encoder (its output has hidden states but no logits) is explained
    through ``pooler_output`` with a CLS readout, or through the attention-
    masked mean of ``last_hidden_state`` with ``readout="mean"``.
    """

    family = "HuggingFace BERT-family text encoder (BERT, RoBERTa, DistilBERT)"
    modality = "text"
    slices_extra_args = True

    @staticmethod
    def is_layer(m: nn.Module) -> bool:
        return hasattr(m, "attention") and (hasattr(m, "intermediate") or hasattr(m, "ffn"))

    @staticmethod
    def is_embeddings(m: nn.Module) -> bool:
        return hasattr(m, "word_embeddings") and hasattr(m, "position_embeddings")

    def __init__(self, model: nn.Module, readout: Readout | None = None) -> None:
        super().__init__(model, readout)
        self._detected: Readout | None = None
        self._warned_pooler = False

    def _default_readout(self) -> Readout:
        return self._detected or "cls"

    # ------------------------------------------------------------------ points
    def pre_attention_point(self, block: int = -1) -> Point:
        return Point(self._layers[block], "input", None, f"layer[{block}] input")

    def attention_point(self, block: int) -> Point:
        return Point(self._layers[block].attention, "output", 1, f"layer[{block}].attention")

    # ------------------------------------------------------------------ inputs
    @property
    def vocab_size(self) -> int:
        return int(self._embeddings.word_embeddings.num_embeddings)

    @property
    def max_positions(self) -> int:
        return int(self._embeddings.position_embeddings.num_embeddings)

    def attention_mask(self, inputs: torch.Tensor, additional_forward_args: Any = None):
        """``(B, T)`` bool from ``additional_forward_args[0]`` when it has that shape, else ``None``."""
        extra = as_tuple(additional_forward_args)
        mask = extra[0] if extra else None
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(inputs.shape[:2]):
            return mask.to(inputs.device) != 0
        return None

    def special_tokens(
        self, inputs: torch.Tensor, additional_forward_args: Any = None
    ) -> torch.Tensor:
        """``(B, T)``: the first and last attended positions ([CLS]/<s>, [SEP]/</s>) and padding."""
        b, t = inputs.shape[:2]
        attended = self.attention_mask(inputs, additional_forward_args)
        if attended is None:
            attended = torch.ones(b, t, dtype=torch.bool, device=inputs.device)
        pos = torch.arange(t, device=inputs.device).expand(b, t)
        first = attended.int().argmax(1, keepdim=True)
        last = t - 1 - attended.flip(1).int().argmax(1, keepdim=True)
        return ~attended | (pos == first) | (pos == last)

    def check_inputs(
        self, inputs: torch.Tensor, method: str, additional_forward_args: Any = None
    ) -> None:
        """Token ids ``(B, T)`` within the vocabulary and position limit; a matching, non-empty mask.

        Raises:
            TypeError: A dict in (or as) ``additional_forward_args`` (keyword arguments
                cannot be passed), or an attention mask (``additional_forward_args[0]``;
                for an HF model itself, any extra argument) that is a list, tuple or
                array instead of a ``torch.Tensor (B, T)``.
            ValueError: As :meth:`ModelAdapter.check_inputs`, and ids, lengths or
                masks out of range.
        """
        _check_extra_types(additional_forward_args, method, every=_is_hf_model(self.model))
        super().check_inputs(inputs, method, additional_forward_args)
        if inputs.dim() != 2:
            raise ValueError(
                f"{method}: {self.family} expects input_ids (B, T); got shape "
                f"{tuple(inputs.shape)}."
            )
        if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
            raise ValueError(
                f"{method}: {self.family} expects integer input_ids (B, T); got "
                f"{inputs.dtype}. Pass token ids, and the attention mask through "
                "additional_forward_args=(attention_mask,)."
            )
        if inputs.shape[1] == 0:
            raise ValueError(f"{method}: the sequences are empty (T = 0).")
        lo, hi = int(inputs.min()), int(inputs.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{method}: token id {bad} is outside the vocabulary of {self.vocab_size} ids "
                f"(valid: 0..{self.vocab_size - 1}); tokenise with this model's tokenizer."
            )
        pad = getattr(self._embeddings, "padding_idx", None)  # RoBERTa counts from pad + 1
        offset = int(pad) + 1 if isinstance(pad, int) else 0
        if inputs.shape[1] + offset > self.max_positions:
            raise ValueError(
                f"{method}: sequences of {inputs.shape[1]} tokens exceed the model's "
                f"{self.max_positions - offset} positions; truncate (tokenizer(..., "
                "truncation=True))."
            )
        extra = as_tuple(additional_forward_args)
        mask = extra[0] if extra else None
        if isinstance(mask, torch.Tensor):
            if tuple(mask.shape) != tuple(inputs.shape):
                raise ValueError(
                    f"{method}: the attention mask has shape {tuple(mask.shape)}; expected "
                    f"{tuple(inputs.shape)} like input_ids."
                )
            empty = ~(mask != 0).any(1)
            if empty.any():
                raise ValueError(
                    f"{method}: the attention mask of example {int(empty.nonzero()[0])} is all "
                    "zeros: no token is attended, so there is nothing to explain."
                )

    # ------------------------------------------------------------------ scores
    def forward(self, inputs: torch.Tensor, additional_forward_args: Any = None) -> torch.Tensor:
        """Scores ``(B, C)``; a bare encoder's latent follows the readout (see class doc)."""
        out = self.model(inputs, *as_tuple(additional_forward_args))
        hidden = getattr(out, "last_hidden_state", None)
        if getattr(out, "logits", None) is not None or not isinstance(hidden, torch.Tensor):
            return model_output_to_tensor(out)
        if self.readout == "mean":
            mask = self.attention_mask(inputs, additional_forward_args)
            w = hidden.new_ones(hidden.shape[:2]) if mask is None else mask.to(hidden.dtype)
            return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        pooled = getattr(out, "pooler_output", None)
        if self._readout_override is None and not self._warned_pooler:
            self._warned_pooler = True
            what = "pooler_output" if pooled is not None else "the first token's hidden state"
            warnings.warn(
                f"{type(self.model).__name__} returns hidden states without logits; explaining "
                f"{what} (CLS readout). Pass readout='mean' to explain the mean of the token "
                "states instead.",
                stacklevel=2,
            )
        return pooled if isinstance(pooled, torch.Tensor) else hidden[:, 0]

    @property
    def readout_known(self) -> bool:
        """Whether the readout was given, read from the structure or detected."""
        return (
            self._readout_override is not None
            or self._detected is not None
            or (_is_hf_model(self.model))
        )

    def probe_inputs(self) -> tuple[torch.Tensor, tuple]:
        """A 4-token dummy sequence ``(input_ids, (attention_mask,))`` for readout detection."""
        dev = next(self.model.parameters(), torch.empty(0)).device
        ids = (torch.arange(4, device=dev) % max(self.vocab_size - 1, 1) + 1)[None]
        return ids, (torch.ones_like(ids),)

    def settle_readout(self, detected: Readout | None) -> None:
        """Records the detected readout; ``None`` assumes ``"cls"`` and warns saying so."""
        if detected is not None:
            self._detected = detected
            return
        self._detected = "cls"
        self.readout_assumed = True
        warnings.warn(
            f"{type(self.model).__name__}: could not tell which token rows the output reads; "
            "assuming the first token (readout='cls'). Pass readout='mean' (or 'cls') to say so.",
            stacklevel=3,
        )


def _check_extra_types(additional_forward_args: Any, method: str, every: bool) -> None:
    """Refuses dicts, and list/tuple/array masks, in ``additional_forward_args``.

    ``every``: check every position (an HF model's positional arguments are all tensors);
    otherwise only the mask position 0 (a wrapper's other arguments are its own).
    """
    if isinstance(additional_forward_args, dict):
        extra: tuple = (additional_forward_args,)
    else:
        extra = as_tuple(additional_forward_args)
    for i, v in enumerate(extra):
        if isinstance(v, dict):
            raise TypeError(
                f"{method}: additional_forward_args[{i}] is a dict (keys {sorted(map(str, v))}); "
                "keyword arguments cannot be passed, the model is called as model(input_ids, "
                "*additional_forward_args): pass additional_forward_args=(attention_mask,) with "
                "a torch.Tensor (B, T)."
            )
        if (i == 0 or every) and (
            isinstance(v, list | tuple)
            or (hasattr(v, "__array__") and not isinstance(v, torch.Tensor))
        ):
            what = "the attention mask" if i == 0 else "it"
            raise TypeError(
                f"{method}: additional_forward_args[{i}] ({what}) must be a torch.Tensor (B, T) "
                f"like input_ids; got {type(v).__name__}. Convert it with torch.as_tensor(...) "
                "on the device of input_ids."
            )


def _is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` itself is a HuggingFace model (it carries a config)."""
    return hasattr(getattr(model, "config", None), "_attn_implementation")
