"""A torch-function mode that records device-hygiene slips of captum_ext code as it runs.

On a CPU-only machine a tensor created without ``device=`` is on the right device by
accident, so a method that builds its masks on the CPU (as Captum 0.9's ``Occlusion`` does)
passes every CPU test and fails on CUDA. :class:`DeviceAudit` catches that bug class on any
machine: it watches every tensor factory (``torch.zeros``, ``arange``, ``tensor``, ``full``,
``eye``, ``randn``, ... — the constructors ``torch.set_default_device`` redirects) and every
device-to-host copy (``Tensor.cpu``, ``numpy``, ``tolist``, ``item``) called *directly* from
a source file under the watched roots, and records each factory call that names no device
(and takes none from a tensor argument) and each host copy, with file, line and function.
Third-party code (torch, timm, transformers) is not judged; only the watched files are.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

_FACTORIES = _device_constructors()
_HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


@dataclass(frozen=True)
class Slip:
    """One recorded call: ``kind`` is ``"factory"`` or ``"host copy"``."""

    kind: str
    call: str
    path: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.function}) {self.call} [{self.kind}]"


class DeviceAudit(TorchFunctionMode):
    """Records factories without a device and host copies made by code under ``roots``.

    Args:
        roots: Directories whose source files are judged.
        allowed: ``(path relative to its root, function name)`` pairs whose slips are
            deliberate (each with its reason in the caller's table); they are not recorded.
    """

    def __init__(self, roots: list[str], allowed: set[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.roots = [os.path.abspath(r) + os.sep for r in roots]
        self.allowed = allowed or set()
        self.slips: list[Slip] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None
        if func in _FACTORIES and kwargs.get("device") is None:
            inherits = func in _FROM_DATA and args and isinstance(args[0], torch.Tensor)
            if not inherits:
                kind = "factory"
        elif func in _HOST_COPIES:
            kind = "host copy"
        if kind is not None:
            self._record(kind, func, sys._getframe(1))
        return func(*args, **kwargs)

    def _record(self, kind: str, func: Any, frame: Any) -> None:
        path = os.path.abspath(frame.f_code.co_filename)
        for root in self.roots:
            if path.startswith(root):
                rel = path[len(root) :].replace(os.sep, "/")
                if (rel, frame.f_code.co_name) in self.allowed:
                    return
                name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
                self.slips.append(Slip(kind, name, rel, frame.f_lineno, frame.f_code.co_name))
                return
