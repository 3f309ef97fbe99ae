"""How long does medfm take to segment a CT organ in 3D from one 3D box, on this machine?

The target case of the 3D issue is a 100-slice 512x512 CT organ (the CVPR 2024 "MedSAM on Laptop"
challenge's best CPU entry took 9 s per 3D case). The bundled real CT is small (30x101x122, 3 mm),
so it is resampled to 100x512x512 (trilinear image, nearest labels) to give an organ of the target
size; timings then cover reading nothing from disk, only segmentation: per-volume normalisation,
lazy encoding, and propagation. ``--slice-steps`` encode only every K-th slice (and the box's end
slices) and interpolate between; ``--refine-below D`` adds, for each step above 1, a run that also
segments the slice between two key slices whose masks overlap with a Dice below D (an adaptive step); ``--precisions bf16`` runs the encoder in bfloat16 where the CPU has it;
``--backends torch openvino`` runs the encoder on torch and on OpenVINO (``medfm.load(..., backend=)``),
one after the other in this process, on the same volume.

    .venv/bin/python benchmarks/volume_speed.py [--label 5] [--threads 2] [--slice-steps 1 4]
                                                [--refine-below 0.9]
                                                [--precisions fp32 bf16] [--backends torch openvino]
                                                [--batch-size 1] [--json]

Every backend x precision x slice step runs in this one process, one after the other, and prints one table.
The upsampled volume is smoother along z than a real 100-slice CT (its slices were interpolated from
30), so the Dice of a slice step here flatters it: judge the quality of slice steps on real volumes
(`medfm evaluate --data ../shared/data/seg/volumes3d_ct_mri --slice-step K`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import zoom

import medfm
from medfm.evaluate.metrics import dice
from medfm.io import MedicalImage
from medfm.prompts import Box3D
from medfm.segment.fast import bf16_supported
from medfm.segment.model import DEFAULT_MODEL
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


def run(image: MedicalImage, organ: np.ndarray, model: str, precision: str, slice_step: int, batch_size: int,
        backend: str = "torch", refine_below: float | None = None) -> dict:
    """One timed 3D segmentation (after a warm-up on a few slices) and its Dice against the organ."""
    box = Box3D.from_mask(organ)
    predictor = medfm.load(model, backend=backend).predictor(precision=precision)
    # warm-up on a 2-slice copy: builds the fast paths, leaves the timed run to normalise the whole volume
    middle = (box.z0 + box.z1) // 2
    warm = dataclasses.replace(image, array=image.array[middle : middle + 2].copy())
    segment_volume(predictor, warm, [Box3D(box.x0, box.y0, 0, box.x1, box.y1, 1)])
    result = segment_volume(predictor, image, [box], slice_step=slice_step, refine_below=refine_below,
                            batch_size=batch_size)
    ours = result.label_map == 1
    return {
        "backend": backend, "precision": precision, "slice_step": slice_step, "refine_below": refine_below,
        "organ_slices": box.z1 - box.z0 + 1,
        "slices_encoded": result.encoded_slices, "seconds": round(result.seconds, 2),
        "seconds_per_encoded_slice": round(result.seconds / max(1, result.encoded_slices), 3),
        "dice": round(dice(ours, organ), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", type=int, default=5, help="TotalSegmentator label (5 = liver, 2 = right kidney)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="slices per encoder call (1 is fastest on CPUs)")
    parser.add_argument("--slice-steps", type=int, nargs="+", default=[1, 4], help="segment every K-th slice, interpolate between")
    parser.add_argument("--refine-below", type=float, nargs="*", default=[],
                        help="for each slice step above 1, also run it refined at these Dice thresholds")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="default: fp32, and bf16 where the CPU has native bfloat16")
    parser.add_argument("--backends", nargs="+", choices=["torch", "openvino"], default=["torch"],
                        help="what runs the image encoder (openvino: pip install 'medfm[openvino]')")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions = args.precisions or (["fp32", "bf16"] if bf16_supported() else ["fp32"])
    image, organ = upsampled_case(args.label)
    rows = [run(image, organ, args.model, precision, step, args.batch_size, backend, refine)
            for backend in args.backends for precision in precisions for step in args.slice_steps
            for refine in ([None, *args.refine_below] if step > 1 else [None])]
    if args.json:
        print(json.dumps({"volume": list(image.array.shape), "threads": args.threads, "model": args.model, "runs": rows}))
        return
    from litemedsam_speed import cpu_name  # this folder is on sys.path when run as a script

    print(f"{args.model}, volume {image.array.shape}, {args.threads} threads, batch size {args.batch_size}, {cpu_name()}")
    print("| backend | precision | slice step | refine below | organ slices | encoded | seconds | s / encoded slice | Dice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        refine = "-" if row["refine_below"] is None else row["refine_below"]
        print(f"| {row['backend']} | {row['precision']} | {row['slice_step']} | {refine} | {row['organ_slices']} | {row['slices_encoded']} | "
              f"{row['seconds']:.1f} | {row['seconds_per_encoded_slice']:.3f} | {row['dice']:.4f} |")


if __name__ == "__main__":
    main()
