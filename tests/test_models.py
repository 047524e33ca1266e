"""``captum_ext.models.load``: a model from a spec, with library errors (no CLI types)."""

from __future__ import annotations

import pytest
import torch

from captum_ext import models
from captum_ext.models import ModelFileNotFoundError, ModelLoadError, load


def test_errors_are_value_and_file_not_found_errors_with_one_line(tmp_path):
    cases = [
        (lambda: load("onnx:model.onnx"), ModelLoadError, "unknown model spec"),
        (lambda: load("zoo:imagenet-vit"), ModelLoadError, "unknown zoo model"),
        (lambda: load("hf:" + str(tmp_path / "nowhere")), FileNotFoundError, "no such folder"),
        (
            lambda: load("timm:vit_tiny_patch16_224", weights=tmp_path / "nope.safetensors"),
            FileNotFoundError,
            "no such file",
        ),
        (lambda: load("timm:vit_tiny_patch16_224"), ValueError, "would need a download"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind, match=text) as info:
            call()
        assert isinstance(info.value, ModelLoadError)  # one base class to catch
        assert "\n" not in str(info.value)
        assert type(info.value).__module__ == "captum_ext.errors"  # re-exported by models
    assert issubclass(ModelFileNotFoundError, FileNotFoundError)
    assert issubclass(ModelLoadError, ValueError)


def test_public_api_is_listed():
    assert {"load", "LoadedModel", "ModelLoadError", "parse_spec"} <= set(models.__all__)
    assert models.parse_spec("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224")


def test_zoo_model_loads_with_its_class_names_and_scores():
    from captum_ext import zoo

    if "shapes-vit" not in zoo.available():
        pytest.skip("zoo weights are not installed")
    loaded = load("zoo:shapes-vit")
    assert loaded.modality == "image" and loaded.multi_label
    assert loaded.class_names == [str(c) for c in zoo.info("shapes-vit")["classes"]]
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.logits(x), zoo.load("shapes-vit")(x))
