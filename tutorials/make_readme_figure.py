"""Regenerate the README's demo figure, ``docs/demo.png``, from the ``captum-ext demo`` pipeline.

The figure is the demo's ``explanations.png`` for the main zoo model (``shapes-vit``):
held-out benchmark images (seed ``captum_ext.cli.demo.DEMO_SEED``, half of them with two
objects), one row per present class, columns input, that class's ground-truth mask, every
registered method and the trained explainers the zoo ships for the model (T-TAME, MHEX). Runs
offline on CPU in seconds (the zoo weights ship with the package):

    python tutorials/make_readme_figure.py [--out docs/demo.png] [--n 4] [--dpi 90]

The PNG is kept under 300 KB (the script fails otherwise; lower ``--dpi``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from captum_ext.cli.demo import IMAGE_MODELS, image_grid  # the demo's own grid

MAX_BYTES = 300_000
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "demo.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model", default=IMAGE_MODELS[0], help="zoo image model")
    parser.add_argument("--n", type=int, default=4, help="held-out images")
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args()

    fig, summary = image_grid(args.model, args.n, "cpu", show_progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    size = args.out.stat().st_size
    print(
        f"{args.out}: {size / 1000:.0f} KB, {len(summary['rows'])} rows "
        f"(images {summary['images']} of seed {summary['seed']}), "
        f"methods {', '.join(summary['methods'])}"
    )
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is over {MAX_BYTES // 1000} KB; rerun with a lower --dpi")


if __name__ == "__main__":
    main()
