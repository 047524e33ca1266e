"""Cost of TAM (batched token ablation) against the one-token-per-forward loop and Captum.

In one run on the same model and batch:
- TAM (``TokenAblation``, ``perturbations_per_eval`` removals per forward);
- the authors' way: one forward per removed token at batch size 1, written
  here as a literal loop that physically deletes the token (timm ViT);
- Captum ``FeatureAblation`` with a patch ``feature_mask`` (pixel occlusion
  to zero at patch granularity: same number of evaluations, different
  perturbation), with the same ``perturbations_per_eval``.

Target (DESIGN.md §8): TAM ≥ 10× faster than the loop.

    python benchmarks/bench_tam.py [--model shapes-vit] [--batch 16] [--ppe 0]

Pass sizing (``--sizing``): each variant in its own process (max RSS via
``resource.getrusage``), variants interleaved, ``--repeats`` rounds, medians:
``before`` (the plan before the token budget: ``B * 16`` rows per pass, no
memory cap), ``after`` (the default: token budget per device; on CPU its first
call calibrates, a second call uses the cached budget), ``loop`` (one removal
of every example per forward: B rows per pass) and ``stacked`` (all ``B * N``
rows in one pass). Target: ``after`` never slower than the best of ``loop``
and ``stacked``.

    python benchmarks/bench_tam.py --sizing [--model vit_small_patch16_224] [--batch 2]
        [--repeats 2] [--threads 1]

Measured 2026-12-01 with ``--sizing --threads 1`` (one torch thread per process on the 2
cores shared with other helpers, load average 10-12, so times are 3-6x an idle machine's and
drift by up to 3x over minutes; "+MB" = max RSS minus the RSS after model and clean forward):
- zoo shapes-vit, batch 16 (256 rows of 16 tokens), ``--repeats 5 --calls 2``: all four
  variants 0.27-0.33 s; after 0.93x the best alternative on its first call (too little work
  to calibrate fully: 2 timed passes of 128 rows, nothing cached), 0.99x later; +17 MB
  (before/stacked +27-29 MB, loop +6 MB); maps identical (max diff 0).
- untrained ViT-S/16, 224 px, batch 2 (392 rows of 196 tokens; batch 8 did not fit the
  time), ``--model vit_small_patch16_224 --batch 2 --repeats 2``, seconds per round:
  after 173 / 234 (1st call, calibrating) and 136 / 220 (cached: 27 resp. 13 rows per pass;
  round 1 ran the first, non-interleaved calibration), loop 115 / 138, stacked 403 / 117,
  before 151 / 106. +MB: after ~400, loop 14, stacked 1690, before 225. The same variant
  moved 3.4x between rounds, so these ratios say nothing; the one-process sweep below does.
  Max map difference between variants 3e-7 (float32).
- The same ViT-S/16, batch 1, in one process (1 thread), fixed passes of 2 / 13 / 32 / 196
  rows (``max_tokens_per_pass=rows * 196``), interleaved, 3 rounds, medians: 112 / 107 / 125
  / 136 ms per row. 13 rows (2730 tokens) is what the calibration cached for this model in
  round 2 above; it was the fastest in every round: 0.95x passes of 2 rows (the loop at
  batch 2), 0.85x passes of 32 rows (the former default at batch 2), 0.78x everything
  stacked.

Measured 2026-11-30 on the development machine (CPU, 2 threads shared with other work;
zoo shapes-vit, batch 16, 16 patch tokens): TAM 0.028 s = 10.0× one forward (it runs the
B·N = 256 shortened rows in one pass); the loop 0.21–0.24 s, i.e. TAM 7.0–8.4× faster (4.9× with
one thread); FeatureAblation 1.6–1.9× TAM's time. Max |TAM − loop| = 2.9e-6 (float32). The
loop computes the pixel embedding once per image, as TAM does since it replays the clean
embedding for every shortened copy (before that, TAM recomputed the conv stem for each copy
and was only 3.7× faster). TAM's time equals one forward of the 256 rows, so what remains is
batching efficiency: on 2 CPU threads a width-64 model gains less from batching than on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _models import shapes_vit
from _timing import median_time, table

from captum_ext import TokenAblation
from captum_ext.attr import _tam_sizing


def loop_reference(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TAM the slow way: batch 1, one forward per deleted token (timm ViT)."""
    p = model.num_prefix_tokens
    out = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            xb = x[b : b + 1]
            tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(xb))))
            full = model.forward_head(model.norm(model.blocks(tokens)))[0, target[b]]
            scores = []
            for i in range(p, tokens.shape[1]):
                kept = torch.cat([tokens[:, :i], tokens[:, i + 1 :]], dim=1)
                logit = model.forward_head(model.norm(model.blocks(kept)))[0, target[b]]
                scores.append(full - logit)
            out.append(torch.stack(scores))
    return torch.stack(out)


