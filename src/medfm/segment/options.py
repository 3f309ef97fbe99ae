"""Option values of segmentation that can be checked before torch is imported or a file read."""

from __future__ import annotations

from numbers import Integral, Real

from medfm.errors import OptionError

#: Arithmetic precisions of the inference engine (`medfm.segment.fast`).
PRECISIONS = ("fp32", "bf16")


def check_precision_name(precision: str) -> str:
    """Raise `OptionError` unless ``precision`` is one of `PRECISIONS` (whether this machine has
    bfloat16 is `medfm.segment.fast.check_precision`'s question)."""
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def check_slice_step(slice_step: int) -> None:
    """Raise `OptionError` unless ``slice_step`` is a whole number of slices, at least 1."""
    if not isinstance(slice_step, Integral) or slice_step < 1:
        raise OptionError(f"slice step must be a whole number >= 1 (1: every slice; k: every k-th slice, "
                          f"interpolated between), not {slice_step!r}")


def check_refine_below(refine_below: float | None, slice_step: int) -> None:
    """Raise `OptionError` unless ``refine_below`` is None, or a Dice in (0, 1] with a slice step above 1."""
    if refine_below is None:
        return
    if isinstance(refine_below, bool) or not (isinstance(refine_below, Real) and 0 < refine_below <= 1):
        raise OptionError(f"refine-below must be a Dice in (0, 1] (the overlap of two key slices' masks below which "
                          f"the slice between them is segmented too), not {refine_below!r}")
    if slice_step == 1:
        raise OptionError("refine-below refines a slice step: give a slice step above 1 with it")


def check_volume_options(slice_step: int, refine_below: float | None, is_volume: bool) -> None:
    """`check_slice_step` and `check_refine_below`, and refuse either on a 2D prompt, where they would
    silently do nothing (the CLI, the batch and the server share this)."""
    check_slice_step(slice_step)
    check_refine_below(refine_below, slice_step)
    if not is_volume and (slice_step != 1 or refine_below is not None):
        raise OptionError("a slice step and refine-below apply to 3D boxes only (a whole volume), not to 2D prompts")


#: Runtimes that can run the image encoder (`medfm.segment.openvino_backend` for "openvino").
BACKENDS = ("torch", "openvino")


def check_backend_name(backend: str) -> str:
    """Raise `OptionError` unless ``backend`` is one of `BACKENDS` (whether OpenVINO is installed
    is `medfm.segment.openvino_backend.check_backend`'s question)."""
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend
