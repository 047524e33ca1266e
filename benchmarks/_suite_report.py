"""The performance suite's outputs: ``suite.json``, the markdown table, the targets and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from _suite_cases import METHODS, MULTI, SIZING, model_label

IMAGE_QUALITY = (
    ("pointing_game", "pointing (15 px @224) ↑"),
    ("deletion_auc", "deletion ↓"),
    ("insertion_auc", "insertion ↑"),
)
TEXT_QUALITY = (("comprehensiveness", "comp. ↑"), ("token_auprc", "AUPRC ↑"))
OURS = ("cdam", "concept_cdam", "tam", "relevance", "rollout", "attention_map", "ttame", "mhex")


# ------------------------------------------------------------------------------ lookups
def main_rows(payload: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {method: row}}`` of the main table; a row is the method's result plus its
    cell's ``batch``, ``forward_s``, ``forward_backward_s`` and ``tokens``."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in payload["cells"]:
        if cell.get("series") != "main":
            continue
        model = cell["model"]
        if "cell_error" in cell:
            for m in cell["requested"]["methods"]:
                rows.setdefault(model, {})[m] = {
                    "error": cell["cell_error"],
                    "batch": cell["batch"],
                }
            continue
        for m, res in cell["methods"].items():
            row = dict(res)
            for k in ("batch", "forward_s", "forward_backward_s", "tokens", "input"):
                row[k] = cell.get(k)
            rows.setdefault(model, {})[m] = row
    for model, reasons in payload.get("skipped", {}).items():
        for m, why in reasons.items():
            rows.setdefault(model, {})[m] = {"skipped": why}
    return rows


def _quality(report: Path) -> dict[tuple[str, str, str], float]:
    try:
        data = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {(r["model"], r["method"], r["metric"]): r["mean"] for r in data.get("rows", [])}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.{max(digits - 1, 1)}f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.{digits}f}" if abs(v) >= 0.01 else f"{v:.2e}"
    return str(v)


# ------------------------------------------------------------------------------- targets
def targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every DESIGN.md §8 target on every model where it was measured, with met / missed."""
    rows = main_rows(payload)
    out: list[dict[str, Any]] = []

    def add(target: str, model: str, value: float | None, bound: float, upper: bool, how: str):
        if value is None:
            return
        met = value <= bound if upper else value >= bound
        out.append(
            {
                "target": target,
                "model": model,
                "measured": value,
                "bound": bound,
                "upper": upper,
                "how": how,
                "met": bool(met),
            }
        )

    def get(model: str, method: str, key: str) -> float | None:
        v = rows.get(model, {}).get(method, {}).get(key)
        return float(v) if isinstance(v, int | float) else None

    for model in rows:
        add(
            "CDAM ≤ 0.45× forward+backward",
            model,
            get(model, "cdam", "x_forward_backward"),
            0.45,
            True,
            "× fwd+bwd",
        )
        add(
            "RP ≤ 1.2× forward+backward",
            model,
            get(model, "relevance", "x_forward_backward"),
            1.2,
            True,
            "× fwd+bwd",
        )
        add(
            "rollout ≤ 1.15× forward",
            model,
            get(model, "rollout", "x_forward"),
            1.15,
            True,
            "× fwd",
        )
        add(
            "attention map ≤ 1.15× forward",
            model,
            get(model, "attention_map", "x_forward"),
            1.15,
            True,
            "× fwd",
        )

        # Across cells (measured minutes apart, perhaps under another load) compare the
        # cost in units of each cell's own forward (per example, whatever the cell's batch).
        def per_fwd(method: str, model: str = model) -> float | None:
            return get(model, method, "x_forward")

        tam, loop = per_fwd("tam"), per_fwd("tam_loop")
        if tam and loop:
            add(
                "TAM never slower than the exact loop (one token per forward)",
                model,
                loop / tam,
                1.0,
                False,
                "loop ÷ TAM, each in its own forwards",
            )
        for m, label in (("ttame", "T-TAME"), ("mhex", "MHEX")):
            add(f"{label} ≤ 1.15× forward", model, per_fwd(m), 1.15, True, "× fwd")
        occ, tt = per_fwd("occlusion"), per_fwd("ttame")
        if occ and tt:
            add(
                "T-TAME ≥ 100× faster than patch Occlusion",
                model,
                occ / tt,
                100.0,
                False,
                "Occlusion ÷ T-TAME, each in its own forwards",
            )
        ig = per_fwd("ig")
        for m in OURS:
            t = per_fwd(m)
            if ig and t:
                add(
                    f"{METHODS[m].label} ≥ 10× faster than IG-50",
                    model,
                    ig / t,
                    10.0,
                    False,
                    "IG ÷ method, each in its own forwards",
                )
    for cell in payload["cells"]:  # TAM against its loop at every size of the token curve
        if cell.get("series") != "tokens" or "cell_error" in cell:
            continue
        ms = cell["methods"]
        if "seconds" in ms.get("tam", {}) and "seconds" in ms.get("tam_loop", {}):
            add(
                "TAM never slower than the exact loop (one token per forward)",
                f"{cell['model']} ({cell['tokens']} tokens, batch {cell['batch']})",
                ms["tam_loop"]["seconds"] / ms["tam"]["seconds"],
                1.0,
                False,
                "loop time ÷ TAM time",
            )
    return out


