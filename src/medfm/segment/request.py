"""What ``medfm segment`` (and the server) asks for, checked whole before the expensive work.

`SegmentRequest.check` looks at the options, the prompts and every output path without reading
a pixel or importing torch, so a typo answers at once; `SegmentRequest.check_image` then checks
the prompts against the image read, before any model loads. Messages name the command's options
(``--slice``, ``--box3d``), since this is the command's request. `medfm.segment.run.run_request`
carries it out. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.errors import InputFileError, OptionError, PromptError
from medfm.intensity import IntensityPreset, preset
from medfm.io.checks import DEFAULT_MAX_BYTES
from medfm.io.image import MedicalImage
from medfm.io.outputs import check_outputs
from medfm.prompts import Box, Box3D, Points
from medfm.segment.options import check_backend_name, check_precision_name, check_volume_options


@dataclass(frozen=True)
class SegmentRequest:
    """One segmentation call: the input, the prompts (2D boxes and clicks on an image or a slice,
    or 3D boxes / a label map's boxes on a volume), the model, and the outputs to write."""

    input: Path
    output: Path | None  #: None: the Python API's call, which writes nothing
    boxes: tuple[Box, ...] = ()
    points: Points | None = None
    slice_index: int | None = None
    boxes3d: tuple[Box3D, ...] = ()
    boxes_from: Path | None = None
    slice_step: int = 1
    refine_below: float | None = None  #: 3D: segment the slice between two key slices whose masks' Dice is below this
    model: str | None = None
    weights: Path | None = None
    modality: str | None = None
    window: str | None = None
    overlay: Path | None = None
    reference: Path | None = None
    uncertainty: Path | None = None
    device: str = "cpu"
    precision: str = "fp32"
    frame: int | None = None  #: one frame of a multi-frame DICOM
    max_bytes: int = DEFAULT_MAX_BYTES  #: the largest pixel data the input may declare
    backend: str = "torch"  #: what runs the image encoder (`medfm.segment.options.BACKENDS`)

    @property
    def is_volume(self) -> bool:
        """Whether this segments a whole volume from 3D boxes."""
        return bool(self.boxes3d) or self.boxes_from is not None

    @property
    def intensity(self) -> IntensityPreset | None:
        """The --window preset (None: the model's default for the modality)."""
        if self.window is None:
            return None
        try:
            return preset(self.window)
        except OptionError as error:
            raise OptionError(f"--window: {error}") from None

    def check(self) -> None:
        """Raise a medfm error for any option, prompt or output path that cannot work; reads nothing."""
        self.check_prompts()
        check_backend_name(self.backend)
        if self.backend != "torch":  # only another backend needs its package to be looked for
            from medfm.segment.openvino_backend import check_backend

            check_backend(self.backend)
        if self.device.strip().lower() != "cpu":  # only another device needs torch to be asked
            from medfm.device import resolve_device

            resolve_device(self.device)
        model_path = self.model if self.model is not None and Path(self.model).exists() else None
        check_outputs(
            {"-o": (self.output, "mask"), "--overlay": (self.overlay, "picture"), "--uncertainty": (self.uncertainty, "map")},
            {"INPUT": self.input, "--reference": self.reference, "--boxes-from": self.boxes_from,
             "--weights": self.weights, "--model": model_path},
        )

    def check_prompts(self) -> None:
        """The options and prompts on their own (no paths): what the Python API checks too."""
        check_precision_name(self.precision)
        check_volume_options(self.slice_step, self.refine_below, self.is_volume)
        _ = self.intensity
        if self.is_volume:
            if self.boxes or self.points is not None or self.slice_index is not None:
                raise PromptError("3D boxes segment the whole volume: do not combine --box3d or --boxes-from "
                                  "with --box, --point or --slice")
            if self.uncertainty is not None:
                raise OptionError("--uncertainty works on a 2D image or one --slice, not with --box3d or --boxes-from")
        else:
            if not self.boxes and self.points is None:
                raise PromptError("give at least one --box or --point (or --box3d / --boxes-from for a volume)")
            if len(self.boxes) > 1 and self.points is not None:
                raise PromptError("clicks refine one box: give a single --box with --point, or boxes alone")
            if self.uncertainty is not None and not self.boxes:
                raise PromptError("--uncertainty (SAM-U) needs --box prompts")
        if self.slice_index is not None and self.slice_index < 0:
            raise PromptError(f"--slice {self.slice_index}: slices count from 0")
        for box in self.boxes:
            box.check_area()
        for box in self.boxes3d:
            box.box2d().check_area()

    def check_image(self, image: MedicalImage) -> None:
        """Raise a medfm error unless the prompts fit ``image`` and it has something to segment."""
        if self.is_volume:
            if not image.is_volume:
                raise PromptError(f"{image.path or 'the image'} is not a volume; --box3d and --boxes-from need a (Z, Y, X) image")
            for box in self.boxes3d:
                box.check_inside(image.spatial_shape)
            check_has_contrast(image)
            return
        if image.is_volume:
            depth = image.spatial_shape[0]
            if self.slice_index is None:
                raise PromptError(f"{image.path or 'the image'} is a volume of {depth} slices: pass --slice K "
                                  f"(0..{depth - 1}) with 2D prompts, or --box3d")
            if self.slice_index >= depth:
                raise PromptError(f"--slice {self.slice_index} is beyond the volume's {depth} slices (0..{depth - 1})")
        elif self.slice_index is not None:
            raise PromptError(f"--slice is for volumes; {image.path or 'the image'} is a 2D image")
        height, width = image.spatial_shape[-2:]
        for box in self.boxes:
            box.check_inside(height, width)
        if self.points is not None:
            self.points.check_inside(height, width)
        check_has_contrast(image, self.slice_index)


def check_has_contrast(image: MedicalImage, slice_index: int | None = None) -> None:
    """Raise `InputFileError` when the image (or the slice) holds one value everywhere: an all-black
    or blank picture has nothing a model could outline, and any mask of it would be made up."""
    pixels = image.array if slice_index is None else image.array[slice_index]
    if pixels.size and np.all(pixels == pixels.flat[0]):
        where = "" if slice_index is None else f" slice {slice_index}"
        raise InputFileError(image.path, f"the image{where} is constant (every pixel {pixels.flat[0]!r}): nothing to segment")
