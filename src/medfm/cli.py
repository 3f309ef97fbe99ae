"""The ``medfm`` command. Thin by design: parse, call the library, format; no logic lives here."""

from __future__ import annotations

import json
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

import medfm
from medfm.errors import MedfmError
from medfm.intensity import PRESET_NAMES
from medfm.io.outputs import check_outputs
from medfm.io.checks import DEFAULT_MAX_BYTES

_ON_TERMINAL = sys.stdout.isatty() and sys.stderr.isatty()
BACKEND_HELP = ("What runs the image encoder on the CPU: torch, or openvino (same masks; 1.1-1.2x on an idle CPU, more under load; "
                "pip install 'medfm[openvino]'; converted once, cached under $MEDFM_HOME/openvino).")

app = typer.Typer(
    name="medfm",
    help="Medical-imaging foundation models: segment, classify, retrieve, adapt and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # rich panels on a terminal; in files, pipes and logs click's plain help and usage errors, one
    # line per option (wrapped text would split names such as medfm-litemedsam-ft at a hyphen)
    rich_markup_mode="rich" if _ON_TERMINAL else None,
    context_settings={} if _ON_TERMINAL else {"terminal_width": 10_000, "max_content_width": 10_000},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"medfm {medfm.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print medfm's version and exit.")] = False,
) -> None:
    """Medical-imaging foundation models: segment, classify, retrieve, adapt and evaluate."""


