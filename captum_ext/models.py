"""Models to explain, from a spec string: ``timm:ARCH``, ``torchvision:ARCH``, ``hf:DIR`` or
``zoo:NAME``.

:func:`load` returns a :class:`LoadedModel`: the module in eval mode on the requested
device, with the model's own preprocessing (timm ``resolve_data_config``, the HF image
processor or tokenizer saved in the folder, the zoo's data recipe), one name per class and
how its scores are read (softmax, or sigmoid for multi-label models). The ``captum-ext
explain`` command is built on it.

Nothing is downloaded and nothing is unpickled: timm weights come from a local file
(safetensors preferred; ``.pt``/``.pth``/``.bin`` through ``torch.load(weights_only=True)``),
HuggingFace models from a local folder (``from_pretrained(DIR, local_files_only=True)``),
zoo models from the safetensors files shipped with the package.

Bare encoders (a sentence-transformers folder, or an HF ``BertModel``/``ViTModel``... folder)
load with :func:`load_encoder`: the model then returns one pooled latent per input, as
:class:`~captum_ext.attr.cdam.ConceptCDAM` reads it (:class:`PooledEncoder`).

Weights load exactly or not at all (no random classifier, no resampled position
embeddings), and images of every Pillow mode are read as the picture they show
(:func:`to_rgb`: 16-bit and float images scaled, not clipped).

Mistakes (an unknown spec, a missing file, weights that do not fit) raise
:class:`ModelLoadError` (a ``ValueError``; :class:`ModelFileNotFoundError` is also a
``FileNotFoundError``) whose message is one line saying what was wrong and what to do.

Example::

    from captum_ext import CDAM
    from captum_ext.models import load
    from PIL import Image

    loaded = load("timm:vit_small_patch16_224", weights="vit_s16.safetensors")
    x = loaded.image_transform(Image.open("cat.png"))[None]  # (1, 3, 224, 224)
    maps = CDAM(loaded.model).attribute(x, target=281)      # (1, 1, 224, 224)
    print(loaded.class_names[281], loaded.probabilities(loaded.logits(x))[0, 281])
"""

from __future__ import annotations

import contextlib
import difflib
import json
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from captum_ext._scores import model_output_to_tensor
from captum_ext.errors import ModelFileNotFoundError, ModelLoadError

__all__ = [
    "POOLINGS",
    "SPEC_HELP",
    "EncoderLayout",
    "LoadedModel",
    "ModelFileNotFoundError",
    "ModelLoadError",
    "PooledEncoder",
    "TokenizedText",
    "encoder_layout",
    "load",
    "load_encoder",
    "load_weights_file",
    "parse_spec",
    "read_class_names",
    "to_rgb",
]

