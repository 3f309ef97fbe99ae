#!/usr/bin/env python
"""Record reference outputs of Meta's ``segment_anything`` (SAM ViT-B) with deterministic random weights.

Run ONCE, in the throw-away environment (never medfm's; needs torchvision through
``segment_anything.utils.transforms``)::

    /tmp/refenv/bin/python scripts/reference/record_segment_anything.py            # tests/fixtures/
    /tmp/refenv/bin/python scripts/reference/record_segment_anything.py --out-dir /tmp/b

Writes ``tests/fixtures/sam_vit_b_keys.json`` and ``tests/fixtures/sam_vit_b_reference.npz``
(byte-identical on re-runs).

Model and weights
=================
``segment_anything.build_sam_vit_b(checkpoint=None)`` (segment-anything 1.0): ImageEncoderViT(
img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
LayerNorm eps=1e-6, use_rel_pos=True, window_size=14, global_attn_indexes=[2, 5, 8, 11],
out_chans=256), PromptEncoder(256, (64, 64), (1024, 1024), mask_in_chans=16), MaskDecoder(3
multimask outputs, TwoWayTransformer(depth=2, 256, mlp_dim=2048, num_heads=8), iou head 3x256).
Every state-dict entry (314 tensors, 93,735,728 values; incl. the buffer
``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``) is replaced by
``random_sam_weights.random_state_dict(key_shapes, seed)`` (numpy only; rules in that module).
``pixel_mean``/``pixel_std`` are non-persistent buffers (not in the state dict) and keep SAM's
constants. ``sam_vit_b_keys.json`` holds the key -> shape list, the seed and the SHA-256
fingerprint of the generated weights (``random_sam_weights.state_dict_fingerprint``).

SamPredictor pre-processing (exact)
===================================
Input: HxWx3 uint8 RGB (grey images are repeated to 3 channels here, ``np.repeat``).

1. ``ResizeLongestSide(1024)``: ``scale = 1024 * 1.0 / max(H, W)``;
   ``newh, neww = int(H * scale + 0.5), int(W * scale + 0.5)``;
   ``np.array(torchvision.transforms.functional.resize(to_pil_image(img), (newh, neww)))`` =
   PIL ``Image.fromarray(img).resize((neww, newh), Image.BILINEAR)`` on the uint8 RGB image
   (PIL's bilinear = triangle filter whose support is widened by the scale factor when
   shrinking, i.e. antialiased; PIL fixed-point uint8 arithmetic; result uint8). Using PIL
   itself reproduces it bit-exactly (the script asserts this).
2. ``Sam.preprocess``: float32 ``(x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]``
   per RGB channel, then zero-pad bottom/right to 1024x1024 (zeros AFTER normalisation).
3. Prompts (original pixel coordinates, x then y): ``apply_coords`` multiplies x by
   ``neww / W`` and y by ``newh / H`` (the ROUNDED new size, separately per axis; float64,
   no rounding); a box (x0, y0, x1, y1) is scaled as two points. Here the box has an INCLUSIVE
   max (x1 = last foreground column), like SAM's own ``batched_mask_to_box``. The prompt
   encoder adds +0.5 (pixel centres) and divides x, y by 1024. Points only -> a padding point
   (0, 0) with label -1 is appended; with a box, no padding point.
4. Decoder: ``multimask_output=True`` returns mask tokens 1..3, ``False`` token 0 (one decoder
   pass computes all 4).
5. ``Sam.postprocess_masks``: bilinear (align_corners=False, no antialias) 256 -> 1024x1024,
   crop ``[:newh, :neww]``, bilinear (align_corners=False) to (H, W); binary = logits > 0.0
   (``mask_threshold``).

Fixture layout (``sam_vit_b_reference.npz``)
============================================
* ``image_path`` str (relative to /work/shared/data/seg), ``mask_path`` str,
  ``original_hw`` (2,) int64, ``input_hw`` (2,) int64 = (newh, neww), ``seed`` int64,
  ``weights_sha256`` str, ``resized_uint8_sha256`` str (PIL-resized HxWx3 uint8 before
  normalisation), ``input_sha256`` str (float32 1x3x1024x1024 model input, <f4 C order),
  ``input_channel_mean`` (3,) float64.
* ``embed_mean``/``embed_std`` float64 (ddof=0), ``embed_ch0_first8`` (8,) float32
  (= ``features[0, 0, 0, :8]``), ``embed_channel_mean`` (256,) float64 of the 1x256x64x64
  image embedding.
* prompts: ``box`` (4,) int64; ``point_coords`` (3, 2) float64 (x, y) with ``point_labels``
  (3,) int64 = [1, 1, 0]; ``box_point_coords`` (1, 2) float64 with ``box_point_labels`` [1].
* for run R in ``box``, ``points``, ``box_point`` and M in ``multi`` (multimask_output=True,
  C=3) / ``single`` (False, C=1): ``R_M_low_res_logits`` (C, 256, 256) float16 (see below),
  ``R_M_iou`` (C,) float32, ``R_M_masks`` uint8 ``np.packbits(masks.ravel())`` of the (C, H, W)
  bool masks -> ``np.unpackbits(a, count=C*H*W).reshape(C, H, W).astype(bool)``.

Low-res logits are stored as float16 (rounding error <= 2**-11 relative) to keep all fixtures
under 4 MB; ``R_M_logits_absmax`` (float32) and ``R_M_logits_sum`` (float64) are exact.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import save_npz_deterministic, sha256  # noqa: E402
from random_sam_weights import DEFAULT_SEED, random_state_dict, state_dict_fingerprint  # noqa: E402

DATA_ROOT_DEFAULT = "/work/shared/data/seg"
REPO = Path(__file__).resolve().parents[2]
DATASET, CASE_ID = "busi_breast_ultrasound", "busi_benign_020"  # 473x319 grey (portrait), scale 2.165


def load_rgb_uint8(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
        if im.mode == "L":
            return np.repeat(a[:, :, None], 3, axis=-1)
        if im.mode != "RGB":
            raise ValueError(im.mode)
        return a.copy()


def prompts_from_mask(gt: np.ndarray):
    ys, xs = np.nonzero(gt == 1)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)  # inclusive max
    # positive 1: foreground pixel nearest to the centroid; positive 2: foreground pixel nearest
    # to the midpoint between the centroid and the box's top-left corner (ties: first in
    # row-major order); negative: a background pixel 12 px outside the box's bottom-right corner.
    cy, cx = ys.mean(), xs.mean()

    def nearest(ty, tx):
        d = (ys - ty) ** 2 + (xs - tx) ** 2
        k = int(np.argmin(d))
        return [float(xs[k]), float(ys[k])]

    p1 = nearest(cy, cx)
    p2 = nearest((cy + box[1]) / 2, (cx + box[0]) / 2)
    h, w = gt.shape
    nx, ny = min(int(box[2]) + 12, w - 1), min(int(box[3]) + 12, h - 1)
    assert gt[ny, nx] == 0
    coords = np.array([p1, p2, [float(nx), float(ny)]], dtype=np.float64)
    labels = np.array([1, 1, 0], dtype=np.int64)
    return box, coords, labels


def run(data_root: Path, out_dir: Path, threads: int, seed: int) -> dict:
    import torch
    from PIL import Image
    from segment_anything import SamPredictor, build_sam_vit_b

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    sam = build_sam_vit_b(checkpoint=None)
    sd = sam.state_dict()
    key_shapes = {k: tuple(int(s) for s in v.shape) for k, v in sd.items()}
    assert all(v.dtype == torch.float32 for v in sd.values())
    weights = random_state_dict(key_shapes, seed)
    fingerprint = state_dict_fingerprint(weights)
    missing = sam.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    for k, v in sam.state_dict().items():  # every entry really replaced
        assert np.array_equal(v.numpy(), weights[k]), k
    sam.eval()

    keys_doc = {
        "description": "State-dict keys and shapes of segment_anything.build_sam_vit_b(checkpoint=None) "
        "(segment-anything 1.0), in state_dict order. Regenerate the weights with "
        "scripts/reference/random_sam_weights.random_state_dict({k: tuple(s) for k, s in keys}, seed).",
        "seed": seed,
        "weights_sha256": fingerprint,
        "num_tensors": len(key_shapes),
        "num_values": int(sum(int(np.prod(s)) for s in key_shapes.values())),
        "non_persistent_buffers": {"pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375]},
        "keys": [[k, list(s)] for k, s in key_shapes.items()],
    }

    img_path = next(p for p in sorted((data_root / DATASET / "images").iterdir()) if p.stem == CASE_ID)
    mask_path = data_root / DATASET / "masks" / f"{CASE_ID}.png"
    img = load_rgb_uint8(img_path)
    with Image.open(mask_path) as m:
        gt = np.asarray(m)
    H, W = img.shape[:2]
    box, coords, labels = prompts_from_mask(gt)

    pred = SamPredictor(sam)
    pred.set_image(img, image_format="RGB")
    newh, neww = pred.input_size
    resized = pred.transform.apply_image(img)
    pil = np.array(Image.fromarray(img).resize((neww, newh), Image.BILINEAR))
    assert np.array_equal(resized, pil), "torchvision resize != PIL bilinear"
    x = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None])
    feats = pred.get_image_embedding().numpy()

    out: dict[str, np.ndarray] = {
        "image_path": np.array(str(img_path.relative_to(data_root))),
        "mask_path": np.array(str(mask_path.relative_to(data_root))),
        "original_hw": np.array([H, W], dtype=np.int64),
        "input_hw": np.array([newh, neww], dtype=np.int64),
        "seed": np.array(seed, dtype=np.int64),
        "weights_sha256": np.array(fingerprint),
        "resized_uint8_sha256": np.array(sha256(np.ascontiguousarray(resized).tobytes())),
        "input_sha256": np.array(sha256(np.ascontiguousarray(x.numpy(), dtype="<f4").tobytes())),
        "input_channel_mean": x.numpy().astype(np.float64).mean(axis=(0, 2, 3)),
        "embed_mean": np.float64(feats.astype(np.float64).mean()),
        "embed_std": np.float64(feats.astype(np.float64).std()),
        "embed_ch0_first8": feats[0, 0, 0, :8].astype(np.float32),
        "embed_channel_mean": feats.astype(np.float64).mean(axis=(0, 2, 3)),
        "box": box,
        "point_coords": coords,
        "point_labels": labels,
        "box_point_coords": coords[:1].copy(),
        "box_point_labels": labels[:1].copy(),
    }
    runs = {
        "box": dict(box=box),
        "points": dict(point_coords=coords, point_labels=labels),
        "box_point": dict(box=box, point_coords=coords[:1], point_labels=labels[:1]),
    }
    summary = {}
    for rname, kw in runs.items():
        for mname, mm in (("multi", True), ("single", False)):
            masks, iou, low = pred.predict(multimask_output=mm, **kw)
            # the same through predict(return_logits=True): logits > 0 gives the masks
            logits_full, _, _ = pred.predict(multimask_output=mm, return_logits=True, **kw)
            assert np.array_equal(masks, logits_full > sam.mask_threshold)
            key = f"{rname}_{mname}"
            out[f"{key}_low_res_logits"] = low.astype(np.float16)
            out[f"{key}_logits_absmax"] = np.float32(np.abs(low).max())
            out[f"{key}_logits_sum"] = np.float64(low.astype(np.float64).sum())
            out[f"{key}_iou"] = iou.astype(np.float32)
            out[f"{key}_masks"] = np.packbits(masks.astype(bool).ravel())
            frac = masks.reshape(masks.shape[0], -1).mean(axis=1)
            assert np.all((frac > 0.01) & (frac < 0.99)), f"degenerate mask {key}: {frac}"
            summary[key] = dict(iou=[round(float(v), 5) for v in iou], fg_frac=[round(float(v), 4) for v in frac],
                                logit_range=[round(float(low.min()), 3), round(float(low.max()), 3)])

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sam_vit_b_keys.json").write_text(json.dumps(keys_doc, indent=1) + "\n")
    save_npz_deterministic(out_dir / "sam_vit_b_reference.npz", out)
    versions = {p: md.version(p) for p in ("torch", "torchvision", "segment-anything", "numpy", "pillow")}
    return dict(summary=summary, versions=versions, hw=[H, W], input_hw=[newh, neww], box=box.tolist(),
                points=coords.tolist(), fingerprint=fingerprint)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("MEDFM_SEG_DATA", DATA_ROOT_DEFAULT))
    ap.add_argument("--out-dir", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    info = run(Path(args.data_root), Path(args.out_dir), args.threads, args.seed)
    dt = time.perf_counter() - t0
    print(json.dumps(info, indent=1))
    for name in ("sam_vit_b_keys.json", "sam_vit_b_reference.npz"):
        p = Path(args.out_dir) / name
        print(f"wrote {p} ({p.stat().st_size} bytes, sha256 {sha256(p.read_bytes())[:16]})")
    print(f"runtime {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
