"""TAM (token ablation) against literal references that physically delete tokens, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
from captum.attr import PerturbationAttribution

from captum_ext.attr.tam import TAM, TokenAblation
from tests import tiny_models as tm

ATOL = 1e-10
CASES = {c.name: c for c in tm.ALL_MODELS}


@functools.cache
def _model(name: str) -> torch.nn.Module:
    return tm.build(CASES[name])


def _inputs(name: str, batch: int = 2) -> tuple[torch.Tensor, tuple | None]:
    x, extra = tm.make_inputs(CASES[name], batch=batch)
    return x, (extra or None)


def _tokens_out(name: str) -> str:
    return "tokens" if CASES[name].modality == "image" else "input"


# ----------------------------------------------------------------- literal references
def _delete(x: torch.Tensor, drop: list[int]) -> torch.Tensor:
    """Physically deletes positions ``drop`` of axis 1 by concatenating slices."""
    for j in sorted(drop, reverse=True):
        x = torch.cat([x[:, :j], x[:, j + 1 :]], dim=1)
    return x


def _timm_logits(m, img: torch.Tensor, drop: list[int]) -> torch.Tensor:
    x = m.patch_embed(img)
    x = m._pos_embed(x)
    x = m.patch_drop(x)
    x = m.norm_pre(x)
    x = _delete(x, drop)
    x = m.blocks(x)
    x = m.norm(x)
    return m.forward_head(x)


def _hf_vit_logits(m, img: torch.Tensor, drop: list[int]) -> torch.Tensor:
    h = _delete(m.vit.embeddings(img), drop)
    for layer in m.vit.layers:
        h = layer(h, None)
    h = m.vit.layernorm(h)
    return m.classifier(h[:, 0])


def _text_logits(m, ids: torch.Tensor, mask: torch.Tensor, drop: list[int]) -> torch.Tensor:
    t = ids.shape[1]
    if hasattr(m, "roberta"):
        pad = m.config.pad_token_id
        ne = ids.ne(pad).long()
        pos = torch.cumsum(ne, dim=1) * ne + pad  # RoBERTa's full-sequence positions
    else:
        pos = torch.arange(t)[None]
    ids, mask, pos = _delete(ids, drop), _delete(mask, drop), _delete(pos, drop)
    if isinstance(m, tm.MeanPoolBert):
        h = m.encoder(ids, attention_mask=mask, position_ids=pos).last_hidden_state
        w = mask[..., None].to(h.dtype)
        return m.head((h * w).sum(1) / w.sum(1))
    return m(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _ref_logits(name: str, m, x: torch.Tensor, extra, b: int, drop: list[int]) -> torch.Tensor:
    """Logits ``(C,)`` of example b with token-point positions ``drop`` deleted."""
    with torch.no_grad():
        if CASES[name].modality == "text":
            return _text_logits(m, x[b : b + 1], extra[0][b : b + 1], drop)[0]
        if name == "hf_vit":
            return _hf_vit_logits(m, x[b : b + 1], drop)[0]
        return _timm_logits(m, x[b : b + 1], drop)[0]


def _removable(name: str, m, x: torch.Tensor, extra, b: int) -> list[int]:
    """Token-point positions the reference may delete in example b."""
    if CASES[name].modality == "text":
        length = int(extra[0][b].sum())
        return list(range(1, length - 1))  # [CLS] ... [SEP] padding
    prefix = 1 if name == "hf_vit" else m.num_prefix_tokens
    with torch.no_grad():
        n = m.vit.embeddings(x[:1]) if name == "hf_vit" else m._pos_embed(m.patch_embed(x[:1]))
    return list(range(prefix, n.shape[1]))


def _reference(name: str, target: int, groups=None) -> torch.Tensor:
    """One deletion per forward at batch size 1: scores (B, N) over token-point positions.

    ``groups``: per example, a list of lists of positions deleted together.
    """
    m = _model(name)
    x, extra = _inputs(name)
    rows = []
    for b in range(x.shape[0]):
        clean = _ref_logits(name, m, x, extra, b, [])[target]
        removable = _removable(name, m, x, extra, b)
        n = x.shape[1] if CASES[name].modality == "text" else removable[-1] + 1
        row = torch.zeros(n, dtype=torch.float64)
        for group in groups[b] if groups is not None else [[i] for i in removable]:
            score = clean - _ref_logits(name, m, x, extra, b, group)[target]
            row[group] = score
        rows.append(row)
    return torch.stack(rows)


def _strip_prefix(name: str, scores: torch.Tensor) -> torch.Tensor:
    if CASES[name].modality == "text":
        return scores
    m = _model(name)
    prefix = 1 if name == "hf_vit" else m.num_prefix_tokens
    return scores[:, prefix:]


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(CASES))
def test_equals_physical_deletion(name: str) -> None:
    x, extra = _inputs(name)
    got = TokenAblation(_model(name)).attribute(
        x,
        target=2,
        additional_forward_args=extra,
        perturbations_per_eval=5,
        output=_tokens_out(name),
    )
    ref = _strip_prefix(name, _reference(name, target=2))
    assert got.shape == ref.shape
    assert ref.abs().max() > 1e-8  # the check can fail
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["timm_dynamic", "roberta", "meanpool_bert"])
def test_batched_equals_unbatched(name: str) -> None:
    x, extra = _inputs(name, batch=3)
    tam = TokenAblation(_model(name))
    out = _tokens_out(name)
    runs = [
        tam.attribute(
            x, target=1, additional_forward_args=extra, perturbations_per_eval=k, output=out
        )
        for k in (1, 3, 64)
    ]
    singles = torch.cat(
        [
            tam.attribute(
                x[b : b + 1],
                target=1,
                additional_forward_args=None if extra is None else (extra[0][b : b + 1],),
                perturbations_per_eval=3,
                output=out,
            )
            for b in range(x.shape[0])
        ]
    )
    for run in [*runs[1:], singles]:
        torch.testing.assert_close(run, runs[0], atol=ATOL, rtol=0)


def test_window_equals_deleting_tiles_together() -> None:
    name = "timm_vit"  # 4x4 grid, CLS at 0: window 2 -> four tiles of 4 tokens
    x, _ = _inputs(name)
    tiles = [
        [1 + r * 4 + c for r in (r0, r0 + 1) for c in (c0, c0 + 1)]
        for r0 in (0, 2)
        for c0 in (0, 2)
    ]
    ref = _reference(name, target=3, groups=[tiles, tiles])[:, 1:]
    for k in (1, 64):
        got = TAM(_model(name)).attribute(
            x, target=3, window=2, perturbations_per_eval=k, output="tokens"
        )
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert got[0, 0] == got[0, 5]  # tokens of one tile share its score


def test_uneven_window_and_feature_mask_groups_of_different_sizes() -> None:
    name = "timm_nonsquare"  # 4x6 grid, CLS at 0
    x, _ = _inputs(name)
    m = _model(name)
    tam = TAM(m)
    # window (3, 4): tiles of 12, 8, 4 and 2 ... tokens, shortened rows of different lengths
    got = tam.attribute(x, target=0, window=(3, 4), perturbations_per_eval=2, output="grid")
    tile = lambda r0, r1, c0, c1: [1 + r * 6 + c for r in range(r0, r1) for c in range(c0, c1)]  # noqa: E731
    tiles = [tile(0, 3, 0, 4), tile(0, 3, 4, 6), tile(3, 4, 0, 4), tile(3, 4, 4, 6)]
    ref = _reference(name, target=0, groups=[tiles, tiles])[:, 1:].reshape(2, 1, 4, 6)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # per-example feature_mask with a never-removed token (negative id)
    g = torch.Generator().manual_seed(0)
    fm = torch.randint(0, 5, (2, 24), generator=g)
    fm[1, 7] = -1
    got = tam.attribute(x, target=0, feature_mask=fm, output="tokens")
    groups = [
        [[1 + j for j in range(24) if fm[b, j] == v] for v in fm[b].unique() if v >= 0]
        for b in (0, 1)
    ]
    ref = _reference(name, target=0, groups=groups)[:, 1:]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert got[1, 7] == 0


def test_text_feature_mask_keeps_special_tokens() -> None:
    name = "bert"
    x, extra = _inputs(name)
    fm = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # shared by both rows
    got = TAM(_model(name)).attribute(x, target=1, additional_forward_args=extra, feature_mask=fm)
    groups = []
    for b in range(2):
        keep = _removable(name, None, x, extra, b)
        groups.append(
            [[i for i in keep if fm[i] == v] for v in (0, 1, 2) if any(fm[i] == v for i in keep)]
        )
    torch.testing.assert_close(got, _reference(name, 1, groups), atol=ATOL, rtol=0)
    assert (got[:, 0] == 0).all() and got[1, 7] == 0  # [CLS]; [SEP] of the shorter row
    # window=2 over text: runs of two positions, special tokens and padding kept
    got = TAM(_model(name)).attribute(x, target=1, additional_forward_args=extra, window=2)
    groups = []
    for b in range(2):
        keep = _removable(name, None, x, extra, b)
        runs = [[i for i in keep if i // 2 == r] for r in range(5)]
        groups.append([run for run in runs if run])
    torch.testing.assert_close(got, _reference(name, 1, groups), atol=ATOL, rtol=0)


def test_attribute_targets_matches_single_targets() -> None:
    name = "timm_deit_distilled"
    x, _ = _inputs(name)
    tam = TAM(_model(name))
    many = tam.attribute_targets(x, [0, [1, 4], torch.tensor([3, 2])], perturbations_per_eval=7)
    assert many.shape == (3, 2, 1, 32, 32)
    for k, t in enumerate([0, [1, 4], torch.tensor([3, 2])]):
        torch.testing.assert_close(many[k], tam.attribute(x, target=t), atol=ATOL, rtol=0)


# ----------------------------------------------------------------- removal vs key masking
def _key_masking_scores(m, x: torch.Tensor, target: int) -> torch.Tensor:
    """f(x) - f(x with key j masked in every attention layer), the masking alternative."""
    with torch.no_grad():
        clean = m(x)[:, target]
        n = m._pos_embed(m.patch_embed(x[:1])).shape[1]
        p = m.num_prefix_tokens
        cols = []
        for j in range(p, n):
            mask = torch.ones(1, 1, n, n, dtype=torch.bool)
            mask[..., j] = False
            cols.append(clean - m(x, attn_mask=mask)[:, target])
    return torch.stack(cols, dim=1)


def test_cls_readout_removal_equals_key_masking_but_avg_pool_does_not() -> None:
    x, _ = _inputs("timm_vit")
    cls_model = _model("timm_vit")
    got = TAM(cls_model).attribute(x, target=2, output="tokens")
    torch.testing.assert_close(got, _key_masking_scores(cls_model, x, 2), atol=ATOL, rtol=0)

    avg_model = _model("timm_avgpool")
    got = TAM(avg_model).attribute(x, target=2, output="tokens")
    assert (got - _key_masking_scores(avg_model, x, 2)).abs().max() > 1e-4


# ----------------------------------------------------------------- Captum contract, outputs
def test_captum_contract_and_outputs() -> None:
    assert TAM is TokenAblation
    m = _model("timm_vit")
    tam = TAM(m)
    assert isinstance(tam, PerturbationAttribution)
    assert tam.multiplies_by_inputs is False and tam.has_convergence_delta() is False
    assert hasattr(TokenAblation.attribute, "__wrapped__")  # log_usage, for NoiseTunnel
    x, _ = _inputs("timm_vit")
    out = tam.attribute((x,))
    assert isinstance(out, tuple) and out[0].shape == (2, 1, 32, 32)
    pred = m(x).argmax(1)
    torch.testing.assert_close(out[0], tam.attribute(x, target=pred), atol=0, rtol=0)
    assert tam.attribute(x, output="grid").shape == (2, 1, 4, 4)
    with torch.no_grad():  # sensitivity_max calls attribute under no_grad
        torch.testing.assert_close(tam.attribute(x), out[0], atol=0, rtol=0)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    x, _ = _inputs("timm_vit", batch=1)
    tam = TAM(_model("timm_vit"))
    quiet = tam.attribute(x, target=0, perturbations_per_eval=4)
    assert "TokenAblation" not in capsys.readouterr().err
    shown = tam.attribute(x, target=0, perturbations_per_eval=4, show_progress=True)
    err = capsys.readouterr().err
    assert "TokenAblation" in err and "4/4" in err  # 16 patches, 4 per forward
    torch.testing.assert_close(shown, quiet, atol=0, rtol=0)


# ----------------------------------------------------------------- hygiene and errors
def _hook_count(m: torch.nn.Module) -> int:
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "distilbert"])
def test_hooks_removed_and_state_restored(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = tm.build(CASES[name])
    m.train()
    if name == "timm_vit":
        m.blocks[0].attn.fused_attn = True
        m.blocks[1].attn.fused_attn = False
    fused = [getattr(a, "fused_attn", None) for a in m.modules()]
    x, extra = _inputs(name)
    tam = TAM(m)
    tam.attribute(x, additional_forward_args=extra)  # success
    with pytest.raises(ValueError, match="out of range"):  # bad target, after the clean pass
        tam.attribute(x, target=99, additional_forward_args=extra)
    calls = []
    forward = tam.adapter.forward

    def flaky(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return forward(*args)

    monkeypatch.setattr(tam.adapter, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):  # inside an ablated forward
        tam.attribute(x, additional_forward_args=extra)
    assert _hook_count(m) == 0
    assert all(mod.training for mod in m.modules())
    assert [getattr(a, "fused_attn", None) for a in m.modules()] == fused
    assert not [n for n, mod in m.named_modules() if "forward" in vars(mod)]  # replay undone


def test_conv_stem_runs_once_and_replay_is_exact() -> None:
    """The shipped conv-stem ViT: the stem runs for the clean pass only, maps stay exact."""
    from captum_ext import zoo

    m = zoo.load("shapes-vit").double()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    calls = []
    handle = m.patch_embed.proj.register_forward_hook(
        lambda mod, args, out: calls.append(out.shape[0])
    )
    try:
        got = TAM(m).attribute(x, target=[0, 1, 2], output="tokens", perturbations_per_eval=5)
    finally:
        handle.remove()
    assert calls == [3]  # the stem's first conv saw the clean batch only
    p = m.num_prefix_tokens
    with torch.no_grad():
        for b in range(3):
            full = _timm_logits(m, x[b : b + 1], [])[0, b]
            ref = torch.stack(
                [full - _timm_logits(m, x[b : b + 1], [p + i])[0, b] for i in range(16)]
            )
            torch.testing.assert_close(got[b], ref, rtol=0, atol=ATOL)
    assert "forward" not in vars(m.patch_embed)


def test_clear_errors() -> None:
    x, _ = _inputs("timm_vit")
    tam = TAM(_model("timm_vit"))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tam.attribute(bad)
    with pytest.raises(ValueError, match="out of range"):
        tam.attribute(x, target=7)
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2"):
        tam.attribute(x, target=[0, 1, 2])
    for window in (0, -1, (2,), (2, 0), 2.0, True):
        with pytest.raises(ValueError, match="window must be"):
            tam.attribute(x, window=window)
    with pytest.raises(ValueError, match="larger than the 4x4 patch grid"):
        tam.attribute(x, window=5)
    with pytest.raises(ValueError, match=r"expected \(16,\) or \(2, 16\)"):
        tam.attribute(x, feature_mask=torch.zeros(15, dtype=torch.long))
    with pytest.raises(ValueError, match="integer group ids"):
        tam.attribute(x, feature_mask=torch.zeros(16))
    with pytest.raises(ValueError, match="not both"):
        tam.attribute(x, window=2, feature_mask=torch.arange(16))
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        tam.attribute(x, perturbations_per_eval=0)
    avg = TAM(_model("timm_avgpool"))  # no prefix token: one group would empty the sequence
    with pytest.raises(ValueError, match="empty sequence"):
        avg.attribute(x, feature_mask=torch.zeros(16, dtype=torch.long))
    ids, extra = _inputs("bert")
    text = TAM(_model("bert"))
    with pytest.raises(ValueError, match="for text, window"):
        text.attribute(ids, additional_forward_args=extra, window=(2, 2))
    with pytest.raises(ValueError, match="output='grid' is for images"):
        text.attribute(ids, additional_forward_args=extra, output="grid")
    with pytest.raises(ValueError, match="targets must be a list"):
        text.attribute_targets(ids, 3, additional_forward_args=extra)
    with pytest.raises(ValueError, match="integer input_ids"):
        text.attribute(ids.double(), additional_forward_args=extra)


# ----------------------------------------------------------------- pass sizing
import dataclasses  # noqa: E402
import math  # noqa: E402

from captum_ext.attr import _tam_sizing as sizing  # noqa: E402
from captum_ext.attr import tam as tam_module  # noqa: E402
from captum_ext.attr.tam import PassSizing  # noqa: E402

HUGE = 1 << 62


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict:
    cache: dict = {}
    monkeypatch.setattr(sizing, "_CALIBRATED", cache)
    return cache


def _count_rows(tam: TokenAblation, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every forward pass (the first is the clean pass), by wrapping the forward."""
    seen: list[int] = []
    forward = tam.adapter.forward

    def counting(inputs, extra=None):
        seen.append(inputs.shape[0])
        return forward(inputs, extra)

    monkeypatch.setattr(tam.adapter, "forward", counting)
    return seen