SPEC_HELP = "timm:ARCH or torchvision:ARCH (with a weights file), hf:DIR or zoo:NAME"
"""The spec forms, as help texts and error messages name them."""
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_HF_IMAGE_TYPES = ("vit", "deit")
_HF_TEXT_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "camembert")


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def _hf_config(spec: str, folder: Path) -> Any:
    """``AutoConfig`` of a local folder; a malformed or unknown ``config.json`` in one line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"{spec}: cannot read config.json ({_first_line(err)})") from err


def _hf_from_pretrained(spec: str, folder: Path, auto: Any, what: str) -> tuple[Any, Any]:
    """``auto.from_pretrained(folder)`` offline, tensors only (``.bin`` files are read with
    ``weights_only=True``), with its loading info; every failure one :class:`ModelLoadError`
    line (``what``: "model" or "encoder")."""
    try:
        with _quiet_transformers():
            return auto.from_pretrained(
                folder,
                local_files_only=True,
                weights_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by the caller, in one line, and refused
            )
    except pickle.UnpicklingError as err:
        bins = sorted(f.name for f in folder.glob("*.bin"))
        file = bins[0] if len(bins) == 1 else "the .bin weights"
        raise ModelLoadError(
            f"{spec}: {file} holds more than tensors (a pickled {_pickled(err)}); it was read "
            "with torch.load(weights_only=True) and nothing was unpickled; save the model "
            "with save_pretrained (safetensors)"
        ) from err
    except Exception as err:
        mismatch = _mismatch(err)
        reason = f"its weights do not fit: {mismatch}" if mismatch else _first_line(err)
        raise ModelLoadError(f"{spec}: could not load the {what} ({reason})") from err


def _pickled(err: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, e.g. ``"argparse.Namespace"``."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else _first_line(err)


def _mismatch(err: BaseException, shown: int = 3) -> str | None:
    """One line naming the missing, unexpected and mis-shaped keys of a failed
    ``load_state_dict`` (first ``shown`` of each, with counts); ``None`` if ``err`` is not
    such a failure."""
    text = str(err)
    if "Error(s) in loading state_dict" not in text:
        return None

    def keys(title: str) -> list[str]:
        found = re.search(rf"{title} key\(s\) in state_dict: (.*)", text)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
        r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)",
        text,
    )
    groups = [
        ("missing", keys("Missing")),
        ("unexpected", keys("Unexpected")),
        ("mis-shaped", [f"{k}: file [{a}] vs model [{b}]" for k, a, b in shapes]),
    ]
    parts = [
        f"{len(items)} {what} key{'s' if len(items) > 1 else ''} "
        f"({', '.join(items[:shown])}{', ...' if len(items) > shown else ''})"
        for what, items in groups
        if items
    ]
    return ", ".join(parts) or None


def _shape(shape: Sequence[int] | None) -> str:
    return "" if shape is None else f" [{', '.join(str(int(d)) for d in shape)}]"


def _describe_fit(
    mis_shaped: Sequence[tuple[str, Sequence[int], Sequence[int]]],
    missing: Sequence[tuple[str, Sequence[int] | None]],
    unexpected: Sequence[tuple[str, Sequence[int] | None]],
    shown: int = 3,
) -> str | None:
    """One line naming every kind of misfit between a file and a model (first ``shown`` of
    each, with counts and shapes); ``None`` when they fit."""
    groups = [
        ("mis-shaped", [f"{k}: file{_shape(a)} vs model{_shape(b)}" for k, a, b in mis_shaped]),
        ("missing from the file", [f"{k}{_shape(b)}" for k, b in missing]),
        ("in the file, not in the model", [f"{k}{_shape(a)}" for k, a in unexpected]),
    ]
    parts = []
    for what, items in groups:
        if items:
            more = ", ..." if len(items) > shown else ""
            noun = "tensors" if len(items) > 1 else "tensor"
            parts.append(f"{len(items)} {noun} {what} ({', '.join(items[:shown])}{more})")
    return ", ".join(parts) or None


def _state_misfit(state: dict[str, torch.Tensor], model: nn.Module) -> str | None:
    """What keeps ``model.load_state_dict(state, strict=True)`` from loading every tensor of
    ``state`` into every parameter and buffer of ``model`` as it is, in one line; ``None``
    when the file fits exactly."""
    own = model.state_dict()
    mis_shaped = [  # in the model's order: the first ones named are the first layers
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = [(k, tuple(v.shape)) for k, v in own.items() if k not in state]
    unexpected = [(k, tuple(v.shape)) for k, v in state.items() if k not in own]
    return _describe_fit(mis_shaped, missing, unexpected)


_FIT_REMEDY = (
    "the file must hold exactly the model's tensors (as save_file(model.state_dict(), FILE) "
    "writes them); build the model the file was saved from"
)


# --- images -------------------------------------------------------------------------------

_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
"""Pillow modes with 8 bits (or 1) per channel, which ``convert("RGB")`` reads correctly."""


def _image_name(img: Any) -> str:
    """The file an image was opened from, or ``"image"``."""
    return str(getattr(img, "filename", "") or "") or "image"


def to_rgb(img: Any) -> Any:
    """A PIL image of any mode Pillow reads as the 8-bit RGB picture it shows.

    ``convert("RGB")`` alone clips 16-bit greys at 255 and floors float images; here:

    * 8-bit modes (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``RGBX``,
      ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``; premultiplied ``La``/``RGBa``) go through
      Pillow's own conversion (alpha is dropped);
    * 16-bit greys (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer greys
      (``I``, e.g. 16-bit PGM files) are read as values in [0, 65535] and scaled by
      255 / 65535 (``x * 257`` gives ``x`` back);
    * float greys (``F``, e.g. float TIFFs): values in [0, 1] are scaled by 255, values in
      [0, 255] (some above 1) are taken as they are.

    Args:
        img: A ``PIL.Image.Image``.

    Returns:
        An ``RGB`` image (``img`` itself when it is one).

    Raises:
        ValueError: An ``I`` image with values outside [0, 65535], an ``F`` image with
            values that are negative, above 255 or not finite (the range is ambiguous),
            or a mode Pillow cannot give as RGB; one line naming the file and the mode.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _EIGHT_BIT_MODES:
        return img.convert("RGB")
    if mode in ("La", "RGBa"):
        return img.convert("LA" if mode == "La" else "RGBA").convert("RGB")
    what = f"{_image_name(img)}: mode {mode} image"
    if mode == "I" or mode.startswith("I;16") or mode == "F":
        values = np.asarray(img)
        if mode == "F":
            values = values.astype(np.float64)
            if not np.isfinite(values).all():
                raise ValueError(f"{what} with NaN or infinite values; save it with finite values")
            low, high = float(values.min()), float(values.max())
            if low < 0 or high > 255:
                raise ValueError(
                    f"{what} with float values in [{low:g}, {high:g}], neither [0, 1] nor "
                    "[0, 255]; scale it to [0, 1] or save it as an 8- or 16-bit image"
                )
            scaled = values * 255.0 if high <= 1 else values
        else:
            values = values.astype(np.int64)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > 65535:
                raise ValueError(
                    f"{what} with integer values in [{low}, {high}], outside the 16-bit range "
                    "[0, 65535]; save it as an 8- or 16-bit image"
                )
            scaled = values * (255.0 / 65535.0)
        grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(
            f"{what} that cannot be read as RGB ({_first_line(err)}); save it as an 8-bit RGB or "
            "grey image"
        ) from err


@dataclass
class TokenizedText:
    """One tokenised text.

    Attributes:
        input_ids: Token ids ``(1, T)``.
        attention_mask: Ones for real tokens ``(1, T)``.
        tokens: The ``T`` tokens as strings, special tokens included.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list[str]


@dataclass
class LoadedModel:
    """A model ready to explain, with what a caller needs to know about it.

    Attributes:
        model: The module, in eval mode, on the requested device.
        spec: The spec it was loaded from.
        modality: ``"image"`` or ``"text"``.
        class_names: One name per output.
        multi_label: Scores are independent sigmoids (else a softmax over classes).
        preprocessing: What is done to inputs, as a JSON-serialisable dict.
        notes: Assumptions worth telling a person (e.g. a default normalisation).
        image_transform: A PIL image to the model's input ``(3, H, W)``; images only.
        mean: Per-channel mean the transform subtracts (to show the input again).
        std: Per-channel standard deviation the transform divides by.
        tokenize: A text to :class:`TokenizedText`; texts only.
        input_size: ``(H, W)`` of the model's inputs (``image_transform`` gives this size);
            images only.
        encoder: For a bare encoder (:func:`load_encoder`), what its folder holds (pooling,
            normalisation); ``model`` then returns latents ``(B, D)``, not class scores, and
            ``class_names`` is empty. ``None`` for classifiers.
    """

    model: nn.Module
    spec: str
    modality: Literal["image", "text"]
    class_names: list[str]
    multi_label: bool
    preprocessing: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    image_transform: Callable[[Any], torch.Tensor] | None = None
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    tokenize: Callable[[str], TokenizedText] | None = None
    input_size: tuple[int, int] | None = None
    encoder: EncoderLayout | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    def logits(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw scores ``(B, C)`` in float32, without gradients.

        Args:
            inputs: Images ``(B, 3, H, W)`` or ``input_ids (B, T)``.
            attention_mask: ``(B, T)`` for texts.
        """
        with torch.no_grad():
            args = (inputs,) if attention_mask is None else (inputs, attention_mask)
            return model_output_to_tensor(self.model(*args)).float()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, C)`` in [0, 1]: sigmoid for multi-label models, softmax otherwise."""
        return logits.sigmoid() if self.multi_label else logits.softmax(-1)

    def display(self, x: torch.Tensor) -> torch.Tensor:
        """The model input ``(..., 3, H, W)`` with the normalisation undone, in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x * std + mean).clamp(0, 1)


