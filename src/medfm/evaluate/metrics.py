"""Spacing-aware segmentation metrics for one binary mask pair: Dice, IoU, NSD and HD95.

Inputs are binary masks (``bool``, or a numeric array holding only 0 and 1) of the same shape,
2D ``(H, W)`` or 3D ``(Z, Y, X)``; ``spacing`` is the voxel size in mm per *array axis*, in array
order (medfm's ``MedicalImage.spacing`` convention). A shape mismatch, a spacing of the wrong
length, a non-positive spacing or a non-binary mask raises ``ValueError`` naming both shapes.

Empty masks (MONAI returns NaN for these; medfm never returns NaN):

=====================  ======  ======  ======  ============================================
case                   Dice    IoU     NSD     HD95
=====================  ======  ======  ======  ============================================
both masks empty       1.0     1.0     1.0     0.0 mm
exactly one empty      0.0     0.0     0.0     the image diagonal in mm,
                                               ``sqrt(sum((shape_i * spacing_i) ** 2))``
=====================  ======  ======  ======  ============================================

Both-empty is a correct "nothing there" answer, hence the perfect scores; one-empty is a complete
miss, and the image diagonal is the largest distance two points of the image can have, so HD95
stays finite, comparable across cases and worst-possible (a 10x20 image with spacing (0.5, 2) mm
scores ``sqrt(5**2 + 40**2) = 40.31`` mm). Note that MONAI's ``DiceMetric.aggregate()`` turns
its NaN into 0.0, which is wrong for both-empty.

Definitions (and how they relate to MONAI and to the MedSAM challenges):

* **Dice / IoU** count voxels with integers: ``2|P∩R| / (|P|+|R|)`` and ``|P∩R| / |P∪R|``.
  MONAI's ``compute_dice`` gives the same value up to float32 rounding (it sums float32
  tensors), but NaN when the reference is empty.
* **NSD** (normalized surface Dice) follows DeepMind's ``surface-distance`` package
  (``compute_surface_distances`` + ``compute_surface_dice_at_tolerance``), which is what the
  MedSAM / CVPR 2024 "MedSAM on Laptop" challenge evaluates with, at ``tolerance_mm=2``. The
  boundary is made of *surfels*: the marching-cubes surface (3D) or marching-squares contour (2D)
  through the voxel corners, found from the 2x2(x2) neighbour code of each corner; each surfel is
  weighted by its area in mm² (3D) or length in mm (2D) at the given spacing, and counts as
  correct when its distance to the other mask's surfels is ``<= tolerance_mm`` (ties within
  1e-6 mm count as within, so that floating-point noise cannot flip them).
  ``NSD = (correct area of P + correct area of R) / (area of P + area of R)``.
  This equals MONAI's ``compute_surface_dice(..., use_subvoxels=True)``. MONAI's *default*
  (``use_subvoxels=False``) is a different metric: it counts boundary *voxels* (a voxel of the
  mask with a face-neighbour outside it), unweighted, so with anisotropic spacing a face
  across thick slices weighs as much as a face along them; for a 10³-voxel cube shifted by one
  slice at spacing (3, 1, 1) mm and 2 mm tolerance it gives 372/488 = 0.762 where the surfel
  definition gives 0.876. medfm follows the surfel (DeepMind / challenge) definition.
  The challenge scores 2D images by lifting them to ``(H, W, 1)`` volumes with spacing
  ``(1, 1, 1)`` (whatever the pixel size), whose flat top and bottom faces then take part in the
  surface and dominate it: a 10x10 square shifted by 3 pixels scores 0.603 as a contour but 0.937
  lifted, at 2 mm. medfm's 2D NSD is the plain contour one (DeepMind's 2D mode, MONAI's 2D
  ``use_subvoxels=True``). To reproduce the challenge's 2D number, call
  ``normalized_surface_dice(pred[..., None], ref[..., None], (1.0, 1.0, 1.0))``.
* **HD95** follows MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``: the
  boundary of a mask is its voxels with at least one face-neighbour outside it (the image border
  counts as outside), distances are between boundary-voxel centres in mm, and HD95 is the larger
  of the two *directed* 95th percentiles (linear interpolation). It is symmetric. Other tools
  differ: medpy's ``hd95`` takes one percentile over both directions pooled, and DeepMind's
  ``compute_robust_hausdorff`` uses area-weighted surfels and a nearest-rank percentile.

Why the distance part is written here with numpy/scipy instead of calling MONAI (its values are
checked against MONAI's in ``tests/test_metrics.py``): MONAI returns NaN for empty masks and warns;
its HD percentile uses ``torch.quantile``, which raises for more than 2**24 boundary voxels (a
noisy prediction on a large CT); it converts the whole volume to float tensors and always uses a
k-d tree, which is slow on dense (noisy) boundaries. Measured on the 2-core project machine for
Dice + NSD + HD95: 512x512 ellipses 5 ms here vs 300 ms through MONAI; a 100x512x512 volume with a
2.7M-voxel ellipsoid 0.9 s vs 4.0 s; a kidney-sized (100k-voxel) object 60 ms. Pure noise over a
whole 100x512x512 volume takes about 20 s (dense distance transforms). MONAI's surfel
area/length lookup tables (``get_code_to_measure_table``) are used as they are; MONAI itself is
imported on the first NSD call only.

Speed: both masks are cropped to the bounding box of their union and padded by one voxel of
zeros before any boundary or distance computation. Every boundary point of either mask lies in
that box (surfel corners lie at most half a voxel outside it, inside the padding), and distances
are only ever taken between boundary points, so the crop changes no value; a tolerance margin is
not needed. Distances come from a k-d tree over boundary points, or from
``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` over the crop when the boundary is
dense (noisy masks), whichever is cheaper; both are exact Euclidean distances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "dice",
    "hausdorff95",
    "iou",
    "normalized_surface_dice",
    "segmentation_metrics",
]

# Distances within this many mm of the tolerance count as within it (floating-point ties).
_TIE_MM = 1e-6
# Cost model that picks a k-d tree or the dense distance transform (microseconds, measured on the
# 2-core project machine): the tree costs about 1.2 per query point plus 0.15 per target point to
# build, the transform about 0.1 per voxel of the cropped grid. On a 100x512x512 volume of noise
# the transform takes 20 s where the tree alone would take 150 s.
_TREE_US_PER_QUERY = 1.2
_TREE_US_PER_TARGET = 0.15
_EDT_US_PER_VOXEL = 0.1


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P|+|R|)``; 1.0 when both masks are empty, 0.0 when one is."""
    pred, ref = _as_mask_pair(prediction, reference)
    inter, n_pred, n_ref = _counts(pred, ref)
    return _dice_from_counts(inter, n_pred, n_ref)


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P∩R| / |P∪R|``; 1.0 when both are empty, 0.0 when one is."""
    pred, ref = _as_mask_pair(prediction, reference)
    inter, n_pred, n_ref = _counts(pred, ref)
    return _iou_from_counts(inter, n_pred, n_ref)


def normalized_surface_dice(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
) -> float:
    """Normalized surface Dice at ``tolerance_mm`` (DeepMind / MedSAM-challenge surfel definition).

    The fraction of the two boundaries' total area (3D, mm²) or length (2D, mm) that lies within
    ``tolerance_mm`` of the other boundary; see the module docstring for the exact definition and
    how it differs from MONAI's default. 1.0 when both masks are empty, 0.0 when one is.
    """
    pred, ref = _as_mask_pair(prediction, reference)
    sp = _check_spacing(spacing, pred.shape, ref.shape)
    tol = _check_tolerance(tolerance_mm)
    empty = _empty_case(pred, ref, sp)
    if empty is not None:
        return empty["nsd"]
    pred_c, ref_c = _crop_pair(pred, ref)
    return _nsd(pred_c, ref_c, sp, tol)


def hausdorff95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's boundary-voxel definition).

    The larger of the two directed 95th percentiles of boundary-voxel-centre distances; see the
    module docstring. 0.0 when both masks are empty; the image diagonal in mm when one is.
    """
    pred, ref = _as_mask_pair(prediction, reference)
    sp = _check_spacing(spacing, pred.shape, ref.shape)
    empty = _empty_case(pred, ref, sp)
    if empty is not None:
        return empty["hd95"]
    pred_c, ref_c = _crop_pair(pred, ref)
    return _hd95(pred_c, ref_c, sp)