def _expected_row_bytes(length: int, width: int, heads: int, itemsize: int, row: int) -> int:
    """The documented estimate: itemsize * L * (12 D + 2 H L) plus the input row."""
    return itemsize * length * (12 * width + 2 * heads * length) + row


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("timm_vit", dict(window=(1, 3))),  # groups of 3 and 1 patches: two kept lengths
        ("timm_registers", {}),
        ("roberta", {}),
    ],
)
def test_maps_do_not_depend_on_the_pass_sizes(
    name: str, kwargs: dict, monkeypatch: pytest.MonkeyPatch, fresh_cache: dict
) -> None:
    x, extra = _inputs(name)
    tam = TokenAblation(_model(name))
    out = _tokens_out(name)
    seen = _count_rows(tam, monkeypatch)
    runs, sizes = [], []
    settings = [
        dict(max_tokens_per_pass=1),  # one row per pass
        dict(max_tokens_per_pass=HUGE, max_memory_bytes=HUGE),  # everything in one pass
        dict(max_tokens_per_pass=5 * 17),  # odd: an example's removals split across passes
        dict(perturbations_per_eval=2, max_tokens_per_pass=HUGE),  # Captum's cap: 4 rows
        dict(max_memory_bytes=1),  # memory cap below one row: one row per pass
        {},  # auto
    ]
    for kw in settings:
        seen.clear()
        runs.append(
            tam.attribute(x, target=1, additional_forward_args=extra, output=out, **kw, **kwargs)
        )
        sizes.append(seen[1:])
    total = sum(sizes[0])
    buckets = 2 if kwargs else 1  # window (1, 3) on 4x4: groups of 3 and of 1 patch
    assert all(r == 1 for r in sizes[0]) and len(sizes[1]) == buckets
    assert all(sum(s) == total for s in sizes)  # every removal exactly once
    assert 1 < max(sizes[2]) < total  # odd-sized passes cutting through examples
    assert max(sizes[3]) == 4 and max(sizes[4]) == 1
    for run in runs[1:]:
        torch.testing.assert_close(run, runs[0], atol=ATOL, rtol=0)


