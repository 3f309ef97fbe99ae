"""One-call segmentation of a file or image: what ``medfm segment`` and the server call.

``segment`` reads the input, runs the predictor on the requested slice with every box as its own
prompt (one label each), and returns the label map on the input's full grid: for a volume, the
whole volume with only the segmented slice filled, so that it is written with the same affine.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from medfm.catalog import registry
from medfm.errors import InputFileError, PromptError
from medfm.intensity import IntensityPreset
from medfm.io import MedicalImage, read_image, write_image, write_mask
from medfm.io.writers import write_map
from medfm.preprocess import to_uint8_rgb
from medfm.prompts import Box, Points
from medfm.segment.model import SegmentationModel, load
from medfm.segment.predictor import Prediction, Predictor
from medfm.segment.request import SegmentRequest
from medfm.segment.uncertainty import predict_with_uncertainty, sam_u_boxes
from medfm.segment.volume import VolumePrompt, VolumeSegmentation, prompts_from_labels, segment_volume


@dataclass
class SegmentationResult:
    """The label map on the input grid, the raw prediction of the slice, and timings (seconds)."""

    image: MedicalImage
    label_map: np.ndarray
    prediction: Prediction
    slice_index: int | None
    encode_seconds: float
    decode_seconds: float
    #: SAM-U entropy (bits, 0..1) on the same grid as ``label_map``, when asked for.
    uncertainty: np.ndarray | None = None


def segment(
    image: MedicalImage | str | PathLike[str],
    boxes: Sequence[Box] = (),
    points: Points | None = None,
    *,
    slice_index: int | None = None,
    model: SegmentationModel | str | None = None,
    intensity: IntensityPreset | None = None,
    uncertainty: bool = False,
    precision: str = "fp32",
) -> SegmentationResult:
    """Segment one 2D image or one slice of a volume from boxes and/or clicks.

    Each box is one prompt and one label (1, 2, ...); clicks refine a single box, or form one
    prompt on their own when no box is given. With ``uncertainty`` each box is also prompted as
    SAM-U's 20 jittered boxes and the result carries the per-pixel entropy (the maximum over boxes).
    ``precision="bf16"`` runs the optimised engine in bfloat16 (faster on CPUs that have it; a few
    boundary pixels may differ from fp32).
    """
    image = image if isinstance(image, MedicalImage) else read_image(image)
    request = SegmentRequest(Path(image.path or "image"), None, tuple(boxes), points, slice_index)
    request.check_prompts()
    request.check_image(image)
    model = model if isinstance(model, SegmentationModel) else load(model)
    warn_untrained_prompts(model, boxes, points)
    if image.modality is None and intensity is None and image.array.dtype != np.uint8:
        warnings.warn(
            f"{image.path or 'image'}: modality unknown, so intensities are min-max scaled; "
            "name the modality (e.g. CT for HU windows) for the intended contrast",
            stacklevel=2,
        )
    predictor = model.predictor(precision=precision)
    started = time.perf_counter()
    predictor.set_image(image, slice_index=slice_index, intensity=intensity)
    encoded = time.perf_counter()
    prediction = predict_prompts(predictor, boxes, points)
    decoded = time.perf_counter()
    entropy = None
    if uncertainty:
        if not boxes:
            raise PromptError("uncertainty (SAM-U) needs box prompts")
        height, width = prediction.masks.shape[1:]
        entropy = np.max([
            predict_with_uncertainty(predictor, sam_u_boxes(box, height, width, seed=i)).entropy
            for i, box in enumerate(boxes)
        ], axis=0)
    labels = label_map_on_grid(prediction, image, slice_index)
    if image.is_volume and entropy is not None:
        entropy = _on_volume(entropy, image, slice_index)
    return SegmentationResult(image, labels, prediction, slice_index, encoded - started, decoded - encoded, entropy)


def predict_prompts(predictor: Predictor, boxes: Sequence[Box], points: Points | None) -> Prediction:
    """Each box one prompt (clicks refine the single box, or are one prompt alone) on the image the
    predictor holds: the decoder only, so many calls share one encoded image."""
    return predictor.predict(
        boxes=list(boxes) or None,
        points=None if points is None else points.coords[None],
        point_labels=None if points is None else points.labels[None],
    )


def label_map_on_grid(prediction: Prediction, image: MedicalImage, slice_index: int | None) -> np.ndarray:
    """One label per prompt on the input's full grid (a volume's slice placed in the whole volume)."""
    labels = prediction.label_map()
    return _on_volume(labels, image, slice_index) if image.is_volume else labels


def _on_volume(plane: np.ndarray, image: MedicalImage, slice_index: int) -> np.ndarray:
    """A slice result placed on the whole volume grid (zeros elsewhere), to keep the input's geometry."""
    full = np.zeros(image.spatial_shape, dtype=plane.dtype)
    full[slice_index] = plane
    return full