def segmentation_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
) -> dict[str, float]:
    """All four metrics at once (validating and cropping once): keys ``dice``, ``iou``, ``nsd``, ``hd95``."""
    pred, ref = _as_mask_pair(prediction, reference)
    sp = _check_spacing(spacing, pred.shape, ref.shape)
    tol = _check_tolerance(tolerance_mm)
    empty = _empty_case(pred, ref, sp)
    if empty is not None:
        return empty
    inter, n_pred, n_ref = _counts(pred, ref)
    pred_c, ref_c = _crop_pair(pred, ref)
    return {
        "dice": _dice_from_counts(inter, n_pred, n_ref),
        "iou": _iou_from_counts(inter, n_pred, n_ref),
        "nsd": _nsd(pred_c, ref_c, sp, tol),
        "hd95": _hd95(pred_c, ref_c, sp),
    }


# ---------------------------------------------------------------------------------------------
# validation and the empty cases
# ---------------------------------------------------------------------------------------------


def _as_mask_pair(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(prediction)
    ref = np.asarray(reference)
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction shape {pred.shape} and reference shape {ref.shape} differ; "
            "the masks must lie on the same grid"
        )
    if pred.ndim not in (2, 3):
        raise ValueError(
            f"masks must be 2D (H, W) or 3D (Z, Y, X); got prediction shape {pred.shape} and "
            f"reference shape {ref.shape}"
        )
    return _as_binary(pred, "prediction"), _as_binary(ref, "reference")


