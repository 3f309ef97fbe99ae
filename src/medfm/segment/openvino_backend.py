"""The image encoder on OpenVINO's CPU runtime: the same network, converted once, run faster.

The encoder dominates a SAM-family model's time (every image, every slice of a volume); the
prompt decoder is cheap and stays on torch (`medfm.segment.fast`). OpenVINO's CPU plugin fuses
the encoder's graph (LayerNorm, attention, GELU, folded BatchNorm) into its own kernels; on the
benchmark's images it runs LiteMedSAM's TinyViT encoder faster than torch with the same masks
(benchmarks/litemedsam_speed.py; the README's "Speed" section).

Opt-in: ``medfm.load(..., backend="openvino")`` or ``--backend openvino`` on the CLI (needs
``pip install 'medfm[openvino]'``). The encoder is converted from torch (``openvino.convert_model``
with an example input) the first time a set of weights is used and its IR is cached under
``$MEDFM_HOME/openvino/<sha>`` (the SHA-256 of the encoder's weights, its input size and the
OpenVINO version), written to a temporary folder and renamed into place, so that a crash or a
concurrent process never leaves half an IR there; later loads read the IR and OpenVINO's own
compiled-blob cache beside it. Arithmetic is float32 (``INFERENCE_PRECISION_HINT`` is set
explicitly: on AMX CPUs OpenVINO would otherwise pick bfloat16); ``precision="bf16"`` asks for
bfloat16 only where the CPU has it natively, with the same caveat as the torch path (boundary
pixels move; it does not pass the 0.005 Dice check, so it is never the default).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medfm.errors import MissingDependencyError
from medfm.segment.options import check_backend_name

#: The IR's file name inside its cache folder (``encoder.bin`` holds the weights beside it).
IR_NAME = "encoder.xml"
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def require_openvino() -> Any:
    """The ``openvino`` module, or `MissingDependencyError` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", "the OpenVINO backend (--backend openvino)") from None
    return openvino


def check_backend(backend: str) -> str:
    """Raise a medfm error unless ``backend`` is known and can run here (OpenVINO importable);
    cheap, so callers run it before any model loads."""
    check_backend_name(backend)
    if backend == "openvino":
        require_openvino()
    return backend


def cache_root() -> Path:
    """``$MEDFM_HOME/openvino`` (default ~/.cache/medfm/openvino): one folder per converted encoder."""
    return Path(os.environ.get("MEDFM_HOME", Path.home() / ".cache" / "medfm")) / "openvino"


def encoder_key(encoder: nn.Module, image_size: int) -> str:
    """SHA-256 of the encoder's class, input size, every tensor of its state dict and the OpenVINO
    version: a retrained encoder, another size or another runtime gets its own IR."""
    digest = hashlib.sha256(f"{type(encoder).__qualname__}\0{image_size}\0{require_openvino().__version__}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def converted_encoder(encoder: nn.Module, image_size: int, root: Path | None = None) -> Path:
    """The folder holding the encoder's OpenVINO IR, converting it (once) if it is not cached.

    The IR is written into a temporary folder next to its final place and renamed there, so the
    cache holds whole IRs only; if another process got there first, its IR is kept.
    """
    ov = require_openvino()
    root = cache_root() if root is None else Path(root)
    folder = root / encoder_key(encoder, image_size)
    if (folder / IR_NAME).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
    try:
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # the tracer notes the Python branches on shapes (window padding): the input size is fixed
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                model = ov.convert_model(encoder, example_input=torch.zeros(1, 3, image_size, image_size))
        finally:
            encoder.train(was_training)
        ov.save_model(model, temporary / IR_NAME, compress_to_fp16=False)  # the weights stay float32
        os.chmod(temporary, 0o755)  # mkdtemp's folder is private; the cache is an ordinary one
        try:
            os.rename(temporary, folder)
        except OSError:  # another process renamed its IR into place first: use that one
            if not (folder / IR_NAME).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


class OpenVINOEncoder:
    """A SAM-family image encoder compiled for OpenVINO's CPU plugin: ``(B, 3, S, S)`` float32
    pixels -> the float32 ``(B, C, E, E)`` embedding, as ``SamCore.encode``.

    ``threads`` defaults to torch's thread count, so that both runtimes get the same cores.
    Images of a batch run one by one (batch 1 is the fastest shape on CPUs).
    """

    def __init__(self, encoder: nn.Module, image_size: int, precision: str = "fp32",
                 threads: int | None = None, root: Path | None = None) -> None:
        from medfm.segment.fast import check_precision

        ov = require_openvino()
        check_precision(precision)
        self.image_size = image_size
        self.precision = precision
        self.folder = converted_encoder(encoder, image_size, root)
        threads = int(threads or torch.get_num_threads())
        core = ov.Core()
        # one blob cache per precision and thread count: OpenVINO's blob names do not tell them
        # apart, and a bf16 blob loaded for f32 (or the reverse) crashes or silently changes the masks
        core.set_property({"CACHE_DIR": str(self.folder / "compiled" / f"{precision}-{threads}t")})
        config = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = core.compile_model(core.read_model(self.folder / IR_NAME), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, pixels: Tensor) -> Tensor:
        size = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixel_values of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [np.array(self.request.infer({0: array[i : i + 1]})[0], copy=True) for i in range(len(array))]
        return torch.from_numpy(np.concatenate(outputs))


class EncoderBackend:
    """A `SamCore`'s encoder on OpenVINO, built on first use and rebuilt when the encoder's weights
    change (a training step, ``load_state_dict``: noticed through the tensors' version counters)."""

    def __init__(self, core: nn.Module, precision: str = "fp32") -> None:
        check_backend("openvino")
        self.core, self.precision = core, precision
        self._built: tuple[tuple, OpenVINOEncoder] | None = None

    def __call__(self, pixels: Tensor) -> Tensor:
        from medfm.segment.fast import _fingerprint

        encoder = self.core.image_encoder
        key = _fingerprint(encoder)
        if self._built is None or self._built[0] != key:
            self._built = (key, OpenVINOEncoder(encoder, self.core.config.image_size, self.precision))
        return self._built[1](pixels)
