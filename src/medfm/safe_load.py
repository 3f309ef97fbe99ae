"""Reading weights without running anything a checkpoint carries.

- TorchScript archives (a zip holding ``constants.pkl`` or ``code/``) are refused before torch sees
  them: ``torch.load`` hands them to ``torch.jit.load``, which runs the archive's code (its
  ``__setstate__`` methods can, for one, create files).
- PyTorch files are read with ``torch.load(weights_only=True)`` only. A file that also pickles
  training objects (SAM-Med2D's ``train.py`` saves the optimizer *object*) is read again with every
  class or function it names (listed by torch's opcode scan, without unpickling) replaced by an
  inert stand-in, so its tensors come back and none of the pickled code runs. ``os``/``sys`` globals
  stay refused by torch whatever is allowed.
- medfm model folders carry the SHA-256 of their weights in ``config.json`` (written by
  `medfm.io.writers.write_model_folder`); `read_folder_weights` checks it before reading the file.
"""

from __future__ import annotations

import pickle
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from medfm.errors import CheckpointError
from medfm.hub import sha256_of

#: the weights file of a medfm model folder
MODEL_WEIGHTS = "model.safetensors"
#: the ``config.json`` field that maps a model folder's weight files to their SHA-256
HASHES_FIELD = "sha256"

_STAND_IN_LOCK = threading.Lock()  # torch's allow-list is process-wide


class _StandIn:
    """Stands for any class or function a checkpoint names beyond tensors (an optimizer, a
    ``defaultdict``, ...): calling or instantiating it gives an empty ``OrderedDict``, a container
    torch's restricted unpickler can fill, so nothing the checkpoint names is ever looked up."""

    def __new__(cls, *args: object, **kwargs: object) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


def is_torchscript_archive(path: str | PathLike[str]) -> bool:
    """True for a zip holding TorchScript records (``constants.pkl`` or ``code/``), which
    ``torch.load`` would pass on to ``torch.jit.load``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    records = {name.split("/", 1)[-1] for name in names}
    return "constants.pkl" in records or any(record.startswith("code/") for record in records)


def read_torch_file(path: str | PathLike[str]) -> tuple[Any, list[str]]:
    """What a ``torch.save`` file holds, and the names of the pickled classes/functions that were
    stood in for (empty for a plain state dict); `CheckpointError` naming the file for TorchScript,
    ``os``/``sys`` globals, and unreadable or corrupt files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if is_torchscript_archive(path):
        raise CheckpointError(path, "is a TorchScript archive: it carries code, and medfm never runs code from a "
                              "checkpoint; save the model's state_dict() with torch.save (or as .safetensors) and load that")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as refused:
        return _read_with_stand_ins(path, refused)
    except Exception as error:  # torch raises RuntimeError, EOFError, BadZipFile, ... on broken files
        raise CheckpointError(path, f"is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(error)}") from error


def _read_with_stand_ins(path: Path, refused: pickle.UnpicklingError) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` with every global the file names mapped to `_StandIn`."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        names = sorted(get_unsafe_globals_in_checkpoint(path))  # an opcode scan: nothing is unpickled
    except Exception as error:  # not a zip checkpoint (a legacy torch.save or a bare pickle), or corrupt
        raise CheckpointError(path, "cannot be read with weights_only=True (corrupt, or holds pickled objects): "
                              f"{_first_line(refused)}") from error
    with _STAND_IN_LOCK, safe_globals([(_StandIn, name) for name in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), names
        except Exception as error:  # os/sys globals, opcodes the restricted unpickler refuses, ...
            raise CheckpointError(path, "cannot be read with weights_only=True, even with the classes it pickles "
                                  f"stood in for: {_first_line(error)}") from error


def read_tensors(path: str | PathLike[str]) -> tuple[Any, list[str]]:
    """`read_torch_file` for PyTorch files; a ``.safetensors`` file's tensors (no stand-ins)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_torch_file(path)
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        return load_file(path, device="cpu"), []
    except Exception as error:  # SafetensorError, OSError, ... on broken files
        raise CheckpointError(path, f"is not a readable safetensors checkpoint (truncated or corrupt?): {_first_line(error)}") from error


def read_folder_weights(directory: str | PathLike[str], config: Mapping[str, Any]) -> dict:
    """A medfm model folder's ``model.safetensors``, checked against the SHA-256 its ``config.json``
    records. A folder written before medfm recorded it loads unchecked, with a warning."""
    from safetensors.torch import load_file

    weights = Path(directory) / MODEL_WEIGHTS
    hashes = config.get(HASHES_FIELD)
    expected = hashes.get(MODEL_WEIGHTS) if isinstance(hashes, Mapping) else None
    if not weights.is_file():
        raise CheckpointError(weights, "no such file (a medfm model folder holds config.json and model.safetensors)")
    if expected is None:
        warnings.warn(f"{weights}: config.json records no SHA-256 of the weights (a folder from an older medfm), "
                      "so a corrupt file would go unnoticed; save the model again to add it", stacklevel=3)
    elif sha256_of(weights) != expected:
        raise CheckpointError(weights, f"SHA-256 differs from the one {Path(directory) / 'config.json'} records "
                              "(corrupt or modified file)")
    try:
        return load_file(str(weights), device="cpu")
    except Exception as error:  # SafetensorError, OSError, ...
        raise CheckpointError(weights, f"cannot read the weights ({_first_line(error)})") from error


def load_strict(module: Any, state: Mapping[str, Any], source: str | PathLike[str], part: str | None = None,
                may_miss: Callable[[str], bool] = lambda key: False) -> None:
    """Load ``state`` into the torch ``module``: every parameter must be there (except those
    ``may_miss`` allows, e.g. frozen backbones that come from elsewhere) and nothing more, or a
    `CheckpointError` names ``source``, the ``part`` when given, and the first keys that differ."""
    what = "weights do not match the architecture" if part is None else f"the {part}'s weights do not match its architecture"
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # torch raises (one message, many lines) on tensors of the wrong shape
        mismatches = [line.strip().rstrip(".") for line in str(error).splitlines() if "size mismatch" in line]
        raise CheckpointError(source, f"{what}: " + "; ".join(mismatches[:2] or [_first_line(error)])) from error
    missing = [key for key in result.missing_keys if not may_miss(key)]
    problems = [f"missing {key}" for key in missing[:5]] + [f"unexpected {key}" for key in result.unexpected_keys[:5]]
    if problems:
        raise CheckpointError(source, f"{what}: " + ", ".join(problems))


def _first_line(error: BaseException) -> str:
    """The gist of an error: for torch's restricted unpickler, its reason without the advice to
    load with ``weights_only=False``."""
    text = str(error)
    if text.startswith("Weights only load failed"):
        text = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text.partition("\n")[2]
        text = text.split("Check the documentation", 1)[0].split(" Please use", 1)[0]
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__
