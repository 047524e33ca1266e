"""The ``captum-ext`` command: ``demo``, ``explain``, ``evaluate`` and ``fit``.

One module per subcommand (:mod:`~captum_ext.cli.demo`, :mod:`~captum_ext.cli.explain`,
:mod:`~captum_ext.cli.evaluate`, :mod:`~captum_ext.cli.fit`), each with
``add_parser(subparsers)`` and ``run(args)``; what they share lives in :mod:`captum_ext.cli._common`. Models come from the library
function :func:`captum_ext.models.load`.

Mistakes in what was asked for (unknown model, method or file, CUDA that is not
there, an output folder that cannot be written, weights that do not fit, an unreadable
image) and the package's own errors (:mod:`captum_ext.errors`: a damaged zoo entry or
checkpoint, a model no method supports...) print one line on stderr and exit with
status 2, and leave no output behind: files are written to a temporary folder that is
moved into place at the end. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captum_ext import __version__

__all__ = ["build_parser", "main"]

PROG = "captum-ext"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-ext`` argument parser with its subcommands."""
    from captum_ext.cli import demo, evaluate, explain, fit

    parser = _Parser(
        prog=PROG,
        description="Class-discriminative explanations for Captum, on vision and text "
        "transformers (timm and HuggingFace ViTs, BERT-family classifiers, sentence encoders "
        "against a concept) and CNNs (timm and torchvision ResNet, VGG, EfficientNet): CDAM, "
        "TAM (token ablation), relevance propagation, attention rollout, the attention map, "
        "and the trainable T-TAME and MHEX (`fit` trains them for your model); on CNNs also "
        "Captum's GradCAM and IntegratedGradients as reference rows.",
        epilog="run `captum-ext COMMAND --help` for the options and examples of each command; "
        "`captum-ext demo` runs every method on the shipped trained models",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in (demo, explain, evaluate, fit):
        command.add_parser(sub).set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 for a mistake in the request).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    from captum_ext import errors
    from captum_ext.cli._common import CLIError, Terminated, as_flags, first_line

    # The package's own errors: each names what was wrong and what to do, in one line.
    # Anything else (a bug) keeps its traceback.
    own = tuple(getattr(errors, name) for name in errors.__all__)

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {first_line(err)}", file=sys.stderr)
        return 2
    except own as err:
        print(f"{PROG} {args.command}: error: {as_flags(first_line(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:  # SIGTERM while an output folder was being staged
        print(f"{PROG} {args.command}: terminated; nothing was written", file=sys.stderr)
        return int(stop.code)
