"""Evaluation outputs: ``cases.csv``, ``summary.json`` and a self-contained ``report.html``.

The HTML report states what was measured (models with a fingerprint of their weights, prompt mode,
seed, NSD tolerance, which files had no physical spacing), then holds the side-by-side table (dataset
x model), one row per structure of each dataset with Dice, IoU, NSD and HD95, box plots of Dice per
dataset and per modality, and a gallery of the best and worst targets (the image and a zoomed crop
with ground truth, prediction and prompt), all embedded so the file can be mailed or archived on its
own; it links to ``cases.csv`` and ``summary.json`` beside it.
"""

from __future__ import annotations

import base64
import csv
import html
import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

import medfm
from medfm.evaluate.runner import METRICS, CaseResult, Evaluation, correct_iteratively, rows_as_dicts, run_name, summarize
from medfm.evaluate.simulate import iterative_clicks, simulate_prompts
from medfm.io import read_image
from medfm.io.writers import atomic_path
from medfm.preprocess import to_uint8_rgb
from medfm.segment.model import SegmentationModel

GALLERY_SIZE = 6
#: margin around a gallery target's crop, as a fraction of its size (at least CROP_MIN_MARGIN pixels)
CROP_MARGIN = 0.3
CROP_MIN_MARGIN = 8


def write_outputs(
    evaluation: Evaluation, out_dir: str | Path, models: Mapping[str, SegmentationModel], prompt: str | Sequence[str],
    seed: int = 0,
) -> dict[str, Path]:
    """Write the three outputs into ``out_dir`` (atomically) and return their paths. The times they
    state include the report's own work (the gallery re-segments the targets it shows)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_as_dicts(evaluation.rows)
    paths = {"cases": out_dir / "cases.csv", "summary": out_dir / "summary.json", "report": out_dir / "report.html"}
    with atomic_path(paths["cases"]) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CaseResult.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(evaluation.rows)
    report = render_html(evaluation, summary, models, prompt, seed)
    with atomic_path(paths["report"]) as temporary:
        temporary.write_text(report)
    report_seconds = time.perf_counter() - started
    summary_document = {
        "prompt": prompt, "seed": seed, "tolerance_mm": evaluation.tolerance_mm,
        "seconds": round(evaluation.seconds + report_seconds, 2), "evaluation_seconds": round(evaluation.seconds, 2),
        "report_seconds": round(report_seconds, 2), "cases": len(evaluation.cases), "medfm_version": medfm.__version__,
        "model_weights": {name: weights_fingerprint(model) for name, model in models.items()},
        "spacing_assumed_datasets": _datasets_without_spacing(evaluation.rows), "models": summary,
    }
    with atomic_path(paths["summary"]) as temporary:
        temporary.write_text(json.dumps(summary_document, indent=2, allow_nan=False, default=_json_default) + "\n")
    return paths


def weights_fingerprint(model: SegmentationModel) -> str:
    """The first 12 hex digits of the SHA-256 over the network's tensors (names, shapes, bytes): two
    reports of one name with different fingerprints were not made with the same weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.network.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _datasets_without_spacing(rows: Sequence[CaseResult]) -> list[str]:
    return sorted({r.dataset for r in rows if r.spacing_assumed})


def _modes(prompt: str | Sequence[str]) -> str:
    return prompt if isinstance(prompt, str) else ", ".join(prompt)


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON serialisable: {value!r}")


def comparison_table(summary: Mapping) -> tuple[list[str], list[list[str]]]:
    """Dataset x model table of mean Dice / NSD (the side-by-side view), with a mean row."""
    models = sorted(summary)
    datasets = sorted({d for m in models for d in summary[m]["datasets"]})
    header = ["dataset", *[f"{m} Dice / NSD" for m in models]]
    body = []
    for dataset in datasets:
        cells = [dataset]
        for model in models:
            stats = summary[model]["datasets"].get(dataset)
            cells.append(f"{stats['dice']['mean']:.3f} / {stats['nsd']['mean']:.3f} (n={stats['n']})" if stats else "-")
        body.append(cells)
    body.append(["mean over datasets", *[
        f"{summary[m]['mean_over_datasets']['dice']:.3f} / {summary[m]['mean_over_datasets']['nsd']:.3f}"
        if summary[m]["mean_over_datasets"] else "-" for m in models]])
    return header, body