def test_token_budget_and_memory_cap_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "timm_vit"  # width 32, 2 heads, 16 patches + CLS: single removals keep L = 16
    x, _ = _inputs(name, batch=3)
    tam = TokenAblation(_model(name))
    seen = _count_rows(tam, monkeypatch)
    for budget in (16, 40, 100, 333):
        seen.clear()
        tam.attribute(x, target=0, max_tokens_per_pass=budget, max_memory_bytes=HUGE)
        assert max(seen[1:]) == budget // 16 and sum(seen[1:]) == 48
    row = _expected_row_bytes(16, 32, 2, 8, 3 * 32 * 32 * 8)
    for cap in (row, 3 * row + 5, 7.5 * row):
        seen.clear()
        tam.attribute(x, target=0, max_tokens_per_pass=HUGE, max_memory_bytes=cap)
        assert max(seen[1:]) == int(cap // row) and sum(seen[1:]) == 48
    seen.clear()  # the smallest of the three caps wins
    tam.attribute(
        x, target=0, perturbations_per_eval=3, max_tokens_per_pass=160, max_memory_bytes=5 * row
    )
    assert max(seen[1:]) == 5


def test_bad_pass_arguments_give_clear_errors() -> None:
    x, _ = _inputs("timm_vit")
    tam = TAM(_model("timm_vit"))
    for bad in (0, -3, 1.5, True, "fast", None):
        with pytest.raises(ValueError, match="max_tokens_per_pass must be 'auto' or a positive"):
            tam.attribute(x, max_tokens_per_pass=bad)
    for bad in (0, -1.0, math.nan, math.inf, "1GB", True):
        with pytest.raises(ValueError, match="max_memory_bytes must be None or a positive"):
            tam.attribute(x, max_memory_bytes=bad)
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="perturbations_per_eval must be None or a positive"):
            tam.attribute(x, perturbations_per_eval=bad)