def overlay(
    result: SegmentationResult,
    boxes: Sequence[Box] = (),
    points: Points | None = None,
    intensity: IntensityPreset | None = None,
) -> np.ndarray:
    """An RGB uint8 picture of the segmented image with masks, boxes and clicks drawn on it."""
    return overlay_picture(result.image, result.label_map, result.slice_index, boxes, points, intensity)


def overlay_picture(
    image: MedicalImage,
    label_map: np.ndarray,
    slice_index: int | None = None,
    boxes: Sequence[Box] = (),
    points: Points | None = None,
    intensity: IntensityPreset | None = None,
) -> np.ndarray:
    """An RGB uint8 picture of a 2D image, or of one slice of a volume, with its labels, boxes and
    clicks drawn on it."""
    from PIL import Image, ImageDraw

    array = image.array if slice_index is None else image.array[slice_index]
    labels = label_map if slice_index is None else label_map[slice_index]
    rgb = to_uint8_rgb(array, intensity, image.modality).astype(np.float32)
    palette = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]])
    for label in np.unique(labels[labels > 0]):
        colour = palette[(label - 1) % len(palette)]
        inside = labels == label
        rgb[inside] = 0.55 * rgb[inside] + 0.45 * colour
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for index, box in enumerate(boxes):
        draw.rectangle([box.x0, box.y0, box.x1, box.y1], outline=tuple(int(c) for c in palette[index % len(palette)]), width=2)
    if points is not None:
        for (x, y), label in zip(points.coords, points.labels):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(0, 255, 0) if label else (255, 0, 0), outline=(0, 0, 0))
    return np.asarray(picture)


def untrained_prompts(model: SegmentationModel, boxes: bool, points: bool) -> str | None:
    """Why the masks are unreliable when a prompt type is one the model's weights never saw in
    training (e.g. clicks for LiteMedSAM, distilled with boxes only), naming models trained with it;
    None when every prompt type given was trained (or the model does not say)."""
    if model.trained_prompts is None:
        return None
    given = ["box"] * boxes + ["point"] * points
    for kind in given:
        if kind not in model.trained_prompts:
            trained = " and ".join(f"{k} prompts" for k in model.trained_prompts) or "no prompts (it is prompt-free)"
            offline = [e.name for e in registry.ENTRIES if e.family == "segment" and e.offline and kind in e.prompts]
            hint = f" (offline models trained with them: {', '.join(offline)})" if offline else ""
            return f"{model.name} was trained with {trained}, not {kind} prompts: its masks from {kind} prompts are unreliable{hint}"
    return None


def warn_untrained_prompts(model: SegmentationModel, boxes: Sequence[Box] = (), points: Points | None = None) -> None:
    """Warn when a prompt type is one the model's weights never saw in training: it runs, but the
    masks are unreliable."""
    message = untrained_prompts(model, bool(boxes), points is not None)
    if message is not None:
        warnings.warn(message, stacklevel=2)