def render_html(
    evaluation: Evaluation, summary: Mapping, models: Mapping[str, SegmentationModel], prompt: str | Sequence[str], seed: int
) -> str:
    """The whole report as one HTML string."""
    started = time.perf_counter()
    galleries = []
    for name, model in models.items():
        scored = sorted((r for r in evaluation.rows if r.model == name and r.note is None), key=lambda r: r.dice)
        if scored:
            galleries.append(f"<h2>{html.escape(name)}: worst targets</h2>" + _gallery(scored[:GALLERY_SIZE], evaluation, model, seed))
            galleries.append(f"<h2>{html.escape(name)}: best targets</h2>" + _gallery(scored[::-1][:GALLERY_SIZE], evaluation, model, seed))
    gallery_seconds = time.perf_counter() - started
    header, body = comparison_table(summary)
    pixels = _datasets_without_spacing(evaluation.rows)
    model_lines = "".join(
        f"<li><b>{html.escape(name)}</b> ({html.escape(model.arch)}), weights {weights_fingerprint(model)}</li>"
        for name, model in models.items()
    )
    sections = [
        "<h1>medfm evaluation</h1>",
        f"<ul>{model_lines}</ul>",
        f"<p>{len(evaluation.cases)} cases, prompt <b>{html.escape(_modes(prompt))}</b>, seed {seed}, medfm {medfm.__version__}. "
        f"NSD at a tolerance of {evaluation.tolerance_mm:g} mm; HD95 is the 95th percentile of the surface distances. "
        + (f"The files of {html.escape(', '.join(pixels))} state no physical spacing: their NSD tolerance and HD95 are in "
           "pixels (1 px taken as 1 mm). " if pixels else "")
        + f"Time: {evaluation.seconds + gallery_seconds:.0f} s ({evaluation.seconds:.0f} s scoring, {gallery_seconds:.0f} s "
        "re-segmenting the gallery). Targets whose prompt is questionable are listed but kept out of the means.</p>",
        "<p>Every target's row: <a href='cases.csv'>cases.csv</a>; the numbers below: "
        "<a href='summary.json'>summary.json</a>.</p>",
        "<h2>Mean Dice / NSD per dataset</h2>" + _table(header, body),
    ]
    for run, entry in summary.items():
        sections.append(f"<h2>{html.escape(run)}: per structure</h2>" + _table(*structure_table(entry, pixels)))
    sections += [
        "<h2>Dice per dataset</h2>" + _img(_box_plot(evaluation.rows, "dataset")),
        "<h2>Dice per modality</h2>" + _img(_box_plot(evaluation.rows, "modality")),
    ]
    if galleries:
        sections.append("<p>Each target: the image and a zoomed crop. Outlines: <span style='color:green'>reference</span>, "
                        "<span style='color:red'>prediction</span>; prompt box in yellow, positive clicks cyan, negative "
                        "clicks magenta.</p>")
        sections += galleries
    notes = [r for r in evaluation.rows if r.note is not None]
    if notes:
        sections.append("<h2>Questionable prompts (not averaged)</h2>" + _table(
            ["model", "dataset", "case", "target", "Dice", "note"],
            [[r.model, r.dataset, r.case, r.target, f"{r.dice:.3f}", r.note] for r in notes]))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
             ".gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:560px}"
             ".gallery img{width:100%}.gallery figcaption{font-size:12px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>medfm evaluation</title><style>{style}</style></head><body>" \
           + "\n".join(sections) + "</body></html>\n"


def structure_table(entry: Mapping, pixel_datasets: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    """One run's rows per (dataset, structure): n, Dice mean and median, IoU, NSD and HD95 (median;
    in px for the datasets in ``pixel_datasets``)."""
    header = ["dataset", "structure", "n", "Dice mean", "Dice median", "IoU mean", "NSD mean", "HD95 median"]
    body = []
    for dataset, structures in entry["structures"].items():
        unit = "px" if dataset in pixel_datasets else "mm"
        for structure, stats in structures.items():
            body.append([dataset, structure, str(stats["n"]), f"{stats['dice']['mean']:.3f}", f"{stats['dice']['median']:.3f}",
                         f"{stats['iou']['mean']:.3f}", f"{stats['nsd']['mean']:.3f}", f"{stats['hd95']['median']:.1f} {unit}"])
    return header, body


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _img(png: bytes) -> str:
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _figure_png(figure) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _box_plot(rows: Sequence[CaseResult], by: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.note is None]
    groups = sorted({getattr(r, by) or "unknown" for r in scored})
    several = len({r.prompt for r in rows if r.prompt != "box3d"}) > 1
    models = sorted({run_name(r, several) for r in scored})
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(groups) * len(models) + 2), 4))
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        data = [[r.dice for r in scored if run_name(r, several) == model and (getattr(r, by) or "unknown") == g] for g in groups]
        positions = np.arange(len(groups)) + (index - (len(models) - 1) / 2) * width
        plot = axis.boxplot([d if d else [np.nan] for d in data], positions=positions, widths=width * 0.9,
                            patch_artist=True, showfliers=True)
        for patch in plot["boxes"]:
            patch.set_facecolor(f"C{index}")
            patch.set_alpha(0.5)
        axis.plot([], [], color=f"C{index}", label=model, linewidth=6, alpha=0.5)
    axis.set_xticks(np.arange(len(groups)), groups, rotation=45, ha="right")
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower left")
    axis.grid(axis="y", alpha=0.3)
    return _figure_png(figure)