def test_pass_sizing_validates_each_argument() -> None:
    assert PassSizing() == PassSizing(None, "auto", None)  # attribute's defaults
    PassSizing(perturbations_per_eval=3, max_tokens_per_pass=1, max_memory_bytes=0.5)
    bad = {
        "perturbations_per_eval": (0, -2, 2.0, False, "4"),
        "max_tokens_per_pass": (0, 1.5, True, "fast", None),
        "max_memory_bytes": (0, -1.0, math.nan, math.inf, "1GB", True),
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=f"^TokenAblation: {name} must be") as err:
                PassSizing(**{name: value})
            assert "\n" not in str(err.value) and repr(value) in str(err.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PassSizing().max_tokens_per_pass = 5  # type: ignore[misc]


def test_pass_sizer_decisions() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tokens = torch.zeros(3, 17, 32, dtype=torch.float64)  # B = 3, N = 17, D = 32
    cost = sizing.RowCost(32, 2, 8, 100)
    assert cost(16) == _expected_row_bytes(16, 32, 2, 8, 100)
    # an explicit budget passes through, uncapped: budget // L rows
    sizer = sizing.pass_sizer(PassSizing(max_tokens_per_pass=160), tokens, 2, 100)
    assert sizer.budget == 160 and not sizer.calibrating and sizer.row_cost == cost
    assert sizer.next_rows(16, left=48) == (10, False)
    # the memory cap bounds the rows (and says so); one row at least
    sizer = sizing.pass_sizer(
        PassSizing(max_tokens_per_pass=HUGE, max_memory_bytes=4.5 * cost(16)), tokens, 2, 100
    )
    assert sizer.rows(16, sizer.budget) == (4, True)
    assert sizing.PassSizer(cost, 1, budget=HUGE).rows(16, HUGE) == (1, True)
    # Captum's cap: B * perturbations_per_eval rows
    sizer = sizing.pass_sizer(PassSizing(2, HUGE, HUGE), tokens, 2, 100)
    assert sizer.per_pass == 6 and sizer.rows(16, sizer.budget) == (6, True)
    # heads unknown: estimated from the width, at least one
    assert sizing.pass_sizer(PassSizing(), tokens, None, 100).row_cost.heads == 1
    # "auto" on CPU calibrates over the ladder divided by the width, unless cached
    sizer = sizing.pass_sizer(PassSizing(), tokens, 2, 100)
    assert sizer.calibrating and sizer.candidates == sizing.cpu_ladder(32)
    assert sizer.candidates[0] == (1 << 17) // 32 and list(sizer.candidates) == sorted(
        sizer.candidates
    )
    assert sizer.memory_cap == sizing.CPU_MEMORY_BYTES
    assert PassSizing(max_memory_bytes=123).memory_cap(cuda) == 123
    assert PassSizing().rows_cap(4) is None and PassSizing(3).rows_cap(4) == 12
    assert sizing.auto_budget(cpu, ("never", "seen")) is None