def parse_spec(spec: str) -> tuple[str, str]:
    """Splits a spec into ``(kind, value)`` and checks what can be checked without loading.

    Checks the kind, a zoo name (``captum_ext.zoo.check_name``), and that
    an ``hf:`` folder exists. A timm architecture is checked by :func:`load`.

    Args:
        spec: ``"timm:ARCH"``, ``"hf:DIR"`` or ``"zoo:NAME"``.

    Returns:
        ``("timm" | "torchvision" | "hf" | "zoo", the rest)``, e.g. ``("zoo", "shapes-vit")``.

    Raises:
        ModelLoadError: Not one of the forms, or an unknown zoo model.
        ModelFileNotFoundError: The ``hf:`` folder does not exist.
    """
    kind, sep, value = spec.partition(":")
    if not sep or kind not in ("timm", "torchvision", "hf", "zoo") or not value:
        raise ModelLoadError(f"unknown model spec {spec!r}; use {SPEC_HELP}")
    if kind == "zoo":
        from captum_ext import zoo

        try:
            zoo.check_name(value)  # the zoo's one name check
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
    elif kind == "hf" and not Path(value).is_dir():
        raise ModelFileNotFoundError(f"{spec}: no such folder")
    return kind, value


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, without unpickling.

    ``.safetensors`` files are read with safetensors; ``.pt``, ``.pth`` and ``.bin`` with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers. A checkpoint dict holding ``state_dict`` or ``model`` is unwrapped.

    Args:
        path: The file.

    Returns:
        Parameter name to tensor, on the CPU.

    Raises:
        ModelFileNotFoundError: No such file.
        ModelLoadError: Unknown format, a pickled object, or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"weights file {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:
            raise ModelLoadError(
                f"weights file {path}: not a safetensors file ({_first_line(err)})"
            ) from err
    elif suffix in WEIGHT_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            what = _pickled(err) if isinstance(err, pickle.UnpicklingError) else _first_line(err)
            raise ModelLoadError(
                f"weights file {path}: not a plain tensor checkpoint; loaded with "
                f"weights_only=True, nothing unpickled ({what})"
            ) from err
    else:
        raise ModelLoadError(
            f"weights file {path}: unknown format {suffix or '(no suffix)'!r}; use "
            ".safetensors (preferred), .pt, .pth or .bin"
        )
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path}: expected a dict of tensors (a state dict)")
    return state


def load(
    spec: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    model_kwargs: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """Loads a model to explain from a spec, onto ``device``, in eval mode.

    Args:
        spec: ``"timm:ARCH"`` (a timm architecture; needs ``weights``, since pretrained
            weights would need a download), ``"torchvision:ARCH"`` (a torchvision
            classification architecture, e.g. ``resnet50``; needs ``weights`` likewise;
            preprocessing and, for 1000-class heads, class names from the architecture's
            default torchvision weights entry, read offline), ``"hf:DIR"`` (a folder written by
            ``save_pretrained``: an image classifier, or a text classifier with its
            tokenizer) or ``"zoo:NAME"`` (a model shipped with captum_ext, see
            ``captum_ext.zoo.available()``).
        weights: A local ``.safetensors`` (preferred), ``.pt``, ``.pth`` or ``.bin`` file.
            Required for timm; for hf and zoo it replaces the folder's or shipped weights.
        device: Where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        model_kwargs: Keyword arguments of ``timm.create_model`` (timm) or
            ``torchvision.models.get_model`` (torchvision), e.g.
            ``{"img_size": 32, "patch_size": 8}``; ``num_classes`` defaults to the number
            of rows of the file's classifier.
        class_names: One name per output, replacing the model's own (a custom head; see
            :func:`read_class_names`).

    Weights load exactly or not at all: every tensor of the file goes into the model as it
    is and every parameter and buffer of the model comes from the file (timm is built with
    ``pretrained=False`` and loaded strictly; HF ``from_pretrained`` must report no missing,
    unexpected or mismatched key). Nothing is dropped, re-initialised or resampled.

    Returns:
        A :class:`LoadedModel`; ``image_transform`` gives ``(3, H, W)`` model inputs from
        PIL images of any mode (read with :func:`to_rgb`), ``tokenize`` gives
        ``input_ids``/``attention_mask`` ``(1, T)``.

    Raises:
        ModelFileNotFoundError: The weights file or the hf folder does not exist.
        ModelLoadError: Unknown spec, timm architecture or zoo model; weights in an
            unknown format, pickled, or not fitting the model (a tensor of another shape,
            e.g. a classifier for another ``num_classes`` or position embeddings for another
            ``img_size``, one the file lacks or one the model has not: the message names the
            tensor and both shapes); an HF folder whose weights do not fit its config (a
            classifier missing or sized for other labels); a folder holding a model
            that is neither an image nor a text classifier (a bare encoder: the message
            names :func:`load_encoder`); a timm ``img_size`` that is not
            a multiple of the patch size; ``class_names`` of the wrong length.

    Example::

        loaded = load("zoo:shapes-vit")
        loaded.class_names   # ['square', 'circle', 'triangle', 'plus']
        loaded.multi_label   # True: scores are sigmoids
    """
    kind, value = parse_spec(spec)
    if model_kwargs and kind not in ("timm", "torchvision"):
        raise ModelLoadError(f"{spec}: model_kwargs apply to timm: and torchvision: models only")
    weights = Path(weights) if weights is not None else None
    if kind == "timm":
        loaded = _load_timm(value, weights, dict(model_kwargs or {}))
    elif kind == "torchvision":
        loaded = _load_torchvision(value, weights, dict(model_kwargs or {}))
    elif kind == "hf":
        loaded = _load_hf(Path(value), weights)
    else:
        loaded = _load_zoo(value, weights, device)
    loaded.spec = spec
    if class_names is not None:
        _rename_classes(loaded, class_names)
    loaded.model.to(device).eval()
    return loaded


def _rename_classes(loaded: LoadedModel, class_names: Sequence[str]) -> None:
    """Replaces ``loaded.class_names`` with ``class_names`` (one per output)."""
    names = [str(n) for n in class_names]
    if len(names) != len(loaded.class_names):
        raise ModelLoadError(
            f"{loaded.spec}: {len(names)} class names given, but the model has "
            f"{len(loaded.class_names)} outputs"
        )
    loaded.class_names = names


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a file: a JSON list of strings, or one name per line.

    Args:
        path: The file, e.g. ``labels.txt`` (``cat``, ``dog``... one per line; trailing
            empty lines are ignored) or ``labels.json`` (``["cat", "dog"]``).

    Returns:
        The names, in class-index order.

    Raises:
        ModelFileNotFoundError: No such file.
        ModelLoadError: Not text, a JSON value that is not a list of strings, or an empty
            name.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"class names file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"class names file {path}: cannot read it ({err})") from err
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"class names file {path}: not valid JSON ({err})") from err
        if not all(isinstance(n, str) for n in names):
            raise ModelLoadError(f"class names file {path}: expected a JSON list of strings")
    else:
        names = [line.strip() for line in text.rstrip().splitlines()]
    empty = [i + 1 for i, n in enumerate(names) if not n.strip()]
    if not names or empty:
        where = f"entry {empty[0]} is empty" if empty else "no names"
        raise ModelLoadError(f"class names file {path}: {where}; give one name per class")
    return names


