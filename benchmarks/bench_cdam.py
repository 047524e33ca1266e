"""Cost of CDAM and the attention map against a plain forward / forward+backward and peers.

All timings in one run, on one model and one batch, as ratios (DESIGN.md §8):
CDAM target ≤ 0.45 × a forward+backward (the forward pass plus a backward
through the last block only); the attention map ≤ 1.15 × a forward.

    python benchmarks/bench_cdam.py [--model vit_small_patch16_224] [--batch 8] [--ig] [--memory]

``--memory`` also reports the peak memory of one call of forward, forward+backward and CDAM,
each in a fresh process: on CPU the rise of the peak resident set (VmHWM, reset through
``/proc/self/clear_refs``) over the resident set before the call; on CUDA
``torch.cuda.max_memory_allocated`` over the allocation before the call.

Peers on the same model: Captum ``LayerGradientXActivation`` on
``blocks[-1].norm1`` (the same quantity, computed by Captum's hooks),
pytorch-grad-cam ``GradCAM`` with a token ``reshape_transform``, and with
``--ig`` Captum ``IntegratedGradients`` (50 steps).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, table

from captum_ext import CDAM, AttentionMap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ig", action="store_true", help="also time IntegratedGradients (slow)")
    p.add_argument("--memory", action="store_true", help="also peak memory per call")
    p.add_argument("--memory-child", choices=MEMORY_CALLS, help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).to(args.device).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(args.batch, *cfg["input_size"], device=args.device)
    target = torch.arange(args.batch, device=args.device) % model.num_classes

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x).gather(1, target[:, None]).sum().backward()

    cdam = CDAM(model)
    if args.memory_child:
        calls = {
            "forward": forward,
            "forward+backward": forward_backward,
            "CDAM": lambda: cdam.attribute(x, target=target),
        }
        print(json.dumps({"peak_mib": _peak_mib(calls[args.memory_child], args.device)}))
        return
    am = AttentionMap(model)
    rows = [
        ("forward (no grad)", median_time(forward, args.repeats)),
        ("forward + backward", median_time(forward_backward, args.repeats)),
        ("CDAM", median_time(lambda: cdam.attribute(x, target=target), args.repeats)),
        (
            "CDAM, 4 targets (attribute_targets)",
            median_time(
                lambda: cdam.attribute_targets(x, [target, target + 1, target + 2, target + 3]),
                args.repeats,
            ),
        ),
        ("AttentionMap", median_time(lambda: am.attribute(x), args.repeats)),
    ]

    from captum.attr import IntegratedGradients, LayerGradientXActivation

    lgxa = LayerGradientXActivation(model, model.blocks[-1].norm1)
    rows.append(
        (
            "Captum LayerGradientXActivation",
            median_time(lambda: lgxa.attribute(x, target=target).sum(-1), args.repeats),
        )
    )
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        h, w = model.patch_embed.grid_size
        p_ = model.num_prefix_tokens

        def reshape(t):
            return t[:, p_:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)

        cam = GradCAM(model, [model.blocks[-1].norm1], reshape_transform=reshape)
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        rows.append(
            (
                "pytorch-grad-cam GradCAM",
                median_time(lambda: cam(input_tensor=x, targets=targets), args.repeats),
            )
        )
    except ImportError:
        print("pytorch-grad-cam not installed: skipping GradCAM", file=sys.stderr)
    if args.ig:
        ig = IntegratedGradients(model)
        rows.append(
            (
                "Captum IntegratedGradients (50 steps)",
                median_time(
                    lambda: ig.attribute(x, target=target, n_steps=50, internal_batch_size=64),
                    1,
                    0,
                ),
            )
        )
    base = {"forward": rows[0][1], "forward+backward": rows[1][1]}
    print(
        f"model {args.model}, batch {args.batch}, input {tuple(x.shape[1:])}, "
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(table(rows, base))
    if args.memory:
        peaks = {name: _peak_in_child(args, name) for name in MEMORY_CALLS}
        where = "peak RSS rise" if args.device == "cpu" else "peak CUDA allocation rise"
        print(f"\nmemory of one call ({where}, fresh process each): ", end="")
        print(", ".join(f"{name} {mib:.0f} MiB" for name, mib in peaks.items()))


MEMORY_CALLS = ("forward", "forward+backward", "CDAM")


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def _peak_mib(fn, device: str) -> float:
    """Peak memory in MiB that one call of ``fn`` adds.

    CUDA: after a warm-up call. CPU: the first call of the process, since memory freed by
    a warm-up call stays resident (glibc) and would hide the second call's peak.
    """
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def _peak_in_child(args: argparse.Namespace, name: str) -> float:
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--device", args.device, "--memory-child", name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


if __name__ == "__main__":
    main()