def _say(text: str) -> None:
    """One line of the command's result on stdout, never wrapped (paths stay whole when piped)."""
    print(text, flush=True)


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[str] = ()) -> None:
    """A table: drawn by rich on a terminal; off a terminal, the title and tab-separated lines,
    every cell whole, for ``| cut``, ``| grep`` and files."""
    if not sys.stdout.isatty():
        print(title)
        for row in ([list(header)] if header else []) + [list(r) for r in rows]:
            print("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=bool(header))
    for column in header or [""] * (len(rows[0]) if rows else 0):
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def info(
    files: Annotated[list[Path], typer.Argument(help="Image files, DICOM folders or zips.")],
    modality: Annotated[Optional[str], typer.Option(help="Override the modality stored in the file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    frame: Annotated[Optional[int], typer.Option(help="One frame (0-based) of a multi-frame DICOM, as a 2D image.")] = None,
    max_bytes: Annotated[int, typer.Option(help="Largest pixel data a file may declare, in bytes.")] = DEFAULT_MAX_BYTES,
) -> None:
    """Shape, spacing, orientation, modality and intensity range of each file."""
    summaries = [medfm.read_image(path, modality=modality, frame=frame, max_bytes=max_bytes).summary() for path in files]
    if as_json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
        return
    for summary in summaries:
        intensity = summary["intensity"]
        rows = {
            "format": summary["format"],
            "shape": f"{summary['shape']} {summary['axes']}",
            "dtype": summary["dtype"],
            "spacing (mm)": ", ".join(f"{s:g}" for s in summary["spacing_mm"]),
            "origin (mm)": ", ".join(f"{o:g}" for o in summary["origin_mm"]),
            "orientation": summary["orientation"],
            "modality": summary["modality"] or "unknown (pass --modality)",
            "intensity": f"min {intensity['min']:g}, max {intensity['max']:g}, mean {intensity['mean']:.4g}, "
            f"p0.5-p99.5 {intensity['p0.5']:g} to {intensity['p99.5']:g}",
        }
        _print_table(summary["path"], (), [(key, str(value)) for key, value in rows.items()])


@app.command()
def models(
    category: Annotated[Optional[str], typer.Option(help="visually-prompted or textually-prompted.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="e.g. CT, MRI, X-ray, dermoscopy.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="box, point, mask, text or none.")] = None,
    support: Annotated[Optional[str], typer.Option(help="e.g. runs-published-weights, planned.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The catalog: every model card, the --model names medfm loads it by, what runs offline, its support."""
    from medfm.catalog import CARD_TABLE_COLUMNS, card_record, cards_table_rows, table_title

    cards = medfm.list_models(category=category, modality=modality, prompt=prompt, support=support)
    if as_json:
        print(json.dumps([card_record(card) for card in cards], indent=2))
        return
    _print_table(table_title(cards), CARD_TABLE_COLUMNS, cards_table_rows(cards))


@app.command()
def segment(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Image, volume, DICOM folder or zip.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mask file: .png, .nii.gz, .npz or .dcm (DICOM-SEG).")],
    box: Annotated[Optional[list[str]], typer.Option(help="X0 Y0 X1 Y1 in input pixels; repeat for more labels.", metavar="X0 Y0 X1 Y1")] = None,
    point: Annotated[Optional[list[str]], typer.Option(help="Positive click X Y; repeatable.", metavar="X Y")] = None,
    negative_point: Annotated[Optional[list[str]], typer.Option(help="Negative click X Y; repeatable.", metavar="X Y")] = None,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice (along Z) of a volume.")] = None,
    box3d: Annotated[Optional[list[str]], typer.Option(help="3D box X0 Y0 Z0 X1 Y1 Z1 (voxels, inclusive); repeat for more labels.", metavar="X0 Y0 Z0 X1 Y1 Z1")] = None,
    boxes_from: Annotated[Optional[Path], typer.Option(help="Label map on the same grid: segment every label's 3D box.")] = None,
    slice_step: Annotated[int, typer.Option(help="3D: segment every K-th slice (and the box's end slices) with the model and interpolate between: about K times faster, may miss detail that changes within K slices.")] = 1,
    refine_below: Annotated[Optional[float], typer.Option(help="3D, with --slice-step K: where two neighbouring key slices' masks overlap with a Dice below this (e.g. 0.9), segment the slice between them too, recursively: an adaptive step.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Registry name or model folder (default: medfm-litemedsam-ft).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local checkpoint file for the named model.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Override the file's modality (e.g. CT).")] = None,
    window: Annotated[Optional[str], typer.Option(help=f"Intensity preset: {', '.join(PRESET_NAMES)}.")] = None,
    overlay: Annotated[Optional[Path], typer.Option(help="Also write a PNG of the image (3D: the first box's middle slice) with masks and prompts.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="A reference mask: print the Dice of each label against the structure its box outlines.")] = None,
    uncertainty: Annotated[Optional[Path], typer.Option(help="Also write SAM-U's uncertainty map (20 jittered boxes) here.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, or bf16: faster where the CPU/GPU has bfloat16; a few boundary pixels may differ.")] = "fp32",
    frame: Annotated[Optional[int], typer.Option(help="One frame (0-based) of a multi-frame DICOM, as a 2D image.")] = None,
    max_bytes: Annotated[int, typer.Option(help="Largest pixel data the input may declare, in bytes.")] = DEFAULT_MAX_BYTES,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "torch",
) -> None:
    """Segment a 2D image or a slice from boxes and clicks, or a volume from 3D boxes; one label per box."""
    from medfm.prompts import Box, Box3D, Points
    from medfm.segment.request import SegmentRequest

    clicks = [(_numbers(t, 2, "--point"), 1) for t in point or []] + [(_numbers(t, 2, "--negative-point"), 0) for t in negative_point or []]
    request = SegmentRequest(
        input_path, output, tuple(Box(*_numbers(text, 4, "--box")) for text in box or []),
        Points([xy for xy, _ in clicks], [label for _, label in clicks]) if clicks else None, slice_index,
        tuple(Box3D(*_numbers(text, 6, "--box3d", whole=True)) for text in box3d or []), boxes_from, slice_step,
        refine_below, model, weights, modality, window, overlay, reference, uncertainty, device, precision, frame, max_bytes, backend,
    )
    request.check()  # options, prompts and every output path, before torch is even imported
    from medfm.segment.run import run_request

    outcome = run_request(request, progress=True)
    if outcome.volume is not None:
        volume = outcome.volume
        _say(f"wrote {_paths(outcome.written)} ({len(volume.slices)} structure(s), {sum(map(len, volume.slices.values()))} "
             f"slices segmented, {volume.encoded_slices} encoded) in {volume.seconds:.1f} s")
    else:
        result = outcome.result
        _say(f"wrote {_paths(outcome.written)} ({len(result.prediction.masks)} label(s), scores "
             + ", ".join(f"{s:.3f}" for s in result.prediction.scores)
             + f"); encoder {result.encode_seconds:.2f} s, decoder {result.decode_seconds * 1000:.0f} ms")
    from medfm.evaluate.reference import score_outcome

    scores = score_outcome(outcome)
    if scores:
        _say("Dice vs reference: " + ", ".join(
            ("foreground" if score.label is None else f"label {score.label}")
            + ("" if score.label is None or score.reference_label == score.label else
               f" (reference {'label ' + str(score.reference_label) if score.reference_label is not None else 'has none there'})")
            + f": {score.dice:.4f}" for score in scores))


def _paths(paths: list[Path]) -> str:
    return ", ".join(str(path) for path in paths)


def _mixed_weights(text: str | None) -> dict[str, float] | None:
    """``--mixed-weights kind=weight,...`` as a dict (checked by the trainer's config)."""
    if text is None:
        return None
    weights = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        kind, _, value = item.partition("=")
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            raise medfm.OptionError(f"--mixed-weights takes kind=weight pairs, e.g. box=0.3,iterative=0.7; not {item!r}") from None
    return weights


def _numbers(text: str, count: int, option: str, whole: bool = False) -> list[float]:
    """Parse 'X0 Y0 X1 Y1' (spaces or commas) for an option that takes several numbers."""
    parts = text.replace(",", " ").split()
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != count:
        raise medfm.PromptError(f"{option} takes {count} numbers, got '{text}'")
    if whole and any(v != int(v) for v in values):
        raise medfm.PromptError(f"{option} takes whole voxel indices, got '{text}'")
    return [int(v) for v in values] if whole else values


@app.command("segment-batch")
def segment_batch(
    prompts: Annotated[Path, typer.Option(help="JSON lines: {\"image\": path, \"boxes\": [[x0, y0, x1, y1]], \"points\", \"slice\", \"box3d\", \"boxes_from\", \"slice_step\", \"refine_below\", \"id\"}.")],
    out: Annotated[Path, typer.Option(help="Folder for the masks and results.jsonl (a rerun resumes there).")],
    model: Annotated[Optional[str], typer.Option(help="Registry name or model folder (default: medfm-litemedsam-ft).")] = None,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (Ray Data; pip install 'medfm[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto or ray://HOST:PORT (default: a local Ray).")] = None,
    workers: Annotated[int, typer.Option(help="Ray: encoder (and decoder) actors, each loading the model once.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="Ray: GPUs per encoder actor (0: CPU).")] = 0.0,
    cpus_per_worker: Annotated[float, typer.Option(help="Ray: CPUs per encoder actor.")] = 1.0,
    retry_errors: Annotated[bool, typer.Option(help="Redo cases whose last row is an error even if nothing changed.")] = False,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "torch",
) -> None:
    """Segment every case of a prompts file, one mask per case; resumable, on one machine or a Ray cluster."""
    from medfm.batch import segment_batch as run_batch

    summary = run_batch(prompts, out, model=model, engine=engine, address=address, workers=workers,
                        gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, retry_errors=retry_errors,
                        progress=sys.stderr.isatty(), backend=backend)
    _say(f"{summary.ok} done, {summary.errors} error(s), {summary.skipped} already done, in {summary.seconds:.1f} s; "
         f"see {summary.results}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="A dataset folder, a collection with manifest.json, or nnU-Net raw.")],
    out: Annotated[Path, typer.Option(help="Folder for cases.csv, summary.json and report.html.")],
    model: Annotated[Optional[list[str]], typer.Option(help="Registry name or model folder; repeat to compare.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="box, box-jitter, points:K, points:K+N (negatives) or iterative:K (a box, then K correction clicks); repeatable.")] = None,
    uncertainty: Annotated[bool, typer.Option(help="SAM-U: 20 jittered boxes per target, uncertainty statistics.")] = False,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Only these datasets of a collection; repeatable.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many cases per dataset.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompt simulation.")] = 0,
    tolerance_mm: Annotated[float, typer.Option(help="NSD tolerance in mm.")] = 2.0,
    slice_step: Annotated[int, typer.Option(help="3D cases: segment every K-th slice and interpolate between (faster, may cost Dice).")] = 1,
    refine_below: Annotated[Optional[float], typer.Option(help="3D cases, with --slice-step K: also segment the slice between two key slices whose masks' Dice is below this, recursively.")] = None,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (cases spread over Ray actors; pip install 'medfm[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto or ray://HOST:PORT (default: a local Ray).")] = None,
    workers: Annotated[int, typer.Option(help="Ray: actors, each loading the models once and evaluating its share of cases.")] = 1,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "torch",
) -> None:
    """Dice, IoU, NSD and HD95 of one or more models on a dataset, with a report."""
    from medfm.evaluate.report import comparison_table, write_outputs
    from medfm.batch.engines import check_engine
    from medfm.evaluate.runner import EVALUATE_ON_RAY, evaluate as run_evaluation

    check_outputs({"--out": (out, "folder")}, {"--data": data, **{f"--model {m}": m for m in model or []}})
    check_engine(engine, workers, EVALUATE_ON_RAY)  # before any model loads
    from medfm.evaluate.simulate import check_mode
    from medfm.segment.openvino_backend import check_backend

    for mode in prompt or []:
        check_mode(mode)  # an unknown --prompt is one line, before any model loads
    check_backend(backend)
    from medfm.segment.model import DEFAULT_MODEL, load

    models = {m.name: m for m in (load(name, backend=backend) for name in (model or [DEFAULT_MODEL]))}
    modes = prompt or ["box"]
    evaluation = run_evaluation(list(models.values()), data, prompt=modes, uncertainty=uncertainty, seed=seed,
                                datasets=dataset, limit_per_dataset=limit, tolerance_mm=tolerance_mm, slice_step=slice_step,
                                refine_below=refine_below, progress=True, engine=engine, address=address, workers=workers)
    paths = write_outputs(evaluation, out, models, modes if len(modes) > 1 else modes[0], seed)
    written = json.loads(paths["summary"].read_text())
    header, body = comparison_table(written["models"])
    _print_table(f"{len(evaluation.cases)} cases in {written['seconds']:.0f} s (report included)", header, body)
    _say(f"wrote {paths['cases']}, {paths['summary']}, {paths['report']}")


@app.command()
def train(
    recipe: Annotated[str, typer.Option(help="full, decoder, lora, adapter or autoprompt.")],
    data: Annotated[Path, typer.Option(help="Training data: a dataset folder, a collection, or nnU-Net raw.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: best/, last/, state.pt, metrics.json.")],
    base: Annotated[str, typer.Option(help="Base model: registry name or model folder.")] = "litemedsam",
    val: Annotated[Optional[Path], typer.Option(help="Validation data (default: a patient-wise split of --data).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of --data for validation when --val is not given.")] = 0.1,
    min_val_cases: Annotated[int, typer.Option(help="Hold out at least this many cases per dataset (at most half of it).")] = 0,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Only these datasets of a collection; repeatable.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many cases per dataset.")] = None,
    split_limit: Annotated[Optional[int], typer.Option(help="After the split, at most this many cases per dataset on each side (a quick run; the held-out cases stay those of the full split).")] = None,
    slices_per_volume: Annotated[int, typer.Option(help="Foreground slices taken from each 3D volume (evenly spaced).")] = 8,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    budget_minutes: Annotated[Optional[float], typer.Option(help="Stop after this much training time.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step and process.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; linear warm-up, cosine decay).")] = 1e-4,
    encoder_lr: Annotated[Optional[float], typer.Option(help="The image encoder's peak learning rate (default: --lr).")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    warmup: Annotated[float, typer.Option(help="Share of the steps spent warming up.")] = 0.05,
    prompt: Annotated[Optional[str], typer.Option(help="box, clicks (iterative) or mixed (box, clicks, both, corrections); autoprompt takes none.")] = None,
    click_iterations: Annotated[int, typer.Option(help="Correction clicks after the first (--prompt clicks; at most, mixed).")] = 3,
    mixed_weights: Annotated[Optional[str], typer.Option(help="--prompt mixed: how often each kind is drawn, e.g. box=0.2,clicks=0.1,box+clicks=0.1,iterative=0.6 (kinds left out: never; default 0.3/0.25/0.15/0.3).")] = None,
    box_jitter: Annotated[int, typer.Option(help="Box jitter in model-input pixels.")] = 5,
    augment: Annotated[bool, typer.Option(help="Flips, rotation, scaling and intensity jitter (not with cached embeddings).")] = True,
    robust_input: Annotated[bool, typer.Option(help="Also a random resize kernel, slight blur and gamma (recipes that train the image encoder).")] = False,
    train_prompt_encoder: Annotated[bool, typer.Option(help="Train the prompt encoder too (e.g. to teach a box-only model clicks).")] = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (lora).")] = 4,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (lora; default: the rank).")] = None,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated Linear names in the image encoder (lora).")] = "qkv",
    adapter_ratio: Annotated[float, typer.Option(help="Adapter width as a share of the block width (adapter).")] = 0.25,
    prompt_tokens: Annotated[int, typer.Option(help="Sparse prompt tokens generated per image (autoprompt).")] = 4,
    cache_embeddings: Annotated[Optional[Path], typer.Option(help="Embedding cache folder for frozen-encoder recipes (default RUN_DIR/embedding-cache).")] = None,
    backend: Annotated[str, typer.Option(help="What fills the embedding cache of a frozen encoder on the CPU: torch, or openvino (faster when other jobs share the cores, ~1.15x on an idle 2-core CPU; pip install 'medfm[openvino]').")] = "torch",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, data order, augmentation and prompts.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast (default: on for CUDA with bf16).")] = None,
    workers: Annotated[int, typer.Option("--loader-workers", help="Data-loading worker processes (per training process).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output after its last finished epoch.")] = False,
    engine: Annotated[str, typer.Option(help="local (this process; torchrun for several) or ray (Ray Train; pip install 'medfm[ray]').")] = "local",
    ray_workers: Annotated[int, typer.Option("--workers", help="Ray: training processes (torch.distributed ranks), 1 with --engine local.")] = 1,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto or ray://HOST:PORT (default: a local Ray).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(help="Ray: GPUs per training process (0: CPU, gloo).")] = 0.0,
    max_failures: Annotated[int, typer.Option(help="Ray: restart the workers this many times after a failure, from the last epoch.")] = 0,
) -> None:
    """Adapt a SAM-family model to your data with one of the survey's recipes (see medfm.train)."""
    check_outputs({"--output": (out, "folder")}, {"--data": data, "--val": val, "--base": base})
    from medfm.batch.engines import check_engine

    check_engine(engine, ray_workers, "medfm train --engine ray")  # before any model loads
    from medfm.segment.openvino_backend import check_backend

    check_backend(backend)
    if engine == "local" and ray_workers != 1:
        raise medfm.OptionError("--workers N runs N processes on Ray (--engine ray); locally use torchrun, "
                                "and --loader-workers for data loading")
    from medfm.train import Recipe, TrainConfig, train as run_training

    recipe_spec = Recipe(recipe, lora_rank=lora_rank, lora_alpha=lora_alpha, adapter_ratio=adapter_ratio,
                         lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()), prompt_tokens=prompt_tokens,
                         prompt_encoder=train_prompt_encoder)
    config = TrainConfig(
        base=base, data=data, out=out, recipe=recipe_spec, val=val, validation_fraction=val_fraction,
        min_validation_cases=min_val_cases, datasets=tuple(dataset) if dataset else None, limit_per_dataset=limit,
        split_limit=split_limit, slices_per_volume=slices_per_volume, epochs=epochs, max_steps=max_steps, budget_minutes=budget_minutes,
        batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, encoder_lr=encoder_lr, weight_decay=weight_decay, warmup=warmup, prompt=prompt, click_iterations=click_iterations,
        mixed_weights=_mixed_weights(mixed_weights), box_jitter=box_jitter, augment=augment, robust_input=robust_input, cache_embeddings=cache_embeddings, backend=backend, seed=seed, device=device,
        bf16=bf16, workers=workers, resume=resume, progress=True,
    )
    if engine == "ray":
        from medfm.train.ray_engine import train_on_ray

        result = train_on_ray(config, workers=ray_workers, address=address, gpus_per_worker=gpus_per_worker,
                              max_failures=max_failures, log=_say)
    else:
        result = run_training(config, log=_say)
    _say(f"best: {result.best}  last: {result.last}  ({result.seconds:.0f} s)")


@app.command("train-lm")
def train_lm(
    recipe: Annotated[str, typer.Option(help="continue (causal-LM training on medical text) or instruct (question -> answer, loss on the answer).")],
    base: Annotated[str, typer.Option(help="Base language model: registry name, transformers folder, hub id or .gguf file.")],
    data: Annotated[list[Path], typer.Option(help="A folder of reports (reports.jsonl) or questions (the layouts of medfm qa); repeatable.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: best/, last/, state.pt, metrics.json.")],
    lora: Annotated[bool, typer.Option("--lora/--no-lora", help="Train LoRA adapters (a small delta folder) or the whole model.")] = True,
    val_fraction: Annotated[float, typer.Option(help="Share of each dataset held out for validation (by id or content hash).")] = 0.2,
    val_items: Annotated[int, typer.Option(help="Validation questions (and texts) per dataset scored after each epoch.")] = 100,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    budget_minutes: Annotated[Optional[float], typer.Option(help="Stop after this much training time.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; linear warm-up, cosine decay).")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Longest sequence in tokens (instruct skips longer items, continue cuts texts).")] = 512,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of LoRA initialisation and data order.")] = 0,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast (default: on for CPUs with AMX-bf16 and CUDA with bf16).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its state.pt.")] = False,
) -> None:
    """Adapt a language model to medicine with PMC-LLaMA's recipe (see medfm.train.lm)."""
    check_outputs({"--output": (out, "folder")}, {f"--data {folder}": folder for folder in data} | {"--base": Path(base)})
    from medfm.train.lm import LMTrainConfig, fit_causal_lm

    config = LMTrainConfig(
        recipe=recipe, base=base, data=tuple(data), out=out, lora=lora, val_fraction=val_fraction, val_items=val_items,
        epochs=epochs, max_steps=max_steps, budget_minutes=budget_minutes, lr=lr, batch_size=batch_size,
        max_length=max_length, lora_rank=lora_rank, seed=seed, bf16=bf16, resume=resume, progress=_ON_TERMINAL,
    )
    result = fit_causal_lm(config, log=_say)
    _say(f"best: {result.best}  last: {result.last}  ({result.seconds:.0f} s)")


@app.command("train-vlm")
def train_vlm(
    stage: Annotated[int, typer.Option(help="1: the connector on image-text pairs; 2: connector + LoRA on instructions.")],
    data: Annotated[list[Path], typer.Option(help="An image-text collection root or dataset folder (records.jsonl); repeatable.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Run folder: best/, last/, state.pt, metrics.json.")],
    base: Annotated[Optional[Path], typer.Option(help="Start from this run (its best/) or model folder (stage 2: stage 1's).")] = None,
    language_model: Annotated[str, typer.Option("--lm", help="The frozen LM: a medfm.lm name or folder.")] = "smollm2-135m",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
    epoch_size: Annotated[Optional[int], typer.Option(help="Samples per epoch (default: the training samples).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    budget_minutes: Annotated[Optional[float], typer.Option(help="Stop after this much training time.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 1e-3 stage 1, 3e-4 stage 2).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 8,
    max_answer_tokens: Annotated[int, typer.Option(help="Answers (notes) are cut at this many tokens.")] = 48,
    limit: Annotated[Optional[int], typer.Option(help="At most this many training images per dataset (features are computed once per image).")] = None,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bf16 autocast where the CPU has native bf16.")] = True,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its state.pt.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
) -> None:
    """Train a small LLaVA-style model (frozen medfm-clip-small tower, MLP connector, SmolLM2 + LoRA)."""
    check_outputs({"--output": (out, "folder")}, {"--base": base, **{f"--data {p}": p for p in data}})
    from medfm.train.vlm import VLMTrainConfig, train_vlm as run_training

    config = VLMTrainConfig(stage=stage, data=list(data), output=out, base=base, language_model=language_model,
                            epochs=epochs, epoch_size=epoch_size, max_steps=max_steps, budget_minutes=budget_minutes,
                            lr=lr, batch_size=batch_size, max_answer_tokens=max_answer_tokens, limit=limit, bf16=bf16, resume=resume,
                            seed=seed)
    result = run_training(config, log=_say)
    _say(f"best: {result.best} (validation loss {result.best_val_loss:.3f})  last: {result.last}  ({result.steps} steps)")


@app.command()
def blend(
    run: Annotated[Path, typer.Argument(help="A model folder written by medfm train (full or decoder recipe), e.g. RUN/best.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The blended model folder.")],
    alpha: Annotated[float, typer.Option(help="Weight of the trained tensors: 1 is the run, 0 its base.")] = 0.5,
) -> None:
    """WiSE-FT: move a fine-tune back towards its base in weight space (keeps most of the gain,
    gives back what the base did well)."""
    check_outputs({"--output": (out, "folder")}, {"RUN": run})
    from medfm.train.recipes import blend_with_base

    folder = blend_with_base(run, alpha, out)
    _say(f"wrote {folder} (base + {alpha:g} x (trained - base))")


@app.command()
def classify(
    image: Annotated[Path, typer.Argument(help="A 2D image: PNG/JPEG, DICOM, a 2D NIfTI.")],
    labels: Annotated[list[str], typer.Option("--labels", help="Class names after the image: --labels pneumonia normal ...")],
    model: Annotated[str, typer.Option(help="medfm-clip-small, biomedclip, chexzero, hf-hub:ORG/NAME or a model folder.")] = "medfm-clip-small",
    weights: Annotated[Optional[Path], typer.Option(help="Local copy of the named model's published weights.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="CheXzero: OpenAI CLIP's tokenizer folder or hub id.")] = None,
    pos_neg: Annotated[bool, typer.Option("--pos-neg", help="CheXzero's scoring: each label against 'no <label>'.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Zero-shot classification: the probability of each text label for the image."""
    from medfm.clip import classify as zero_shot, load

    network = load(model, weights=weights, tokenizer=tokenizer)
    probabilities = zero_shot(image, labels, network, method="pos-neg" if pos_neg else "softmax")
    if as_json:
        print(json.dumps(probabilities, indent=2))
        return
    rows = [(label, f"{p:.4f}") for label, p in sorted(probabilities.items(), key=lambda item: -item[1])]
    _print_table(f"{image} ({network.name}{', each label vs no label' if pos_neg else ''})", ("label", "probability"),
                 rows, right=("probability",))


@app.command()
def retrieve(
    text: Annotated[str, typer.Option(help="The query, e.g. 'chest x-ray with pneumonia'.")],
    images: Annotated[Path, typer.Option(help="Folder of images to rank.")],
    top: Annotated[int, typer.Option(help="How many images to list.")] = 5,
    model: Annotated[str, typer.Option(help="medfm-clip-small, biomedclip, chexzero, hf-hub:ORG/NAME or a model folder.")] = "medfm-clip-small",
    weights: Annotated[Optional[Path], typer.Option(help="Local copy of the named model's published weights.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="CheXzero: OpenAI CLIP's tokenizer folder or hub id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Text-to-image retrieval: the images of a folder most similar to a text, best first."""
    from medfm.clip import load, retrieve_images

    hits = retrieve_images(text, images, load(model, weights=weights, tokenizer=tokenizer), top_k=top)
    if as_json:
        print(json.dumps([{"image": str(path), "similarity": score} for path, score in hits], indent=2))
        return
    _print_table(f"'{text}'", ("rank", "image", "similarity"),
                 [(str(rank), str(path), f"{score:.4f}") for rank, (path, score) in enumerate(hits, 1)])


VLM_MODEL_HELP = ("medfm-vlm-small (default: medfm-clip-small's image tower, a trained connector and SmolLM2-135M "
                  "with LoRA), medfm-experts-smollm2 (medfm-clip-small describes the image in text, SmolLM2-135M "
                  "answers from that text; it never sees pixels), llava-med, xraygpt or med-flamingo (--weights FOLDER), "
                  "medblip or radfm (--weights FOLDER; read whole 3D volumes), or a LLaVA / llava folder.")


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="PNG/JPEG, DICOM or NIfTI (a volume needs --slice, except with medblip or radfm, which read it whole).")],
    question: Annotated[str, typer.Argument(help="The question, in quotes.")],
    model: Annotated[Optional[str], typer.Option(help=VLM_MODEL_HELP)] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local folder of the named model's published weights.")] = None,
    choices: Annotated[Optional[list[str]], typer.Option("--choices", help="Closed question: answer with the most likely of these (two or more).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice (along Z) of a volume.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (image, question, model, answer) instead of streaming.")] = False,
) -> None:
    """Ask a question about an image; the answer streams as it is written. Research use, not diagnosis."""
    from medfm.vlm.api import DEFAULT_MODEL, ask as ask_model

    answer = ask_model(image, question, model, choices, weights=weights, slice_index=slice_index,
                       max_new_tokens=max_new_tokens, stream=None if as_json else _print_piece)
    if as_json:
        print(json.dumps({"image": str(image), "question": question, "model": model or DEFAULT_MODEL, "choices": choices,
                          "answer": answer}, indent=2))
    else:
        print(flush=True)


@app.command()
def report(
    image: Annotated[Path, typer.Argument(help="PNG/JPEG, DICOM or NIfTI (a volume needs --slice, except with medblip or radfm, which read it whole).")],
    model: Annotated[Optional[str], typer.Option(help=VLM_MODEL_HELP)] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local folder of the named model's published weights.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest draft, in tokens.")] = 200,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice (along Z) of a volume.")] = None,
) -> None:
    """A findings-style draft for an image (streams). A draft to check: research use, not diagnosis."""
    from medfm.vlm.api import report as draft

    draft(image, model, weights=weights, slice_index=slice_index, max_new_tokens=max_new_tokens, stream=_print_piece)
    print(flush=True)


@app.command()
def chat(
    image: Annotated[Path, typer.Argument(help="PNG/JPEG, DICOM or NIfTI (a volume needs --slice, except with medblip or radfm, which read it whole).")],
    model: Annotated[Optional[str], typer.Option(help=VLM_MODEL_HELP)] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local folder of the named model's published weights.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 128,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice (along Z) of a volume.")] = None,
) -> None:
    """A conversation about an image in the terminal; an empty line or Ctrl-D ends it."""
    from medfm.vlm.api import Conversation

    conversation = Conversation(image, model, weights=weights, slice_index=slice_index)
    _say(f"{conversation.model.name} on {image}; an empty line ends the conversation.")
    while True:
        try:
            question = input("you> ")
        except EOFError:
            break
        if not question.strip():
            break
        print("model> ", end="", flush=True)
        conversation.say(question, max_new_tokens=max_new_tokens, stream=_print_piece)
        print(flush=True)


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


@app.command()
def qa(
    data: Annotated[list[Path], typer.Option(help="A folder of questions (medfm items.jsonl, MedQA jsonl, PubMedQA ori_pqal.json, MedMCQA dev.json, MMLU csv); repeatable.")],
    model: Annotated[str, typer.Option(help="Language model: registry name, transformers folder, hub id or .gguf file.")] = "smollm2-135m",
    strategy: Annotated[str, typer.Option(help="zero-shot, few-shot:K, cot, self-consistency:N or ensemble-refinement:N.")] = "zero-shot",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N items of each dataset.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of exemplar choice and sampled reasoning paths.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Folder for items.csv, summary.json, report.html; reuse it to resume (default out/qa/<model>/<strategy>).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reasoning per generation (cot, self-consistency, ensemble-refinement).")] = 192,
) -> None:
    """Medical exam question answering: accuracy per dataset with its 95% interval, beside the majority-class and chance rates."""
    from medfm.qa import SUMMARY_HEADER, evaluate, summary_table

    from medfm.io.outputs import check_outputs

    out = out or Path("out") / "qa" / Path(model).name / strategy.replace(":", "-")
    check_outputs({"--out": (out, "folder")}, {f"--data {folder}": folder for folder in data} | {"--model": Path(model)})
    summary = evaluate(model, data, out, strategy=strategy, limit=limit, seed=seed, max_new_tokens=max_new_tokens)
    _print_table(f"{summary['settings']['model']}, {summary['settings']['strategy']}", SUMMARY_HEADER, summary_table(summary))
    if summary["problems"]:
        _say(f"{len(summary['problems'])} item(s) skipped, listed in summary.json")
    _say(f"wrote {out / 'items.csv'}, {out / 'summary.json'}, {out / 'report.html'}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but 127.0.0.1/localhost needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(envvar="MEDFM_TOKEN", help="Bearer token every /v1 call must send (or MEDFM_TOKEN).", show_default=False)] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (413 beyond).")] = 512,
    model: Annotated[Optional[list[str]], typer.Option(help="Segmentation model(s) to serve, the first the default; repeatable.")] = None,
    ask_model: Annotated[str, typer.Option(help="Vision-language model of /ask: medfm-vlm-small, medfm-experts-smollm2, radfm, llava-med, xraygpt or med-flamingo (with --ask-weights), or a LLaVA / llava folder; loaded on the first question.")] = "medfm-vlm-small",
    ask_weights: Annotated[Optional[Path], typer.Option(help="Local folder of the --ask-model's published weights.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    cache_mb: Annotated[float, typer.Option(help="Memory for cached image embeddings (least recently used dropped first).")] = 1024,
    idle_minutes: Annotated[float, typer.Option(help="Delete an uploaded image after this long unused.")] = 60,
    max_images: Annotated[int, typer.Option(help="Images held at once (each stays in memory until deleted or idle).")] = 32,
    max_questions: Annotated[int, typer.Option(min=1, help="Questions /ask holds at once, the one being answered included (503 beyond).")] = 8,
) -> None:
    """HTTP API (/v1, OpenAPI at /openapi.json) and the browser app at / for interactive segmentation, classification and questions."""
    from medfm.serve import ServeSettings, serve as run_server

    run_server(ServeSettings(host=host, port=port, token=token, max_upload_mb=max_upload_mb, models=tuple(model or ()),
                             ask_model=ask_model, ask_weights=ask_weights, device=device, cache_mb=cache_mb, idle_minutes=idle_minutes, max_images=max_images,
                             max_questions=max_questions))


#: Options that take several numbers, as in ``--box 120 80 210 190`` (click needs one token each).
NUMERIC_OPTIONS = {"--box", "--box3d", "--point", "--negative-point"}


def group_numeric_options(argv: list[str]) -> list[str]:
    """Join the numbers after ``--box`` / ``--point`` into one token, so both ``--box 1 2 3 4`` and
    ``--box "1 2 3 4"`` (or ``1,2,3,4``) reach the command as one value; the command checks the count."""
    grouped, index = [], 0
    while index < len(argv):
        token = argv[index]
        grouped.append(token)
        index += 1
        if token in NUMERIC_OPTIONS:
            end = index
            while end < len(argv) and _is_number(argv[end]):
                end += 1
            if end > index:
                grouped.append(" ".join(argv[index:end]))
                index = end
    return grouped


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


#: Options that take several words, as in ``--labels pneumonia normal`` (click needs the option before each).
MULTI_VALUE_OPTIONS = {"--labels", "--choices"}


def spread_multi_value_options(argv: list[str]) -> list[str]:
    """``--labels a b c`` -> ``--labels a --labels b --labels c``: the values run up to the next
    token that starts with ``-``."""
    spread, option = [], None
    for token in argv:
        if token.startswith("-"):
            option = token if token in MULTI_VALUE_OPTIONS else None
            if option is None:
                spread.append(token)
            continue
        spread.extend([option, token] if option else [token])
    return spread


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _exit_on_terminate(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds, so temporary files are removed as on any failure


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback;
    warnings are one line too (no source line). ``argv`` defaults to ``sys.argv[1:]``."""
    warnings.showwarning = _one_line_warning
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=spread_multi_value_options(group_numeric_options(args)), prog_name="medfm")
    except MedfmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