def read_label_map(path: str | PathLike[str], like: MedicalImage) -> np.ndarray:
    """A label map (a reference, or the coarse labels of ``--boxes-from``) that must lie on the
    grid of ``like``; `InputFileError` naming the file otherwise."""
    labels = read_image(path).array
    if labels.shape != like.spatial_shape:
        raise InputFileError(path, f"label map shape {labels.shape} differs from the image's {like.spatial_shape}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise InputFileError(path, f"a label map holds whole labels; this one holds fractions ({labels.dtype})")
    return labels


@dataclass(frozen=True)
class ReferenceComparison:
    """What a reference is compared on: the label map and the reference on the same grid (a volume's
    segmented slice only, for a 2D prompt), and each output label's prompt: (the slice its 2D box
    lies on or None, the box), or None for a label taken from a label map (``--boxes-from``).
    `medfm.evaluate.reference.score_outcome` scores it."""

    label_map: np.ndarray
    reference: np.ndarray
    prompts: Mapping[int, tuple[int | None, Box] | None]


@dataclass
class SegmentOutcome:
    """What `run_request` wrote and found: the files, the 2D result or the volume's, and what to
    compare with the reference (None without one)."""

    written: list[Path]
    result: SegmentationResult | None = None
    volume: VolumeSegmentation | None = None
    comparison: ReferenceComparison | None = None


def run_request(request: SegmentRequest, *, progress: bool = False) -> SegmentOutcome:
    """Carry out ``medfm segment``: every check first (options and output paths, then the prompts
    against the image and the label maps' grids), then load the model, segment, write each output
    atomically and gather what the reference is compared on. ``progress`` reports 3D work on stderr."""
    request.check()
    image = read_image(request.input, modality=request.modality, frame=request.frame, max_bytes=request.max_bytes)
    request.check_image(image)
    coarse = None if request.boxes_from is None else read_label_map(request.boxes_from, image)
    reference = None if request.reference is None else read_label_map(request.reference, image)
    if coarse is not None:
        from_labels = prompts_from_labels(coarse)
        clash = {p.label for p in from_labels} & set(range(1, len(request.boxes3d) + 1))
        if clash:
            raise PromptError(f"--box3d labels 1..{len(request.boxes3d)} and --boxes-from labels {sorted(clash)} collide; "
                              "give one or the other")
    model = load(request.model, weights=request.weights, device=request.device, backend=request.backend)
    if request.is_volume:
        return _run_volume(request, image, model, [] if coarse is None else from_labels, reference, progress)
    result = segment(image, request.boxes, request.points, slice_index=request.slice_index, model=model,
                     intensity=request.intensity, uncertainty=request.uncertainty is not None, precision=request.precision)
    written = [write_mask(result.label_map, request.output, like=image)]
    if request.uncertainty is not None:
        written.append(write_map(result.uncertainty, request.uncertainty, like=image))
    if request.overlay is not None:
        written.append(write_image(overlay(result, request.boxes, request.points, request.intensity), request.overlay))
    outcome = SegmentOutcome(written, result=result)
    if reference is not None:  # on the segmented slice only: the rest of a volume's map is empty by design
        boxes = list(request.boxes) or [Box(*request.points.coords[0], *request.points.coords[0])]
        plane = (lambda array: array) if request.slice_index is None else (lambda array: array[request.slice_index])
        outcome.comparison = ReferenceComparison(plane(result.label_map), plane(reference),
                                                 {label: (None, box) for label, box in enumerate(boxes, 1)})
    return outcome


def _run_volume(request: SegmentRequest, image: MedicalImage, model: SegmentationModel, from_labels: list,
                reference: np.ndarray | None, progress: bool) -> SegmentOutcome:
    """The 3D half of `run_request`: propagate each 3D box through the volume."""
    prompts = [VolumePrompt(box, label) for label, box in enumerate(request.boxes3d, 1)] + from_labels
    warn_untrained_prompts(model, boxes=[p.box.box2d() for p in prompts])
    volume = segment_volume(model.predictor(precision=request.precision), image, prompts, intensity=request.intensity,
                            slice_step=request.slice_step, refine_below=request.refine_below, progress=progress)
    written = [write_mask(volume.label_map, request.output, like=image)]
    starts = {p.label: (p.start_slice if p.start_slice is not None else (p.box.z0 + p.box.z1) // 2,
                        p.start_box or p.box.box2d()) for p in prompts}
    if request.overlay is not None:  # the first prompt's start slice, with every box that crosses it
        middle = starts[prompts[0].label][0]
        boxes = [starts[p.label][1] for p in prompts if p.box.z0 <= middle <= p.box.z1]
        written.append(write_image(overlay_picture(image, volume.label_map, middle, boxes, None, request.intensity),
                                   request.overlay))
    outcome = SegmentOutcome(written, volume=volume)
    if reference is not None:
        by_box = {label for label in range(1, len(request.boxes3d) + 1)}
        outcome.comparison = ReferenceComparison(volume.label_map, reference,
                                                 {p.label: starts[p.label] if p.label in by_box else None for p in prompts})
    return outcome