def _as_binary(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} mask must be bool or numeric 0/1, got dtype {array.dtype}")
    mask = array != 0
    if not np.array_equal(array, mask):  # any value other than 0 and 1 (NaN included)
        values = np.unique(array[(array != 0) & (array != 1)])[:5]
        raise ValueError(
            f"{name} mask (shape {array.shape}) must be binary (bool or 0/1), but holds "
            f"{values.tolist()}; threshold it first (e.g. mask > 0, or probability > 0.5), "
            "or compare one label at a time (label_map == k)"
        )
    return mask


def _check_spacing(
    spacing: Sequence[float], pred_shape: tuple[int, ...], ref_shape: tuple[int, ...]
) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as exc:
        raise ValueError(
            f"spacing must be a sequence of {len(pred_shape)} numbers (mm per array axis) for "
            f"prediction shape {pred_shape} and reference shape {ref_shape}; got {spacing!r}"
        ) from exc
    if len(sp) != len(pred_shape):
        raise ValueError(
            f"spacing {sp} has {len(sp)} values but prediction shape {pred_shape} and reference "
            f"shape {ref_shape} have {len(pred_shape)} axes; give one spacing (mm) per array axis"
        )
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(
            f"spacing {sp} must be positive and finite (mm per array axis; prediction shape "
            f"{pred_shape}, reference shape {ref_shape})"
        )
    return sp


def _check_tolerance(tolerance_mm: float) -> float:
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    return tol


def _empty_case(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]
) -> dict[str, float] | None:
    """The four metrics when at least one mask is empty (see the module docstring), else None."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        return None
    if not has_pred and not has_ref:
        return {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}
    return {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": _diagonal_mm(pred.shape, spacing)}


def _diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


# ---------------------------------------------------------------------------------------------
# overlap
# ---------------------------------------------------------------------------------------------


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    return (
        int(np.count_nonzero(pred & ref)),
        int(np.count_nonzero(pred)),
        int(np.count_nonzero(ref)),
    )


def _dice_from_counts(inter: int, n_pred: int, n_ref: int) -> float:
    total = n_pred + n_ref
    return 1.0 if total == 0 else 2.0 * inter / total


def _iou_from_counts(inter: int, n_pred: int, n_ref: int) -> float:
    union = n_pred + n_ref - inter
    return 1.0 if union == 0 else inter / union


# ---------------------------------------------------------------------------------------------
# boundaries and distances (both masks non-empty from here on)
# ---------------------------------------------------------------------------------------------


def _crop_pair(pred: np.ndarray, ref: np.ndarray, crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their union's bounding box, then padded by one voxel of zeros.

    Padding makes the result independent of where the image border is: outside the image is
    background, as in MONAI (erosion with ``border_value=0``) and DeepMind (zero padding).
    ``crop=False`` only pads (the tests use it to show that cropping changes nothing).
    """
    if crop:
        union = pred | ref
        box = []
        for axis in range(union.ndim):
            other = tuple(a for a in range(union.ndim) if a != axis)
            hit = np.flatnonzero(union.any(axis=other))
            box.append(slice(int(hit[0]), int(hit[-1]) + 1))
        pred, ref = pred[tuple(box)], ref[tuple(box)]
    return np.pad(pred, 1), np.pad(ref, 1)