def _apply_weights(model: nn.Module, weights: Path, spec: str) -> None:
    """Loads the file ``weights`` into ``model`` (see :func:`_load_exactly`)."""
    _load_exactly(model, load_weights_file(weights), spec, weights)


def _load_exactly(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    spec: str,
    weights: Path,
    built: str = "",
    remedy: str = _FIT_REMEDY,
) -> None:
    """Loads ``state`` (read from ``weights``) into ``model``: every tensor of the file into
    every parameter and buffer of the model, as it is, or :class:`ModelLoadError` naming
    each tensor that does not fit with both shapes (``built`` says how the model was built,
    ``remedy`` what to do)."""
    misfit = _state_misfit(state, model)
    if misfit:
        raise ModelLoadError(
            f"{spec}: weights {weights} do not fit the model{built}: {misfit}; {remedy}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(
            f"{spec}: weights {weights} do not fit the model{built}: "
            f"{_mismatch(err) or _first_line(err)}"
        ) from err


# --- timm ---------------------------------------------------------------------------------


def _load_timm(arch: str, weights: Path | None, kwargs: dict[str, Any]) -> LoadedModel:
    import timm
    from timm.data import create_transform, resolve_data_config

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ModelLoadError(f"unknown timm architecture {arch!r}{hint}")
    if weights is None:
        raise ModelLoadError(
            f"timm:{arch} needs a weights file (weights=FILE): its pretrained "
            "weights would need a download, and captum_ext never downloads; pass a local "
            ".safetensors (or .pt/.pth/.bin) file"
        )
    state = load_weights_file(weights)
    kwargs, head = _timm_kwargs(arch, state, kwargs)
    built = f" built with model_kwargs {kwargs}" if kwargs else ""
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as err:
        raise ModelLoadError(
            f"timm:{arch}: could not build the model"
            f"{' with model_kwargs ' + str(kwargs) if kwargs else ''} ({_first_line(err)})"
        ) from err
    _check_timm_img_size(arch, model)  # before the weights: a clearer message than pos_embed
    remedy = _FIT_REMEDY
    if head is not None and kwargs.get("num_classes", head) != head:
        remedy = (
            f"the file's classifier has {head} classes, model_kwargs ask for "
            f"{kwargs['num_classes']}: leave num_classes out (a new head needs training)"
        )
    _load_exactly(model, state, f"timm:{arch}", weights, built, remedy)
    config = resolve_data_config({}, model=model)
    # The pretrained config keeps the architecture's default size (224) when img_size was
    # changed through model_kwargs; the patch embedding knows the size the model takes.
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and tuple(config["input_size"][1:]) != tuple(img_size):
        config["input_size"] = (config["input_size"][0], *img_size)
    transform = create_transform(**config)
    names = _timm_class_names(model)
    return LoadedModel(
        model=model,
        spec="",
        modality="image",
        class_names=names,
        multi_label=False,
        preprocessing={"source": "timm.data.resolve_data_config", **_jsonable(config)},
        image_transform=lambda img: transform(to_rgb(img)),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        input_size=(int(config["input_size"][1]), int(config["input_size"][2])),
    )


def _timm_kwargs(
    arch: str, state: dict[str, torch.Tensor], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], int | None]:
    """``(kwargs, classes)``: ``kwargs`` for ``timm.create_model`` with ``num_classes`` set to
    the number of rows of the file's classifier unless the caller gave one, and that number
    (``None`` when the file has no classifier)."""
    import timm

    classifier = getattr(timm.models.get_pretrained_cfg(arch), "classifier", None) or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head = state.get(f"{classifiers[0]}.weight")
    if head is None or head.ndim < 1:
        return kwargs, None
    return {"num_classes": int(head.shape[0]), **kwargs}, int(head.shape[0])


