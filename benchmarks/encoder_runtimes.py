#!/usr/bin/env python
"""LiteMedSAM's image encoder on each CPU runtime, side by side in one process: time and masks.

    PYTHONPATH=src .venv/bin/python benchmarks/encoder_runtimes.py [--images 10] [--threads 2] [--json out.json]

The runtimes an inference backend could be built on (issue 19), on the same images as
benchmarks/litemedsam_speed.py (``--data-root``, one or two images from each of ten 2D datasets),
with the same thread count, taking turns image by image in rotating order (load from elsewhere
on a shared machine falls on all alike):

* ``torch fast fp32``: medfm's default encoder path (`medfm.segment.fast.FastTinyViT`);
* ``torch fast bf16``: the same in bfloat16 (CPUs with native bf16 only);
* ``openvino fp32`` / ``openvino bf16``: `medfm.segment.openvino_backend.OpenVINOEncoder`
  (the IR cached under ``$MEDFM_HOME/openvino``; bf16 only where the CPU has it);
* ``onnxruntime fp32``: the encoder exported with ``torch.onnx.export``, run by ONNX Runtime
  with every graph optimisation (fusions) on; ``onnxruntime int8``: the same model after ONNX
  Runtime's dynamic int8 quantisation of its weights (``quantize_dynamic``). Both need
  ``pip install 'medfm[onnxruntime]'`` and are skipped without it (nothing in medfm uses them:
  they are measured here, not adopted);
* ``openvino int8 (NNCF, static)``: OpenVINO's fp32 IR after NNCF's post-training quantisation
  (``nncf.quantize``, transformer mode, activations calibrated on ``--calibration`` images of the
  same datasets that are not timed). Needs ``pip install 'medfm[int8]'``; skipped without it.

Per image: one warm encode is timed per runtime (the median over images is reported); each
embedding is then decoded with the same box by medfm's fast decoder, and the mask compared with
the ground truth and with torch fp32's mask ("Dice vs torch": the lowest per image; a backend is
adoptable only at >= 0.995). Encoder time only: decoding is the same torch code for all.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litemedsam_speed import DEFAULT_DATA, cpu_name, select_cases  # noqa: E402


def onnxruntime_encoders(encoder: torch.nn.Module, size: int, threads: int, folder: Path) -> dict:
    """ONNX Runtime sessions for the encoder: fp32 with all graph optimisations, and int8 (dynamic)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("  onnxruntime is not installed: its rows are skipped (pip install 'medfm[onnxruntime]')", file=sys.stderr)
        return {}
    path, int8 = folder / "encoder.onnx", folder / "encoder_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = (torch.zeros(1, 3, size, size),)
        try:  # the TorchScript exporter; the dynamo one where a torch no longer has it
            torch.onnx.export(encoder, example, str(path), dynamo=False, opset_version=17,
                              input_names=["pixels"], output_names=["embedding"])
        except Exception:  # noqa: BLE001 - any exporter failure: try the other
            torch.onnx.export(encoder, example, str(path), dynamo=True, input_names=["pixels"], output_names=["embedding"])
        logging.disable(logging.WARNING)  # one warning per shape-only tensor it leaves in float32
        try:
            quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
    runners = {}
    for name, model in (("onnxruntime fp32", path), ("onnxruntime int8 (dynamic)", int8)):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda pixels, s=session: torch.from_numpy(s.run(None, {"pixels": pixels.numpy()})[0])
    return runners