def test_tam_formula_is_the_logit_drop() -> None:
    clean = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, -1.0]])  # (K=2, R=3)
    ablated = torch.tensor([[4.0, 9.0], [7.0, 0.5], [1.0, 2.5]])  # (R=3, C=2)
    target = torch.tensor([[0, 1, 1], [1, 1, 0]])  # (K, R)
    got = tam_module._tam_score(clean, ablated, target)
    expected = torch.tensor([[5.0 - 4.0, 1.0 - 0.5, 2.0 - 2.5], [0.0 - 9.0, 3.0 - 0.5, -1.0 - 1.0]])
    assert torch.equal(got, expected)


def test_calibration_key_and_device_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    key = sizing.calibration_key(cpu, torch.float32, 384, 197)
    threads = torch.get_num_threads()
    assert key == ("cpu", None, threads, "torch.float32", 384, 197)
    assert key != sizing.calibration_key(cpu, torch.float64, 384, 197)
    assert key != sizing.calibration_key(cpu, torch.float32, 768, 197)
    assert key != sizing.calibration_key(cpu, torch.float32, 384, 50)
    try:
        torch.set_num_threads(threads + 1)
        assert key != sizing.calibration_key(cpu, torch.float32, 384, 197)
    finally:
        torch.set_num_threads(threads)
    assert sizing.calibration_key(cuda, torch.float16, 384, 197)[:3] == ("cuda", 1, 0)
    # accelerators: big passes without timing; CPU: calibrate unless cached
    monkeypatch.setattr(sizing, "_CALIBRATED", {key: 1234})
    assert sizing.auto_budget(cuda, key) == sizing.ACCELERATOR_TOKENS
    assert sizing.auto_budget(torch.device("mps"), key) == sizing.ACCELERATOR_TOKENS
    assert sizing.auto_budget(cpu, key) == 1234
    assert sizing.auto_budget(cpu, (*key[:-1], 50)) is None
    # memory caps: CPU fixed, CUDA half of the free memory (mocked), others fixed
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return 40 << 30, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert sizing.default_memory_cap(cuda) == 20 << 30 and calls == [cuda]
    assert sizing.default_memory_cap(cpu) == sizing.CPU_MEMORY_BYTES
    assert sizing.default_memory_cap(torch.device("mps")) == sizing.OTHER_DEVICE_MEMORY_BYTES
    # ViT-S/16 fp32 on such a GPU: passes >= 10x the rows of the loop over a batch of 8
    row_bytes = functools.partial(sizing.row_bytes, width=384, heads=6, itemsize=4)
    sizer = sizing.PassSizer(
        lambda n: row_bytes(n) + 3 * 224 * 224 * 4,
        sizing.default_memory_cap(cuda),
        budget=sizing.ACCELERATOR_TOKENS,
    )
    rows, capped = sizer.rows(196, sizer.budget)
    assert rows >= 80 and rows == sizing.ACCELERATOR_TOKENS // 196 and not capped