def _check_timm_img_size(arch: str, model: nn.Module) -> None:
    """A ViT whose ``img_size`` is not a multiple of its patch size drops pixels at the
    edge, and the explainers refuse its inputs: say which sizes work instead."""
    pe = getattr(model, "patch_embed", None)
    img_size, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if img_size is None or patch is None or getattr(pe, "dynamic_img_pad", False):
        return
    (h, w), (ph, pw) = tuple(img_size), tuple(patch)
    if h % ph == 0 and w % pw == 0:
        return

    def size(a: int, b: int) -> str:
        return str(a) if a == b else f"[{a}, {b}]"

    below = size(max(h // ph, 1) * ph, max(w // pw, 1) * pw)
    above = size(-(-h // ph) * ph, -(-w // pw) * pw)
    raise ModelLoadError(
        f"timm:{arch}: img_size {h}x{w} is not a multiple of the patch size {ph}x{pw}; "
        f"build the model with img_size {below} or {above} (model_kwargs)"
    )


def _timm_class_names(model: nn.Module) -> list[str]:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    n = int(model.num_classes)
    subset = infer_imagenet_subset(model)
    if subset is not None:
        try:
            info = ImageNetInfo(subset)
            return [info.index_to_description(i) for i in range(n)]
        except Exception:  # label files missing in this timm build: fall back to numbers
            pass
    return [f"class {i}" for i in range(n)]


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# --- torchvision --------------------------------------------------------------------------


def _load_torchvision(arch: str, weights: Path | None, kwargs: dict[str, Any]) -> LoadedModel:
    """A torchvision classification model from a local weights file (built with
    ``weights=None``: nothing is downloaded), with the preprocessing of the architecture's
    default weights entry (its ``transforms()`` and, for a head of that size, its categories)."""
    import torchvision
    from torchvision.models import get_model, get_model_weights, list_models

    spec = f"torchvision:{arch}"
    archs = list_models(module=torchvision.models)
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see torchvision.models)"
        raise ModelLoadError(f"unknown torchvision classification architecture {arch!r}{hint}")
    if weights is None:
        raise ModelLoadError(
            f"{spec} needs a weights file (weights=FILE): its pretrained weights would need a "
            "download, and captum_ext never downloads; pass a local .safetensors (or "
            ".pt/.pth/.bin) file"
        )
    state = load_weights_file(weights)
    heads = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if heads and "num_classes" not in kwargs:  # the classifier is the last matrix
        kwargs = {"num_classes": int(heads[-1].shape[0]), **kwargs}
    built = f" built with model_kwargs {kwargs}" if kwargs else ""
    try:
        model = get_model(arch, weights=None, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as err:
        raise ModelLoadError(
            f"{spec}: could not build the model{built} ({_first_line(err)})"
        ) from err
    _load_exactly(model, state, spec, weights, built)
    default = get_model_weights(arch).DEFAULT
    transform = default.transforms()
    categories = [str(c) for c in default.meta.get("categories") or []]
    n = int(kwargs.get("num_classes", len(categories) or 1000))
    names = categories if len(categories) == n else [f"class {i}" for i in range(n)]
    crop = list(transform.crop_size)
    return LoadedModel(
        model=model,
        spec=spec,
        modality="image",
        class_names=names,
        multi_label=False,
        preprocessing={
            "source": f"torchvision {default}.transforms()",
            "resize": list(transform.resize_size),
            "crop": crop,
            "mean": list(transform.mean),
            "std": list(transform.std),
            "interpolation": str(transform.interpolation.value),
        },
        image_transform=lambda img: transform(to_rgb(img)),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        input_size=(int(crop[0]), int(crop[-1])),
    )


# --- HuggingFace --------------------------------------------------------------------------


def _load_hf(folder: Path, weights: Path | None) -> LoadedModel:
    spec = f"hf:{folder}"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{spec}: no config.json in the folder; save the model with save_pretrained"
        )
    config = _hf_config(spec, folder)
    modality, auto = _hf_auto_class(spec, config)
    model, info = _hf_from_pretrained(spec, folder, auto, "model")
    _check_hf_loading(spec, model, info)
    if weights is not None:
        _apply_weights(model, weights, spec)
    names = [str(model.config.id2label.get(i, f"class {i}")) for i in range(model.num_labels)]
    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
    loaded = LoadedModel(
        model=model,
        spec=spec,
        modality=modality,
        class_names=names,
        multi_label=multi,
        preprocessing={},
    )
    if modality == "image":
        _hf_image_preprocessing(loaded, folder, config)
    else:
        _hf_tokenizer(loaded, folder, config)
    return loaded


def _check_hf_loading(spec: str, model: nn.Module, info: dict[str, Any]) -> None:
    """Refuses a model ``from_pretrained`` completed with freshly initialised tensors (a
    classifier missing from the folder's weights, or of another size than the config's
    classes) or that left tensors of the folder unused."""
    own = model.state_dict()
    mis_shaped = sorted(
        (str(k), tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or ()
    )
    missing = sorted(
        (str(k), tuple(own[k].shape) if k in own else None) for k in info.get("missing_keys") or ()
    )
    unexpected = [(str(k), None) for k in sorted(info.get("unexpected_keys") or ())]
    misfit = _describe_fit(mis_shaped, missing, unexpected)
    errors = [str(e) for e in info.get("error_msgs") or ()]
    if misfit or errors:
        what = misfit or " ".join(errors[0].split())
        raise ModelLoadError(
            f"{spec}: the folder's weights do not fit its config.json: {what}; captum_ext "
            "explains only trained weights (no tensor re-initialised or left out): save the "
            "trained classifier with save_pretrained, with its config"
        )


def _hf_auto_class(spec: str, config: Any) -> tuple[Literal["image", "text"], Any]:
    """The modality of an hf folder's ``config`` and the ``AutoModelFor...`` class to load it."""
    archs = list(config.architectures or [])
    if any(a.endswith("ForImageClassification") for a in archs) or (
        not archs and config.model_type in _HF_IMAGE_TYPES
    ):
        from transformers import AutoModelForImageClassification

        return "image", AutoModelForImageClassification
    if any(a.endswith("ForSequenceClassification") for a in archs) or (
        not archs and config.model_type in _HF_TEXT_TYPES
    ):
        from transformers import AutoModelForSequenceClassification

        return "text", AutoModelForSequenceClassification
    if _bare_encoder({"architectures": archs, "model_type": config.model_type}):
        raise ModelLoadError(
            f"{spec}: holds a {archs[0]} encoder (no classifier head); load it with "
            "load_encoder and explain it against a concept with ConceptCDAM, or save a "
            "classifier (e.g. BertForSequenceClassification)"
        )
    raise ModelLoadError(
        f"{spec}: holds {', '.join(archs) or config.model_type}; captum_ext needs an image "
        "classifier (e.g. ViTForImageClassification) or a text classifier "
        "(e.g. BertForSequenceClassification)"
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar or load report on stderr (an error must stay one
    line); restored."""
    from transformers.utils import logging

    was, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()  # no multi-line load report: misfits are refused in one line
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if was:
            logging.enable_progress_bar()


def _hf_image_preprocessing(loaded: LoadedModel, folder: Path, config: Any) -> None:
    size = getattr(config, "image_size", 224)
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as err:
            raise ModelLoadError(
                f"{loaded.spec}: cannot read preprocessor_config.json ({_first_line(err)})"
            ) from err
        source = "preprocessor_config.json"
    else:
        from transformers import ViTImageProcessor

        proc = ViTImageProcessor(size={"height": h, "width": w})
        source = f"no preprocessor_config.json: resize to image_size={h}, ViT default mean/std"
        loaded.notes.append(
            f"{loaded.spec}: no preprocessor_config.json; resized to the config's image_size "
            f"{h} and normalised with mean {list(proc.image_mean)}, std "
            f"{list(proc.image_std)} (HF ViT defaults)"
        )
    if getattr(proc, "do_normalize", True):
        loaded.mean, loaded.std = tuple(proc.image_mean), tuple(proc.image_std)

    def process(img: Any) -> torch.Tensor:
        return proc(images=to_rgb(img), return_tensors="pt")["pixel_values"][0]

    from PIL import Image

    got = tuple(process(Image.new("RGB", (w, h))).shape[-2:])
    loaded.preprocessing = {
        "source": source,
        "processor": type(proc).__name__,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
    }
    if got == (h, w):
        loaded.image_transform = process
    else:  # the model would refuse these inputs: bring them to the size it was built for

        def resized(img: Any) -> torch.Tensor:
            x = process(img)[None]
            return nn.functional.interpolate(
                x, size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )[0]

        loaded.image_transform = resized
        loaded.preprocessing["resize_after"] = [h, w]
        loaded.notes.append(
            f"{loaded.spec}: {source} gives {got[0]}x{got[1]} inputs, the model takes "
            f"{h}x{w} (config image_size); images are resized to {h}x{w} after preprocessing"
        )
    loaded.input_size = (h, w)


def _hf_tokenizer(
    loaded: LoadedModel, folder: Path, config: Any, max_length: int | None = None
) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"{loaded.spec}: no usable tokenizer in the folder (save one there with "
            f"tokenizer.save_pretrained): {_first_line(err)}"
        ) from err
    max_len = max_length or int(getattr(config, "max_position_embeddings", 512))

    def tokenize(text: str) -> TokenizedText:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=max_len)
        ids = enc["input_ids"]
        return TokenizedText(
            ids, enc["attention_mask"], list(tok.convert_ids_to_tokens(ids[0].tolist()))
        )

    loaded.tokenize = tokenize
    loaded.preprocessing = {"source": "tokenizer in the folder", "tokenizer": type(tok).__name__}


# --- zoo ----------------------------------------------------------------------------------


def _load_zoo(name: str, weights: Path | None, device: str | torch.device) -> LoadedModel:
    from captum_ext import zoo

    spec = f"zoo:{name}"
    model = zoo.load(name, device=device)
    if weights is not None:
        _apply_weights(model, weights, spec)
    info = zoo.info(name)
    loaded = LoadedModel(
        model=model,
        spec=spec,
        modality="text" if info.get("modality") == "text" else "image",
        class_names=[str(c) for c in info["classes"]],
        multi_label=info.get("task") == "multilabel",
        preprocessing={},
    )
    kwargs = zoo.data_kwargs(name)
    if loaded.modality == "image":
        size = int(kwargs.get("size", 32))

        def transform(img: Any) -> torch.Tensor:
            from PIL import Image

            img = to_rgb(img).resize((size, size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

        loaded.image_transform = transform
        loaded.input_size = (size, size)
        loaded.preprocessing = {"source": "zoo", "resize": [size, size], "range": [0, 1]}
    else:
        _zoo_tokenizer(loaded, info, model)
    return loaded


def _zoo_tokenizer(loaded: LoadedModel, info: dict[str, Any], model: nn.Module) -> None:
    from captum_ext.data import TEXT_VOCAB

    vocab = list(info.get("vocab") or TEXT_VOCAB)
    index = {w: i for i, w in enumerate(vocab)}
    max_len = int(getattr(getattr(model, "config", None), "max_position_embeddings", 512))

    def tokenize(text: str) -> TokenizedText:
        words = [
            w if w.startswith("[") else w.lower()
            for w in re.findall(r"\[[A-Z]+\]|[\w']+", text)[: max_len - 2]
        ]
        tokens = [t if t in index else "[UNK]" for t in ("[CLS]", *words, "[SEP]")]
        ids = torch.tensor([[index[t] for t in tokens]])
        return TokenizedText(ids, torch.ones_like(ids), tokens)

    loaded.tokenize = tokenize
    loaded.preprocessing = {"source": "zoo", "tokenizer": "lower-case words over TEXT_VOCAB"}


# --- encoders (concept CDAM) --------------------------------------------------------------

POOLINGS = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
"""Poolings of :class:`PooledEncoder`, in the order sentence-transformers concatenates them."""

_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass
class EncoderLayout:
    """What an ``hf:`` folder holding a bare encoder is, read from its JSON files only.

    Attributes:
        folder: The folder of the spec.
        model_dir: The folder holding the HF model (``config.json``, weights, tokenizer):
            ``folder`` itself, or the sentence-transformers Transformer module's sub-folder.
        architecture: The model class ``config.json`` names (e.g. ``"BertModel"``).
        modality: ``"text"`` (BERT-family) or ``"image"`` (ViT).
        pooling: The pooling modes, concatenated in this order (see :data:`POOLINGS`).
        normalize: The latent is scaled to unit length (a sentence-transformers
            ``Normalize`` module).
        sentence_transformers: The folder is a sentence-transformers model
            (``modules.json``).
        max_length: Tokens kept per text (sentence-transformers ``max_seq_length``, else
            the model's position limit); ``None`` for images.
    """

    folder: Path
    model_dir: Path
    architecture: str
    modality: Literal["image", "text"]
    pooling: tuple[str, ...]
    normalize: bool = False
    sentence_transformers: bool = False
    max_length: int | None = None


def _read_json(path: Path, spec: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{spec}: cannot read {path.name} ({_first_line(err)})") from err


def _bare_encoder(config: dict[str, Any]) -> Literal["image", "text"] | None:
    """The modality of a ``config.json`` naming a bare encoder of a supported family
    (``BertModel``, ``RobertaModel``, ``DistilBertModel``, ``ViTModel``...), else ``None``."""
    archs = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type", ""))
    if not archs or not all(a.endswith("Model") and "For" not in a for a in archs):
        return None
    if model_type in _HF_TEXT_TYPES:
        return "text"
    if model_type in _HF_IMAGE_TYPES:
        return "image"
    return None


def encoder_layout(folder: str | Path, pooling: str | Sequence[str] | None = None) -> EncoderLayout:
    """Reads what encoder an ``hf:`` folder holds, from its JSON files (no weights, no torch).

    Two layouts are read:

    * a sentence-transformers folder: ``modules.json`` lists a ``Transformer`` module (the
      HF model in the folder itself, ``"path": ""``, or in a sub-folder such as
      ``0_Transformer``), a ``Pooling`` module whose ``config.json`` sets the
      ``pooling_mode_*_tokens`` flags, and optionally a ``Normalize`` module;
      ``sentence_bert_config.json`` gives ``max_seq_length``. The latent is what
      ``SentenceTransformer.encode`` returns for that folder.
    * a plain HF folder written by ``save_pretrained`` whose ``config.json`` names a bare
      encoder (``BertModel``, ``RobertaModel``, ``DistilBertModel``, ``ViTModel``): texts
      are mean-pooled over the attended tokens (sentence-transformers' default for a plain
      HF model), images give the CLS token of ``last_hidden_state`` (after the final
      LayerNorm: what ``ViTForImageClassification`` reads).

    Args:
        folder: The folder.
        pooling: Replaces the pooling (one of :data:`POOLINGS`, or several, concatenated).

    Raises:
        ModelLoadError: Not an encoder folder (e.g. a classifier), unreadable JSON, a
            sentence-transformers module other than Transformer, Pooling and Normalize,
            or an unknown pooling.
    """
    folder = Path(folder)
    spec = f"hf:{folder}"
    modules_file = folder / "modules.json"
    st = modules_file.is_file()
    model_dir, pool, normalize = folder, None, False
    if st:
        modules = _read_json(modules_file, spec)
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ModelLoadError(f"{spec}: modules.json is not a list of modules")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        other = [str(m.get("type")) for m, k in zip(modules, kinds) if k not in _ST_MODULES]
        if other or kinds.count("Transformer") != 1 or kinds[0] != "Transformer":
            what = f"module {other[0]}" if other else f"modules {kinds}"
            raise ModelLoadError(
                f"{spec}: a sentence-transformers folder with {what}; captum_ext loads one "
                "Transformer module followed by Pooling and Normalize modules"
            )
        for module, kind in zip(modules, kinds):
            path = folder / str(module.get("path", ""))
            if kind == "Transformer":
                model_dir = path
            elif kind == "Pooling":
                cfg = _read_json(path / "config.json", f"{spec} ({module.get('path')})")
                pool = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key))
                if isinstance(cfg.get("pooling_mode"), str) and not pool:
                    pool = (cfg["pooling_mode"],)
                if not pool:
                    raise ModelLoadError(
                        f"{spec}: {module.get('path')}/config.json sets no pooling_mode_* flag"
                    )
            else:
                normalize = True
    if st and pool is None:
        raise ModelLoadError(
            f"{spec}: a sentence-transformers folder without a Pooling module: its output are "
            "token embeddings, not one latent per text"
        )
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{spec}: no config.json in {model_dir}; save the model with save_pretrained"
        )
    config = _read_json(model_dir / "config.json", spec)
    modality = _bare_encoder(config) if isinstance(config, dict) else None
    if modality is None:
        archs = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
        raise ModelLoadError(
            f"{spec}: {model_dir / 'config.json'} names {archs or 'no architecture'}, not a bare "
            "encoder; load_encoder takes a BertModel, RobertaModel, DistilBertModel or ViTModel "
            "folder, or a sentence-transformers folder holding one"
        )
    if st and modality != "text":
        raise ModelLoadError(f"{spec}: a sentence-transformers folder of an image model")
    if pooling is not None:
        pool = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    pool = pool or (("mean",) if modality == "text" else ("cls",))
    unknown = [p for p in pool if p not in POOLINGS]
    if unknown:
        raise ModelLoadError(
            f"{spec}: unknown pooling {unknown[0]!r}; use one of {', '.join(POOLINGS)}"
        )
    max_length = None
    if modality == "text":
        max_length = int(config.get("max_position_embeddings", 512))
        st_config = model_dir / "sentence_bert_config.json"
        if st_config.is_file():
            seq = _read_json(st_config, spec).get("max_seq_length")
            max_length = min(int(seq), max_length) if isinstance(seq, int) else max_length
    return EncoderLayout(
        folder=folder,
        model_dir=model_dir,
        architecture=str((config.get("architectures") or [""])[0]),
        modality=modality,
        pooling=pool,
        normalize=normalize,
        sentence_transformers=st,
        max_length=max_length,
    )


class PooledEncoder(nn.Module):
    """A HuggingFace encoder whose forward returns one latent per input ``(B, D)``.

    ``forward(input_ids, attention_mask=None)`` for text encoders, ``forward(pixel_values)``
    for ViTs. The latent pools ``last_hidden_state`` as sentence-transformers' ``Pooling``
    does (padding never counts): ``"cls"`` the first token, ``"mean"`` the mean of the
    attended tokens, ``"max"`` their element-wise maximum, ``"mean_sqrt_len_tokens"`` their
    sum over the square root of their count, ``"weightedmean"`` the mean weighted by
    position (1, 2, ...), ``"lasttoken"`` the last attended token; several modes are
    concatenated. With ``normalize`` the latent is scaled to unit length. The encoder's
    ``pooler_output`` is never used.

    This is the ``embed_model`` :class:`~captum_ext.attr.cdam.ConceptCDAM` takes.

    Args:
        encoder: A bare HF encoder (``BertModel``, ``ViTModel``...).
        pooling: Modes of :data:`POOLINGS`, concatenated in this order.
        normalize: Scale the latent to unit length.
    """

    def __init__(
        self, encoder: nn.Module, pooling: Sequence[str] = ("mean",), normalize: bool = False
    ) -> None:
        super().__init__()
        unknown = [p for p in pooling if p not in POOLINGS]
        if not pooling or unknown:
            raise ValueError(
                f"PooledEncoder: pooling must be modes of {POOLINGS}; got {tuple(pooling)!r}."
            )
        self.encoder = encoder
        self.pooling = tuple(pooling)
        self.normalize = bool(normalize)

    def forward(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            out = self.encoder(inputs)
        else:
            out = self.encoder(inputs, attention_mask)
        hidden = out.last_hidden_state  # (B, N, D)
        if attention_mask is None:
            mask = hidden.new_ones(hidden.shape[:2])
        else:
            mask = attention_mask.to(hidden.dtype)
        z = torch.cat([_pool(hidden, mask, mode) for mode in self.pooling], dim=-1)
        return nn.functional.normalize(z, p=2, dim=-1) if self.normalize else z


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' pooling of ``hidden (B, N, D)`` over ``mask (B, N)``."""
    m = mask[..., None]  # (B, N, 1)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    if mode == "lasttoken":
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last attended position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "weightedmean":
        pos = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        m = m * pos[None, :, None]
    total = (hidden * m).sum(1)
    count = m.sum(1).clamp_min(1e-9)
    return total / count.sqrt() if mode == "mean_sqrt_len_tokens" else total / count


def load_encoder(
    spec: str, device: str | torch.device = "cpu", *, pooling: str | Sequence[str] | None = None
) -> LoadedModel:
    """Loads a bare encoder from an ``hf:DIR`` spec, to explain against a concept.

    The folder is a sentence-transformers model or a bare HF encoder saved with
    ``save_pretrained`` (see :func:`encoder_layout` for both layouts and the pooling each
    gets). The returned ``model`` is a :class:`PooledEncoder`: its forward returns the
    latent ``(B, D)`` that :class:`~captum_ext.attr.cdam.ConceptCDAM` reads, so::

        loaded = load_encoder("hf:./all-MiniLM-L6-v2")
        enc = loaded.tokenize("a photo of a dog")
        cdam = ConceptCDAM(loaded.model, readout="mean")
        concept = cdam.concept_from_examples(enc.input_ids, (enc.attention_mask,))

    Weights are read from the folder only (``from_pretrained(local_files_only=True)``,
    ``weights_only=True`` for ``.bin`` files: nothing is downloaded or unpickled), and
    must hold every tensor of the encoder except its unused pooler (``pooler_output`` is
    never read; a pooler missing from the file is noted in ``notes``).

    Args:
        spec: ``"hf:DIR"``.
        device: Where to put the model.
        pooling: Replaces the folder's pooling (see :data:`POOLINGS`).

    Returns:
        A :class:`LoadedModel` with ``encoder=True``, no classes, ``pooling`` and
        ``normalize`` as the folder says; ``logits`` returns the latents.

    Raises:
        ModelFileNotFoundError: The folder does not exist.
        ModelLoadError: Not an ``hf:`` spec, not an encoder folder (:func:`encoder_layout`),
            weights that do not fit the config, a pickled ``.bin``, no usable tokenizer.
    """
    kind, value = parse_spec(spec)
    if kind != "hf":
        raise ModelLoadError(
            f"{spec}: load_encoder takes hf:DIR (a sentence-transformers or bare HF encoder folder)"
        )
    layout = encoder_layout(value, pooling)
    from transformers import AutoModel

    folder = layout.model_dir
    config = _hf_config(spec, folder)  # a malformed config.json: one line, before the weights
    encoder, info = _hf_from_pretrained(spec, folder, AutoModel, "encoder")
    notes = []
    missing = list(info.get("missing_keys") or ())
    pooler = [k for k in missing if str(k).startswith("pooler.")]
    if pooler:  # never read: PooledEncoder pools last_hidden_state
        info = {**info, "missing_keys": [k for k in missing if k not in pooler]}
        notes.append(
            f"{spec}: the weights hold no pooler; it is not used (the latent pools "
            "last_hidden_state)"
        )
    _check_hf_loading(spec, encoder, info)
    model = PooledEncoder(encoder, layout.pooling, layout.normalize)
    loaded = LoadedModel(
        model=model,
        spec=spec,
        modality=layout.modality,
        class_names=[],
        multi_label=False,
        preprocessing={},
        notes=notes,
        encoder=layout,
    )
    if layout.modality == "image":
        _hf_image_preprocessing(loaded, folder, config)
    else:
        _hf_tokenizer(loaded, folder, config, layout.max_length)
    model.to(device).eval()
    return loaded
