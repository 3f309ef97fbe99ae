"""Throughput of `medfm segment-batch`: the local engine, and Ray Data with 1 and 2 workers on this
machine, then a projection to N machines built from the measured per-stage times.

    PYTHONPATH=src python benchmarks/batch_scale.py --images 8 --cases-per-image 2

The cases are real 2D images of ../shared/data/seg (breast ultrasound), each prompted with
``--cases-per-image`` boxes as separate cases (so the shared-embedding path is exercised). Per-stage
times come from running the four stage functions (`medfm.batch.stages`) in this process, one image
at a time; engine throughputs are whole `segment_batch` runs into fresh folders. Ray's start-up
(``ray.init``) is timed apart from the batch. The projection and its assumptions are printed at
the end. Keep the sizes modest: the project machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litemedsam_speed import cpu_name  # noqa: E402 - the benchmarks' shared CPU description

from medfm.batch import segment_batch  # noqa: E402
from medfm.batch.cases import read_cases  # noqa: E402
from medfm.batch.engines import load_model, model_fingerprint  # noqa: E402
from medfm.batch.stages import decode_stage, encode_stage, group_by_image, read_stage, write_stage  # noqa: E402
from medfm.prompts import Box  # noqa: E402

DATA = Path(os.environ.get("MEDFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")) / "seg"


def write_prompts(folder: Path, images: int, per_image: int) -> Path:
    """``per_image`` cases an image: the lesion's box from its reference mask, then shifted copies."""
    from medfm import read_image

    dataset = DATA / "busi_breast_ultrasound"
    lines = []
    for path in sorted((dataset / "images").glob("*.png"))[:images]:
        box = Box.from_mask(read_image(dataset / "masks" / path.name).array > 0)
        for shift in range(per_image):
            lines.append({"image": str(path), "boxes": [[box.x0 + shift, box.y0, box.x1 + shift, box.y1]]})
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return prompts


def stage_times(prompts: Path, out: Path, model_name: str | None) -> dict[str, float]:
    """Median seconds per image of each stage, run in this process."""
    model = load_model(model_name)
    predictor, fingerprint = model.predictor(), model_fingerprint(model)
    times: dict[str, list[float]] = {"read": [], "encode": [], "decode": [], "write": []}
    for work in group_by_image([c for c in read_cases(prompts, out) if c.error is None]):
        for name, stage in (("read", lambda w: read_stage(w, {}, fingerprint)), ("encode", lambda w: encode_stage(w, predictor)),
                            ("decode", lambda w: decode_stage(w, predictor)), ("write", write_stage)):
            started = time.perf_counter()
            work = stage(work)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--cases-per-image", type=int, default=2)
    parser.add_argument("--model", default=None, help="registry name or folder (default: medfm's default model)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run")
    args = parser.parse_args(argv)
    if not (DATA / "busi_breast_ultrasound").is_dir():
        print(f"{DATA} is absent: this benchmark needs the shared segmentation data", file=sys.stderr)
        return 2
    import ray
    import torch

    torch.set_num_threads(1)  # as each Ray worker gets one thread per CPU it holds
    folder = Path(tempfile.mkdtemp(prefix="batch_scale_"))
    prompts = write_prompts(folder, args.images, args.cases_per_image)
    cases = args.images * args.cases_per_image
    print(f"CPU: {cpu_name()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"{args.images} images x {args.cases_per_image} cases = {cases} cases, model {args.model or 'default'}")
    stages = stage_times(prompts, folder / "stages", args.model)
    print("per image (median, 1 thread): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items()))

    rows = []
    local = segment_batch(prompts, folder / "local", model=args.model)
    rows.append(("local (1 process)", local.seconds, None))
    for workers in (int(w) for w in args.workers.split(",")):
        started = time.perf_counter()
        ray.init(num_cpus=workers + 1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        start_up = time.perf_counter() - started
        result = segment_batch(prompts, folder / f"ray{workers}", model=args.model, engine="ray", workers=workers)
        ray.shutdown()
        assert result.ok == cases, result
        rows.append((f"ray, {workers} worker(s)", result.seconds, start_up))
    print(f"\n{'engine':<22}{'batch s':>9}{'cases/s':>9}{'ray.init s':>12}")
    for name, seconds, start_up in rows:
        print(f"{name:<22}{seconds:>9.1f}{cases / seconds:>9.2f}{'' if start_up is None else f'{start_up:.1f}':>12}")

    per_image = stages["encode"] + stages["decode"]  # what one encoder + decoder worker spends on an image
    fixed = max(0.0, rows[1][1] - args.images * sum(stages.values()))  # 1 worker: the rest is start-up
    cores = os.cpu_count() or 1
    workers_per_machine = max(1, cores - 1)
    print(f"\nProjection to N machines like this one ({workers_per_machine} encoder worker(s) each: cores - 1):")
    print(f"  per image and worker: encode + decode {per_image:.2f} s (measured above, 1 thread); fixed cost of a\n"
          f"  Ray batch {fixed:.0f} s (1-worker batch time minus its images' stage times: actor and task\n"
          f"  processes importing torch, model loading, Ray Data scheduling); {args.cases_per_image} cases an image")
    print(f"  {'machines':>8}{'images/s':>10}{'cases/s':>9}{'10k images':>12}")
    for machines in (1, 2, 4, 8, 16, 32):
        rate = machines * workers_per_machine / per_image
        print(f"  {machines:>8}{rate:>10.2f}{rate * args.cases_per_image:>9.2f}{(fixed + 10_000 / rate) / 3600:>10.1f} h")
    print("  assumptions: encoding (+ decoding) is the bottleneck and each worker gets a core of its own, so\n"
          "  throughput grows linearly with workers (on this shared 2-core machine 2 workers have no spare core:\n"
          "  compare the measured rows); read and write tasks overlap with it on the spare core; the inputs are on\n"
          "  storage every machine reads at the measured read speed (shared FS), not on the driver; the driver's\n"
          "  results.jsonl appends (one fsync a case) stay far below the rate; the fixed cost is paid once a batch\n"
          "  and does not grow with machines (actors start in parallel).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
