"""The evaluation runner behind ``medfm evaluate``: every case, every target, every model, one table.

For each 2D case the image is encoded once per model and all of its simulated prompts go through
the decoder in one batch (``iterative:K``: a box, then K correction clicks, one decoder pass each,
see `correct_iteratively`); 3D cases are segmented from their 3D boxes by propagation. Each row of
the result is one (model, case, target) with Dice, IoU, NSD and HD95 (spacing-aware) and the time
it took; a target whose prompt makes no sense (a box around scattered or thin structures) carries a
note and is kept out of the averages instead of passing silently into them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medfm.batch.engines import check_engine, ray_session
from medfm.data.datasets import Case, discover_cases
from medfm.evaluate.metrics import segmentation_metrics
from medfm.evaluate.simulate import check_mode, iterative_clicks, simulate_prompts
from medfm.intensity import window_for_target
from medfm.io import read_image
from medfm.io.readers import PHOTO_SUFFIXES
from medfm.preprocess import Geometry
from medfm.progress import progress_bar
from medfm.prompts import Box, Box3D, Points, correction_click
from medfm.segment.model import SegmentationModel, load
from medfm.segment.predictor import Prediction, Predictor
from medfm.segment.uncertainty import error_detection_auc, predict_with_uncertainty, sam_u_boxes
from medfm.segment.volume import VolumePrompt, check_refine_below, check_slice_step, segment_volume

METRICS = ("dice", "iou", "nsd", "hd95")
EVALUATE_ON_RAY = "medfm evaluate --engine ray"


@dataclass
class CaseResult:
    """One row of ``cases.csv``."""

    model: str
    dataset: str
    modality: str | None
    case: str
    label: int
    target: str
    prompt: str
    dice: float
    iou: float
    nsd: float
    hd95: float
    seconds: float
    note: str | None = None
    uncertainty_auc: float | None = None
    mean_uncertainty: float | None = None
    #: the file states no physical spacing (PNG, JPEG, ...): NSD and HD95 are in pixels, 1 px = 1 mm
    spacing_assumed: bool = False


@dataclass
class Evaluation:
    """All rows, the cases they came from, the NSD tolerance they were scored at, and the wall time."""

    rows: list[CaseResult] = field(default_factory=list)
    cases: dict[tuple[str, str], Case] = field(default_factory=dict)
    seconds: float = 0.0
    tolerance_mm: float = 2.0


def evaluate(
    models: Sequence[str | SegmentationModel],
    data: str | Path | Sequence[Case],
    *,
    prompt: str | Sequence[str] = "box",
    uncertainty: bool = False,
    seed: int = 0,
    datasets: Sequence[str] | None = None,
    limit_per_dataset: int | None = None,
    tolerance_mm: float = 2.0,
    slice_step: int = 1,
    refine_below: float | None = None,
    progress: bool = False,
    engine: str = "local",
    address: str | None = None,
    workers: int = 1,
) -> Evaluation:
    """Evaluate each model on every case under ``data`` (a folder, or cases already chosen, such as a
    validation split) with simulated prompts of each ``prompt`` mode (one image embedding serves all
    modes and all targets of an image). ``slice_step``: 3D cases segment every k-th slice and
    interpolate between, and with ``refine_below`` also segment the slice between two key slices
    whose masks disagree (see `segment_volume`). ``engine="ray"`` spreads the cases over ``workers``
    Ray actors (on the cluster at ``address``, or a local Ray) that load the models once each (a
    killed one is restarted and its case redone); the rows come back in case order, as the local
    engine gives them."""
    check_slice_step(slice_step)  # before hours of 2D cases, not at the first volume
    check_refine_below(refine_below, slice_step)
    check_engine(engine, workers, EVALUATE_ON_RAY)  # before any work
    settings = CaseSettings([prompt] if isinstance(prompt, str) else list(prompt), uncertainty, seed, tolerance_mm, slice_step,
                            refine_below)
    for mode in settings.modes:
        check_mode(mode)  # one line for a mode it does not know, before any model loads
    if isinstance(data, (str, Path)):
        cases = discover_cases(data, datasets=datasets, limit_per_dataset=limit_per_dataset)
    else:
        cases = [c for c in data if datasets is None or c.dataset in datasets]
    loaded = [m if isinstance(m, SegmentationModel) else load(m) for m in models]
    evaluation = Evaluation(cases={(c.dataset, c.case_id): c for c in cases}, tolerance_mm=tolerance_mm)
    started = time.perf_counter()
    if engine == "local":
        owners = encoder_owners(loaded)
        with progress_bar(progress, len(cases), "evaluating cases") as advance:
            for case in cases:
                evaluation.rows += evaluate_case(loaded, owners, case, settings)
                advance()
    else:
        evaluation.rows = _evaluate_on_ray(loaded, cases, settings, address, workers, progress)
    evaluation.seconds = time.perf_counter() - started
    return evaluation


@dataclass(frozen=True)
class CaseSettings:
    """How every case of an evaluation is prompted and scored (the same on every engine)."""

    modes: list[str]
    uncertainty: bool
    seed: int
    tolerance_mm: float
    slice_step: int
    refine_below: float | None = None


def evaluate_case(models: Sequence[SegmentationModel], owners: Sequence[int], case: Case, settings: CaseSettings) -> list[CaseResult]:
    """Every model's rows for one case; ``owners`` from `encoder_owners` (an image is encoded once
    for the models that share an encoder)."""
    image = read_image(case.image_path, modality=case.modality if case.modality in {"CT", "MR"} else None)
    reference = read_image(case.mask_path).array
    rows: list[CaseResult] = []
    encoded: dict[int, _Encoded | None] = {}
    for index, model in enumerate(models):
        if case.is_volume:
            rows += _evaluate_volume(model, case, image, reference, settings.modes, settings.tolerance_mm, settings.slice_step,
                                     settings.refine_below)
        else:
            model_rows, encoded[index] = _evaluate_image(model, case, image, reference, settings.modes, settings.uncertainty,
                                                         settings.seed, settings.tolerance_mm, encoded.get(owners[index]))
            rows += model_rows
    return rows


#: how often a killed evaluation actor is restarted, and a case it was on retried on the new one
RAY_RETRIES = 3


class _CaseEvaluator:
    """A Ray actor holding the models (loaded once) that evaluates the cases it is handed."""

    def __init__(self, models: list[SegmentationModel], settings: CaseSettings) -> None:
        self.models, self.owners, self.settings = models, encoder_owners(models), settings

    def evaluate(self, case: Case) -> list[CaseResult]:
        return evaluate_case(self.models, self.owners, case, self.settings)


def _evaluate_on_ray(models: list[SegmentationModel], cases: list[Case], settings: CaseSettings, address: str | None,
                     workers: int, progress: bool) -> list[CaseResult]:
    """The rows of every case from ``workers`` actors, a case a call (the free actor takes the next),
    in case order. A killed actor is restarted and its case retried (`RAY_RETRIES` times), so every
    case is reported once."""
    if not cases:
        return []
    with ray_session(address, EVALUATE_ON_RAY) as ray:
        from ray.util import ActorPool

        shared = ray.put(models)
        actor = ray.remote(num_cpus=1, max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES)(_CaseEvaluator)
        pool = ActorPool([actor.remote(shared, settings) for _ in range(min(workers, len(cases)))])
        rows: list[CaseResult] = []
        with progress_bar(progress, len(cases), f"evaluating cases on {min(workers, len(cases))} Ray worker(s)") as advance:
            for case_rows in pool.map_unordered(lambda evaluator, case: evaluator.evaluate.remote(case), cases):
                rows += case_rows
                advance()
    position = {(case.dataset, case.case_id): index for index, case in enumerate(cases)}
    return sorted(rows, key=lambda row: position[(row.dataset, row.case)])  # stable: a case's rows keep their order


def _row(model: SegmentationModel, case: Case, label: int, prompt: str, metrics: dict, seconds: float, **extra) -> CaseResult:
    return CaseResult(
        model=model.name, dataset=case.dataset, modality=case.modality, case=case.case_id, label=label,
        target=case.label_names.get(label, f"label {label}"), prompt=prompt, seconds=seconds,
        spacing_assumed=case.image_path.suffix.lower() in PHOTO_SUFFIXES,
        **{k: float(metrics[k]) for k in METRICS}, **extra,
    )


@dataclass(frozen=True)
class _Encoded:
    """One image's embedding, its geometry and what encoding it took, for models that share it."""

    embedding: torch.Tensor
    geometry: Geometry
    seconds: float