def _sizer(candidates=(10, 20, 40, 80), per_pass=None, cap=HUGE, key=("k",)):
    return sizing.PassSizer(lambda n: 1, cap, per_pass, candidates=candidates, key=key)


def test_calibration_choice(fresh_cache: dict) -> None:
    # per-token cost by rows per pass (length 10): 2 rows are cheapest, 4 rise > 10%
    cost = {1: 3.0, 2: 1.0, 4: 1.2, 8: 0.5}
    sizer = _sizer()
    used = []
    while sizer.calibrating:
        rows, timed = sizer.next_rows(10, left=1000)
        assert timed
        used.append(rows)
        slow = 2.0 if len(used) in (3, 8) else 1.0  # a burst of load: the faster pass counts
        sizer.record(rows, 10, cost[rows] * rows * 10 * slow)
    assert used == [1, 1, 2, 1, 2, 1, 4, 2, 4, 2]  # each size against the best; 8 never tried
    assert sizer.budget == 20 and fresh_cache == {("k",): 20}
    assert sizer.next_rows(10, left=1000) == (2, False) and sizer.next_rows(7, 5) == (2, False)
    # still falling at the end of the ladder: the largest
    sizer = _sizer(candidates=(10, 20))
    for rows in (1, 1, 2, 1, 2, 1):
        assert sizer.next_rows(10, 1000) == (rows, True)
        sizer.record(rows, 10, 1.0 / rows)
    assert sizer.budget == 20 and fresh_cache[("k",)] == 20
    # too little work left to time the next size against the best: the best, not cached
    sizer = _sizer(key=("small",))
    for _ in range(2):
        sizer.next_rows(10, 6)
        sizer.record(1, 10, 1.0)
    assert sizer.next_rows(10, left=5) == (1, False) and ("small",) not in fresh_cache
    # too little work for even the first size: everything in one pass, not cached
    sizer = _sizer(candidates=(100,), key=("tiny",))
    assert sizer.next_rows(10, left=15) == (HUGE, False) and sizer.budget == math.inf
    assert ("tiny",) not in fresh_cache
    # a cap binds (Captum's perturbations_per_eval): the ladder stops, nothing cached
    sizer = _sizer(per_pass=3, key=("capped",))
    for rows in (1, 1, 2, 1, 2, 1):
        assert sizer.next_rows(10, 1000) == (rows, True)
        sizer.record(rows, 10, 1.0 / rows)
    assert sizer.next_rows(10, 1000) == (2, False) and ("capped",) not in fresh_cache


