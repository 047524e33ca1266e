"""The fine benchmark data: ``shapes(..., size=96, min_extent=16, max_extent=40)``.

``min_extent`` is additive: every existing call renders bit for bit as before it existed
(hashes below were taken with the code before the argument was added).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from captum_ext.data import SHAPE_CLASSES, ShapesDataset, recolour, shapes

FINE = dict(layout="free", max_objects=2, size=96, patch=8, min_extent=16, max_extent=40)

# sha256 of images, labels and masks of shapes(40, seed=3, **kwargs) before min_extent existed.
OLD_HASHES = [
    ({}, "f6191ecfef63bb7c42261bbcbb32c5bf81273076d08dc3328c6b8772a0277582"),
    ({"layout": "free"}, "3d9876a4f1560702f05734c179741792bb924b4154dfa4cd9d98b214748736f4"),
    (
        {"layout": "aligned", "max_extent": 7},
        "9014957a0960c96ef826a19b063ae7c4bb34db3112fac7ca26f04690627f8afa",
    ),
    (
        {"layout": "free", "size": 96, "max_extent": 40},
        "0bad3979827361c2cdf1627fcdce04a9f0f2409e0fe7e3e8f46ce0bddcee93ab",
    ),
    (
        {"layout": "free", "max_objects": 4, "min_objects": 2, "size": 48},
        "0334a3c03121bc729a0e331f3da5a26e384e7215d9effc73139b456c194b7720",
    ),
]


def _hash(batch) -> str:
    m = hashlib.sha256()
    for t in (batch.images, batch.labels, batch.masks):
        m.update(t.numpy().tobytes())
    return m.hexdigest()


@pytest.mark.parametrize(("kwargs", "digest"), OLD_HASHES)
def test_existing_calls_render_bit_identically(kwargs, digest):
    assert _hash(shapes(40, 3, **kwargs)) == digest
    assert _hash(shapes(40, 3, **kwargs, min_extent=None)) == digest


def _literal_mask(cls: int, s: int) -> np.ndarray:
    """The shape inside an s x s box, pixel by pixel (doubled offsets from the box centre)."""
    out = np.zeros((s, s), dtype=bool)
    hw = s // 4
    if (hw - (s - 1)) % 2 != 0:
        hw -= 1
    for i in range(s):
        for j in range(s):
            a, b = 2 * i - (s - 1), 2 * j - (s - 1)
            if cls == 0:
                out[i, j] = True
            elif cls == 1:
                out[i, j] = a * a + b * b <= s * s
            elif cls == 2:
                out[i, j] = 2 * abs(b) <= 2 * i + 3
            else:
                out[i, j] = abs(a) <= hw or abs(b) <= hw
    return out


def test_fine_objects_span_several_tokens_and_masks_are_exact():
    b = shapes(48, 5, **FINE)
    assert b.images.shape == (48, 3, 96, 96) and b.masks.shape == (48, 4, 96, 96)
    for n, p in enumerate(b.params):
        assert 1 <= len(p.objects) <= 2
        want = np.zeros((len(SHAPE_CLASSES), 96, 96), dtype=bool)
        for o in p.objects:
            assert 16 <= o.extent <= 40  # 2 to 5 tokens of a patch-8 grid
            want[o.class_index, o.top : o.top + o.extent, o.left : o.left + o.extent] = (
                _literal_mask(o.class_index, o.extent)
            )
        assert np.array_equal(b.masks[n].numpy(), want)
        assert torch.equal(b.labels[n], torch.from_numpy(want.any(axis=(1, 2))).float())
        if len(p.objects) == 2:  # disjoint boxes, a gap of at least one pixel
            o, q = p.objects
            assert (
                o.top + o.extent < q.top
                or q.top + q.extent < o.top
                or o.left + o.extent < q.left
                or q.left + q.extent < o.left
            )


def test_fine_extents_cover_the_whole_range_and_the_dataset_agrees():
    b = shapes(400, 6, **FINE)
    extents = [o.extent for p in b.params for o in p.objects]
    assert min(extents) == 16 and max(extents) == 40
    data = ShapesDataset(400, 6, **FINE)
    for i in (0, 17, 399):
        x, y, m = data[i]
        assert torch.equal(x, b.images[i]) and torch.equal(y, b.labels[i])
        assert torch.equal(m, b.masks[i])


def test_min_extent_also_narrows_the_aligned_layout():
    b = shapes(200, 2, layout="aligned", min_extent=7)
    assert {o.extent for p in b.params for o in p.objects} == {7, 8}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"layout": "free", "size": 96, "min_extent": 5},
            r"min_extent must be an integer in 6\.\.48",
        ),
        (
            {"layout": "free", "size": 96, "min_extent": 41, "max_extent": 40},
            r"6\.\.40 .*max_extent=40.*got 41",
        ),
        ({"layout": "free", "size": 96, "min_extent": 16.0}, "min_extent"),
        ({"layout": "free", "size": 96, "min_extent": True}, "min_extent"),
        ({"min_extent": 9}, r"min_extent must be an integer in 5\.\.8"),
    ],
)
def test_bad_min_extent_is_a_one_line_error(kwargs, match):
    for make in (lambda: shapes(2, 0, **kwargs), lambda: ShapesDataset(2, 0, **kwargs)):
        with pytest.raises(ValueError, match=match) as err:
            make()
        assert "\n" not in str(err.value)


def test_recolour_keeps_the_layout_and_draws_every_colour_anew():
    b = shapes(24, 5, **FINE)
    images, params = recolour(b.params, seed=1)
    assert images.shape == b.images.shape and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    for old, new in zip(b.params, params, strict=True):
        assert [(o.class_index, o.top, o.left, o.extent) for o in old.objects] == [
            (o.class_index, o.top, o.left, o.extent) for o in new.objects
        ]
        assert new.background != old.background and new.noise_seed != old.noise_seed
        assert all(o.colour != q.colour for o, q in zip(old.objects, new.objects, strict=True))
    # The new parameters render these images, with the old masks (labels unchanged).
    again = shapes_from(params)
    assert torch.equal(again.images, images) and torch.equal(again.masks, b.masks)
    # Every object keeps the contrast rule: max channel gap to its background >= 0.3 before
    # noise (the noise is a uniform of std 0.03: bounded by 0.03 * sqrt(3) per pixel, twice).
    for n, p in enumerate(params):
        bare = render_without_all(p)
        for o in p.objects:
            gap = (images[n] - bare).abs().amax(0)[again.masks[n, o.class_index]]
            assert gap.min() > 0.3 - 2 * 0.03 * 3**0.5
    # Deterministic in the seed; another seed gives other colours.
    assert torch.equal(recolour(b.params, seed=1)[0], images)
    assert not torch.equal(recolour(b.params, seed=2)[0], images)


def test_recolour_refuses_bad_input_in_one_line():
    b = shapes(2, 5, **FINE)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        recolour(b.params, seed=-1)
    mixed = (b.params[0], shapes(1, 5, size=32).params[0])
    with pytest.raises(ValueError, match="one size, got sizes \\[32, 96\\]"):
        recolour(mixed, seed=0)
    assert recolour((), seed=0)[0].shape[0] == 0


def shapes_from(params):
    """Images and masks rendered from ``params`` through the package's own renderer."""
    from captum_ext.data.images import _batch_from_params

    return _batch_from_params(params, params[0].size, seed=0, layout="free", patch=8)


def render_without_all(p):
    """Image ``p`` with its objects removed (background and noise only)."""
    from dataclasses import replace

    from captum_ext.data.images import _render

    return torch.from_numpy(_render([replace(p, objects=())], p.size)[0][0])
