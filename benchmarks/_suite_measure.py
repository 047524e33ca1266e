"""Measuring one cell of the performance suite: time (interleaved medians) and peak memory.

A cell is a model key, a batch size and one or more method keys (``_suite_cases``). On CPU each
cell runs in a fresh child process forked from a forkserver (which has imported the libraries but
run no tensor code), so that one cell's heap does not hide the next one's growth; the peak is
the high-water mark of the child's resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the call) minus its resident set before the call. On CUDA
cells run in the suite's own process and the peak is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before the call.

Timing (:func:`interleaved`, also used by ``training/train_mhex.py``): each method's first call
is the memory measurement; then the forward, the forward+backward and every method of the cell
are timed in turn, ``repeats`` rounds, and each gets the median of its rounds, so all ratios
come from the same minutes of the same machine. Within a round a call is timed by
``torch.utils.benchmark.Timer.blocked_autorange`` (a warm-up, then blocks of calls until
``min_run_time`` seconds; the median seconds per call); the methods of a slow cell, which run
for seconds to minutes, are timed by one synchronised call per round instead (the Timer's
warm-up would double them), and a slow cell with ``repeats=1`` times the first call itself
(no warm-up: it runs once).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from _suite_cases import Skip, build_call, build_case
from torch.utils.benchmark import Timer


@dataclass
class Cell:
    """One measurement: ``methods`` on model ``model`` at batch ``batch``.

    Attributes:
        model: Model key.
        methods: Method keys (the baselines are always measured too).
        batch: Batch size.
        repeats: Timed rounds (the result is the median of the rounds).
        series: ``"main"`` or a scaling curve (``"batch"``, ``"tokens"``, ``"targets"``).
        memory: Measure the peak memory of each method's first call.
        slow: Its methods run for seconds or more: one call per round, and with
            ``repeats=1`` the first (memory) call is the time.
        min_run_time: Seconds of calls per round for each fast call
            (``Timer.blocked_autorange``).
    """

    model: str
    methods: list[str]
    batch: int
    repeats: int
    series: str = "main"
    memory: bool = True
    slow: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    min_run_time: float = 0.2


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _clock(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call of ``fn`` (a call that runs once: the memory call, a slow call)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    min_run_time: float = 0.2,
    single: frozenset[str] | set[str] = frozenset(),
    device: str = "cpu",
) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds per call of every function and how many calls were timed.

    Every round times each function in turn: those in ``single`` by one call, the others by
    ``Timer.blocked_autorange(min_run_time)`` (its own warm-up first; the round's value is its
    median seconds per call). The result is the median over the rounds, so functions measured
    together share the machine's state. Timer runs at the current torch thread count.
    """
    per_round: dict[str, list[float]] = {n: [] for n in fns}
    calls = dict.fromkeys(fns, 0)
    threads = torch.get_num_threads()
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            if name in single:
                per_round[name].append(_clock(fn, device))
                calls[name] += 1
                continue
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            m = timer.blocked_autorange(min_run_time=min_run_time)
            per_round[name].append(m.median)
            calls[name] += m.number_per_run * len(m.raw_times)
    return {n: statistics.median(v) for n, v in per_round.items()}, calls