def test_calibration_end_to_end_with_a_fake_clock(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "timm_vit"  # width 32, L = 16 per single removal
    x, _ = _inputs(name, batch=4)
    tam = TokenAblation(_model(name))
    monkeypatch.setattr(sizing, "CPU_CANDIDATE_ELEMENTS", tuple(32 * 16 * r for r in (1, 2, 4, 8)))
    seconds_per_row = {1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5}
    now = [0.0]
    monkeypatch.setattr(sizing, "_clock", lambda: now[0])
    seen = _count_rows(tam, monkeypatch)
    forward = tam.adapter.forward

    def costly(inputs, extra=None):
        now[0] += seconds_per_row.get(inputs.shape[0], 9.0) * inputs.shape[0]
        return forward(inputs, extra)

    monkeypatch.setattr(tam.adapter, "forward", costly)
    first = tam.attribute(x, target=2, output="tokens", show_progress=True)
    ladder = [1, 1, 2, 1, 2, 1, 4, 2, 4, 2, 8, 4, 8, 4]  # 44 rows; 8 costs more than 4: stop
    assert seen[1:] == [*ladder, 4, 4, 4, 4, 4]  # 64 rows: the ladder, then 4 per pass
    assert "19/19" in capsys.readouterr().err  # the bar's total follows the calibration
    key = sizing.calibration_key(torch.device("cpu"), torch.float64, 32, 17)
    assert fresh_cache == {key: 64}  # 4 rows of 16 tokens
    seen.clear()
    again = tam.attribute(x, target=2, output="tokens")
    assert seen[1:] == [4] * 16  # cached: no ladder
    torch.testing.assert_close(again, first, atol=ATOL, rtol=0)
    one_pass = tam.attribute(x, target=2, output="tokens", max_tokens_per_pass=HUGE)
    torch.testing.assert_close(first, one_pass, atol=ATOL, rtol=0)
