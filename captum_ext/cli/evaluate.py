"""``captum-ext evaluate``: :func:`captum_ext.evaluation.evaluate` on zoo models.

Writes ``metrics.md`` and ``metrics.json`` to ``--out`` and prints the markdown table.

With ``--dataset`` (``shapes``, a folder of images or an ``ImageFolder`` tree) one model
(``--model SPEC`` or one ``--models NAME``) is evaluated on the whole dataset, in one process
or under ``torchrun``: each process scores its share of the chunks, every chunk's per-example
values are written as a resumable shard (``shard-CCCCC.safetensors`` + ``.json``, one
``index.json``), and the table is gathered from all of them (the same as one process gives);
rank 0 writes ``metrics.md`` / ``metrics.json`` beside the shards. See
:func:`captum_ext.evaluation.evaluate_dataset`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from captum_ext.cli._common import (
    DATASET_HELP,
    ZOO_MODELS,
    CLIError,
    HelpFormatter,
    add_chunk_size,
    add_device,
    add_num_examples,
    add_quiet,
    as_flags,
    check_methods,
    check_out_dir,
    count,
    first_line,
    is_main_process,
    model_kind,
    model_record,
    open_dataset,
    refuse_unsupported,
    resolve_device,
    run_metrics,
    split_trained,
    staged_output,
    write_json,
)

__all__ = ["add_parser", "run", "shards_line"]

EPILOG = f"""\
zoo models:
  --models    {ZOO_MODELS}

examples:
  captum-ext evaluate                                   # every zoo model, --methods all
  captum-ext evaluate --models shapes-vit --methods cdam tam --n 32 --out results/
  captum-ext evaluate --models shapes-cnn --methods gradcam ig ttame mhex --n 32
  captum-ext evaluate --models shapes-vit --dataset shapes --n 4096 --out shards/
  captum-ext evaluate --models shapes-vit --dataset my-photos/ --methods cdam --out ev/
  torchrun --nproc_per_node 8 -m captum_ext.cli evaluate --model hf:./my-vit \\
      --dataset imagenet-val/ --methods cdam --device cuda --out shards/

methods: cdam, tam, relevance, rollout, attention_map (transformers); gradcam, ig (Captum
references for CNNs); ttame, mhex (the zoo's fitted explainers of the model); all. Only
the named methods are scored, next to the random and centre-Gaussian baselines; without
--methods, every method of the package and every trained explainer the zoo ships for the
model. Named methods that do not explain the only model are refused; with several models
each gets those that apply.

writes metrics.md and metrics.json to --out and prints the markdown table. Its header says
what the data is: the zoo's benchmark (with the zoo's recorded held-out accuracy, on that
benchmark), or a folder (how many images, labels or not, no object masks; with labels, the
top-1 accuracy measured on these images). Metrics that could not be computed are listed
under the table, one line per reason.
--dataset also writes resumable shards and index.json there: run again to resume; the last
line says how many shards were computed and how many reused.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``evaluate`` subcommand to ``sub``."""
    p = sub.add_parser(
        "evaluate",
        help="score the methods on the zoo models (localisation, discrimination, faithfulness)",
        description="Run captum_ext.evaluation.evaluate on zoo models and write the table.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--models", nargs="+", metavar="NAME", help="zoo models (default: all)")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="methods (cdam ...; gradcam, ig on CNNs; ttame, mhex where the zoo ships them), "
        "or all (default: the evaluation's own set)",
    )
    add_num_examples(
        p, "examples per model (default: %(default)s; under torchrun write --num-examples)"
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="NAME",
        help="metrics to compute (default: all that apply but ROAD; see "
        "captum_ext.evaluation.IMAGE_METRICS)",
    )
    p.add_argument("--seed", type=int, help="data seed (default: the evaluation's held-out seed)")
    p.add_argument(
        "--bootstrap",
        type=count(0),
        default=1000,
        help="bootstrap resamples for intervals (default: %(default)s)",
    )
    p.add_argument("--dataset", metavar="SOURCE", help=DATASET_HELP)
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="--dataset: the model, timm:ARCH, torchvision:ARCH, hf:DIR or zoo:NAME (or one "
        "--models NAME)",
    )
    p.add_argument("--weights", metavar="PATH", help="--dataset: weights file of --model")
    add_chunk_size(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--dataset: replace an --out written with other settings",
    )
    p.add_argument("--out", default="captum-ext-eval", help="output folder (default: %(default)s)")
    add_device(p)
    add_quiet(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs ``captum-ext evaluate``."""
    from captum_ext import zoo
    from captum_ext.models import parse_spec

    device = resolve_device(args.device)
    if args.dataset:
        return _run_dataset(args, device)
    if args.metrics:
        raise CLIError("--metrics goes with --dataset")
    if args.model or args.weights:
        raise CLIError("--model and --weights go with --dataset; without it use --models NAME")
    out = Path(args.out)
    check_out_dir(out)
    models = list(args.models or zoo.available())
    for name in models:
        parse_spec(f"zoo:{name}")  # an unknown name is one line naming the available ones
    methods = check_methods(args.methods) if args.methods else None
    if methods is not None and len(models) == 1 and "all" not in map(str.lower, args.methods):
        family = zoo.info(models[0]).get("family")
        kind = "cnn" if family == "cnn" else "transformer"
        _check_supported(methods, f"zoo:{models[0]}", kind, zoo_name=models[0])
    show = not args.quiet
    md, data = run_metrics(models, methods, args.n, args.seed, args.bootstrap, device, show)
    with staged_output(out) as tmp:
        (tmp / "metrics.md").write_text(md)
        write_json(tmp / "metrics.json", {"n": args.n, "seed": args.seed, **data})
    print(md)
    print(f"wrote {out / 'metrics.md'} and {out / 'metrics.json'}")
    return 0