def encoder_owners(models: Sequence[SegmentationModel]) -> list[int]:
    """For each model, the first model (index) whose image embedding it can use: the same predictor
    class, preprocessing and image-encoder weights, as fine-tunes that left the encoder alone (a
    decoder recipe, a blend) have. Each image is then encoded once for all of them; their timings
    keep the owner's encoding time."""
    def same(a: SegmentationModel, b: SegmentationModel) -> bool:
        if type(a.predictor()) is not type(b.predictor()) or a.preprocess != b.preprocess:
            return False
        first, second = a.network.image_encoder.state_dict(), b.network.image_encoder.state_dict()
        return first.keys() == second.keys() and all(
            first[k].shape == second[k].shape and first[k].device == second[k].device and torch.equal(first[k], second[k])
            for k in first
        )

    return [next(j for j in range(i + 1) if j == i or same(models[j], model)) for i, model in enumerate(models)]


def _evaluate_image(
    model, case, image, reference, modes, uncertainty, seed, tolerance_mm, shared,  # noqa: ANN001
) -> tuple[list[CaseResult], _Encoded | None]:
    """One model's rows for a 2D case, and the encoding it used (``shared``, when given, is reused)."""
    simulated_by_mode = {mode: simulate_prompts(reference, mode, seed=seed) for mode in modes}
    if not any(simulated_by_mode.values()):
        return [], None
    predictor = model.predictor()
    if shared is None:
        started = time.perf_counter()
        predictor.set_image(image)
        shared = _Encoded(predictor.embedding, predictor.geometry, time.perf_counter() - started)
    else:
        predictor.use_embedding(shared.embedding, shared.geometry)
    encode_seconds = shared.seconds
    rows = []
    for mode, prompts in simulated_by_mode.items():
        clicks = iterative_clicks(mode)
        if clicks is not None:
            for simulated in prompts:
                started = time.perf_counter()
                truth = reference == simulated.label
                final = correct_iteratively(predictor, simulated.box, truth, clicks)[0][-1]
                seconds = encode_seconds / len(prompts) + time.perf_counter() - started
                rows.append(_row(model, case, simulated.label, mode,
                                 segmentation_metrics(final.masks[0], truth, image.spacing, tolerance_mm), seconds,
                                 note=simulated.note))
            continue
        if uncertainty:
            rows += [_sam_u_row(model, case, predictor, simulated, reference, image, mode, seed, tolerance_mm, encode_seconds)
                     for simulated in prompts]
            continue
        started = time.perf_counter()
        if all(p.points is None for p in prompts):
            prediction = predictor.predict(boxes=[p.box for p in prompts])
        else:
            prediction = predictor.predict(
                boxes=[p.box for p in prompts] if all(p.box is not None for p in prompts) else None,
                points=np.stack([p.points.coords for p in prompts]),
                point_labels=np.stack([p.points.labels for p in prompts]),
            )
        seconds = encode_seconds / len(prompts) + (time.perf_counter() - started) / len(prompts)
        rows += [
            _row(model, case, simulated.label, mode,
                 segmentation_metrics(mask, reference == simulated.label, image.spacing, tolerance_mm), seconds, note=simulated.note)
            for simulated, mask in zip(prompts, prediction.masks)
        ]
    return rows, shared


