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
def version() -> None:
    """Print medfm's version."""
    print(medfm.__version__)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except MedfmError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