# ----------------------------------------------------------- pass sizing (--sizing)
HUGE = 1 << 62
VARIANTS = {
    # the plan before the token budget: B * 16 rows per pass, no memory cap
    "before": dict(perturbations_per_eval=16, max_tokens_per_pass=HUGE, max_memory_bytes=HUGE),
    # the default: token budget measured per device (CPU: calibrated on the first call)
    "after": dict(),
    # one removal of every example per forward: B rows per pass
    "loop": dict(perturbations_per_eval=1, max_tokens_per_pass=HUGE, max_memory_bytes=HUGE),
    # every removal of every example in one pass
    "stacked": dict(max_tokens_per_pass=HUGE, max_memory_bytes=HUGE),
}


def _model(name: str) -> tuple[torch.nn.Module, str]:
    if name.startswith("shapes-"):
        return shapes_vit(name)
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval(), f"timm:{name} (untrained)"


def _setup(
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor, TokenAblation]:
    """Model, its label, a seeded random batch of ``--batch`` images, targets and TAM."""
    model, label = _model(args.model)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, *model.patch_embed.img_size)
    target = torch.arange(args.batch) % model.num_classes
    return model, label, x, target, TokenAblation(model)


def _worker(args: argparse.Namespace) -> None:
    """One variant in this process: times ``--calls`` calls, prints JSON (times, rows, max RSS)."""
    import json
    import resource

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, x, target, tam = _setup(args)
    with torch.no_grad():
        model(x)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows: list[int] = []
    forward = tam.adapter.forward

    def counting(inputs, extra=None):
        rows.append(inputs.shape[0])
        return forward(inputs, extra)

    tam.adapter.forward = counting
    times = []
    for _ in range(args.calls):
        rows.clear()
        t0 = time.perf_counter()
        maps = tam.attribute(x, target=target, output="tokens", **VARIANTS[args.worker])
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(maps, args.save)
    sizes = sorted(set(rows[1:]))
    calibrated = list(_tam_sizing._CALIBRATED.values())  # the cached CPU budget, if any
    info = dict(times=times, passes=len(rows) - 1, rows=sizes, rss0_kb=rss0, rss_kb=rss)
    print(json.dumps(dict(info, calibrated=calibrated)))


def _sizing(args: argparse.Namespace) -> None:
    """Runs every variant in its own process, interleaved, ``--repeats`` rounds; medians.

    ``after`` runs one call more than the others: its first call calibrates
    (CPU), the later ones use the cached budget. The table is printed after
    every round.
    """
    import json
    import subprocess
    import tempfile

    _, label = _model(args.model)
    res: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for done in range(1, args.repeats + 1):
            for v in args.variants:
                save = f"{tmp}/{v}.pt"
                calls = args.calls + (v == "after")
                cmd = [sys.executable, __file__, "--worker", v, "--model", args.model]
                cmd += ["--batch", str(args.batch), "--calls", str(calls), "--save", save]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                res[v].append(json.loads(out.strip().splitlines()[-1]))
                print(v, res[v][-1], flush=True)
            ref = torch.load(f"{tmp}/{args.variants[0]}.pt")
            diff = {v: (torch.load(f"{tmp}/{v}.pt") - ref).abs().max().item() for v in res}
            threads = args.threads or torch.get_num_threads()
            print(
                f"\nmodel {label}, batch {args.batch}, torch {torch.__version__}, threads "
                f"{threads}, {done} rounds interleaved, medians; peak = max RSS of the "
                "variant's process (model and input included)"
            )
            _sizing_table(res, diff)


