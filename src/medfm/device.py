"""Which torch device a ``device=`` / ``--device`` value means, checked before anything loads.

A device this machine cannot use (``cuda`` on a CPU-only torch, ``cuda:3`` with one GPU, ``mps`` off
Apple silicon) is an `OptionError` in one line, not a traceback from deep inside a model's ``.to()``.
"""

from __future__ import annotations

import torch

from medfm.errors import OptionError

#: what ``resolve_device`` accepts, for messages
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device) -> torch.device:
    """The `torch.device` of ``device`` (``"auto"``: CUDA when available, else the CPU), or an
    `OptionError` saying why this machine cannot use it."""
    text = device.strip().lower() if isinstance(device, str) else device
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device '{device}'; use {DEVICE_CHOICES}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch finds no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES empty?)")
            raise OptionError(f"device '{device}' is not available: {why} (torch {torch.__version__}); use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise OptionError(f"device '{device}' is not available: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(f"device '{device}' is not available: torch finds no Apple GPU (MPS); use cpu")
        return resolved
    raise OptionError(f"device '{device}' is not one medfm runs on; use {DEVICE_CHOICES}")
