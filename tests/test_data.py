"""Tests of the procedural benchmark data in ``captum_ext.data``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_ext.data import (
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SHAPE_CLASSES,
    TEXT_VOCAB,
    ShapesDataset,
    TextDataset,
    render_without,
    shapes,
    text_rationales,
)

K = len(SHAPE_CLASSES)
NOISE_BOUND = 0.03 * 3**0.5 + 1e-6  # uniform noise of std 0.03


@pytest.fixture(scope="module", params=["aligned", "free"])
def batch(request):
    return shapes(96, seed=11, layout=request.param, max_objects=3)


def _objects(b):
    for i, p in enumerate(b.params):
        for o in p.objects:
            yield i, o


def test_shapes_tensors_and_labels(batch):
    n = len(batch)
    assert batch.images.shape == (n, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (n, K) and batch.labels.dtype == torch.float32
    assert batch.masks.shape == (n, K, 32, 32) and batch.masks.dtype == torch.bool
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert torch.equal(batch.labels, batch.masks.any(dim=(2, 3)).float())
    counts = batch.labels.sum(1)
    assert counts.min() == 1 and counts.max() == 3
    for i, p in enumerate(batch.params):  # labels agree with the drawn objects
        assert (
            sorted(o.class_index for o in p.objects) == batch.labels[i].nonzero().flatten().tolist()
        )


def test_deterministic_per_seed_and_seeds_differ():
    a, b, c = shapes(40, seed=5), shapes(40, seed=5), shapes(40, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert a.params == b.params
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.labels, c.labels)
    # Image i does not depend on how many images are requested.
    assert torch.equal(shapes(7, seed=5).images, a.images[:7])


def test_global_rng_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    expected_t, expected_n = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    shapes(8, seed=1)
    text_rationales(8, seed=1)
    assert torch.equal(torch.rand(3), expected_t)
    assert np.array_equal(np.random.rand(3), expected_n)


def test_masks_are_exactly_the_painted_pixels(batch):
    for i, o in _objects(batch):
        box = (slice(o.top, o.top + o.extent), slice(o.left, o.left + o.extent))
        crop = batch.images[i][:, box[0], box[1]]
        colour = torch.tensor(o.colour, dtype=torch.float32)[:, None, None]
        near = ((crop - colour).abs() <= NOISE_BOUND).all(0)
        mask = batch.masks[i, o.class_index]
        assert torch.equal(near, mask[box]), (i, o)
        assert mask.sum() == mask[box].sum()  # nothing outside the bounding box


def test_render_without_changes_exactly_the_mask(batch):
    for i, o in list(_objects(batch))[:80]:
        removed = render_without(batch, i, o.class_index)
        assert removed.shape == (3, 32, 32)
        changed = (removed != batch.images[i]).any(0)
        assert torch.equal(changed, batch.masks[i, o.class_index]), (i, o)
    i, o = next(_objects(batch))
    assert torch.equal(batch.without(i, o.class_name), render_without(batch, i, o.class_index))


def test_render_without_absent_class_raises(batch):
    i = int((batch.labels.sum(1) < K).nonzero()[0])
    absent = int((batch.labels[i] == 0).nonzero()[0])
    with pytest.raises(ValueError, match=r"no .* object"):
        render_without(batch, i, absent)
    with pytest.raises(ValueError, match="classes are"):
        render_without(batch, i, "hexagon")


def test_aligned_objects_stay_in_their_own_cell():
    b = shapes(200, seed=2, layout="aligned", max_objects=4, min_objects=2, patch=8)
    for i in range(len(b)):
        cells = []
        for c in b.labels[i].nonzero().flatten().tolist():
            rows, cols = b.masks[i, c].nonzero(as_tuple=True)
            cell = set(zip((rows // 8).tolist(), (cols // 8).tolist()))
            assert len(cell) == 1, (i, c, cell)
            cells += cell
        assert len(cells) == len(set(cells))


def test_aligned_respects_patch_size():
    b = shapes(50, seed=2, layout="aligned", patch=16)
    extents = {o.extent for _, o in _objects(b)}
    assert max(extents) > 8  # objects grow with the cell
    for i, o in _objects(b):
        rows, cols = b.masks[i, o.class_index].nonzero(as_tuple=True)
        assert len(set((rows // 16).tolist())) == 1 and len(set((cols // 16).tolist())) == 1


@pytest.mark.parametrize("layout", ["aligned", "free"])
def test_max_extent_caps_objects_and_leaves_a_rim_in_every_cell(layout):
    b = shapes(300, seed=4, layout=layout, max_extent=7)
    extents = [o.extent for _, o in _objects(b)]
    assert max(extents) == 7 and min(extents) >= (5 if layout == "aligned" else 6)
    if layout == "aligned":  # no object touches both borders of its cell
        for i, o in _objects(b):
            rows, cols = b.masks[i, o.class_index].nonzero(as_tuple=True)
            assert rows.max() - rows.min() < 7 and cols.max() - cols.min() < 7
    default = shapes(300, seed=4, layout=layout)
    assert max(o.extent for _, o in _objects(default)) > 7  # the default is not capped
    data = ShapesDataset(300, seed=4, layout=layout, max_extent=7)
    torch.testing.assert_close(data[5][0], b.images[5], rtol=0, atol=0)


def test_free_objects_straddle_patch_borders():
    b = shapes(200, seed=3, layout="free")
    straddle = 0
    for i, o in _objects(b):
        rows, cols = b.masks[i, o.class_index].nonzero(as_tuple=True)
        straddle += len(set(zip((rows // 8).tolist(), (cols // 8).tolist()))) > 1
    assert straddle > 50


@pytest.mark.parametrize("layout", ["aligned", "free"])
@pytest.mark.parametrize("count", [2, 4])
def test_objects_have_distinct_classes_and_disjoint_masks(layout, count):
    b = shapes(150, seed=4, layout=layout, min_objects=count, max_objects=count)
    assert torch.equal(b.labels.sum(1), torch.full((150,), float(count)))
    assert b.masks.sum(1).max() == 1  # no pixel belongs to two objects
    for p in b.params:
        assert len({o.class_index for o in p.objects}) == count


def test_colour_carries_no_class_information():
    b = shapes(2000, seed=7, layout="free", min_objects=2, max_objects=2)
    colours = [[] for _ in range(K)]
    for _, o in _objects(b):
        colours[o.class_index].append(o.colour)
    assert min(len(c) for c in colours) > 800
    means = np.array([np.mean(c, axis=0) for c in colours])  # (K, 3)
    assert np.ptp(means, axis=0).max() < 0.05, means
    # The same on the rendered pixels: mean colour of each object, averaged per class.
    masks = b.masks.float()
    per_object = torch.einsum("nkhw,nchw->nkc", masks, b.images) / masks.sum((2, 3))[..., None]
    present = b.labels.bool()
    pixel_means = torch.stack([per_object[present[:, k], k].mean(0) for k in range(K)])
    assert (pixel_means.amax(0) - pixel_means.amin(0)).max() < 0.05, pixel_means


def test_each_class_has_its_own_outline():
    b = shapes(400, seed=8, layout="free")
    outlines: dict[tuple[int, int], torch.Tensor] = {}
    for i, o in _objects(b):
        crop = b.masks[i, o.class_index, o.top : o.top + o.extent, o.left : o.left + o.extent]
        key = (o.class_index, o.extent)
        assert torch.equal(outlines.setdefault(key, crop), crop)  # same shape every time
    for (c, s), crop in outlines.items():
        for (c2, s2), crop2 in outlines.items():
            if s == s2 and c != c2:
                assert not torch.equal(crop, crop2), (SHAPE_CLASSES[c], SHAPE_CLASSES[c2], s)


def test_objects_contrast_with_background():
    b = shapes(100, seed=9)
    objects = list(_objects(b))
    removed = torch.stack([render_without(b, i, o.class_index) for i, o in objects])
    index = torch.tensor([i for i, _ in objects])
    masks = b.masks[index, torch.tensor([o.class_index for _, o in objects])]
    gap = (removed - b.images[index]).abs().amax(1)  # (M, H, W)
    # Contrast 0.3 before noise and clipping; the shared noise can clip away at most its bound.
    assert gap[masks].min() > 0.3 - NOISE_BOUND


def test_shapes_dataset_matches_shapes():
    ds = ShapesDataset(1100, seed=12, layout="free", max_objects=3)
    ref = shapes(1100, seed=12, layout="free", max_objects=3)
    assert len(ds) == 1100
    for i in (0, 5, 1023, 1024, 1099, -1):
        image, labels, masks = ds[i]
        assert image.shape == (3, 32, 32) and labels.shape == (K,) and masks.shape == (K, 32, 32)
        assert torch.equal(image, ref.images[i])
        assert torch.equal(labels, ref.labels[i])
        assert torch.equal(masks, ref.masks[i])
    with pytest.raises(IndexError):
        ds[1100]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 30, "patch": 8}, "divisible"),
        ({"max_objects": K + 1}, f"1..{K}"),
        ({"layout": "grid"}, "aligned.*free"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"size": 8, "patch": 8, "max_objects": 2}, "only 1 cells"),
        ({"noise_std": 0.5}, "noise_std"),
        ({"seed": -1}, "seed"),
        ({"max_extent": 9}, r"max_extent must be an integer in 5\.\.8"),
        ({"max_extent": 4}, "max_extent"),
        ({"layout": "free", "max_extent": 17}, r"6\.\.16"),
        ({"max_extent": 7.0}, "max_extent"),
    ],
)
def test_bad_shape_arguments_raise(kwargs, message):
    args = {"n": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        shapes(**args)
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**args)


def test_free_layout_accepts_any_size():
    b = shapes(10, seed=0, layout="free", size=30)
    assert b.images.shape == (10, 3, 30, 30)


# --------------------------------------------------------------------------------------------
# text


def test_text_deterministic_and_seeds_differ():
    a, b, c = text_rationales(64, seed=1), text_rationales(64, seed=1), text_rationales(64, seed=2)
    for name in ("input_ids", "attention_mask", "labels", "rationale", "counter"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.input_ids, c.input_ids)


def test_text_structure():
    b = text_rationales(300, seed=3, seq_len=16)
    vocab = b.vocab
    assert vocab == list(TEXT_VOCAB)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert b.input_ids.shape == (300, 16) and b.input_ids.dtype == torch.long
    assert b.labels.dtype == torch.long and set(b.labels.tolist()) == {0, 1}
    assert torch.equal(b.attention_mask, (b.input_ids != 0).long())
    assert (b.input_ids[:, 0] == vocab.index("[CLS]")).all()
    lengths = b.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 5  # variable length
    sep = b.input_ids[torch.arange(300), lengths - 1]
    assert (sep == vocab.index("[SEP]")).all()
    assert ((b.input_ids == vocab.index("[SEP]")).sum(1) == 1).all()
    positions = torch.arange(16)[None]
    assert not (b.attention_mask.bool() & (positions >= lengths[:, None])).any()


def test_text_rationale_holds_label_polarity():
    b = text_rationales(300, seed=4)
    pos = {TEXT_VOCAB.index(w) for w in POSITIVE_WORDS}
    neg = {TEXT_VOCAB.index(w) for w in NEGATIVE_WORDS}
    saw_counter = False
    for i in range(len(b)):
        own, other = (pos, neg) if b.labels[i] == 1 else (neg, pos)
        ids = b.input_ids[i].tolist()
        support = [t for t, r in zip(ids, b.rationale[i].tolist()) if r]
        counter = [t for t, r in zip(ids, b.counter[i].tolist()) if r]
        assert 1 <= len(support) <= 3 and set(support) <= own
        assert set(counter) <= other and len(counter) < len(support)
        saw_counter |= bool(counter)
        # Every polarity word is marked: no unmarked sentiment word hides among the fillers.
        marked = b.rationale[i] | b.counter[i]
        assert not any(t in pos | neg for t, m in zip(ids, marked.tolist()) if not m)
        assert not (b.rationale[i] & b.counter[i]).any()
    assert saw_counter


def test_text_dataset_and_bad_arguments():
    ds = TextDataset(20, seed=5, seq_len=12)
    ref = text_rationales(20, seed=5, seq_len=12)
    ids, mask, label, rationale = ds[3]
    assert torch.equal(ids, ref.input_ids[3]) and torch.equal(rationale, ref.rationale[3])
    assert torch.equal(mask, ref.attention_mask[3]) and label == ref.labels[3]
    assert len(ds) == 20
    with pytest.raises(ValueError, match="seq_len"):
        text_rationales(4, seed=0, seq_len=3)
    with pytest.raises(ValueError, match="counter_prob"):
        text_rationales(4, seed=0, counter_prob=2.0)
