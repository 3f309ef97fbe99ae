"""The ``medfm`` command. Thin by design: parse, call the library, format; no logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import medfm
from medfm.errors import MedfmError

app = typer.Typer(
    name="medfm",
    help="Medical-imaging foundation models: run, adapt, evaluate, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


@app.command()
def info(
    files: Annotated[list[Path], typer.Argument(help="Image files, DICOM folders or zips.")],
    modality: Annotated[Optional[str], typer.Option(help="Override the modality stored in the file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Shape, spacing, orientation, modality and intensity range of each file."""
    summaries = [medfm.read_image(path, modality=modality).summary() for path in files]
    if as_json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
        return
    for summary in summaries:
        table = Table(title=summary["path"], show_header=False, title_justify="left")
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
        for key, value in rows.items():
            table.add_row(key, str(value))
        console.print(table)


@app.command()
def models(
    category: Annotated[Optional[str], typer.Option(help="visually-prompted or textually-prompted.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="e.g. CT, MRI, X-ray, dermoscopy.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="box, point, mask, text or none.")] = None,
    support: Annotated[Optional[str], typer.Option(help="e.g. runs-published-weights, planned.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The catalog: every system of the survey and what medfm supports of it."""
    from medfm.catalog import cards_table_rows

    cards = medfm.list_models(category=category, modality=modality, prompt=prompt, support=support)
    if as_json:
        print(json.dumps([card.to_dict() for card in cards], indent=2))
        return
    table = Table(title=f"{len(cards)} systems")
    for column in ("name", "year", "category", "modalities", "prompts", "support"):
        table.add_column(column)
    for row in cards_table_rows(cards):
        table.add_row(*row)
    console.print(table)


@app.command()
def segment(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Image, volume, DICOM folder or zip.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mask file: .png, .nii.gz, .npz or .dcm (DICOM-SEG).")],
    box: Annotated[Optional[list[str]], typer.Option(help="X0 Y0 X1 Y1 in input pixels; repeat for more labels.", metavar="X0 Y0 X1 Y1")] = None,
    point: Annotated[Optional[list[str]], typer.Option(help="Positive click X Y; repeatable.", metavar="X Y")] = None,
    negative_point: Annotated[Optional[list[str]], typer.Option(help="Negative click X Y; repeatable.", metavar="X Y")] = None,
    slice_index: Annotated[Optional[int], typer.Option("--slice", help="Slice (along Z) of a volume.")] = None,
    model: Annotated[str, typer.Option(help="Registry name or model folder.")] = "litemedsam",
    weights: Annotated[Optional[Path], typer.Option(help="Local checkpoint file for the named model.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="Override the file's modality (e.g. CT).")] = None,
    window: Annotated[Optional[str], typer.Option(help="Intensity preset: soft_tissue, lung, bone, brain, mr, minmax.")] = None,
    overlay: Annotated[Optional[Path], typer.Option(help="Also write a PNG of the image with masks and prompts.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="A reference mask: print the Dice against it.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Segment a 2D image or one slice of a volume from boxes and clicks; one label per box."""
    from medfm.intensity import preset
    from medfm.prompts import Box, Points
    from medfm.segment.model import load
    from medfm.segment.run import dice_per_label, overlay as draw_overlay, segment as run_segment

    boxes = [Box(*_numbers(text, 4, "--box")) for text in box or []]
    clicks = [(_numbers(t, 2, "--point"), 1) for t in point or []] + [(_numbers(t, 2, "--negative-point"), 0) for t in negative_point or []]
    points = Points([xy for xy, _ in clicks], [label for _, label in clicks]) if clicks else None
    intensity = preset(window) if window else None
    image = medfm.read_image(input_path, modality=modality)
    result = run_segment(image, boxes, points, slice_index=slice_index,
                         model=load(model, weights=weights, device=device), intensity=intensity)
    medfm.write_mask(result.label_map, output, like=image)
    if overlay is not None:
        medfm.write_image(draw_overlay(result, boxes, points, intensity), overlay)
    summary = f"wrote {output} ({len(result.prediction.masks)} label(s), scores " + ", ".join(
        f"{s:.3f}" for s in result.prediction.scores) + f"); encoder {result.encode_seconds:.2f} s, decoder {result.decode_seconds * 1000:.0f} ms"
    console.print(summary, highlight=False)
    if reference is not None:
        scores = dice_per_label(result.label_map, medfm.read_image(reference).array)
        console.print("Dice vs reference: " + ", ".join(f"label {k}: {v:.4f}" for k, v in scores.items()), highlight=False)


def _numbers(text: str, count: int, option: str) -> list[float]:
    """Parse 'X0 Y0 X1 Y1' (spaces or commas) for an option that takes several numbers."""
    parts = text.replace(",", " ").split()
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != count:
        raise medfm.PromptError(f"{option} takes {count} numbers, got '{text}'")
    return values


@app.command()
def version() -> None:
    """Print medfm's version."""
    print(medfm.__version__)


#: Options that take several numbers, as in ``--box 120 80 210 190`` (click needs one token each).
NUMERIC_OPTIONS = {"--box", "--point", "--negative-point"}


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


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    try:
        app(args=group_numeric_options(sys.argv[1:]), prog_name="medfm")
    except MedfmError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