# ------------------------------------------------------------------------------ markdown
def markdown(payload: dict[str, Any], report: Path, plots: list[str]) -> str:
    m = payload["machine"]
    quality = _quality(report)
    load = m.get("load_average_start")
    lines = [
        "# captum_ext performance suite" + (" (quick)" if payload["quick"] else "") + "\n",
        f"Command: `{payload['command']}`  ",
        f"Run: {m['date_utc']}, git {m['git_commit']}{' (+ local changes)' if m['git_dirty'] else ''}"
        f", wall time {m['wall_seconds']:.0f} s; "
        + {
            "cell": "each (model, method) cell in a fresh process.  ",
            "model": "one fresh process per model (memory of later methods is approximate).  ",
        }.get(m["isolation"], "every cell in the suite's process (CUDA).  "),
        f"Machine: {m['device_name']} ({m['device']}), {m['cores']} cores, {m['threads']} torch "
        f"thread(s); Python {m['python']}, torch {m['torch']}, captum {m['captum']}, timm "
        f"{m['timm']}, transformers {m['transformers']}, pytorch-grad-cam {m['pytorch_grad_cam']}.",
        "",
    ]
    for note in payload.get("notes", []):
        lines += [f"> {note}", ""]
    if payload.get("not_reached"):
        lines += [
            "> **Interrupted run**: these cells were not reached before the run was stopped: "
            + "; ".join(payload["not_reached"])
            + ". Wall time is the sum of the finished cells.",
            "",
        ]
    if payload.get("omitted_models"):
        lines += [
            "> Not measured in this run (left out with `--models` to fit the time available): "
            + ", ".join(f"{x} ({model_label(x)})" for x in payload["omitted_models"])
            + ".",
            "",
        ]
    if load:
        lines += [
            f"> Load average at start {load[0]:.1f}, at end {m['load_average_end'][0]:.1f} (1 min) "
            f"on {m['cores']} cores. "
            + (
                "The machine was shared with other jobs during this run, so absolute times are "
                "inflated and noisy; the ratios compare calls interleaved in the same process "
                "within seconds of each other, which is what the targets use."
                if load[0] > 0.5 * (m["cores"] or 1)
                else "The machine was otherwise idle."
            ),
            "",
        ]
    timing = m.get("timing")  # absent in runs before the Timer harness
    lines += [
        (
            f"Time: {timing}; the median over the rounds of one explanation call of the whole "
            "batch, divided by the batch (s / example)"
            if timing
            else "Time: median over the timed calls of one explanation call of the whole batch, "
            "divided by the batch (s / example)"
        )
        + "; × fwd and × fwd+bwd divide by a forward (no grad) and a "
        "forward+backward (logit of the target, backward to every parameter) of the same model "
        "and batch, measured in the same process, interleaved with the method. Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated` after a reset, minus what was allocated before."
            if m["device"].startswith("cuda")
            else "the high-water mark of the process's resident set during the first call minus the "
            "resident set before it (Linux VmHWM), in a fresh process."
        )
        + " Quality columns (zoo models) are read from `benchmarks/results/report.json` "
        "(`benchmarks/report.py`), not recomputed; IG's come from the report's 32-step IG, "
        "the CNN's LayerGradCam from its `layer4` GradCAM row.\n",
        "## Targets (DESIGN.md §8)\n",
        "| target | model | measured | bound | met |",
        "|---|---|---:|---:|---|",
    ]
    for t in targets(payload):
        bound = ("≤ " if t["upper"] else "≥ ") + _fmt(t["bound"])
        lines.append(
            f"| {t['target']} | {t['model']} | {_fmt(t['measured'])} ({t['how']}) | "
            f"{bound} | {'met' if t['met'] else '**missed**'} |"
        )
    lines.append("")
    lines.append("## Main table\n")
    for model, methods in main_rows(payload).items():
        any_row = next((r for r in methods.values() if "batch" in r and "tokens" in r), {})
        shape = "×".join(str(s) for s in any_row.get("input") or [])
        tokens = any_row.get("tokens")
        lines.append(
            f"### {model}: {model_label(model)}"
            + (f", input {shape}" if shape else "")
            + (f", {tokens} tokens" if tokens else "")
            + "\n"
        )
        text = model == "text-bert"
        qual = TEXT_QUALITY if text else IMAGE_QUALITY
        has_q = any((model, METHODS[k].quality or "", qual[0][0]) in quality for k in methods)
        head = "| method | batch | calls | s / example | × fwd | × fwd+bwd | peak MiB |" + (
            "".join(f" {q[1]} |" for q in qual) if has_q else ""
        )
        lines += [
            head,
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" * len(qual) if has_q else ""),
        ]
        for key in METHODS:
            row = methods.get(key)
            if row is None:
                continue
            label = METHODS[key].label
            if METHODS[key].group == "peer":
                label = f"*{label}*"
            if "skipped" in row or "error" in row:
                why = row.get("skipped") or f"error: {row['error']}"
                blank = [""] * (3 + (len(qual) if has_q else 0))
                lines.append("| " + " | ".join([label, "—", "—", why, *blank]) + " |")
                continue
            if row.get("note"):
                label += f" ({row['note']})"
            calls = f"{row.get('timed_calls', '—')}" + ("" if row.get("warmup", 1) else " (cold)")
            cells = [
                label,
                str(row.get("batch")),
                calls,
                _fmt(row.get("seconds_per_example"), 4),
                _fmt(row.get("x_forward")),
                _fmt(row.get("x_forward_backward")),
                _fmt(row.get("peak_mib"), 1),
            ]
            if has_q:
                q = METHODS[key].quality
                cells += [_fmt(quality.get((model, q, metric))) if q else "—" for metric, _ in qual]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "Peers in *italics*. Rows with (cold) were timed on their single call (slow "
        "cells: the call that also measured memory). Batches differ between rows only "
        "where the batch column says so; ratios always use the forward of the row's own "
        "batch.\n"
    )
    if plots:
        lines.append("## Scaling\n")
        lines += scaling_tables(payload)
        for p in plots:
            lines.append(f"![{p}]({p})\n")
    lines += sizing_tables(payload)
    return "\n".join(lines) + "\n"