# --------------------------------------------------------------------------- memory (CPU)
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[float, float, str]:
    """``(seconds, peak bytes above the start, how measured)`` of one call of ``fn``."""
    if device.startswith("cuda"):
        _sync(device)
        dev = torch.device(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        seconds = _clock(fn, device)
        peak = torch.cuda.max_memory_allocated(dev) - before
        return seconds, float(peak), "torch.cuda.max_memory_allocated - allocated before"
    _trim()
    if sys.platform.startswith("linux") and _reset_hwm():
        before = _rss_bytes()
        seconds = _clock(fn, device)
        return seconds, float(max(0, _hwm_bytes() - before)), "VmHWM - RSS"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = _clock(fn, device)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return seconds, float(max(0, after - before)), "ru_maxrss growth (lower bound)"


# ----------------------------------------------------------------------------- one cell
def run_cell(cell: Cell, device: str, threads: int = 0) -> dict[str, Any]:
    """Measures ``cell`` in this process; returns its result (never raises for a method)."""
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    case = build_case(cell.model, cell.batch, device)
    baselines = {"forward": case.forward, "forward_backward": case.forward_backward}
    calls: dict[str, Callable[[], Any]] = {}
    out: dict[str, Any] = {
        "model": cell.model,
        "family": case.family,
        "batch": case.batch,
        "tokens": case.tokens,
        "input": list(case.inputs.shape[1:]),
        "repeats": cell.repeats,
        "series": cell.series,
        "methods": {},
    }
    firsts: dict[str, float] = {}
    for name in cell.methods:
        res: dict[str, Any] = {}
        out["methods"][name] = res
        case.info.clear()
        try:
            calls[name] = build_call(name, case)
        except Skip as e:
            res["skipped"] = str(e)
            continue
        except Exception as e:
            res["error"] = f"building: {type(e).__name__}: {e}"
            continue
        res.update(case.info)
        try:
            if cell.memory:
                seconds, peak, how = peak_memory(calls[name], device)
                res["peak_mib"] = peak / 2**20
                res["memory_measured_by"] = how
            else:
                seconds = _clock(calls[name], device)
            firsts[name] = seconds
            res["first_call_s"] = seconds
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc(limit=3)
            del calls[name]
    timed = {**baselines, **{n: f for n, f in calls.items() if n not in baselines}}
    slow = {n for n in timed if cell.slow and n not in baselines}
    once = {n: firsts[n] for n in slow if n in firsts and cell.repeats == 1}
    med, counts = interleaved(
        {n: f for n, f in timed.items() if n not in once},
        cell.repeats,
        cell.min_run_time,
        single=slow,
        device=device,
    )
    med |= once
    counts |= dict.fromkeys(once, 1)
    out["forward_s"] = med["forward"]
    out["forward_backward_s"] = med["forward_backward"]
    for name, res in out["methods"].items():
        if name not in med:
            continue
        sec = med[name]
        res["seconds"] = sec
        res["seconds_per_example"] = sec / case.batch
        res["x_forward"] = sec / med["forward"]
        res["x_forward_backward"] = sec / med["forward_backward"]
        res["timed_calls"] = counts[name]
        res["rounds"] = 1 if name in once else max(1, cell.repeats)
        res["warmup"] = 0 if name in once else 1
    out["cell_seconds"] = time.perf_counter() - t_start
    return out


_PRELOAD = ["torch", "timm", "captum.attr", "captum_ext", "_suite_cases", "_suite_measure"]


def _child(cell: Cell, device: str, threads: int, conn: Any) -> None:
    try:
        payload: Any = run_cell(cell, device, threads)
    except BaseException as e:
        payload = {"cell_error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    conn.send(payload)
    conn.close()


def run_forked(cell: Cell, device: str, threads: int = 0) -> dict[str, Any]:
    """Runs :func:`run_cell` in a fresh child process; the result comes back through a pipe.

    Children are forked from a ``forkserver`` that has imported the libraries and run no
    tensor code (a child forked from a process whose OpenMP pool has run would hang), so
    starting one costs a fork, not an interpreter start.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cell, device, threads, send), daemon=True)
    proc.start()
    send.close()
    try:
        payload = recv.recv()
    except EOFError:
        payload = {
            "cell_error": f"the child process died (exit code {proc.exitcode}; out of memory?)"
        }
    proc.join()
    return payload


def measure(cell: Cell, device: str, threads: int = 0, isolate: bool = True) -> dict[str, Any]:
    """Measures ``cell``: forked on CPU when ``isolate``, in this process otherwise (CUDA)."""
    if isolate and not device.startswith("cuda"):
        res = run_forked(cell, device, threads)
    else:
        try:
            res = run_cell(cell, device, threads)
        except Exception as e:
            res = {"cell_error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    res.setdefault("model", cell.model)
    res.setdefault("series", cell.series)
    res.setdefault("batch", cell.batch)
    res["requested"] = asdict(cell) | {"result": None}
    return res