def _nearest_distances(
    query: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, ...],
    upper_bound: float | None = None,
) -> np.ndarray:
    """Distance in mm from each True of ``query`` (C order) to the nearest True of ``target``.

    Both are boolean masks on the same grid with at least one True each. With ``upper_bound``,
    distances beyond it may come back as ``inf`` (enough to compare against a tolerance).
    """
    n_query = int(np.count_nonzero(query))
    n_target = int(np.count_nonzero(target))
    tree_cost = _TREE_US_PER_QUERY * n_query + _TREE_US_PER_TARGET * n_target
    if tree_cost > _EDT_US_PER_VOXEL * query.size:
        distance_map = ndimage.distance_transform_edt(~target, sampling=spacing)
        return distance_map[query]
    scale = np.asarray(spacing, dtype=np.float64)
    tree = cKDTree(np.argwhere(target) * scale, leafsize=32, balanced_tree=False)
    bound = np.inf if upper_bound is None else upper_bound
    distances, _ = tree.query(np.argwhere(query) * scale, k=1, distance_upper_bound=bound)
    return distances


@lru_cache(maxsize=64)
def _surfel_tables(spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(measure per neighbour code, encoding kernel) from MONAI's port of DeepMind's tables.

    The measure is the surfel area in mm² (3D, marching cubes) or contour length in mm (2D,
    marching squares) of each 2x2(x2) neighbour code at this spacing. MONAI builds the 3D table
    in float32, so 3D NSD values carry a relative rounding of about 1e-8.
    """
    from monai.metrics.utils import get_code_to_measure_table  # heavy import, only when needed

    table, kernel = get_code_to_measure_table(spacing)
    table = np.asarray(table.cpu(), dtype=np.float64)
    kernel = np.asarray(kernel.cpu(), dtype=np.int64).reshape((2,) * len(spacing))
    return table, kernel


def _neighbour_codes(padded: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Code of every voxel corner: sum of ``kernel`` over the 2x2(x2) voxels around it (DeepMind's)."""
    out_shape = tuple(n - 1 for n in padded.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    as_uint8 = padded.view(np.uint8)
    for offset in np.ndindex(kernel.shape):
        window = tuple(slice(o, o + n) for o, n in zip(offset, out_shape, strict=True))
        codes += as_uint8[window] * np.uint8(kernel[offset])
    return codes


def _nsd(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float) -> float:
    table, kernel = _surfel_tables(spacing)
    full = int(kernel.sum())
    codes_pred = _neighbour_codes(pred, kernel)
    codes_ref = _neighbour_codes(ref, kernel)
    border_pred = (codes_pred != 0) & (codes_pred != full)
    border_ref = (codes_ref != 0) & (codes_ref != full)
    area_pred = table[codes_pred[border_pred]]
    area_ref = table[codes_ref[border_ref]]
    bound = tol + _TIE_MM
    d_pred = _nearest_distances(border_pred, border_ref, spacing, upper_bound=bound)
    d_ref = _nearest_distances(border_ref, border_pred, spacing, upper_bound=bound)
    correct = area_pred[d_pred <= bound].sum() + area_ref[d_ref <= bound].sum()
    total = area_pred.sum() + area_ref.sum()
    return float(correct / total)


def _boundary_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it (MONAI's / medpy's edges)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    edge_pred = _boundary_voxels(pred)
    edge_ref = _boundary_voxels(ref)
    d_pred = _nearest_distances(edge_pred, edge_ref, spacing)
    d_ref = _nearest_distances(edge_ref, edge_pred, spacing)
    return float(max(np.percentile(d_pred, 95), np.percentile(d_ref, 95)))