def openvino_int8_encoder(folder: Path, calibration: list[torch.Tensor], threads: int) -> dict:
    """The OpenVINO IR in ``folder`` quantised to int8 by NNCF, calibrated on ``calibration`` pixels."""
    try:
        import nncf
    except ImportError:
        print("  nncf is not installed: the int8 row is skipped (pip install 'medfm[int8]')", file=sys.stderr)
        return {}
    import openvino as ov

    from medfm.segment.openvino_backend import IR_NAME

    core = ov.Core()
    dataset = nncf.Dataset([pixels.numpy() for pixels in calibration])
    logging.disable(logging.INFO)  # NNCF's notes (its progress bars still print)
    try:
        quantized = nncf.quantize(core.read_model(folder / IR_NAME), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
    finally:
        logging.disable(logging.NOTSET)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = core.compile_model(quantized, "CPU", config).create_infer_request()
    return {"openvino int8 (NNCF, static)": lambda pixels: torch.from_numpy(
        np.array(request.infer({0: pixels.numpy()})[0], copy=True))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=30, help="images (not timed) that calibrate the int8 model")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    if args.images < 1 or args.calibration < 1:
        parser.error("--images and --calibration take a count of at least 1")
    if not args.data_root.is_dir():
        print(f"data folder {args.data_root} is absent; pass --data-root", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from PIL import Image

    import medfm
    from medfm.evaluate.metrics import dice
    from medfm.preprocess import prepare, to_uint8_rgb
    from medfm.prompts import Box
    from medfm.segment.fast import FastTinyViT, bf16_supported
    from medfm.segment.model import load
    from medfm.segment.openvino_backend import OpenVINOEncoder

    model = load("litemedsam")
    encoder, size = model.network.image_encoder, model.network.config.image_size
    predictor = model.predictor()
    bf16 = bf16_supported()
    runners = {"torch fast fp32": FastTinyViT(encoder)}
    if bf16:
        runners["torch fast bf16"] = FastTinyViT(encoder, "bf16")
    runners["openvino fp32"] = OpenVINOEncoder(encoder, size, "fp32", args.threads)
    if bf16:
        runners["openvino bf16"] = OpenVINOEncoder(encoder, size, "bf16", args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runners.update(onnxruntime_encoders(encoder, size, args.threads, Path(tmp)))
    cases = select_cases(args.data_root, args.images)
    timed = {case["id"] for case in cases}
    calibration = [case for case in select_cases(args.data_root, args.images + args.calibration) if case["id"] not in timed]
    runners.update(openvino_int8_encoder(runners["openvino fp32"].folder, [
        prepare(to_uint8_rgb(image.array, None, image.modality), model.preprocess)[0]
        for image in (medfm.read_image(case["image"]) for case in calibration[: args.calibration])], args.threads))
    names = list(runners)
    times = {name: [] for name in names}
    masks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    truths = []
    for index, case in enumerate(cases):
        image = medfm.read_image(case["image"])
        pixels, geometry = prepare(to_uint8_rgb(image.array, None, image.modality), model.preprocess)
        with Image.open(case["mask"]) as mask_image:
            truths.append(np.asarray(mask_image) == case["label"])
        order = names[index % len(names):] + names[: index % len(names)]
        for name in order:
            with torch.inference_mode():
                runners[name](pixels)  # warm (first call of a runtime: its own warm-up)
                start = time.perf_counter()
                embedding = runners[name](pixels).float()
                times[name].append(time.perf_counter() - start)
                predictor.use_embedding(embedding, geometry)
                masks[name].append(predictor.predict(boxes=[Box(*case["box"])]).masks[0])
        print(f"  image {index + 1}/{len(cases)}", file=sys.stderr, flush=True)
    torch_time = float(np.median(times["torch fast fp32"]))
    rows = []
    for name in names:
        rows.append(dict(
            runtime=name, encoder_ms=1e3 * float(np.median(times[name])),
            speedup_over_torch_fast=torch_time / float(np.median(times[name])),
            mean_dice=float(np.mean([dice(m, t) for m, t in zip(masks[name], truths)])),
            min_dice_vs_torch=float(min(dice(m, t) for m, t in zip(masks[name], masks["torch fast fp32"]))),
        ))
    print(f"LiteMedSAM encoder, {len(cases)} images, {cpu_name()}, {args.threads} threads; medians over images")
    print("| runtime | encoder ms | speed-up over torch fast fp32 | mean Dice vs GT | min Dice vs torch fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['runtime']} | {row['encoder_ms']:.0f} | {row['speedup_over_torch_fast']:.2f}x | "
              f"{row['mean_dice']:.4f} | {row['min_dice_vs_torch']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_name(), threads=args.threads, images=len(cases), rows=rows,
                                                   times=times), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