def correct_iteratively(predictor: Predictor, box: Box, truth: np.ndarray, clicks: int
                        ) -> tuple[list[Prediction], Points | None]:
    """Interactive correction as an annotator does it: the box, then ``clicks`` more passes, each adding
    a click on the largest error region of the current mask (`medfm.prompts.correction_click`:
    positive in a missed region, negative in a false one) with the previous low-res logits as
    ``mask_input``. Stops early once the mask equals ``truth``. -> the prediction of every pass
    (the first is the box alone) and the clicks placed (None without any); needs
    ``predictor.set_image`` (or ``use_embedding``) first."""
    prediction = predictor.predict(boxes=[box])
    passes = [prediction]
    coords: list[tuple[float, float]] = []
    labels: list[int] = []
    for _ in range(clicks):
        click = correction_click(prediction.masks[0], truth)
        if click is None:
            break
        row, col, label = click
        coords.append((float(col), float(row)))
        labels.append(label)
        prediction = predictor.predict(boxes=[box], points=np.array([coords]), point_labels=np.array([labels]),
                                       mask_input=prediction)
        passes.append(prediction)
    return passes, Points(np.array(coords), np.array(labels)) if coords else None


def _sam_u_row(model, case, predictor, simulated, reference, image, prompt, seed, tolerance_mm, encode_seconds) -> CaseResult:  # noqa: ANN001
    """SAM-U for one target: 20 jittered boxes, mean probability, entropy as the uncertainty."""
    started = time.perf_counter()
    boxes = sam_u_boxes(simulated.box, *image.spatial_shape, seed=seed + simulated.label)
    result = predict_with_uncertainty(predictor, boxes)
    truth = reference == simulated.label
    region = _boxes_region(boxes, image.spatial_shape)
    return _row(
        model, case, simulated.label, f"{prompt}+sam-u", segmentation_metrics(result.mask, truth, image.spacing, tolerance_mm),
        encode_seconds + time.perf_counter() - started, note=simulated.note,
        uncertainty_auc=error_detection_auc(result.entropy, result.mask, truth, region),
        mean_uncertainty=float(result.entropy[region].mean()),
    )