def _gallery(rows: Sequence[CaseResult], evaluation: Evaluation, model: SegmentationModel, seed: int) -> str:
    """Re-run the chosen 2D targets (a handful of encodes) and draw image, truth, prediction, prompt."""
    items = []
    for row in rows:
        case = evaluation.cases[(row.dataset, row.case)]
        if case.is_volume:
            continue
        items.append(f"<figure>{_img(_overlay_png(case, row, model, seed))}<figcaption>{html.escape(row.dataset)}/"
                     f"{html.escape(row.case)} {html.escape(row.target)} ({html.escape(row.prompt)}): "
                     f"Dice {row.dice:.3f}, NSD {row.nsd:.3f}</figcaption></figure>")
    return "<div class='gallery'>" + "".join(items) + "</div>"


def _overlay_png(case, row: CaseResult, model: SegmentationModel, seed: int) -> bytes:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = read_image(case.image_path, modality=case.modality if case.modality in {"CT", "MR"} else None)
    reference = read_image(case.mask_path).array
    mode = row.prompt.removesuffix("+sam-u")
    simulated = next(p for p in simulate_prompts(reference, mode, seed=seed) if p.label == row.label)
    predictor = model.predictor()
    predictor.set_image(image)
    truth = reference == row.label
    points = simulated.points
    if iterative_clicks(mode) is not None:  # the mask after the corrections, with the clicks that made it
        passes, points = correct_iteratively(predictor, simulated.box, truth, iterative_clicks(mode))
        prediction = passes[-1]
    else:
        prediction = predictor.predict(
            boxes=None if simulated.box is None else [simulated.box],
            points=None if points is None else points.coords[None],
            point_labels=None if points is None else points.labels[None],
        )
    figure, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    for axis in axes:
        axis.imshow(to_uint8_rgb(image.array, None, image.modality))
        axis.contour(truth, levels=[0.5], colors=["lime"], linewidths=1.2)
        axis.contour(prediction.masks[0], levels=[0.5], colors=["red"], linewidths=1.2)
        if simulated.box is not None:
            box = simulated.box
            axis.add_patch(Rectangle((box.x0, box.y0), box.x1 - box.x0, box.y1 - box.y0, fill=False, edgecolor="yellow", linewidth=1))
        if points is not None:
            for (x, y), label in zip(points.coords, points.labels):
                axis.plot(x, y, "o", color="cyan" if label else "magenta", markersize=4)
        axis.set_axis_off()
    (x0, y0, x1, y1) = crop_window(truth | prediction.masks[0], simulated.box, truth.shape)
    axes[1].set_xlim(x0 - 0.5, x1 + 0.5)
    axes[1].set_ylim(y1 + 0.5, y0 - 0.5)
    return _figure_png(figure)


def crop_window(region: np.ndarray, box, shape: tuple[int, int]) -> tuple[int, int, int, int]:  # noqa: ANN001 - Box or None
    """A square-ish window (x0, y0, x1, y1, inclusive) around the target, its prediction and its box,
    with a margin, clipped to the image: small targets become visible in the gallery."""
    ys, xs = np.nonzero(region)
    xs_all = [*xs.tolist(), *([box.x0, box.x1] if box is not None else [])]
    ys_all = [*ys.tolist(), *([box.y0, box.y1] if box is not None else [])]
    if not xs_all:
        return 0, 0, shape[1] - 1, shape[0] - 1
    x0, x1, y0, y1 = min(xs_all), max(xs_all), min(ys_all), max(ys_all)
    half = max(x1 - x0, y1 - y0) / 2 * (1 + 2 * CROP_MARGIN) + CROP_MIN_MARGIN
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (int(max(0, cx - half)), int(max(0, cy - half)), int(min(shape[1] - 1, cx + half)), int(min(shape[0] - 1, cy + half)))


__all__ = ["METRICS", "comparison_table", "crop_window", "render_html", "structure_table", "weights_fingerprint", "write_outputs"]
