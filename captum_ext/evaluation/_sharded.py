"""Whole-dataset runs, in one process or under ``torchrun``: sharded, resumable outputs.

The dataset is cut into *chunks* of ``chunk_size`` consecutive examples (the last one may be
shorter). The chunks are dealt to the processes by a ``DistributedSampler`` (no shuffling)
whose padding is dropped, so every example is explained exactly once, whatever the number of
processes; with one process (no ``torchrun``) the same code runs every chunk.

Each chunk is written as one shard, a checkpoint pair of :mod:`captum_ext.checkpoint`
(``shard-CCCCC.safetensors`` + ``shard-CCCCC.json``: atomic per file, sha256 of the tensors in
the record, verified on read), and one ``index.json`` lists the shards, the examples of each,
the method(s), the model and the hash of the configuration. Rank 0 writes the index when the
run starts (``"complete": false``) and when every shard is written.

Resuming: a run on an output folder that holds an index with the same configuration hash
keeps every shard that verifies and computes only the missing ones (an interruption loses at
most the chunks in progress). A folder written with another configuration, or a non-empty
folder without an index, is refused with :class:`ShardedOutputError` (one line) unless
``overwrite``. The configuration covers what changes the stored numbers (model weights,
methods, targets, data, chunk size, metric settings), not how they are computed (batch size,
device, number of processes), so an interrupted 8-GPU run may be finished on one.

``evaluate_dataset`` gathers the per-example metric values of every shard on every process
(``all_gather_object``), in chunk order, so that the table (means and bootstrap intervals)
equals, number for number, the one-process run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from captum_ext._scores import model_output_to_tensor, progress
from captum_ext.checkpoint import (
    dumps_json,
    load_checkpoint,
    model_fingerprint,
    read_json,
    save_checkpoint,
    verify_checkpoint,
)
from captum_ext.distributed import World, local_device
from captum_ext.distributed import world as process_world
from captum_ext.errors import CheckpointError
from captum_ext.registry import METHODS, REFERENCES, make_method

from ._config import EvalConfig
from ._datasets import ChunkBatch, load_items
from ._engine import _score, _Subject, _subject, benchmark_part
from ._images import ImageSet, images_part
from ._result import Collector, EvalResult
from ._table import IMAGE_TABLE, missing_notes

__all__ = [
    "INDEX",
    "ShardedOutput",
    "ShardedOutputError",
    "config_hash",
    "evaluate_dataset",
    "explain_dataset",
    "load_maps",
    "shard_chunks",
]

INDEX = "index.json"
"""Name of the index file of an output folder."""

FORMAT = "captum_ext.sharded-output"
_VERSION = 1


class ShardedOutputError(ValueError):
    """An output folder that cannot be used for this run (one line, naming what differs)."""


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no spaces).

    Raises:
        ValueError: ``config`` is not strict JSON (:func:`captum_ext.checkpoint.dumps_json`:
            a NaN or infinite number, a non-str key, another type), naming the key.
    """
    text = dumps_json(config, "config", canonical=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_record(model: nn.Module) -> dict[str, Any]:
    """The class and a sha256 of every parameter and buffer (names, dtypes, shapes, bytes)."""
    return {"class": type(model).__name__, "state_sha256": model_fingerprint(model, exact=True)}


def shard_chunks(n_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks process ``rank`` of ``world_size`` runs: a ``DistributedSampler`` without
    shuffling, its padding (chunks repeated to even the shares) dropped."""
    sampler = DistributedSampler(
        range(n_chunks), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
    )
    own = len(range(rank, n_chunks, world_size))
    return list(sampler)[:own]


def _chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(dumps_json(data, path, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = list(dict.fromkeys([*new, *old]))
    return [k for k in keys if config_hash({"v": old.get(k)}) != config_hash({"v": new.get(k)})]


def _prepare(out: Path, config: dict[str, Any], digest: str, overwrite: bool) -> str | None:
    """Rank 0: checks (and with ``overwrite`` empties) the folder, writes the starting index.

    Returns:
        ``None``, or the one-line reason the folder cannot be used.
    """
    if out.exists() and not out.is_dir():
        return f"out={out}: exists and is not a folder"
    index = out / INDEX
    if overwrite and out.is_dir():
        for item in out.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    old: dict[str, Any] | None = None
    if index.is_file():
        try:
            old = read_json(index)
        except CheckpointError as err:  # unreadable, not JSON, or NaN / Infinity in it
            return (
                f"out={out}: {INDEX} cannot be read ({err.problem}); pass overwrite=True to "
                "start again"
            )
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            return f"out={out}: {INDEX} is not a captum-ext index; choose another folder"
        if old.get("config_hash") != digest:
            diff = ", ".join(_differences(old.get("config") or {}, config)) or "config"
            return (
                f"out={out} was written with another configuration (differs in: {diff}); "
                "use another folder, the same settings to resume, or overwrite=True to start again"
            )
    elif out.is_dir() and any(out.iterdir()):
        return (
            f"out={out}: the folder is not empty and holds no {INDEX} of an earlier run; "
            "choose another folder, or pass overwrite=True to replace its content"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        record = old or {
            "format": FORMAT,
            "version": _VERSION,
            "config_hash": digest,
            "config": config,
            "complete": False,
            "shards": [],
        }
        record["complete"] = False
        _write_json_atomic(index, record)
    except OSError as err:
        return f"out={out}: cannot write there ({err.strerror or err})"
    return None


@dataclass
class ShardedOutput:
    """What a whole-dataset run wrote.

    Attributes:
        out: The output folder.
        index: The index (``index.json``'s content; on every process).
        computed: Chunks computed by this run (all processes).
        reused: Chunks found complete and kept (all processes).
        payloads: Per chunk (in order) its tensors, where the run gathered them.
    """

    out: Path
    index: dict[str, Any]
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    payloads: list[tuple[dict[str, Tensor], dict[str, Any]]] = field(default_factory=list)


def _broadcast(value: Any, world: World) -> Any:
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any, world: World) -> list[Any]:
    if world.size == 1:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


@dataclass(frozen=True)
class _RunOptions:
    """How :func:`run_sharded` treats the output folder and reports progress.

    Attributes:
        overwrite: Empty ``out`` first.
        gather: Also gather every shard's tensors and record on every process (in chunk
            order): :attr:`ShardedOutput.payloads`.
        show_progress: A tqdm bar on rank 0.
        desc: The bar's title.
    """

    overwrite: bool = False
    gather: bool = False
    show_progress: bool = False
    desc: str = "shards"


def run_sharded(
    out: str | Path,
    config: dict[str, Any],
    n: int,
    chunk_size: int,
    compute: Callable[[int, range], tuple[dict[str, Tensor], dict[str, Any]]],
    world: World,
    *,
    options: _RunOptions = _RunOptions(),
) -> ShardedOutput:
    """Runs ``compute(chunk, examples)`` for every chunk not yet complete in ``out``.

    Args:
        out: The output folder.
        config: What the stored numbers depend on (hashed; a different hash is refused).
        n: Number of examples.
        chunk_size: Examples per shard.
        compute: ``(tensors, record)`` of one chunk (``examples`` = its global indices).
        world: The processes (:func:`captum_ext.distributed.world`): ``rank`` and ``size``.
        options: Overwriting, gathering and the progress bar (:class:`_RunOptions`).

    Raises:
        ShardedOutputError: ``out`` was written with another configuration, is a non-empty
            folder without an index, or cannot be written (the same on every process).
    """
    out = Path(out)
    digest = config_hash(config)
    _claim(out, config, digest, options.overwrite, world)
    bounds = _chunk_bounds(n, chunk_size)
    mine = shard_chunks(len(bounds), world.rank, world.size)
    done: list[dict[str, Any]] = []
    payloads: dict[int, tuple[dict[str, Tensor], dict[str, Any]]] = {}
    show = options.show_progress and world.rank == 0
    for c in progress(mine, show, options.desc, unit="shard", leave=False):
        shard, payload = _run_chunk(out, c, bounds[c], digest, compute, options.gather, world)
        done.append(shard)
        if options.gather:
            payloads[c] = payload
    everything = _gather((done, payloads), world)
    shards = sorted((s for part, _ in everything for s in part), key=lambda s: s["chunk"])
    assert [s["chunk"] for s in shards] == list(range(len(bounds))), "a chunk was lost"
    index = _complete_index(config, digest, n, chunk_size, world, shards)
    if world.rank == 0:
        _write_json_atomic(out / INDEX, index)
    merged = {c: p for _, part in everything for c, p in part.items()}
    return ShardedOutput(
        out,
        index,
        computed=[s["chunk"] for s in shards if not s["reused"]],
        reused=[s["chunk"] for s in shards if s["reused"]],
        payloads=[merged[c] for c in sorted(merged)],
    )


def _claim(out: Path, config: dict[str, Any], digest: str, overwrite: bool, world: World) -> None:
    """Rank 0 prepares ``out``; every process raises the same error when it cannot be used."""
    problem = _prepare(out, config, digest, overwrite) if world.rank == 0 else None
    problem = _broadcast(problem, world)
    if problem:
        raise ShardedOutputError(problem)


def _run_chunk(
    out: Path,
    c: int,
    bounds: tuple[int, int],
    digest: str,
    compute: Callable[[int, range], tuple[dict[str, Tensor], dict[str, Any]]],
    gather: bool,
    world: World,
) -> tuple[dict[str, Any], tuple[dict[str, Tensor], dict[str, Any]] | None]:
    """Chunk ``c``: its shard kept when it verifies, else computed and written.

    Returns:
        ``(shard, payload)``: the chunk's index entry (with ``rank`` and ``reused``) and, with
        ``gather``, its tensors and record (without the file checksums), else ``None``.
    """
    start, stop = bounds
    base = out / f"shard-{c:05d}"
    expect = {"config_hash": digest, "chunk": c, "start": start, "stop": stop}
    tensors: dict[str, Tensor] | None = None
    try:
        if gather:
            tensors, record = load_checkpoint(base, expect=expect)
        else:
            record = verify_checkpoint(base, expect=expect)
        reused = True
    except CheckpointError:  # missing, partial, damaged (NaN in its JSON too) or stale: again
        tensors, extra = compute(c, range(start, stop))
        record = {"format": FORMAT, **expect, **extra}
        paths = save_checkpoint(base, tensors, record)
        record = read_json(paths.record)  # with the file's size and sha256
        reused = False
    shard = {
        "chunk": c,
        "start": start,
        "stop": stop,
        "file": f"{base.name}.safetensors",
        "record": f"{base.name}.json",
        "sha256": record["weights"]["sha256"],
        "bytes": record["weights"]["bytes"],
        "rank": world.rank,
        "reused": reused,
    }
    if not gather:
        return shard, None
    return shard, (tensors or {}, {k: v for k, v in record.items() if k != "weights"})


def _complete_index(
    config: dict[str, Any],
    digest: str,
    n: int,
    chunk_size: int,
    world: World,
    shards: list[dict[str, Any]],
) -> dict[str, Any]:
    """The index of a finished run, listing ``shards`` (in chunk order)."""
    return {
        "format": FORMAT,
        "version": _VERSION,
        "config_hash": digest,
        "config": config,
        "complete": True,
        "n_examples": n,
        "chunk_size": chunk_size,
        "world_size": world.size,
        "shards": [{k: v for k, v in s.items() if k not in ("rank", "reused")} for s in shards],
    }


# ------------------------------------------------------------------------------------------
# explain


def _stack(items: list[tuple[Tensor, Any, Any]]) -> tuple[Tensor, list[Any], Tensor | None]:
    images = torch.stack([x for x, _, _ in items])
    labels = [y for _, y, _ in items]
    masks = None if items[0][2] is None else torch.stack([m for _, _, m in items])
    return images, labels, masks


def _pair_targets(
    targets: str | Sequence[int], labels: list[Any], probs: Tensor, ids: Sequence[str]
) -> list[list[int]]:
    """The classes each example is explained for."""
    if not isinstance(targets, str):
        return [list(targets)] * len(labels)
    if targets == "top":
        return [[int(k)] for k in probs.argmax(1)]
    if targets == "label":
        out = []
        for label, name in zip(labels, ids):
            if isinstance(label, Tensor):  # multi-hot: every present class
                out.append([int(k) for k in torch.nonzero(label > 0.5).flatten()])
            elif int(label) >= 0:
                out.append([int(label)])
            else:
                raise ValueError(
                    f"example {name} has no label (a plain folder); use targets='top' or "
                    "class indices, or an ImageFolder tree (one sub-folder per class)"
                )
        return out
    raise ValueError(f"targets must be 'top', 'label' or class indices; got {targets!r}")


def _label_tensor(labels: list[Any]) -> Tensor:
    if isinstance(labels[0], Tensor):
        return torch.stack(labels).float()
    return torch.tensor([int(v) for v in labels], dtype=torch.int64)


def explain_dataset(
    model: nn.Module,
    methods: Sequence[str],
    dataset: Any,
    out: str | Path,
    *,
    targets: str | Sequence[int] = "top",
    multi_label: bool = False,
    chunk_size: int = 256,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    model_record: dict[str, Any] | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    distributed: bool | None = None,
) -> ShardedOutput:
    """Maps of every example of ``dataset``, one shard per chunk (see the module docstring).

    Each shard holds ``examples`` (``(n,)`` dataset indices), ``labels`` (``(n,)`` class or
    ``-1``; ``(n, K)`` multi-hot for the shapes benchmark), ``probs`` (``(n, K)``: sigmoid
    when ``multi_label``, else softmax), ``pair_example`` / ``pair_target`` (``(P,)``: the
    example and class of each map) and ``maps.METHOD`` (``(P, H, W)`` float32, in input
    space); its JSON record holds the examples' ``ids``.

    Args:
        model: The model (moved to ``device``, eval mode).
        methods: Registry names (:data:`captum_ext.registry.METHODS`, or the Captum
            references of :data:`captum_ext.registry.REFERENCES` for a CNN).
        dataset: A dataset of :mod:`~captum_ext.evaluation._datasets` (items ``(image, label,
            masks)``, with ``ids`` and ``describe()``).
        out: Output folder (created; resumed when it holds this configuration's index).
        targets: ``"top"`` (the predicted class), ``"label"`` (the folder class of an
            ``ImageFolder``, every present class of a shapes image) or class indices.
        multi_label: Scores are sigmoids (else softmax).
        chunk_size: Examples per shard.
        batch_size: Maps per attribution call.
        device: Where to run; ``"cuda"`` under torchrun is the process's GPU.
        model_record: What to record about the model (default: class and weights hash).
        overwrite: Empty ``out`` first.
        show_progress: A tqdm bar on rank 0.
        distributed: ``None``: join torchrun's process group when launched by torchrun.

    Raises:
        ShardedOutputError: ``out`` holds another configuration's output (see
            :func:`run_sharded`).
        ValueError: An unknown method, or ``"label"`` targets on a plain folder.
    """
    job = _ExplainChunks.build(model, methods, dataset, targets, multi_label, batch_size, device)
    config = job.config(methods, targets, chunk_size, model_record)
    options = _RunOptions(overwrite=overwrite, show_progress=show_progress, desc="explain")
    with process_world(job.device, distributed, keep=True) as world:
        return run_sharded(out, config, len(dataset), chunk_size, job, world, options=options)


def _forward(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Float logits of ``images``, ``batch_size`` at a time on ``device``, without gradients."""
    with torch.no_grad():
        return torch.cat(
            [
                model_output_to_tensor(model(images[s : s + batch_size].to(device))).float()
                for s in range(0, len(images), batch_size)
            ]
        )


@dataclass(frozen=True)
class _ExplainChunks:
    """``compute`` of :func:`explain_dataset`: the probabilities and maps of one chunk."""

    model: nn.Module
    explainers: dict[str, Any]
    dataset: Any
    ids: list[str]
    targets: str | Sequence[int]
    multi_label: bool
    batch_size: int
    device: torch.device

    @classmethod
    def build(
        cls,
        model: nn.Module,
        methods: Sequence[str],
        dataset: Any,
        targets: str | Sequence[int],
        multi_label: bool,
        batch_size: int,
        device: str | torch.device,
    ) -> _ExplainChunks:
        """Checks ``methods``, moves ``model`` to the process's device and builds them."""
        unknown = [m for m in methods if m not in METHODS and m not in REFERENCES]
        if unknown:
            raise ValueError(
                f"unknown method(s) {unknown}; available: {', '.join([*METHODS, *REFERENCES])}"
            )
        dev = local_device(device)
        model = model.to(dev).eval()
        explainers = {m: make_method(m, model) for m in methods}
        ids = list(dataset.ids)
        return cls(model, explainers, dataset, ids, targets, multi_label, batch_size, dev)

    def config(
        self,
        methods: Sequence[str],
        targets: str | Sequence[int],
        chunk_size: int,
        model_record: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """What the stored maps depend on (hashed into the index)."""
        return {
            "kind": "explain",
            "model": model_record or _model_record(self.model),
            "methods": list(methods),
            "targets": targets if isinstance(targets, str) else [int(k) for k in targets],
            "scores": "sigmoid" if self.multi_label else "softmax",
            "dataset": self.dataset.describe(),
            "chunk_size": chunk_size,
        }

    def __call__(self, chunk: int, examples: range) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The shard tensors and record of ``examples`` (see :func:`explain_dataset`)."""
        images, labels, _ = _stack(load_items(self.dataset, examples))
        images = images.to(self.device)
        logits = _forward(self.model, images, self.batch_size, self.device)
        probs = (logits.sigmoid() if self.multi_label else logits.softmax(-1)).cpu()
        names = self.ids[examples.start : examples.stop]
        per = _pair_targets(self.targets, labels, probs, names)
        pe = torch.tensor([i for i, ks in enumerate(per) for _ in ks], dtype=torch.int64)
        pt = torch.tensor([k for ks in per for k in ks], dtype=torch.int64)
        tensors = {
            "examples": torch.arange(examples.start, examples.stop, dtype=torch.int64),
            "labels": _label_tensor(labels),
            "probs": probs.contiguous(),
            "pair_example": pe + examples.start,
            "pair_target": pt,
        }
        for m, attr in self.explainers.items():
            tensors[f"maps.{m}"] = self._maps(attr, images, pe, pt)
        return tensors, {"ids": names}

    def _maps(self, attr: Any, images: Tensor, pe: Tensor, pt: Tensor) -> Tensor:
        """``(P, H, W)`` float32 maps of the pairs ``(pe, pt)`` on the host."""
        maps = []
        for s in range(0, len(pe), self.batch_size):
            x = images[pe[s : s + self.batch_size].to(self.device)]
            t = pt[s : s + self.batch_size].to(self.device)
            a = attr.attribute(x, target=t).detach().float()
            maps.append((a.sum(1) if a.dim() == 4 else a).cpu())
        return torch.cat(maps).contiguous()


def load_maps(out: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """Every shard of a complete output folder, verified and concatenated in example order.

    Returns:
        ``(tensors, ids)``: the shard tensors (see :func:`explain_dataset`) over the whole
        dataset, and the example ids.

    Raises:
        ShardedOutputError: The folder holds no complete index.
        CheckpointError: A shard is missing or does not verify.
    """
    out = Path(out)
    try:
        index = read_json(out / INDEX)
    except CheckpointError as err:
        raise ShardedOutputError(f"{out}: no readable {INDEX} ({err.problem})") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardedOutputError(f"{out}: {INDEX} is not a captum-ext index")
    if not index.get("complete"):
        raise ShardedOutputError(f"{out}: the run is not complete; run it again to resume")
    parts: dict[str, list[Tensor]] = {}
    ids: list[str] = []
    for shard in index["shards"]:
        tensors, record = load_checkpoint(
            out / shard["file"], expect={"config_hash": index["config_hash"]}
        )
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
        ids += record.get("ids", [])
    return {k: torch.cat(v) for k, v in parts.items()}, ids


# ------------------------------------------------------------------------------------------
# evaluate


def _one_hot(labels: list[Any], probs: Tensor) -> Tensor:
    """``(n, K)``: a folder's class (ImageFolder) or the predicted class (plain folder)."""
    k = probs.shape[1]
    out = torch.zeros(len(labels), k)
    for i, (label, p) in enumerate(zip(labels, probs)):
        out[i, int(label) if int(label) >= 0 else int(p.argmax())] = 1.0
    return out


def evaluate_dataset(
    model_or_name: str | nn.Module,
    dataset: Any,
    out: str | Path,
    methods: Sequence[str] | None = None,
    *,
    config: EvalConfig | None = None,
    chunk_size: int = 256,
    name: str | None = None,
    model_record: dict[str, Any] | None = None,
    overwrite: bool = False,
    distributed: bool | None = None,
    **settings: Any,
) -> EvalResult:
    """:func:`~captum_ext.evaluation.evaluate` over a dataset, sharded and resumable.

    Every chunk is scored as ``evaluate`` scores a held-out set (same metric table, methods,
    trained zoo explainers, baselines), with the chunk's seed ``seed + chunk`` (random
    baseline, ROAD noise), and its per-example values are written as a shard. The values of
    every shard are gathered in chunk order and aggregated (mean, cluster bootstrap over
    images) on every process: the table equals the one-process run's. With a single chunk it
    equals ``evaluate`` on the same images.

    On the shapes benchmark every present class of an image is explained and scored against
    its mask. On a folder (no masks) the class of an ``ImageFolder`` sub-folder, or the
    predicted class of a plain folder, is explained, and only the metrics that need no mask
    are computed (sparsity, deletion / insertion, AD / IC, ROAD when named, r(TAM)).

    Args:
        model_or_name: A zoo name or an image model.
        dataset: A dataset of :mod:`~captum_ext.evaluation._datasets`.
        out: Output folder for the shards and the index.
        methods: Registry names; ``None`` = the config's.
        config: The settings (:class:`EvalConfig`; ``n`` and ``seed`` describe the data only
            through ``dataset``).
        chunk_size: Examples per shard.
        name: Model name in the table.
        model_record: What to record about the model (default: class and weights hash).
        overwrite: Empty ``out`` first.
        distributed: ``None``: join torchrun's process group when launched by torchrun.
        **settings: Fields of :class:`EvalConfig`.

    Returns:
        The :class:`EvalResult` (the same on every process), with the chunks this run
        computed and reused in :attr:`EvalResult.shards`.

    Raises:
        ShardedOutputError: ``out`` holds another configuration's output.
    """
    if methods is not None:
        settings["methods"] = methods
    cfg = (config or EvalConfig()).replace(**settings)
    job = _EvaluateChunks.build(model_or_name, dataset, name, cfg)
    record = job.record(chunk_size, model_record)
    desc = f"{job.subject.label}: evaluate"
    options = _RunOptions(overwrite, gather=True, show_progress=job.cfg.show_progress, desc=desc)
    with process_world(job.device, distributed, keep=True) as world:
        result = run_sharded(out, record, len(dataset), chunk_size, job, world, options=options)
    return _aggregate(result, job.subject, job.cfg, job.masks, job.dataset)


@dataclass(frozen=True)
class _EvaluateChunks:
    """``compute`` of :func:`evaluate_dataset`: the per-example metric values of one chunk."""

    subject: _Subject
    dataset: Any
    cfg: EvalConfig
    device: torch.device
    masks: bool
    patch: int

    @classmethod
    def build(
        cls, model_or_name: str | nn.Module, dataset: Any, name: str | None, cfg: EvalConfig
    ) -> _EvaluateChunks:
        """Resolves the process's device, then loads or checks the model (:func:`_subject`)."""
        dev = local_device(cfg.device)
        cfg = cfg.replace(device=dev)
        masks = getattr(dataset, "layout", None) == "shapes"
        subject = _subject(model_or_name, dataset, name, cfg)
        patch = int(getattr(dataset, "kwargs", {}).get("patch", 8))
        return cls(subject, dataset, cfg, dev, masks, patch)

    def record(self, chunk_size: int, model_record: dict[str, Any] | None) -> dict[str, Any]:
        """What the stored values depend on (hashed into the index)."""
        cfg = self.cfg
        return {
            "kind": "evaluate",
            "model": model_record or _model_record(self.subject.model),
            "explainers": sorted(self.subject.explainers),
            "methods": cfg.method_names,
            "metrics": list(cfg.metrics) if cfg.metrics is not None else None,
            "resolution": cfg.resolution,
            "steps": cfg.steps,
            "score": self.subject.score,
            "seed": cfg.seed,
            "extra_maps": sorted(cfg.extra_maps),
            # the columns (and so what each one measures): a run of an older table is not
            # resumed with values of another protocol under the same name
            "columns": [m.name for m in IMAGE_TABLE],
            "pixel_localisation": "token grids bilinear",
            "dataset": self.dataset.describe(),
            "chunk_size": chunk_size,
        }

    def __call__(self, chunk: int, examples: range) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The values and groups of every (method, metric) on ``examples``, and their labels."""
        subject = self.subject
        batch, top1 = self._batch(examples)
        chunk_cfg = self.cfg.replace(seed=self.cfg.seed + chunk)
        items = ImageSet(subject.model, batch, chunk_cfg, subject.score)
        notes: list[str] = []
        col, meta = _score(items, subject.label, chunk_cfg, notes, subject.explainers)
        tensors = {}
        for (method, metric), (v, g) in col.values.items():
            tensors[f"values/{method}/{metric}"] = torch.from_numpy(v).double()
            tensors[f"groups/{method}/{metric}"] = torch.from_numpy(g).long() + examples.start
        record = {"labels": col.labels, "notes": notes, "meta": meta}
        if top1 is not None:
            record["top1"] = top1
        return tensors, record

    def _batch(self, examples: range) -> tuple[ChunkBatch, list[int] | None]:
        """The chunk's images with the classes to explain (the masks' or the folder's), and
        on an ``ImageFolder`` tree ``[correct, labelled]``: how many of its labelled images
        the model's top class gets right (else ``None``)."""
        images, labels, mask = _stack(load_items(self.dataset, examples))
        top1 = None
        if self.masks:
            multi = torch.stack(labels).float()
        else:
            bs = self.cfg.batch_size
            probs = _forward(self.subject.model, images, bs, self.device).cpu()
            multi = _one_hot(labels, probs)
            known = [(int(y), int(p.argmax())) for y, p in zip(labels, probs) if int(y) >= 0]
            if known:
                top1 = [sum(y == k for y, k in known), len(known)]
        layout = self.dataset.kwargs.get("layout") if self.masks else self.dataset.layout
        return ChunkBatch(images, multi, mask, layout, self.patch), top1


def folder_part(dataset: Any, n_images: int, top1: Sequence[int] | None) -> str:
    """The summary's first part for images without object masks: how many, whether they
    have labels (an ``ImageFolder`` tree) and which class each is explained for, and the
    top-1 accuracy ``top1 = (correct, labelled)`` when it was measured on them."""
    layout = getattr(dataset, "layout", None)
    if layout == "imagefolder":
        k = len(getattr(dataset, "classes", ()))
        text = (
            f"{n_images} images of an ImageFolder tree (labels: {k} class folders; each image "
            "explained for its folder's class; no object masks)"
        )
        if top1:
            correct, labelled = top1
            text += (
                f"; top-1 accuracy on these images {correct / labelled:.3f} "
                f"({correct}/{labelled}, measured in this run)"
            )
        return text
    if layout == "folder":
        return (
            f"{n_images} images of a folder (no labels: each image explained for the model's "
            "top class; no object masks)"
        )
    return f"{n_images} images (no object masks)"


def _aggregate(
    run: ShardedOutput, subject: Any, cfg: EvalConfig, masks: bool, dataset: Any
) -> EvalResult:
    """The table of the gathered shards: values concatenated in chunk order, then bootstrap."""
    labels: dict[str, str] = {}
    notes: list[str] = []
    metas = []
    for _, record in run.payloads:
        labels.update(record["labels"])
        notes += [n for n in record["notes"] if n not in notes]
        metas.append(record["meta"])
    order = {m.name: i for i, m in enumerate(IMAGE_TABLE)}
    keys = {tuple(k.split("/")[1:]) for t, _ in run.payloads for k in t if k.startswith("values/")}
    ranked = sorted(keys, key=lambda k: (list(labels).index(k[0]), order.get(k[1], len(order))))
    col = Collector(subject.label, labels=labels)
    for method, metric in ranked:
        vs = [
            t[f"values/{method}/{metric}"]
            for t, _ in run.payloads
            if f"values/{method}/{metric}" in t
        ]
        gs = [
            t[f"groups/{method}/{metric}"]
            for t, _ in run.payloads
            if f"groups/{method}/{metric}" in t
        ]
        col.add(method, metric, torch.cat(vs), torch.cat(gs))
    # one note per reason, from the whole run (a chunk without two-object images notes D
    # missing, a chunk's own mask notes are the same reason again): drop the chunks' notes
    # on missing metrics and state them once here
    notes = [n for n in notes if " not computed: " not in n and not n.startswith("No object")]
    notes += missing_notes([m for m in IMAGE_TABLE if cfg.wants(m.name)], col.has, masks)
    meta = dict(metas[0])
    for key in ("n_images", "n_pairs", "n_two_object"):
        meta[key] = sum(int(m[key]) for m in metas)
    meta.update(subject.meta)
    meta["chunks"] = len(run.payloads)
    meta["chunk_size"] = run.index["chunk_size"]
    b = cfg.bootstrap
    if masks:  # the zoo's benchmark: what the zoo records of the model on it
        data = [
            images_part(meta["n_images"], meta["n_pairs"], meta["n_two_object"], meta.get("layout"))
        ]
        record = benchmark_part(meta)
        if record:
            data.insert(0, record)
    else:  # the user's images: what is known of them; no accuracy measured on other data
        meta.pop("heldout", None)
        meta.pop("heldout_accuracy", None)
        counts = [r.get("top1") for _, r in run.payloads]
        if counts and all(c is not None for c in counts):  # labelled: measured in this run
            correct, labelled = (sum(c[i] for c in counts) for i in (0, 1))
            meta["top1_accuracy"] = correct / labelled
            meta["top1_counts"] = [correct, labelled]
        data = [folder_part(dataset, meta["n_images"], meta.get("top1_counts"))]
    parts = [
        *data,
        *meta.pop("summary_parts")[1:],
        f"{len(run.payloads)} shard(s) of {run.index['chunk_size']} images (seed + shard index)",
        f"seed {cfg.seed}",
        *([f"95 % percentile bootstrap over images ({b} resamples)"] if b else []),
    ]
    meta["summary"] = "; ".join(parts) + "."
    result = col.result(b, cfg.bootstrap_seed, notes, meta)
    result.shards = {"computed": list(run.computed), "reused": list(run.reused)}
    return result
