"""The ``captum-ext`` command: ``demo``, ``explain`` and ``evaluate``.

Mistakes in what was asked for (unknown model, method or file, CUDA that is not
there) print one line on stderr and exit with status 2, and leave no output
behind: files are written to a temporary folder that is moved into place at the
end. Heavy imports (torch, timm, transformers) happen inside the subcommands, so
``--help`` is quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captum_ext import __version__

__all__ = ["build_parser", "main"]

PROG = "captum-ext"

_DEMO_EPILOG = """\
examples:
  captum-ext demo                          # CPU, offline, writes ./captum-ext-demo/
  captum-ext demo --out /tmp/demo --n 6    # six held-out images per model
  captum-ext demo --device cuda

writes explanations.png (shapes-vit: rows = image x present class, columns = input,
ground-truth mask, every method), the same for shapes-vit-plain and shapes-vit-free
(explanations-NAME.png), text.html and text.png (text-bert), metrics.md and metrics.json
(captum_ext.evaluation).
"""

_EXPLAIN_EPILOG = """\
model specs:
  timm:ARCH   a timm architecture; weights from --weights FILE (never downloaded)
  hf:DIR      a HuggingFace folder written by save_pretrained (image or text classifier;
              text models use the tokenizer saved in DIR)
  zoo:NAME    a model shipped with captum_ext (see `captum-ext evaluate --help`)

examples:
  captum-ext explain --model timm:vit_small_patch16_224 --weights vit_s16.safetensors \\
      --image cat.png dog.jpg --method cdam --target 281 285
  captum-ext explain --model timm:vit_tiny_patch16_224 --weights tiny.safetensors \\
      --model-kwargs '{"img_size": 32, "patch_size": 8}' --image x.png --method tam
  captum-ext explain --model hf:./my-vit --image x.png --method relevance
  captum-ext explain --model hf:./my-bert --text "a great movie" --method cdam --target 1
  captum-ext explain --model zoo:shapes-vit --image shapes.png --method cdam --target circle

writes, per input and target: NAME_METHOD_classK.png (Captum blended_heat_map overlay,
400x400 px) and NAME_METHOD_classK.npy (the map in input space); for texts text.html,
text.png and token-score .npy files; always attributions.safetensors (every map) and
prediction.json (top classes and scores: softmax, or sigmoid for multi-label models).
Weights: .safetensors preferred; .pt/.pth/.bin are read with torch.load(weights_only=True).
"""

_EVALUATE_EPILOG = """\
examples:
  captum-ext evaluate                                   # every zoo model, default methods
  captum-ext evaluate --models shapes-vit --methods cdam tam --n 32 --out results/

writes metrics.md and metrics.json to --out and prints the markdown table.
"""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(low: int):
    """An argparse ``type`` for integers ``>= low`` (a bad value is a one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="cpu",
        metavar="cpu|cuda",
        help="where to run (default: cpu; cuda or cuda:N if available)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-ext`` argument parser with its three subcommands."""
    parser = _Parser(
        prog=PROG,
        description="Class-discriminative explanations of transformers for Captum: "
        "CDAM, TAM, relevance propagation, attention rollout, attention map.",
        epilog="run `captum-ext COMMAND --help` for the options and examples of each command",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    demo = sub.add_parser(
        "demo",
        help="explain the shipped zoo models on held-out benchmark data (offline, CPU, < 2 min)",
        description="Run every method on the shipped zoo models and held-out benchmark "
        "images and texts; write figures and a metrics table.",
        epilog=_DEMO_EPILOG,
        formatter_class=fmt,
    )
    demo.add_argument(
        "--out", default="captum-ext-demo", help="output folder (default: %(default)s)"
    )
    _add_device(demo)
    demo.add_argument(
        "--n",
        type=_count(1),
        default=4,
        help="held-out images (and texts) per model (default: %(default)s)",
    )
    demo.add_argument(
        "--eval-n",
        type=_count(1),
        default=32,
        help="images (texts) per model for the metrics table (default: %(default)s)",
    )

    explain = sub.add_parser(
        "explain",
        help="explain your own model on local images or texts",
        description="Explain a timm, HuggingFace or zoo model on local images or texts "
        "with one or more methods.",
        epilog=_EXPLAIN_EPILOG,
        formatter_class=fmt,
    )
    explain.add_argument(
        "--model", required=True, metavar="SPEC", help="timm:ARCH, hf:DIR or zoo:NAME"
    )
    explain.add_argument("--weights", metavar="PATH", help="weights file (.safetensors preferred)")
    explain.add_argument(
        "--model-kwargs", metavar="JSON", help="timm.create_model keyword arguments, as JSON"
    )
    inputs = explain.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", metavar="IMG", help="image files (read with PIL)")
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="texts to classify and explain")
    explain.add_argument(
        "--method",
        nargs="+",
        required=True,
        metavar="NAME",
        help="cdam, tam, relevance, rollout, attention_map (one or more)",
    )
    explain.add_argument(
        "--target",
        nargs="+",
        metavar="K",
        help="class indices or names to explain (default: the top class of each input)",
    )
    explain.add_argument(
        "--out", default="captum-ext-explain", help="output folder (default: %(default)s)"
    )
    _add_device(explain)

    evaluate = sub.add_parser(
        "evaluate",
        help="score the methods on the zoo models (localisation, discrimination, faithfulness)",
        description="Run captum_ext.evaluation.evaluate on zoo models and write the table.",
        epilog=_EVALUATE_EPILOG,
        formatter_class=fmt,
    )
    evaluate.add_argument("--models", nargs="+", metavar="NAME", help="zoo models (default: all)")
    evaluate.add_argument(
        "--methods", nargs="+", metavar="NAME", help="methods (default: the evaluation's own set)"
    )
    evaluate.add_argument(
        "--n", type=_count(1), default=64, help="examples per model (default: %(default)s)"
    )
    evaluate.add_argument(
        "--seed", type=int, help="data seed (default: the evaluation's held-out seed)"
    )
    evaluate.add_argument(
        "--bootstrap",
        type=_count(0),
        default=1000,
        help="bootstrap resamples for intervals (default: %(default)s)",
    )
    evaluate.add_argument(
        "--out", default="captum-ext-eval", help="output folder (default: %(default)s)"
    )
    _add_device(evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 for a mistake in the request).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    from captum_ext._cli_common import CLIError, first_line

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from captum_ext._cli_demo import run_demo

            return run_demo(args)
        if args.command == "explain":
            from captum_ext._cli_explain import run_explain

            return run_explain(args)
        from captum_ext._cli_demo import run_evaluate

        return run_evaluate(args)
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
