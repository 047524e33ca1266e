"""Cost of T-TAME inference against one plain forward, Captum ``Occlusion`` and Captum IG.

In one run on the same model and batch (target = the predicted class):
- a plain forward of the classifier (``torch.no_grad``);
- T-TAME ``attribute`` (one forward of the backbone with three feature hooks, the attention
  mechanism on the target's class only, bilinear upsampling to the input);
- Captum ``Occlusion`` at patch granularity (sliding window = stride = one patch over all
  channels, zero baseline, ``perturbations_per_eval`` = number of windows): one forward per
  patch per image, so its cost grows with the number of patches;
- Captum ``IntegratedGradients``, 50 steps (``internal_batch_size`` = 50 × batch).

Models: the zoo's ``shapes-vit`` and ``shapes-cnn`` with their shipped T-TAME
(``shapes-vit-ttame``, ``shapes-cnn-ttame``), 32 px, batch 16, patch 8 px (16 patches); with
``--large``, an untrained torchvision ResNet-50 and an untrained timm ViT-S/16 at 224 px with a
freshly initialised (untrained) T-TAME, patch 16 px (196 patches), batch ``--large-batch``:
time only, the maps mean nothing.

Targets (DESIGN.md §8): T-TAME ≤ 1.15 × a plain forward; ≥ 100 × faster than Occlusion at
patch granularity; ≥ 10 × faster than IG (50 steps).

    python benchmarks/bench_ttame.py [--batch 16] [--threads 1] [--large] [--large-batch 2]

Measured 2026-12-01 on the development machine (CPU, 1 thread, both cores busy with a
concurrent training job, so ratios moved between runs), ``python benchmarks/bench_ttame.py``,
batch 16, 32 px, 16 patches:

- shapes-cnn: forward 0.045 s, T-TAME 0.049 s = 1.10× a forward (1.17× in a second run);
  Occlusion 0.61 s = 12× T-TAME; IG (50 steps) 6.7 s = 135× T-TAME.
- shapes-vit: forward 0.019 s, T-TAME 0.027 s = 1.45× (1.65× in a second run): above the
  1.15× target on this tiny model, where a forward is ~1 ms per image and the three hooks,
  the mechanism and the upsampling are a fixed cost of a few ms; Occlusion 0.30 s = 11×
  T-TAME; IG 2.5 s = 92× T-TAME.

Occlusion's cost is one forward per patch, so with 16 patches it cannot be 100× T-TAME; the
≥ 100× target is about 224 px inputs with 196 patches. ``--large --large-batch 2 --repeats
10``, same run: untrained ResNet-50, 2 × 224 px: forward 0.86 s, T-TAME (untrained) 1.05 s =
1.22×; Occlusion (196 patches of 16 px) 145 s = 138× T-TAME; IG 136 s = 130× T-TAME (one
timed call each). ViT-S/16 at 224 px: not yet recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, table

IG_STEPS = 50


def zoo_case(name: str, batch: int):
    """``(label, model, explainer, images, patch)`` for a zoo model and its shipped T-TAME."""
    from captum_ext import zoo
    from captum_ext.data import shapes

    model = zoo.load(name)
    explainer = zoo.load(f"{name}-ttame")
    data = shapes(batch, 1, **zoo.data_kwargs(name))
    patch = int(getattr(data, "patch", 8))
    return f"zoo {name} ({batch} × 32 px)", model, explainer, data.images, patch


def large_cases(batch: int):
    """Untrained ResNet-50 and ViT-S/16 at 224 px, each with a fresh (untrained) T-TAME."""
    import timm
    import torchvision

    from captum_ext import TTAME

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    resnet = torchvision.models.resnet50(weights=None).eval()
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    for label, model in (("ResNet-50", resnet), ("ViT-S/16", vit)):
        yield f"untrained {label} ({batch} × 224 px)", model, TTAME(model).eval(), x, 16


def measure(label, model, explainer, x, patch: int, repeats: int) -> str:
    from captum.attr import IntegratedGradients, Occlusion

    with torch.no_grad():
        target = model(x).argmax(1)
    windows = (x.shape[-2] // patch) * (x.shape[-1] // patch)
    occ = Occlusion(model)
    ig = IntegratedGradients(model)

    def forward():
        with torch.no_grad():
            model(x)

    def ttame():
        explainer.attribute(x, target=target)

    def occlusion():
        occ.attribute(
            x,
            sliding_window_shapes=(x.shape[1], patch, patch),
            strides=(x.shape[1], patch, patch),
            target=target,
            perturbations_per_eval=windows,
        )

    def integrated():
        ig.attribute(x, target=target, n_steps=IG_STEPS, internal_batch_size=IG_STEPS * len(x))

    slow = max(1, repeats // 5)
    t_fwd = median_time(forward, repeats=repeats * 4)
    t_tt = median_time(ttame, repeats=repeats * 4)
    t_occ = median_time(occlusion, repeats=slow, warmup=0 if slow == 1 else 1)
    t_ig = median_time(integrated, repeats=slow, warmup=0 if slow == 1 else 1)
    rows = [
        ("forward", t_fwd),
        ("T-TAME attribute", t_tt),
        (f"Captum Occlusion ({windows} patches of {patch} px)", t_occ),
        (f"Captum IG ({IG_STEPS} steps)", t_ig),
    ]
    head = (
        f"### {label}\n\nT-TAME / forward = {t_tt / t_fwd:.2f}×; Occlusion / T-TAME = "
        f"{t_occ / t_tt:.0f}×; IG / T-TAME = {t_ig / t_tt:.0f}×\n"
    )
    return head + "\n" + table(rows, {"forward": t_fwd, "T-TAME": t_tt}) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--large", action="store_true", help="also ResNet-50 and ViT-S/16 at 224 px")
    p.add_argument("--large-batch", type=int, default=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [zoo_case(n, args.batch) for n in ("shapes-vit", "shapes-cnn")]
    for case in cases:
        print(measure(*case, repeats=args.repeats), flush=True)
    if args.large:
        for case in large_cases(args.large_batch):
            print(measure(*case, repeats=1), flush=True)


if __name__ == "__main__":
    main()
