"""``captum-ext evaluate``: :func:`captum_ext.evaluation.evaluate` on zoo models.

Writes ``metrics.md`` and ``metrics.json`` to ``--out`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from captum_ext.cli._common import (
    ZOO_MODELS,
    HelpFormatter,
    add_device,
    add_quiet,
    check_methods,
    check_out_dir,
    count,
    resolve_device,
    run_metrics,
    staged_output,
    write_json,
)

__all__ = ["add_parser", "run"]

EPILOG = f"""\
zoo models:
  --models    {ZOO_MODELS}

examples:
  captum-ext evaluate                                   # every zoo model, default methods
  captum-ext evaluate --models shapes-vit --methods cdam tam --n 32 --out results/

writes metrics.md and metrics.json to --out and prints the markdown table.
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
        help="methods, or all (default: the evaluation's own set)",
    )
    p.add_argument(
        "--n", type=count(1), default=64, help="examples per model (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, help="data seed (default: the evaluation's held-out seed)")
    p.add_argument(
        "--bootstrap",
        type=count(0),
        default=1000,
        help="bootstrap resamples for intervals (default: %(default)s)",
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
    out = Path(args.out)
    check_out_dir(out)
    models = list(args.models or zoo.available())
    for name in models:
        parse_spec(f"zoo:{name}")  # an unknown name is one line naming the available ones
    methods = check_methods(args.methods) if args.methods else None
    show = not args.quiet
    md, data = run_metrics(models, methods, args.n, args.seed, args.bootstrap, device, show)
    with staged_output(out) as tmp:
        (tmp / "metrics.md").write_text(md)
        write_json(tmp / "metrics.json", {"n": args.n, "seed": args.seed, **data})
    print(md)
    print(f"wrote {out / 'metrics.md'} and {out / 'metrics.json'}")
    return 0