def _series(payload: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [c for c in payload["cells"] if c.get("series") == name and "cell_error" not in c]


def _plot_both(axes: tuple[Any, Any], pts: list, first: str, fmt: str, **style: Any) -> None:
    """Draws ``pts`` (``(x, method result)``) on both axes: ``first`` left, × forward right."""
    xs = [p[0] for p in pts]
    for ax, key in zip(axes, (first, "x_forward"), strict=True):
        ax.plot(xs, [p[1][key] for p in pts], fmt, **style)


def scaling_tables(payload: dict[str, Any]) -> list[str]:
    """Compact tables of the three curves (× forward), so the numbers are in the markdown too."""
    lines: list[str] = []
    for series, axis in (("batch", "batch"), ("tokens", "tokens"), ("targets", "K")):
        cells = _series(payload, series)
        if not cells:
            continue
        lines.append(f"### Cost vs {'number of ' if series != 'batch' else ''}{series}\n")
        lines.append(
            f"| model | batch | {axis if axis != 'batch' else 'tokens'} | method | "
            "seconds / call | × fwd | × fwd+bwd |"
        )
        lines.append("|---|---:|---:|---|---:|---:|---:|")
        for c in cells:
            for m, r in c["methods"].items():
                if "seconds" not in r:
                    continue
                name, _, k = m.partition("@")
                label = MULTI.get(name, METHODS[name].label if name in METHODS else name)
                x = k if series == "targets" else c["tokens"]
                lines.append(
                    f"| {c['model']} | {c['batch']} | {x} | {label} | "
                    f"{_fmt(r['seconds'], 4)} | {_fmt(r['x_forward'])} | "
                    f"{_fmt(r['x_forward_backward'])} |"
                )
        lines.append("")
    return lines


def sizing_tables(payload: dict[str, Any]) -> list[str]:
    """The TAM pass-sizing sweep (``--tam-sizing``): one row per sizing, each from its own cell."""
    groups: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for c in _series(payload, "sizing"):
        for m, r in c["methods"].items():
            if "seconds" in r:
                row = dict(r, forward_s=c["forward_s"], tokens=c["tokens"])
                groups.setdefault((c["model"], c["batch"]), {})[m.partition("@")[2]] = row
    if not groups:
        return []
    lines = [
        "## TAM pass sizing\n",
        "Each pass sizing in its own process (its own forward, peak memory and, for the "
        "default, a calibration from scratch): "
        + "; ".join(f"`{k}`: {label}" for k, (label, _) in SIZING.items())
        + ". First call: the call that also measured memory (the default's calibrates on "
        "CPU); later calls: the timed calls after it. Rows per pass: the ablated passes of the "
        "last call (the clean forward not counted).\n",
        "| model | batch | tokens | sizing | rows per pass | ablated passes | first call s | "
        "later calls s | × fwd | peak MiB |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for (model, batch), rows in groups.items():
        for v, r in rows.items():
            passes = r.get("passes") or {}
            lines.append(
                f"| {model} | {batch} | {r['tokens']} | {v} | "
                f"{','.join(map(str, passes.get('rows_per_pass', [])))} | "
                f"{passes.get('ablated_passes', '—')} | {_fmt(r.get('first_call_s'), 4)} | "
                f"{_fmt(r['seconds'], 4)} | {_fmt(r['x_forward'])} | {_fmt(r.get('peak_mib'), 1)} |"
            )
        fixed = [rows[v] for v in ("loop", "stacked") if v in rows]
        if "after" in rows and fixed:
            after = rows["after"]
            best = min(r["x_forward"] for r in fixed)
            best_first = min(r["first_call_s"] / r["forward_s"] for r in fixed)
            first = after["first_call_s"] / after["forward_s"]
            notes.append(
                f"{model}, batch {batch}: default ÷ best of loop and stacked, each in its own "
                f"forwards: {_fmt(after['x_forward'] / best)} later calls, "
                f"{_fmt(first / best_first)} first calls (target: ≤ 1, never slower than the "
                "better fixed sizing)."
            )
    lines.append("")
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    return lines


# --------------------------------------------------------------------------------- plots
def plots(payload: dict[str, Any], out: Path, prefix: str) -> list[str]:
    """Writes the scaling PNGs; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    written: list[str] = []

    def ticks(axes: Any, values: list[int]) -> None:
        for a in axes:
            a.set_xticks(sorted(set(values)))
            a.set_xticklabels([str(v) for v in sorted(set(values))])
            a.xaxis.set_minor_formatter(NullFormatter())

    def save(fig: Any, name: str, layout: bool = True) -> None:
        if layout:
            fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    cells = _series(payload, "batch")
    if cells:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        methods = [m for m in cells[0]["methods"]]
        xs = [c["batch"] for c in cells]
        a1.plot(xs, [c["forward_s"] / c["batch"] for c in cells], "k--", label="forward")
        a1.plot(
            xs,
            [c["forward_backward_s"] / c["batch"] for c in cells],
            "k:",
            label="forward+backward",
        )
        for m in methods:
            pts = [(c["batch"], c["methods"][m]) for c in cells if "seconds" in c["methods"][m]]
            _plot_both((a1, a2), pts, "seconds_per_example", "o-", label=METHODS[m].label)
        a2.axhline(1.0, color="k", ls="--", lw=0.8)
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel("batch size")
            a.grid(alpha=0.3)
        a1.set_yscale("log")
        a1.set_ylabel("seconds per explained example")
        a2.set_ylabel("time ÷ one forward of the same batch")
        ticks((a1, a2), xs)
        a1.legend(fontsize=8)
        fig.suptitle(f"Cost vs batch size: {cells[0]['model']} ({cells[0]['tokens']} tokens)")
        save(fig, f"{prefix}_batch.png")

    cells = _series(payload, "tokens")
    if cells:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5.4))
        base = sorted({c["model"].split("@")[0] for c in cells})
        names = sorted({m for c in cells for m in c["methods"]}, key=list(METHODS).index)
        for b in base:
            group = sorted(
                (c for c in cells if c["model"].split("@")[0] == b), key=lambda c: c["tokens"]
            )
            style = "s" if b == "vit-s8" else "o"
            suffix = f" [{b}]" if len(base) > 1 else ""
            fw = {c["tokens"]: c["forward_s"] for c in group}
            if b != "vit-s8":
                xs = sorted(fw)
                a1.plot(xs, [fw[x] for x in xs], "k--", label="forward" + suffix)
                fb = {c["tokens"]: c["forward_backward_s"] for c in group}
                a1.plot(xs, [fb[x] for x in xs], "k:", label="forward+backward" + suffix)
            for i, m in enumerate(names):
                pts = sorted(
                    (c["tokens"], c["methods"][m])
                    for c in group
                    if "seconds" in c["methods"].get(m, {})
                )
                if not pts:
                    continue
                color = f"C{i}"
                lab = METHODS[m].label if b != "vit-s8" else f"{METHODS[m].label} [ViT-S/8]"
                mfc = "none" if b == "vit-s8" else color
                _plot_both((a1, a2), pts, "seconds", style + "-", color=color, label=lab, mfc=mfc)
        a2.axhline(1.0, color="k", ls="--", lw=0.8)
        for a in (a1, a2):
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("tokens (patches + CLS)")
            a.grid(alpha=0.3, which="both")
        ticks((a1, a2), [c["tokens"] for c in cells])
        a1.set_ylabel("seconds per call (batch 1)")
        a2.set_ylabel("time ÷ one forward")
        handles, labels = a1.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
        title = "Cost vs number of tokens: " + ", ".join(base)
        if "vit-s8" in base:
            title += " (squares: ViT-S/8 at 224 px)"
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        save(fig, f"{prefix}_tokens.png", layout=False)

    cells = _series(payload, "targets")
    if cells:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        curves: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        for c in cells:
            for m, r in c["methods"].items():
                if "seconds" in r:
                    name, _, k = m.partition("@")
                    curves.setdefault((c["model"], name), []).append((int(k), r))
        for (model, name), pts in curves.items():
            pts.sort(key=lambda p: p[0])
            lab = f"{MULTI[name]} [{model}]"
            _plot_both((a1, a2), pts, "seconds", "o-", label=lab)
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("targets explained (K)")
            a.grid(alpha=0.3, which="both")
        ticks((a1, a2), [k for pts in curves.values() for k, _ in pts])
        a1.set_ylabel("seconds per call (whole batch)")
        a2.set_ylabel("time ÷ one forward of the same batch")
        a1.legend(fontsize=7)
        fig.suptitle("Cost vs number of targets explained at once")
        save(fig, f"{prefix}_targets.png")
    return written


def write_outputs(payload: dict[str, Any], out: Path, report: Path) -> None:
    """Writes ``<prefix>.json``, ``<prefix>.md`` and the PNGs (prefix ``suite`` or ``suite_quick``)."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = "suite_quick" if payload["quick"] else "suite"
    names = plots(payload, out, prefix)
    payload["targets"] = targets(payload)
    payload["plots"] = names
    (out / f"{prefix}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / f"{prefix}.md").write_text(markdown(payload, report, names))