def _sizing_table(res: dict[str, list[dict]], diff: dict[str, float]) -> None:
    import statistics

    first = {v: statistics.median(r["times"][0] for r in res[v]) for v in res}
    print(
        "| variant | rows per pass | passes | 1st call s | later calls s | peak MB | "
        "+MB over model | max abs diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    later = {}
    for v in res:
        r = res[v][-1]
        times = [t for x in res[v] for t in x["times"][1:]]
        later[v] = statistics.median(times) if times else first[v]
        peak = statistics.median(x["rss_kb"] for x in res[v]) / 1024
        extra = statistics.median(x["rss_kb"] - x["rss0_kb"] for x in res[v]) / 1024
        rows = ",".join(map(str, r["rows"]))
        print(
            f"| {v} | {rows} | {r['passes']} | {first[v]:.2f} | {later[v]:.2f} | {peak:.0f} | "
            f"{extra:.0f} | {diff[v]:.1e} |"
        )
    alternatives = [first[v] for v in ("loop", "stacked") if v in first]
    if "after" in first and alternatives:
        best = min(alternatives)
        print(
            f"\nafter / best exact alternative: {first['after'] / best:.2f} (1st call, "
            f"calibrating), {later['after'] / best:.2f} (cached budget)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-vit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--ppe", type=int, default=0, help="perturbations_per_eval (0: TAM's token budget alone)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--sizing",
        action="store_true",
        help="compare pass sizings (before/after/loop/stacked), one process per run",
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--calls", type=int, default=1, help="--sizing: calls per process")
    ap.add_argument("--threads", type=int, default=0, help="--sizing: torch threads (0: default)")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    if args.sizing:
        return _sizing(args)

    model, label, x, target, tam = _setup(args)

    ppe = args.ppe or None  # 0: TAM sizes its passes by its token budget alone
    got = tam.attribute(x, target=target, output="tokens", perturbations_per_eval=ppe)
    ref = loop_reference(model, x, target)
    max_err = (got - ref).abs().max().item()

    from captum.attr import FeatureAblation

    h, w = model.patch_embed.grid_size
    ph, pw = model.patch_embed.patch_size
    cells = torch.arange(h * w).reshape(1, 1, h, w)
    fmask = cells.repeat_interleave(ph, 2).repeat_interleave(pw, 3).expand(1, 3, -1, -1)
    fa = FeatureAblation(model)

    def forward():
        with torch.no_grad():
            model(x)

    rows = [
        ("forward (no grad)", median_time(forward, args.repeats)),
        (
            f"TAM (perturbations_per_eval={ppe})",
            median_time(
                lambda: tam.attribute(x, target=target, perturbations_per_eval=ppe),
                args.repeats,
            ),
        ),
        (
            "loop: batch 1, one token per forward",
            median_time(lambda: loop_reference(model, x, target), args.repeats),
        ),
        (
            f"Captum FeatureAblation, patch mask (ppe={args.ppe or 16})",
            median_time(
                lambda: fa.attribute(
                    x, target=target, feature_mask=fmask, perturbations_per_eval=args.ppe or 16
                ),
                args.repeats,
            ),
        ),
    ]
    tam_t = rows[1][1]
    print(
        f"model {label}, batch {args.batch}, {h * w} patch tokens, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; max |TAM - loop| = {max_err:.2e}"
    )
    print(table(rows, {"forward": rows[0][1], "TAM": tam_t}))
    print(f"\nTAM speed-up over the loop: {rows[2][1] / tam_t:.1f}x")


if __name__ == "__main__":
    main()