def _run_dataset(args: argparse.Namespace, device: str) -> int:
    """``evaluate --dataset``: one model on a whole dataset, sharded, the table on rank 0."""
    from captum_ext.distributed import local_device
    from captum_ext.evaluation import DEFAULT_SEED, ShardedOutputError, evaluate_dataset
    from captum_ext.models import load

    if args.model and args.models:
        raise CLIError("--dataset takes one model: --model SPEC or one --models NAME, not both")
    if not args.model and len(args.models or []) != 1:
        raise CLIError("--dataset takes one model: --model SPEC or one --models NAME")
    spec = args.model or f"zoo:{args.models[0]}"
    device = str(local_device(device))
    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.is_file():
        raise CLIError(f"--weights {weights}: no such file")
    out = Path(args.out)
    check_out_dir(out)
    methods = check_methods(args.methods) if args.methods else None
    loaded = load(spec, weights, device)
    zoo_name = spec[4:] if spec.startswith("zoo:") and weights is None else None
    seed = DEFAULT_SEED if args.seed is None else args.seed
    settings: dict[str, Any] = {"bootstrap": args.bootstrap, "device": device, "seed": seed}
    if methods is not None:
        if "all" not in map(str.lower, args.methods):
            _check_supported(methods, spec, model_kind(loaded.model), zoo_name=zoo_name)
        methods, settings["explainers"] = split_trained(methods)
    data = open_dataset(args.dataset, loaded, args.n, seed)
    main = is_main_process()
    if args.metrics:
        settings["metrics"] = args.metrics
    if zoo_name is None:
        settings["score"] = "sigmoid" if loaded.multi_label else "softmax"
    try:
        result = evaluate_dataset(
            zoo_name or loaded.model,
            data,
            out,
            methods,
            chunk_size=args.chunk_size,
            name=zoo_name or spec,
            model_record=model_record(spec, loaded.model),
            overwrite=args.overwrite,
            show_progress=not args.quiet and main,
            **settings,
        )
    except (ShardedOutputError, ValueError) as err:
        raise CLIError(as_flags(first_line(err), out)) from err
    if not main:
        return 0
    md = result.to_markdown()
    (out / "metrics.md").write_text(md)
    meta = {"n": len(data), "seed": seed, "dataset": data.describe()}
    write_json(out / "metrics.json", {**meta, **result.to_dict()})
    print(md)
    print(f"wrote {out / 'metrics.md'}, {out / 'metrics.json'}, {shards_line(result, out)}")
    return 0


def _check_supported(methods: list[str], spec: str, kind: str, zoo_name: str | None) -> None:
    """Refuses, in one line, a named method that does not explain the model: a transformer
    method on a CNN, a Captum reference on a transformer, or a trained explainer the zoo
    ships no fitted entry of for the model."""
    from captum_ext import zoo
    from captum_ext.registry import METHODS, REFERENCES, TRAINED

    for m in methods:
        if (m in METHODS and kind == "cnn") or (m in REFERENCES and kind != "cnn"):
            raise refuse_unsupported(m, spec, kind)
        if m in TRAINED:
            entry = (zoo_name or "") + TRAINED[m].zoo_suffix
            if zoo_name is None or entry not in zoo.available(kind="explainer"):
                raise CLIError(
                    f"{m} on {spec}: evaluate runs the zoo's fitted {m} of a zoo model, and "
                    f"the zoo ships none for it; explain it with captum-ext explain --method "
                    f"{m} --explainer FILE"
                )


def shards_line(result: Any, out: Path) -> str:
    """How many shards a ``--dataset`` run wrote, computed and reused, as ``explain
    --dataset`` says it: ``"4 shards in OUT/ (1 computed, 3 reused) and OUT/index.json"``."""
    computed, reused = len(result.shards["computed"]), len(result.shards["reused"])
    return (
        f"{computed + reused} shards in {out}/ ({computed} computed, {reused} reused) "
        f"and {out / 'index.json'}"
    )
