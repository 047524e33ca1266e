"""Cost and memory of relevance propagation (RP) and attention rollout.

In one run on the same model and batch (DESIGN.md §8):
- RP time relative to one forward+backward (target ≤ 1.2×), and Captum
  ``LayerGradientXActivation`` on the last block's norm1 (one gradient to one
  layer: what CDAM costs) as a gradient peer;
- peak memory of the streaming RP (readout row accumulated in the backward
  pass, O(B·N) extra) against the naive path that keeps all L attention
  gradients (B, H, N, N): each mode runs in a fresh subprocess and reports its
  peak resident memory (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA);
- rollout and the attention map relative to one forward (target ≤ 1.15×).

    python benchmarks/bench_relevance.py [--model zoo:shapes-vit | vit_small_patch16_224] [--batch 8]

``zoo:NAME`` is a shipped trained model (32 px, 17 tokens); a timm name builds that
architecture with random weights (ViT-S/16: 197 tokens, where memory differences show).

Measured 2026-11-30 on the development machine (CPU, 2 threads, other work running), ratios
to one forward+backward (RP) or one no-grad forward (rollout, attention map):

| model, batch | RP streaming | RP naive | Captum LGXA | rollout | attention map |
|---|---:|---:|---:|---:|---:|
| zoo:shapes-vit, 8 | 0.76× f+b | 0.78× f+b | 0.48× f+b | 1.47× fwd | 1.41× fwd |
| vit_small_patch16_224, 8 | 0.71× f+b | 0.78× f+b | 0.36× f+b | 1.04× fwd | 0.93× fwd |

RP needs no parameter gradients (``torch.autograd.grad`` to the attention probabilities
only), hence below one forward+backward. On the 17-token zoo model the eager attention that
rollout needs (SDPA returns no probabilities) and the hooks are a visible fixed cost; on
ViT-S they are within noise. Peak RSS was equal for streaming and naive (780 MiB zoo,
1738 MiB ViT-S) although naive keeps 12 × 7.1 MiB of attention gradients on ViT-S: the
process peak is set by the autograd graph earlier in the backward pass. That streaming
keeps no (B, H, N, N) gradient alive is asserted in tests/test_relevance.py by weak
references; the CUDA allocator's peak (``--device cuda``) is the sharper measurement and
was not taken (no GPU in these sessions).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import timm
import torch
from captum.attr import LayerGradientXActivation

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, table

from captum_ext import AttentionMap, AttentionRollout, RelevancePropagation


def build(name: str, device: str) -> torch.nn.Module:
    """``zoo:NAME`` loads a shipped zoo model; anything else is a timm architecture (random)."""
    if name.startswith("zoo:"):
        from captum_ext import zoo

        return zoo.load(name[4:]).to(device).eval()
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).to(device).eval()


def inputs(model: torch.nn.Module, batch: int, device: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(batch, 3, *model.patch_embed.img_size, device=device)


def peak_memory(args: argparse.Namespace, streaming: bool) -> float:
    """Peak memory in MiB of one RP call in a fresh process."""
    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--memory-child",
        "stream" if streaming else "naive",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def memory_child(args: argparse.Namespace) -> None:
    model = build(args.model, args.device)
    x = inputs(model, args.batch, args.device)
    rp = RelevancePropagation(model, streaming=args.memory_child == "stream")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        rp.attribute(x, target=1)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        rp.attribute(x, target=1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:shapes-vit")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-child", choices=["stream", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    model = build(args.model, args.device)
    x = inputs(model, args.batch, args.device)
    target = torch.arange(args.batch, device=args.device) % model.num_classes

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x).gather(1, target[:, None]).sum().backward()

    rp = RelevancePropagation(model)
    naive = RelevancePropagation(model, streaming=False)
    rollout = AttentionRollout(model)
    am = AttentionMap(model)
    lgxa = LayerGradientXActivation(model, model.blocks[-1].norm1)
    rows = [
        ("forward (no grad)", median_time(forward, args.repeats)),
        ("forward + backward", median_time(forward_backward, args.repeats)),
        (
            "RelevancePropagation (streaming)",
            median_time(lambda: rp.attribute(x, target=target), args.repeats),
        ),
        (
            "RelevancePropagation (naive)",
            median_time(lambda: naive.attribute(x, target=target), args.repeats),
        ),
        (
            "Captum LayerGradientXActivation (last norm1)",
            median_time(lambda: lgxa.attribute(x, target=target), args.repeats),
        ),
        ("AttentionRollout", median_time(lambda: rollout.attribute(x), args.repeats)),
        ("AttentionMap", median_time(lambda: am.attribute(x), args.repeats)),
    ]
    print(
        f"model {args.model}, batch {args.batch}, input {tuple(x.shape[1:])}, device "
        f"{args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(table(rows, {"forward": rows[0][1], "forward+backward": rows[1][1]}))
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    layer_grad = args.batch * model.blocks[0].attn.num_heads * n * n * 4 / 2**20
    stream, full = peak_memory(args, True), peak_memory(args, False)
    kind = "peak RSS of the process" if args.device == "cpu" else "peak CUDA allocation"
    print(
        f"\nmemory ({kind}): streaming {stream:.0f} MiB, naive {full:.0f} MiB, "
        f"difference {full - stream:.0f} MiB; one layer's (B,H,N,N) gradient is "
        f"{layer_grad:.1f} MiB, all {len(model.blocks)} layers {layer_grad * len(model.blocks):.0f} MiB"
    )


if __name__ == "__main__":
    main()
