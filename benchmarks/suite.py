"""Performance suite: every method of captum_ext and its peers, as ratios to a forward pass.

One command measures, on the zoo ViT / CNN / BERT, on untrained timm ViT-S/16 and ViT-B/16
and on an untrained torchvision ResNet-50 (the three at 224 px), every method of this package
(CDAM, concept-CDAM, TAM, relevance propagation, rollout, the attention map, and T-TAME / MHEX
where the zoo has a trained explainer; on the 224 px models an untrained T-TAME, for time
only) and the peers a user would pick instead (Captum ``LayerGradCam`` with a token->grid
reshape, ``LayerGradientXActivation`` on the last block's ``norm1`` (CDAM's quantity through
Captum's hooks), ``IntegratedGradients`` with 50 steps, ``Occlusion`` with patch windows,
``FeatureAblation`` with a patch mask, pytorch-grad-cam ``GradCAM``; on BERT:
``LayerIntegratedGradients`` on the embeddings and occlusion / ablation over tokens), plus two
references: the exact slow alternative of TAM (one token removed per forward) and relevance
propagation with ``streaming=False`` (every layer's attention gradient kept: its peak memory
against the streaming default). For each cell it records the time per explained example as a
ratio to one forward and to one forward+backward of the same model and batch, measured in the
same child process, interleaved, medians (``_suite_measure``: ``torch.utils.benchmark.Timer``
for repeated calls, one call per round for slow ones); the peak memory of one call; and, for
the zoo models, the quality metrics of ``benchmarks/results/report.json`` (pointing game,
deletion / insertion AUC; text: comprehensiveness, token AUPRC). Then scaling curves (batch
size, number of tokens, number of targets explained at once) and the DESIGN.md §8 targets,
met or missed.

    python benchmarks/suite.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
        [--threads N] [--isolate cell|model] [--models M ...] [--no-main] [--no-scaling]
        [--tam-sizing] [--min-run-time S] [--from-json FILE]

Writes ``suite.json`` (every number), ``suite.md`` (tables, targets, machine) and
``suite_batch.png``, ``suite_tokens.png``, ``suite_targets.png``; ``--quick`` (zoo models only,
batch 2, one timed round, a tiny ViT for the token curve) writes ``suite_quick.*`` instead and
is a smoke run of well under a minute. Batch sizes per cell: zoo models 16; ViT-S/16 8 (TAM,
the token loop, Occlusion, FeatureAblation, IG: 1); ViT-B/16 and ResNet-50 2 (slow ones 1).
The slow cells of the 224 px models are called once, and that call is both the memory and the
time measurement. ``--tam-sizing`` adds TAM's pass-sizing sweep: the default token budget
against fixed sizings (``B x 16`` rows per pass, one removal per example per pass, everything
in one pass), each in its own process, on the zoo ViT (batch 16) and ViT-S/16 (batch 2): time
of the first (calibrating) and later calls, rows per pass, peak memory. ``--from-json``
re-renders the markdown and plots of an earlier run without measuring.

The committed run and what it says: ``benchmarks/results/suite.md`` and ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import torch
from _suite_cases import METHODS, MULTI, SIZING, ZOO, model_family
from _suite_measure import Cell, measure
from _suite_report import write_outputs
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the plan
def _applicable(model: str, method: str) -> str | None:
    """``None`` when ``method`` applies to ``model``, else the reason it is skipped."""
    info = METHODS[method]
    family = model_family(model)
    if family not in info.families:
        return f"{info.label} does not apply to a {family.upper()} model"
    if method in ("ttame", "mhex") and model in ZOO:
        from captum_ext import zoo

        if f"{model}-{method}" not in zoo.available(kind="explainer"):
            return f"no trained {info.label} in the zoo for {model}"
    if method == "mhex" and model not in ZOO:
        return "no trained MHEX for this model (MHEX is trained into the network)"
    if method == "gradcam":
        try:
            import pytorch_grad_cam  # noqa: F401
        except ImportError:
            return "pytorch-grad-cam is not installed (pip install captum-ext[bench])"
    return None


MAIN_MODELS = (*ZOO, "vit-s16", "vit-b16", "resnet50")


def main_plan(
    quick: bool, models: list[str] | None = None
) -> tuple[list[Cell], dict[str, dict[str, str]]]:
    """Cells of the main table and the skipped (model, method) pairs with their reasons."""
    if quick:
        sizes = {m: (2, 1, 2, 1, 2) for m in ZOO}
    else:
        # model: (fast batch, fast repeats, slow batch, slow repeats, IG batch)
        sizes = {m: (16, 5, 16, 3, 16) for m in ZOO}
        sizes["vit-s16"] = (8, 3, 1, 1, 1)
        sizes["vit-b16"] = (2, 3, 1, 1, 1)
        sizes["resnet50"] = (2, 3, 1, 1, 1)
    if models:
        sizes = {m: v for m, v in sizes.items() if m in models}
    cells: list[Cell] = []
    skipped: dict[str, dict[str, str]] = {}
    for model, (fb, fr, sb, sr, igb) in sizes.items():
        for method, info in METHODS.items():
            reason = _applicable(model, method)
            if reason:
                skipped.setdefault(model, {})[method] = reason
                continue
            if method == "ig":
                cells.append(Cell(model, [method], igb, sr, slow=True))
            elif info.slow:
                cells.append(Cell(model, [method], sb, sr, slow=True))
            else:
                cells.append(Cell(model, [method], fb, fr))
    return cells, skipped


def scaling_plan(quick: bool) -> list[Cell]:
    """Cells of the three scaling curves (no memory; several methods per child)."""
    fast = ["cdam", "relevance", "rollout", "attention_map"]
    cells: list[Cell] = []
    if quick:
        for b in (1, 2, 4):
            cells.append(Cell("shapes-vit", [*fast, "ttame"], b, 1, "batch", memory=False))
        for s in (16, 32, 64):
            cells.append(
                Cell(f"tiny-vit@{s}", [*fast, "tam", "tam_loop"], 1, 1, "tokens", memory=False)
            )
        ks = (1, 2, 4)
        names = ["cdam_targets", "cdam_calls", "tam_targets", "mhex_targets"]
        cells.append(
            Cell("shapes-vit", [f"{n}@{k}" for k in ks for n in names], 2, 1, "targets", False)
        )
        return cells
    for b in (1, 2, 4, 8):
        cells.append(Cell("vit-s16", [*fast, "ttame"], b, 2, "batch", memory=False))
    for s in (64, 128, 224, 320, 448):
        cells.append(Cell(f"vit-s16@{s}", fast, 1, 2, "tokens", memory=False))
    # TAM against its loop in one process, interleaved (the main table's 224 px cells run each
    # in its own process for their memory, so their ratio divides two separately timed forwards)
    for s in (64, 128, 224):
        cells.append(
            Cell(f"vit-s16@{s}", ["tam", "tam_loop"], 1, 1, "tokens", memory=False, slow=True)
        )
    cells.append(Cell("vit-s8", fast, 1, 2, "tokens", memory=False))
    for k in (1, 2, 4, 8):
        names = ["cdam_targets", "cdam_calls", "relevance_calls"]
        cells.append(Cell("vit-s16", [f"{n}@{k}" for n in names], 2, 2, "targets", False))
    ks = (1, 2, 4, 8, 16)
    cells.append(Cell("vit-s16@64", [f"tam_targets@{k}" for k in ks], 2, 2, "targets", False))
    cells.append(
        Cell("shapes-vit", [f"mhex_targets@{k}" for k in (1, 2, 3, 4)], 16, 3, "targets", False)
    )
    return cells


def sizing_plan(quick: bool) -> list[Cell]:
    """Cells of the TAM pass-sizing sweep (``--tam-sizing``): one sizing per cell, so that each
    gets its own process (its peak memory, and the default's calibration from scratch)."""
    if quick:
        runs = [("shapes-vit", 2, 1, False)]
    else:
        runs = [("shapes-vit", 16, 5, False), ("vit-s16", 2, 2, True)]
    return [
        Cell(model, [f"tam_sizing@{v}"], batch, repeats, "sizing", slow=slow)
        for model, batch, repeats, slow in runs
        for v in SIZING
    ]


def _group_by_model(cells: list[Cell]) -> list[Cell]:
    """One cell per (model, batch, repeats, slow) holding all their methods (``--isolate model``)."""
    out: dict[tuple[Any, ...], Cell] = {}
    for c in cells:
        if c.series == "sizing":  # each pass sizing keeps its own process
            out[(id(c),)] = c
            continue
        key = (c.model, c.batch, c.repeats, c.slow, c.series, c.memory, c.min_run_time)
        if key in out:
            out[key].methods.extend(c.methods)
        else:
            out[key] = Cell(
                c.model,
                list(c.methods),
                c.batch,
                c.repeats,
                c.series,
                c.memory,
                c.slow,
                min_run_time=c.min_run_time,
            )
    return list(out.values())


# ------------------------------------------------------------------------- machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """What the numbers were measured on (the device name is filled in by a CUDA cell)."""
    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "captum": _version("captum"),
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "pytorch_grad_cam": _version("grad-cam"),
        "device": device,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = info["cpu"]
    return info


def _partial_payload(cells: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """A payload for the cells of an interrupted run (machine info taken now, marked so)."""
    machine = machine_info(args.device, args.threads)
    machine.update(
        wall_seconds=sum(c.get("cell_seconds", 0.0) for c in cells),
        isolation="cell",
        load_average_end=machine["load_average_start"],
        partial=True,
    )
    done = {(c["model"], m) for c in cells if c.get("series") == "main" for m in c["methods"]}
    plan, skipped = main_plan(args.quick, args.models)
    return {
        "command": "python benchmarks/suite.py (interrupted; rendered with --from-json)",
        "quick": args.quick,
        "machine": machine,
        "skipped": skipped,
        "main_models": sorted({c.model for c in plan}),
        "omitted_models": [],
        "not_reached": sorted(
            {f"{c.model}: {c.methods[0]}" for c in plan if (c.model, c.methods[0]) not in done}
        ),
        "cells": cells,
    }


# ------------------------------------------------------------------------------- main
def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the suite; returns what ``suite.json`` holds."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--quick", action="store_true", help="zoo models only, batch 2, one call")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--isolate",
        choices=("cell", "model"),
        default=None,
        help="a fresh process per (model, method) cell (default) or per model (--quick)",
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling curves")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of calls per round for each fast call (Timer.blocked_autorange; "
        "default 0.2, --quick 0.02)",
    )
    p.add_argument("--no-main", action="store_true", help="no main table")
    p.add_argument(
        "--tam-sizing",
        action="store_true",
        help="also TAM's pass-sizing sweep (default token budget vs fixed sizings)",
    )
    p.add_argument(
        "--models",
        nargs="*",
        default=None,
        choices=MAIN_MODELS,
        help="models of the main table (default: all; --quick: the zoo models)",
    )
    p.add_argument(
        "--report",
        default=str(REPO / "benchmarks" / "results" / "report.json"),
        help="quality metrics (benchmarks/report.py output)",
    )
    p.add_argument(
        "--from-json",
        default=None,
        help="re-write the markdown and plots from an earlier suite JSON (measures nothing)",
    )
    args = p.parse_args(argv)
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        if isinstance(payload, list):  # a *.partial.json of an interrupted run
            payload = _partial_payload(payload, args)
        write_outputs(payload, Path(args.out), Path(args.report))
        return payload
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here; run with --device cpu")
    isolate = args.isolate or ("model" if args.quick else "cell")
    t0 = time.perf_counter()
    machine = machine_info(args.device, args.threads)

    cells, skipped = main_plan(args.quick, args.models)
    if args.no_main:
        cells, skipped = [], {}
    if not args.no_scaling:
        cells += scaling_plan(args.quick)
    if args.tam_sizing:
        cells += sizing_plan(args.quick)
    min_run_time = args.min_run_time or (0.02 if args.quick else 0.2)
    for c in cells:
        c.min_run_time = min_run_time
    if isolate == "model":
        cells = _group_by_model(cells)
    results = []
    partial = Path(args.out) / ("suite_quick" if args.quick else "suite")
    partial = partial.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(cells, desc="suite", unit="cell")
    for cell in bar:
        bar.set_postfix_str(f"{cell.model} {','.join(cell.methods)[:40]} b{cell.batch}")
        res = measure(cell, args.device, args.threads, isolate=True)
        if "cell_error" in res:
            tqdm.write(f"[suite] {cell.model} {cell.methods}: {res['cell_error']}")
        results.append(res)
        partial.write_text(json.dumps(results, default=str))  # survives an interrupted run
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["wall_seconds"] = time.perf_counter() - t0
    machine["isolation"] = "process" if args.device.startswith("cuda") else isolate
    machine["timing"] = (
        "each round times every call of a cell in turn, by torch.utils.benchmark.Timer."
        f"blocked_autorange (warm-up, then {min_run_time:g} s of calls; median per call), "
        "slow methods by one call per round (a single-round slow cell: its first call)"
    )
    command = "python benchmarks/suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {
        "command": command.strip(),
        "quick": args.quick,
        "machine": machine,
        "methods": {k: {"label": v.label, "group": v.group} for k, v in METHODS.items()}
        | {k: {"label": v, "group": "targets"} for k, v in MULTI.items()}
        | {f"tam_sizing@{k}": {"label": v[0], "group": "sizing"} for k, v in SIZING.items()},
        "skipped": skipped,
        "main_models": sorted({c.model for c in cells if c.series == "main"} | set(skipped)),
        "omitted_models": [
            m for m in (ZOO if args.quick else MAIN_MODELS) if args.models and m not in args.models
        ],
        "cells": results,
    }
    write_outputs(payload, Path(args.out), Path(args.report))
    partial.unlink(missing_ok=True)
    return payload


if __name__ == "__main__":
    run()