def _evaluate_volume(model, case, image, reference, modes, tolerance_mm, slice_step, refine_below) -> list[CaseResult]:  # noqa: ANN001
    """3D boxes from each label's mask; CT structures are segmented in the window they are read in
    (lung, bone or soft tissue, from the label name), one propagation run per window."""
    if not any(mode.startswith("box") for mode in modes):
        return []  # clicks are 2D prompts; volumes are prompted with 3D boxes
    labels = [int(v) for v in np.unique(reference) if v != 0]
    groups: dict = {}
    for label in labels:
        window = window_for_target(case.label_names.get(label)) if image.modality == "CT" else None
        groups.setdefault(window, []).append(label)
    rows = []
    for window, members in groups.items():
        started = time.perf_counter()
        prompts = [VolumePrompt(Box3D.from_mask(reference == label), label) for label in members]
        result = segment_volume(model.predictor(), image, prompts, intensity=window, slice_step=slice_step,
                                refine_below=refine_below)
        seconds = (time.perf_counter() - started) / len(members)
        rows += [
            _row(model, case, label, "box3d",
                 segmentation_metrics(result.label_map == label, reference == label, image.spacing, tolerance_mm), seconds)
            for label in members
        ]
    return sorted(rows, key=lambda row: row.label)


def _boxes_region(boxes, shape: tuple[int, int]) -> np.ndarray:  # noqa: ANN001
    """The union of the boxes: where the prompts asked the model to decide."""
    region = np.zeros(shape, bool)
    for box in boxes:
        region[int(box.y0) : int(math.ceil(box.y1)) + 1, int(box.x0) : int(math.ceil(box.x1)) + 1] = True
    return region


def run_name(row: CaseResult, several_prompts: bool) -> str:
    """How a (model, prompt mode) run is named in summaries: the model, plus the mode when several ran."""
    return f"{row.model} ({row.prompt})" if several_prompts else row.model


def summarize(rows: Sequence[CaseResult]) -> dict:
    """Per run (model, or model and prompt mode): per dataset, per structure of each dataset (liver,
    spleen and tumour are not pooled) and per modality n, mean and median of each metric; the mean
    over datasets; how many questionable prompts were kept out; with SAM-U
    rows, how well the uncertainty predicts errors (pixel AUC) and how it correlates with Dice."""
    several = len({r.prompt for r in rows if r.prompt != "box3d"}) > 1
    summary: dict = {}
    for model in sorted({run_name(r, several) for r in rows}):
        scored = [r for r in rows if run_name(r, several) == model and r.note is None]
        per_dataset = {name: _stats([r for r in scored if r.dataset == name]) for name in sorted({r.dataset for r in scored})}
        entry = {
            "datasets": per_dataset,
            "structures": {name: {target: _stats([r for r in scored if r.dataset == name and r.target == target])
                                  for target in sorted({r.target for r in scored if r.dataset == name})}
                           for name in per_dataset},
            "modalities": {name: _stats([r for r in scored if (r.modality or "unknown") == name])
                           for name in sorted({r.modality or "unknown" for r in scored})},
            "mean_over_datasets": {m: float(np.mean([d[m]["mean"] for d in per_dataset.values()])) for m in METRICS}
            if per_dataset else {},
            "excluded_questionable_prompts": sum(1 for r in rows if run_name(r, several) == model and r.note is not None),
        }
        uncertain = [r for r in scored if r.mean_uncertainty is not None]
        if uncertain:
            aucs = [r.uncertainty_auc for r in uncertain if r.uncertainty_auc is not None and not math.isnan(r.uncertainty_auc)]
            entry["uncertainty"] = {
                "error_detection_auc_mean": float(np.mean(aucs)) if aucs else None,
                "targets_with_auc": len(aucs),
                "pearson_mean_uncertainty_vs_dice": _pearson([r.mean_uncertainty for r in uncertain], [r.dice for r in uncertain]),
            }
        summary[model] = entry
    return summary


def _stats(rows: Sequence[CaseResult]) -> dict:
    stats: dict = {"n": len(rows)}
    for metric in METRICS:
        values = np.array([getattr(r, metric) for r in rows], dtype=np.float64)
        stats[metric] = {"mean": float(values.mean()), "median": float(np.median(values))} if len(values) else {}
    return stats


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def rows_as_dicts(rows: Sequence[CaseResult]) -> list[dict]:
    """Rows ready for csv.DictWriter / JSON."""
    return [asdict(r) for r in rows]
