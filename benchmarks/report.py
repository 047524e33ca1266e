"""Benchmark report: every attribution method on every zoo model, with baselines and sanity checks.

Runs :func:`captum_ext.evaluation.evaluate` on the zoo models (localisation, discrimination,
sparsity, RISE deletion / insertion and correlation with TAM for the image models; ERASER
comprehensiveness / sufficiency and token AUPRC for the text model), repeats the evaluation on
further held-out seeds (smaller sets) to show how much the means move between data sets, and
runs the cascading model-parameter randomisation test (Adebayo et al. 2018) for CDAM and
relevance propagation on ``shapes-vit``. Writes ``report.md`` and ``report.json`` to ``--out``
and prints the markdown.

    HF_HUB_OFFLINE=1 python benchmarks/report.py [--n 256] [--models shapes-vit ...]
        [--methods cdam tam ...] [--out benchmarks/results] [--seeds 2] [--threads 1]
        [--paper-models shapes-vit-dino shapes-vit-fine --paper-n 512 | --paper-json PATH]

``--paper-models`` appends the CDAM paper's analysis (``benchmarks/paper_analysis.py``) of
those zoo ViTs on ``--paper-n`` fresh images to ``report.md`` (a section) and ``report.json``
(``paper_analysis``), and writes its figure ``paper_analysis.png``; by default it is not run.
``--paper-json PATH`` appends a stored run of ``paper_analysis.py`` instead (its JSON; the
section names that run's command), so the analysis is not computed twice.

ROAD (noisy linear imputation of every map and order) dominates the run time; ``--no-road``
skips it, and the committed report was made with ``--n 64``. The header of ``report.md`` and
``run`` in ``report.json`` record each run's times (earlier run times:
``benchmarks/results/README.md``). ``--threads 1`` is the default because on a busy two-core
machine one thread is several times faster than two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from captum_ext import zoo
from captum_ext.data import shapes
from captum_ext.evaluation import (
    DEFAULT_SEED,
    IMAGE_METRICS,
    TEXT_METRICS,
    EvalConfig,
    EvalResult,
    MapFn,
    evaluate,
)
from captum_ext.metrics import model_randomisation
from captum_ext.registry import METHODS, make_method

SEED_METRICS = {
    "image": ("relevance_mass_accuracy", "discrimination_score", "insertion_auc"),
    "text": ("comprehensiveness", "token_auprc"),
}
IG_STEPS = 32
SANITY_MODEL = "shapes-vit"
SANITY_METHODS = ("cdam", "relevance")


def _finite(x: Any) -> Any:
    """NaN floats to ``None`` (JSON ``null``), recursively."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def captum_peers(model_name: str, device: str) -> dict[str, MapFn]:
    """Captum's own methods on the same (image) model, evaluated like ours.

    Every image model: ``IntegratedGradients`` (``IG_STEPS`` steps, black baseline; the map
    is the signed sum over colour channels). The CNN also gets ``LayerGradCam`` on its last
    stage (ReLU, bilinear upsampling), the usual CNN reference. Text models: none (Captum's
    gradient methods need an embedding layer wrapper; our methods cover text).
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    info = zoo.info(model_name)
    if info["modality"] != "image":
        return {}
    model = zoo.load(model_name, device=device)
    ig = IntegratedGradients(model)
    peers: dict[str, MapFn] = {
        f"Captum IG ({IG_STEPS} steps)": lambda x, t: ig.attribute(
            x, target=t, n_steps=IG_STEPS, internal_batch_size=256
        ).detach()
    }
    if info["family"] == "cnn":
        cam = LayerGradCam(model, model.layer4)

        def gradcam(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            maps = cam.attribute(x, target=t, relu_attributions=True).detach()
            return LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), "bilinear")

        peers["Captum GradCAM (layer4)"] = gradcam
    return peers


def sanity(model_name: str, n_images: int, device: str) -> dict[str, Any]:
    """Cascading randomisation: Spearman similarity to the original map after each step.

    Returns:
        ``{"model", "n_images", "steps": [module names], "methods": {name: [similarity]},
        "verdict": {name: str}}``.
    """
    model = zoo.load(model_name, device=device)
    data = shapes(n_images, DEFAULT_SEED + 100, **zoo.data_kwargs(model_name))
    target = data.labels.argmax(dim=1).to(device)  # first present class
    images = data.images.to(device)
    out: dict[str, Any] = {"model": model_name, "n_images": n_images, "methods": {}, "verdict": {}}
    for name in SANITY_METHODS:

        def explain(m: torch.nn.Module, x: torch.Tensor, t: Any, name: str = name) -> torch.Tensor:
            return make_method(name, m).attribute(x, target=t, output="tokens")

        steps = model_randomisation(model, explain, images, target, similarity="spearman")
        out["steps"] = [s for s, _ in steps]
        sims = [v for _, v in steps]
        out["methods"][name] = sims
        finite = [v for v in sims if not math.isnan(v)]
        first, last = (finite[0], finite[-1]) if finite else (math.nan, math.nan)
        passed = bool(finite) and last < 0.5  # from 1.0 (the unrandomised map)
        out["verdict"][name] = (
            f"{'falls' if passed else 'does NOT fall enough'}: {first:.2f} after the first "
            f"step, {last:.2f} with every layer randomised (min {min(finite):.2f})"
            if finite
            else "undefined (constant maps)"
        )
    return out


def _group(module: str) -> str:
    """``blocks.3.mlp.fc2`` -> ``blocks.3``; ``patch_embed.proj.0`` -> ``patch_embed``."""
    if not module:
        return "(root: position embedding, CLS token)"
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("blocks", "layers") else parts[0]


def sanity_markdown(s: dict[str, Any]) -> str:
    names = list(s["methods"])
    lines = [
        f"## Sanity: cascading model-parameter randomisation ({s['model']})\n",
        f"Spearman rank correlation between the token map of the trained model and the map "
        f"after randomising the listed module and every module after it (from the head down; "
        f"Adebayo et al. 2018), mean over {s['n_images']} images, target = first present "
        "class. A method that depends on the learned parameters must fall towards 0.\n",
        "| step | randomised down to | " + " | ".join(METHODS[n].label for n in names) + " |",
        "|---:|---|" + "---:|" * len(names),
    ]
    groups = [_group(m) for m in s["steps"]]
    for i, group in enumerate(groups):
        if i + 1 < len(groups) and groups[i + 1] == group:
            continue  # show the state once each block / stage is fully randomised
        vals = " | ".join(f"{s['methods'][n][i]:.3f}" for n in names)
        lines.append(f"| {i + 1} | `{group}` | {vals} |")
    lines.append(
        f"\n{len(groups)} steps in all (one per module with parameters); the table shows the "
        "state after each group is fully randomised, `report.json` every step."
    )
    lines.append("")
    lines += [f"- {METHODS[n].label}: {s['verdict'][n]}." for n in names]
    return "\n".join(lines) + "\n"


def seeds_markdown(runs: list[tuple[int, int, EvalResult]], main: EvalResult) -> str:
    lines = [
        "## Seed stability\n",
        "Means on further held-out sets (other seeds, fewer items); the first value is the "
        "main run above. Intervals there are over images of one set; this shows how much a "
        "fresh set moves the means.\n",
    ]
    for model in main.models:
        modality = main.meta[model].get("modality", "image")
        metrics = [
            m
            for m in SEED_METRICS[modality]
            if any(r["metric"] == m for r in main.rows if r["model"] == model)
        ]
        if not metrics:
            continue
        seeds = [f"{DEFAULT_SEED} (n={main.meta[model]['n_images']})"] + [
            f"{s} (n={n})" for s, n, _ in runs
        ]
        lines.append(f"### {model}: seeds {', '.join(seeds)}\n")
        lines.append("| method | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        methods = list(dict.fromkeys(r["method"] for r in main.rows if r["model"] == model))
        for meth in methods:
            cells = []
            for metric in metrics:
                vals = []
                for res in [main] + [r for _, _, r in runs]:
                    try:
                        vals.append(f"{res.get(model, meth, metric)['mean']:.3f}")
                    except KeyError:
                        vals.append("—")
                cells.append(" / ".join(vals))
            label = next(
                r["label"] for r in main.rows if r["model"] == model and r["method"] == meth
            )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paper_part(
    models: list[str], n: int, bootstrap: int, steps: int, out: Path, **settings: Any
) -> tuple[str, dict[str, Any]]:
    """The CDAM paper's analysis of ``models`` (``benchmarks/paper_analysis.py``): its
    markdown section and its JSON payload (without the example image), and its figure
    written to ``out / "paper_analysis.png"``. ``settings``: further arguments of
    ``paper_analysis.run`` (``variant_samples``, ``concept_examples``, ``progress``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import paper_analysis

    result = paper_analysis.run(models, n=n, bootstrap=bootstrap, steps=steps, **settings)
    return _paper_outputs(paper_analysis, result, out, "")


def paper_json_part(path: Path, out: Path) -> tuple[str, dict[str, Any]]:
    """:func:`paper_part` of a stored ``benchmarks/paper_analysis.py`` run (its JSON), without
    recomputing: the section names the run's own command, and the figure is re-rendered.

    Raises:
        SystemExit: ``path`` is missing or not a paper-analysis JSON (one line).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import paper_analysis

    try:
        result = paper_analysis.load_result(path)
    except (OSError, ValueError) as err:
        sys.exit(f"--paper-json {path}: not a paper_analysis.py result ({err})")
    run = result["run"]
    note = (
        f"Computed by {paper_analysis.commands_markdown(run)} ({run['seconds']:.0f} s, "
        f"{run['threads']} thread(s)) and included from `{Path(path).name}`, not rerun here.\n\n"
    )
    return _paper_outputs(paper_analysis, result, out, note)


def _paper_outputs(
    paper_analysis: Any, result: dict[str, Any], out: Path, note: str
) -> tuple[str, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    paper_analysis.figure(result, out / "paper_analysis.png")
    section = paper_analysis.markdown_section(result) + "\nFigure: `paper_analysis.png`.\n"
    if note:
        head, _, rest = section.partition("\n\n")
        section = f"{head}\n\n{note}{rest}"
    payload = {**result, "models": [paper_analysis.without_example(m) for m in result["models"]]}
    return section, payload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="held-out items per model (main run)")
    p.add_argument("--models", nargs="*", default=None, help="zoo names (default: all)")
    p.add_argument("--methods", nargs="*", default=None, help="registry names (default: all)")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--seeds", type=int, default=2, help="extra held-out seeds (n/4 items each)")
    p.add_argument("--steps", type=int, default=16, help="RISE deletion/insertion steps")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument(
        "--no-road", action="store_true", help="skip ROAD (the slowest metric) in the main run"
    )
    p.add_argument("--sanity-images", type=int, default=16)
    p.add_argument("--no-sanity", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument(
        "--paper-models",
        nargs="*",
        default=None,
        help="zoo ViTs for the CDAM paper's analysis, appended to the report (default: none)",
    )
    p.add_argument("--paper-n", type=int, default=512, help="fresh images per paper model")
    p.add_argument(
        "--paper-json",
        metavar="PATH",
        default=None,
        help="append a stored paper_analysis.py result (its JSON) instead of --paper-models",
    )
    args = p.parse_args()
    if args.paper_json and args.paper_models:
        sys.exit("give --paper-models (compute) or --paper-json (include a stored run), not both")
    if args.threads:
        torch.set_num_threads(args.threads)

    available = zoo.available()
    models = args.models or available
    missing = [m for m in models if m not in available]
    if missing:
        sys.exit(f"zoo models not found: {missing}; available: {available or 'none'}")
    if not models:
        sys.exit("no zoo models found; train them with benchmarks/training/train_zoo.py")

    t0 = time.perf_counter()
    metrics = None if args.no_road else IMAGE_METRICS + TEXT_METRICS  # ROAD only when named
    config = EvalConfig(
        methods=args.methods,
        metrics=metrics,
        n=args.n,
        seed=DEFAULT_SEED,
        device=args.device,
        bootstrap=args.bootstrap,
        show_progress=args.progress,
        steps=args.steps,
    )
    peers = {m: captum_peers(m, args.device) for m in models}  # built once, used per seed
    result = EvalResult()
    for m in models:
        result = result + evaluate(m, config=config, extra_maps=peers[m])
        print(f"[report] {m}: {result.meta[m]['seconds']:.1f} s", file=sys.stderr)
    t_main = time.perf_counter() - t0
    for m in models:
        for phase in zoo.info(m).get("training", {}).get("phases") or []:
            if phase.get("source"):
                result.notes[m].append(
                    f"Backbone = {phase['source']}'s, frozen; only the linear head was trained "
                    f"here, so class-agnostic methods and baselines match {phase['source']}'s "
                    "rows up to RISE (which reads the head)."
                )

    runs: list[tuple[int, int, EvalResult]] = []
    n_seed = max(8, args.n // 4)
    for k in range(1, args.seeds + 1):
        seed = DEFAULT_SEED + k
        config_seed = config.replace(n=n_seed, seed=seed, bootstrap=0, metrics=None)
        run = EvalResult()
        for m in models:
            run = run + evaluate(m, config=config_seed, extra_maps=peers[m])
        runs.append((seed, n_seed, run))
        print(f"[report] seed {seed} done", file=sys.stderr)
    t_seeds = time.perf_counter() - t0 - t_main

    san = None
    if not args.no_sanity and SANITY_MODEL in models:
        san = sanity(SANITY_MODEL, args.sanity_images, args.device)
    paper = None
    if args.paper_json:
        paper = paper_json_part(Path(args.paper_json), Path(args.out))
    elif args.paper_models:
        paper = paper_part(
            args.paper_models,
            args.paper_n,
            args.bootstrap,
            args.steps,
            Path(args.out),
            progress=args.progress,
        )
    total = time.perf_counter() - t0

    argv = " ".join(sys.argv[1:])
    header = [
        "# captum_ext benchmark report\n",
        f"Command: `HF_HUB_OFFLINE=1 python benchmarks/report.py {argv}`".rstrip() + "  ",
        f"Run time: {total:.0f} s in all (main evaluation {t_main:.0f} s, extra seeds "
        f"{t_seeds:.0f} s), {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.machine()}. Main evaluation per "
        "model: " + ", ".join(f"{m} {result.meta[m]['seconds']:.0f} s" for m in models) + ".\n",
        "Every method explains every present class of every held-out image (a two-object "
        "image gives two maps). Columns: the pointing game of Zhang et al. (`pointing (15 px "
        "@224)`: the map's maximum within 15 px of the object at 224 px, scaled to the image: "
        "2 px at 32 px; maps and masks in pixels, every token-grid map upsampled bilinearly) "
        "and on the patch grid (`pointing (patch grid)`: the maximum cell inside the pooled "
        "mask, no tolerance; not comparable with published numbers), relevance mass and rank "
        "accuracy against the class's mask, the signed offset of the map's peak from the "
        "object's centre (`peak dx`, `peak dy`, px; > 0: right of / below it), sparsity (share of tokens below 5 % of the max), class "
        "discrimination D on two-object images (0.5 = class-agnostic), RISE deletion / "
        "insertion AUC, Average Drop (AD) / Increase in Confidence (IC) in % keeping 100/50/15 % "
        "of the min-max normalised map (T-TAME preset; target = the map's class, sigmoid "
        "score), "
        + (
            ""
            if args.no_road
            else "ROAD MoRF / LeRF (T-TAME preset: top-1 agreement with the clean prediction, "
            "mean over 10–90 % of pixels removed and imputed), "
        )
        + "and r(TAM), the Pearson correlation with token ablation's map. "
        "Cells are `mean [95 % bootstrap interval]`; ↑/↓ mark the better direction. "
        "Baselines: `random` (uniform noise) and `centre Gaussian`. Captum peers on the same "
        f"model: `IntegratedGradients` ({IG_STEPS} steps, black baseline, channel sum) on every "
        "image model, `LayerGradCam` on the CNN's last stage. T-TAME and MHEX: the zoo's "
        "trained explainers for the model (`NAME-ttame`, Ntrougkas et al. 2024; `NAME-mhex`, "
        "Sun & Liò, this package's reconstruction), maps in [0, 1].\n",
        "## Results\n",
    ]
    parts = ["\n".join(header), result.to_markdown()]
    if runs:
        parts.append(seeds_markdown(runs, result))
    if san is not None:
        parts.append(sanity_markdown(san))
    if paper is not None:
        parts.append(paper[0])
    md = "\n".join(parts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    payload = {
        **result.to_dict(),
        "seeds": [{"seed": s, "n": n, **r.to_dict()} for s, n, r in runs],
        "sanity": san,
        **({"paper_analysis": paper[1]} if paper is not None else {}),
        "run": {
            "command": f"python benchmarks/report.py {argv}".rstrip(),
            "seconds": round(total, 1),
            "seconds_main": round(t_main, 1),
            "seconds_seeds": round(t_seeds, 1),
            "device": args.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    text = json.dumps(_finite(payload), indent=1, ensure_ascii=False, allow_nan=False)
    (out / "report.json").write_text(text + "\n")
    print(md)


if __name__ == "__main__":
    main()
