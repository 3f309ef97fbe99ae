"""How long does medfm take to segment a CT organ in 3D from one 3D box, on this machine?

The target case of the 3D issue is a 100-slice 512x512 CT organ (the CVPR 2024 "MedSAM on Laptop"
challenge's best CPU entry took 9 s per 3D case). The bundled real CT is small (30x101x122, 3 mm),
so it is resampled to 100x512x512 (trilinear image, nearest labels) to give an organ of the target
size; timings then cover reading nothing from disk, only segmentation: per-volume normalisation,
lazy batched encoding, and propagation.

    .venv/bin/python benchmarks/volume_speed.py [--label 5] [--threads 2] [--batch-size 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import zoom

import medfm
from medfm.io import MedicalImage
from medfm.prompts import Box3D
from medfm.segment.volume import segment_volume

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGET_SHAPE = (100, 512, 512)


def upsampled_case(label: int) -> tuple[MedicalImage, np.ndarray]:
    """The bundled CT and one organ's mask, resampled to 100x512x512 with matching spacing."""
    ct = medfm.read_image(EXAMPLES / "totalseg_example_ct.nii.gz", modality="CT")
    labels = medfm.read_image(EXAMPLES / "totalseg_example_ct_mask.nii.gz").array
    factors = [t / s for t, s in zip(TARGET_SHAPE, ct.array.shape)]
    volume = zoom(ct.array.astype(np.float32), factors, order=1).round().astype(np.int16)
    organ = zoom((labels == label).astype(np.uint8), factors, order=0).astype(bool)
    image = MedicalImage(
        array=volume, spacing=tuple(s / f for s, f in zip(ct.spacing, factors)), origin=ct.origin,
        direction=ct.direction, modality="CT", metadata={"kind": "volume", "format": "synthetic"},
    )
    return image, organ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", type=int, default=5, help="TotalSegmentator label (5 = liver, 2 = right kidney)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image, organ = upsampled_case(args.label)
    box = Box3D.from_mask(organ)
    predictor = medfm.load(args.model).predictor()
    started = time.perf_counter()
    result = segment_volume(predictor, image, [box], batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    ours = result.label_map == 1
    figures = {
        "volume": list(image.array.shape), "organ_slices": box.z1 - box.z0 + 1, "slices_segmented": len(result.slices[1]),
        "slices_encoded": result.encoded_slices, "seconds": round(seconds, 2),
        "seconds_per_slice": round(seconds / max(1, result.encoded_slices), 3),
        "dice": round(float(2 * (ours & organ).sum() / (ours.sum() + organ.sum())), 4),
        "threads": args.threads, "batch_size": args.batch_size, "model": args.model,
    }
    if args.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
