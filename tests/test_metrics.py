"""Segmentation metrics: values worked out by hand, the empty cases, errors, MONAI agreement, speed.

Conventions used in the hand arithmetic below (see ``medfm.evaluate.metrics``):

* HD95 (MONAI's definition): boundary voxels are mask voxels with a face-neighbour outside the
  mask; distances are between boundary-voxel centres in mm; HD95 is the larger of the two
  directed 95th percentiles with linear interpolation, i.e. for n sorted distances the value at
  position 0.95 * (n - 1).
* NSD (DeepMind / MedSAM-challenge definition): boundary points are voxel *corners* whose 2x2
  (2D) or 2x2x2 (3D) neighbourhood is partly inside the mask. In 2D each carries a contour
  length: a straight piece across the cell is one pixel spacing long (along axis 1 for a top or
  bottom edge, along axis 0 for a left or right edge), a cut corner (one pixel of four inside) is
  half the pixel diagonal, ``0.5 * sqrt(s0**2 + s1**2)``. In 3D each carries an area: a flat
  face point ``s_a * s_b`` (its two in-face spacings), a point on a box edge along axis ``a``
  ``0.5 * s_a * sqrt(s_b**2 + s_c**2)``, a box corner ``0.125 * sqrt((s1 s2)**2 + (s0 s2)**2 +
  (s0 s1)**2)``. Corner points of an h x w pixel rectangle at rows r0..r0+h-1 lie on the grid
  lines r0..r0+h and c0..c0+w.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

import medfm.evaluate.metrics as metrics_module
from medfm.evaluate import dice, hausdorff95, iou, normalized_surface_dice, segmentation_metrics

# --------------------------------------------------------------------------------------------------
# helpers


def square(shape: tuple[int, ...], start: tuple[int, ...], size: int | tuple[int, ...]) -> np.ndarray:
    """A bool mask with a box of ``size`` voxels per axis starting at ``start``."""
    sizes = (size,) * len(shape) if isinstance(size, int) else size
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, sizes, strict=True))] = True
    return mask


def blob(shape: tuple[int, ...], seed: int, sigma: float = 3.0, level: float = 0.2) -> np.ndarray:
    """A smooth random mask with several irregular components (seeded)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


def all_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tol: float = 2.0) -> dict[str, float]:
    """The four metrics from the four single functions (must equal segmentation_metrics)."""
    return {
        "dice": dice(pred, ref),
        "iou": iou(pred, ref),
        "nsd": normalized_surface_dice(pred, ref, spacing, tol),
        "hd95": hausdorff95(pred, ref, spacing),
    }


# --------------------------------------------------------------------------------------------------
# Dice and IoU


def test_two_overlapping_squares_dice_iou() -> None:
    # A: rows 0..9, cols 0..9 (100 px); B: rows 5..14, cols 0..9 (100 px); overlap rows 5..9 = 50 px.
    # Dice = 2*50 / (100+100) = 0.5; IoU = 50 / (100+100-50) = 1/3.
    a = square((20, 12), (0, 0), 10)
    b = square((20, 12), (5, 0), 10)
    assert dice(a, b) == pytest.approx(0.5, abs=1e-12)
    assert iou(a, b) == pytest.approx(1 / 3, abs=1e-12)


def test_nested_squares_dice_iou() -> None:
    # outer 4x4 = 16 px contains inner 2x2 = 4 px: Dice = 2*4/(16+4) = 0.4; IoU = 4/16 = 0.25.
    outer = square((8, 8), (2, 2), 4)
    inner = square((8, 8), (3, 3), 2)
    assert dice(inner, outer) == pytest.approx(0.4, abs=1e-12)
    assert iou(inner, outer) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_dice_equals_two_iou_over_one_plus_iou(seed: int) -> None:
    # Dice = 2I/(P+R) and IoU = I/(P+R-I)  =>  Dice = 2 IoU / (1 + IoU), for any pair, empties included.
    rng = np.random.default_rng(seed)
    shape = (16, 24) if seed % 2 else (6, 10, 12)
    pred = rng.random(shape) < rng.choice([0.0, 0.1, 0.5, 0.9])
    ref = rng.random(shape) < rng.choice([0.0, 0.1, 0.5, 0.9])
    j = iou(pred, ref)
    assert dice(pred, ref) == pytest.approx(2 * j / (1 + j), abs=1e-12)


def test_bool_int_and_float_masks_agree() -> None:
    a = square((12, 12), (1, 1), 6)
    b = square((12, 12), (3, 2), 6)
    expected = segmentation_metrics(a, b, (1.0, 0.5))
    for dtype in (np.uint8, np.int64, np.float32, np.float64):
        assert segmentation_metrics(a.astype(dtype), b.astype(dtype), (1.0, 0.5)) == expected
    assert segmentation_metrics(a.tolist(), b.tolist(), [1, 0.5]) == expected


# --------------------------------------------------------------------------------------------------
# a shifted square with anisotropic spacing: HD95 and NSD


SHIFT_SPACING = (2.0, 0.5)  # mm along axis 0 (rows) and axis 1 (cols)


def test_shifted_square_hd95_anisotropic() -> None:
    # R: rows 10..19, cols 10..19; P: R moved down 3 rows (rows 13..22). 36 boundary pixels each.
    # R -> P: R's top row (10 px) is 3 rows from P's top row: 3 * 2.0 = 6 mm; rows 11, 12 of R's
    # sides are 2 and 1 rows above P's corner: 4 and 2 mm (2 px each); rows 13..18 of the sides
    # and R's bottom corners lie on P's sides: 0 (14 px); the 8 inner px of R's bottom row lie inside
    # P, nearest P boundary is its side c cols away: min(c-10, 19-c) * 0.5 = .5,1,1.5,2,2,1.5,1,.5.
    # Sorted: 14 x 0, 2 x .5, 2 x 1, 2 x 1.5, 4 x 2, 2 x 4, 10 x 6 (36 values). Position
    # 0.95 * 35 = 33.25 lies among the 6's (indices 26..35): 6 mm, and P -> R is the mirror image.
    ref = square((40, 40), (10, 10), 10)
    down = square((40, 40), (13, 10), 10)
    assert hausdorff95(down, ref, SHIFT_SPACING) == pytest.approx(6.0, abs=1e-9)
    # The same 3-pixel shift along axis 1 (cols 13..22): R's left col is 3 * 0.5 = 1.5 mm from P's
    # left col; the 8 inner px of R's right col lie inside P and are 1.5 mm from P's right col
    # (closer than P's top/bottom rows, >= 2 mm away); R's top/bottom rows at cols 11, 12 are 1.0 and
    # 0.5 mm from P's corner, cols 13..19 are on P's rows: 0. Sorted: 14 x 0, 2 x .5, 2 x 1,
    # 18 x 1.5; position 33.25 -> 1.5 mm. The spacing of each axis applies to that axis.
    right = square((40, 40), (10, 13), 10)
    assert hausdorff95(right, ref, SHIFT_SPACING) == pytest.approx(1.5, abs=1e-9)
    # isotropic 1 mm: the shift is 3 mm whichever axis it is along
    assert hausdorff95(down, ref, (1.0, 1.0)) == pytest.approx(3.0, abs=1e-9)
    assert hausdorff95(right, ref, (1.0, 1.0)) == pytest.approx(3.0, abs=1e-9)


def test_shifted_square_nsd_below_and_above_the_shift() -> None:
    # Same R and P (P = R moved down 3 rows), spacing (2.0, 0.5). Corner points: R's outline on
    # rows 10..20 x cols 10..20, P's on rows 13..23 x cols 10..20; 40 points each:
    #   4 cut corners, length d = 0.5 * sqrt(2.0**2 + 0.5**2) = 0.5 * sqrt(4.25) = 1.0308 mm,
    #   9 + 9 top/bottom edge points of length 0.5 (spacing of axis 1),
    #   9 + 9 side points of length 2.0 (spacing of axis 0).
    # Total per mask: 4d + 9 + 36 = 49.123 mm.
    # Distances of R's points to P's outline:
    #   top row (row 10, 2 corners + 9 edge points): 3 rows * 2.0 = 6 mm;
    #   side points at rows 11, 12: 4 and 2 mm; side points at rows 13..19: on P's sides, 0;
    #   bottom corners (20, 10), (20, 20): on P's sides, 0;
    #   bottom edge points (20, c), c = 11..19: inside P, min(c-10, 20-c) * 0.5 = 0.5 .. 2.5 mm.
    # P's points mirror these exactly, so NSD = R's share.
    ref = square((40, 40), (10, 10), 10)
    pred = square((40, 40), (13, 10), 10)
    d = 0.5 * math.sqrt(4.25)
    total = 4 * d + 18 * 0.5 + 18 * 2.0
    # tolerance 0.4 mm: only the 0-distance points, 7 + 7 side points (2.0 each) and 2 corners.
    assert normalized_surface_dice(pred, ref, SHIFT_SPACING, 0.4) == pytest.approx(
        (14 * 2.0 + 2 * d) / total, rel=1e-9
    )  # = 0.61196
    # tolerance 5.9 mm, below the 6 mm shift: everything but the top row (2d + 9 * 0.5).
    assert normalized_surface_dice(pred, ref, SHIFT_SPACING, 5.9) == pytest.approx(
        (total - 2 * d - 9 * 0.5) / total, rel=1e-9
    )  # = 0.86643
    # tolerance 6 mm (= the shift) and above: every point is within, NSD = 1.
    assert normalized_surface_dice(pred, ref, SHIFT_SPACING, 6.0) == pytest.approx(1.0, abs=1e-12)
    assert normalized_surface_dice(pred, ref, SHIFT_SPACING, 10.0) == pytest.approx(1.0, abs=1e-12)
    # tolerance 0: the 0-distance points only, as at 0.4 mm
    assert normalized_surface_dice(pred, ref, SHIFT_SPACING, 0.0) == pytest.approx(
        (14 * 2.0 + 2 * d) / total, rel=1e-9
    )


@pytest.mark.parametrize("force", ["tree", "dense"])
def test_distance_exactly_at_tolerance_counts_as_within(monkeypatch, force: str) -> None:
    # A 5-row shift at 0.4 mm spacing puts the far rows exactly 5 * 0.4 = 2.0 mm apart. Scaled
    # k-d tree coordinates give 12*0.4 - 7*0.4 = 2.0000000000000004 > 2.0; that must not flip the
    # comparison (definition: distance <= tolerance), in either distance path.
    _force_path(monkeypatch, force)
    ref = square((40, 40), (10, 10), 10)
    pred = np.roll(ref, 5, axis=0)
    assert normalized_surface_dice(pred, ref, (0.4, 0.4), 2.0) == pytest.approx(1.0, abs=1e-12)
    assert normalized_surface_dice(pred, ref, (0.4, 0.4), 1.9) < 1.0


# --------------------------------------------------------------------------------------------------
# 3D: a cube and the cube moved one slice along Z


def test_cube_shifted_one_slice_anisotropic_vs_isotropic() -> None:
    # R: 10x10x10 voxels at z,y,x = 5..14; P: z = 6..15. Overlap 9 slices: 900 voxels.
    # Dice = 2*900/2000 = 0.9; IoU = 900/1100.
    ref = square((30, 30, 30), (5, 5, 5), 10)
    pred = square((30, 30, 30), (6, 5, 5), 10)
    for sp in ((3.0, 1.0, 1.0), (1.0, 1.0, 1.0)):
        assert dice(pred, ref) == pytest.approx(0.9, abs=1e-12)
        assert iou(pred, ref) == pytest.approx(900 / 1100, abs=1e-12)

    # HD95. R has 1000 - 8**3 = 488 boundary voxels. R -> P: the z=5 face (100 voxels) is one slice
    # from P's z=6 face: 1 * s_z. Side voxels at z=6..13 (8 rings of 36) and the ring of the z=14
    # face (36) lie on P's sides: 0. The 64 inner voxels of the z=14 face are inside P: nearest P
    # boundary is P's z=15 face (s_z) or P's side, k = 1..4 mm in-plane (rings of 28, 20, 12, 4):
    # min(s_z, k). Spacing (3,1,1): 324 x 0, 28 x 1, 20 x 2, 100 + 12 + 4 = 116 x 3 mm;
    # position 0.95 * 487 = 462.65 > 324 + 28 + 20 = 372, so 3 mm. Spacing (1,1,1): all non-zero
    # distances are 1 mm, so 1 mm. P -> R mirrors R -> P.
    assert hausdorff95(pred, ref, (3.0, 1.0, 1.0)) == pytest.approx(3.0, abs=1e-9)
    assert hausdorff95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(1.0, abs=1e-9)

    # NSD at 2 mm. Surfel areas of the 11x11x11 corner outline at spacing (3, 1, 1):
    #   z-faces: 2 x 81 inner points, 1 x 1 = 1 mm² each;
    #   y- and x-faces: 4 x 81 points, 3 x 1 = 3 mm² each;
    #   4 edges along z, 9 points each: 0.5 * 3 * sqrt(1 + 1) = 2.1213;
    #   8 edges along y or x, 9 points each: 0.5 * 1 * sqrt(9 + 1) = 1.5811;
    #   8 corners: 0.125 * sqrt(1 + 9 + 9) = 0.5449.
    # R's outline spans corner z = 5..15, P's z = 6..16. Within 2 mm of P's outline (R side):
    #   y/x-face points (z = 6..14) and z-edges: on P's sides, 0;
    #   the 36 y/x-edge points and 4 corners at z = 15 (R's top rim): on P's sides, 0;
    #   the z = 15 face (81 points) lies inside P: P's top is 3 mm away, its side k mm in-plane
    #     (k = 1..5); k <= 2 for the rings of 32 and 24 points: 56 points;
    #   everything at z = 5 (R's bottom face, rim, corners) is 1 slice = 3 mm from P: out.
    # P mirrors R.  Spacing (1, 1, 1): every distance is 0 or 1 mm <= 2 mm, so NSD = 1.
    e_z = 0.5 * 3 * math.sqrt(2)
    e_xy = 0.5 * math.sqrt(10)
    corner = 0.125 * math.sqrt(19)
    total = 2 * 81 * 1 + 4 * 81 * 3 + 36 * e_z + 72 * e_xy + 8 * corner
    within = 4 * 81 * 3 + 36 * e_z + 36 * e_xy + 4 * corner + 56 * 1
    assert normalized_surface_dice(pred, ref, (3.0, 1.0, 1.0), 2.0) == pytest.approx(
        within / total, rel=1e-6
    )  # = 0.87573
    assert normalized_surface_dice(pred, ref, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0, abs=1e-12)
    # at 3 mm tolerance the anisotropic shift is fully forgiven too
    assert normalized_surface_dice(pred, ref, (3.0, 1.0, 1.0), 3.0) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# one-pixel objects


def test_one_pixel_object() -> None:
    a = square((5, 5), (2, 2), 1)
    b = square((5, 5), (2, 3), 1)  # one column to the right
    sp = (1.0, 2.0)
    # identical single pixels: perfect
    assert segmentation_metrics(a, a, sp) == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}
    # one pixel apart along axis 1 (2 mm): no overlap; each pixel is its own boundary: HD95 = 2 mm.
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    assert hausdorff95(a, b, sp) == pytest.approx(2.0, abs=1e-12)
    # NSD: a's corners (2,2) (2,3) (3,2) (3,3), b's (2,3) (2,4) (3,3) (3,4), all cut corners of the
    # same length; the shared column 3 is at 0 mm, the other two points of each at 2 mm.
    # tolerance 1 mm: 4 of 8 equal pieces = 0.5; tolerance 2 mm: 1.
    assert normalized_surface_dice(a, b, sp, 1.0) == pytest.approx(0.5, abs=1e-12)
    assert normalized_surface_dice(a, b, sp, 2.0) == pytest.approx(1.0, abs=1e-12)


def test_one_pixel_inside_a_three_by_three_square() -> None:
    px = square((7, 7), (3, 3), 1)
    sq = square((7, 7), (2, 2), 3)
    # Dice = 2*1/(1+9) = 0.2; IoU = 1/9
    assert dice(px, sq) == pytest.approx(0.2, abs=1e-12)
    assert iou(px, sq) == pytest.approx(1 / 9, abs=1e-12)
    # HD95, spacing (2, 1): the pixel's only boundary voxel is 1 mm from the ring (left/right
    # neighbour). The 8 ring pixels -> pixel: above/below 2 mm, left/right 1 mm, diagonals
    # sqrt(2**2 + 1**2) = sqrt(5). Sorted 1, 1, 2, 2, sqrt5 x 4: position 0.95 * 7 = 6.65 -> sqrt(5).
    assert hausdorff95(px, sq, (2.0, 1.0)) == pytest.approx(math.sqrt(5), abs=1e-12)
    # isotropic 1 mm: ring -> pixel is 1 (4x) and sqrt(2) (4x): HD95 = sqrt(2)
    assert hausdorff95(px, sq, (1.0, 1.0)) == pytest.approx(math.sqrt(2), abs=1e-12)
    # NSD at 1 mm, spacing 1: the pixel's 4 corners (length sqrt(2)/2 each) are 1 mm from the
    # square's outline: within. The square's outline has 8 edge points (length 1) 1 mm from the
    # pixel's corners (within) and 4 cut corners (length sqrt(2)/2) sqrt(2) mm away (out).
    # NSD = (2 sqrt2 + 8) / (2 sqrt2 + 8 + 2 sqrt2) = 0.79289.
    r2 = math.sqrt(2)
    assert normalized_surface_dice(px, sq, (1.0, 1.0), 1.0) == pytest.approx(
        (2 * r2 + 8) / (4 * r2 + 8), rel=1e-12
    )
    assert normalized_surface_dice(px, sq, (1.0, 1.0), 1.5) == pytest.approx(1.0, abs=1e-12)


def test_one_voxel_3d() -> None:
    v = square((5, 5, 5), (2, 2, 2), 1)
    w = square((5, 5, 5), (3, 2, 2), 1)  # next slice
    assert segmentation_metrics(v, v, (3.0, 1.0, 1.0)) == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}
    # one slice apart at 3 mm: HD95 = 3 mm; 4 of 8 equal corner surfels shared -> NSD 0.5 below 3 mm
    assert hausdorff95(v, w, (3.0, 1.0, 1.0)) == pytest.approx(3.0, abs=1e-12)
    assert normalized_surface_dice(v, w, (3.0, 1.0, 1.0), 2.0) == pytest.approx(0.5, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# empty masks: defined values, never NaN


@pytest.mark.parametrize("shape,spacing", [((10, 20), (0.5, 2.0)), ((4, 10, 20), (3.0, 0.5, 2.0))])
def test_both_empty(shape, spacing) -> None:
    empty = np.zeros(shape, dtype=bool)
    expected = {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}
    assert segmentation_metrics(empty, empty, spacing) == expected
    assert all_metrics(empty, empty, spacing) == expected


def test_one_empty_hd95_is_the_image_diagonal() -> None:
    # 10 x 20 pixels at (0.5, 2) mm is 5 mm x 40 mm: diagonal sqrt(5**2 + 40**2) = sqrt(1625) = 40.311 mm
    empty = np.zeros((10, 20), dtype=bool)
    some = square((10, 20), (2, 3), 4)
    diagonal = math.sqrt(5**2 + 40**2)
    for pred, ref in ((some, empty), (empty, some)):
        expected = {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": pytest.approx(diagonal, abs=1e-12)}
        assert segmentation_metrics(pred, ref, (0.5, 2.0)) == expected
        assert all_metrics(pred, ref, (0.5, 2.0)) == expected
    # 3D: 4 x 10 x 20 at (3, 0.5, 2) mm: sqrt(12**2 + 5**2 + 40**2)
    empty3 = np.zeros((4, 10, 20), dtype=bool)
    some3 = square((4, 10, 20), (1, 2, 3), 2)
    assert hausdorff95(some3, empty3, (3.0, 0.5, 2.0)) == pytest.approx(math.sqrt(144 + 25 + 1600))


def test_never_nan() -> None:
    shapes = [(1, 1), (1, 7), (6, 6), (1, 1, 1), (3, 4, 5)]
    for shape in shapes:
        spacing = tuple(0.7 + i for i in range(len(shape)))
        candidates = [np.zeros(shape, bool), np.ones(shape, bool)]
        candidates.append(np.zeros(shape, bool))
        candidates[-1].flat[0] = True
        for pred in candidates:
            for ref in candidates:
                values = segmentation_metrics(pred, ref, spacing)
                assert all(math.isfinite(v) for v in values.values()), (shape, values)
                assert 0.0 <= values["nsd"] <= 1.0 and 0.0 <= values["dice"] <= 1.0


def test_whole_image_masks_and_border_touching_objects() -> None:
    # A mask filling the whole image has a boundary at the image border (outside is background).
    full = np.ones((6, 8), dtype=bool)
    assert segmentation_metrics(full, full, (1.0, 1.0)) == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}
    # full 6x8 vs its top 5 rows: boundaries differ by the last row only: 1 mm apart
    top = full.copy()
    top[5] = False
    assert hausdorff95(top, full, (1.0, 1.0)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# errors


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(10, 20\).*\(10, 21\)"):
        dice(np.zeros((10, 20), bool), np.zeros((10, 21), bool))
    with pytest.raises(ValueError, match=r"\(10, 20\).*\(10, 21\)"):
        segmentation_metrics(np.zeros((10, 20), bool), np.zeros((10, 21), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(4, 10, 20\).*\(10, 20\)"):
        hausdorff95(np.zeros((4, 10, 20), bool), np.zeros((10, 20), bool), (1.0, 1.0))


def test_wrong_spacing_length_names_both_shapes() -> None:
    a = np.zeros((10, 20), bool)
    for fn in (hausdorff95, normalized_surface_dice, segmentation_metrics):
        with pytest.raises(ValueError, match=r"3 values.*\(10, 20\).*\(10, 20\)"):
            fn(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(2, 10, 20\).*\(2, 10, 20\)"):
        segmentation_metrics(np.zeros((2, 10, 20)), np.zeros((2, 10, 20)), (1.0, 1.0))


def test_other_bad_inputs() -> None:
    a = square((8, 8), (2, 2), 3)
    with pytest.raises(ValueError, match="positive"):
        hausdorff95(a, a, (1.0, 0.0))
    with pytest.raises(ValueError, match="positive"):
        normalized_surface_dice(a, a, (1.0, float("nan")))
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(a, a, (1.0, 1.0), -1.0)
    with pytest.raises(ValueError, match="binary"):
        dice(a * 255, a)  # a 0/255 PNG mask must be thresholded first
    with pytest.raises(ValueError, match="binary"):
        dice(a, a * 0.5)
    with pytest.raises(ValueError, match="2D"):
        dice(np.zeros(5, bool), np.zeros(5, bool))
    with pytest.raises(ValueError, match="2D"):
        dice(np.zeros((2, 2, 2, 2), bool), np.zeros((2, 2, 2, 2), bool))


# --------------------------------------------------------------------------------------------------
# symmetry, cropping, distance paths, the combined call


@pytest.mark.parametrize("seed", range(4))
def test_symmetric(seed: int) -> None:
    shape, spacing = ((48, 40), (0.8, 1.7)) if seed % 2 else ((14, 30, 26), (2.5, 0.7, 0.9))
    a = blob(shape, seed)
    b = blob(shape, seed + 100)
    assert hausdorff95(a, b, spacing) == pytest.approx(hausdorff95(b, a, spacing), abs=1e-12)
    assert normalized_surface_dice(a, b, spacing) == pytest.approx(normalized_surface_dice(b, a, spacing), abs=1e-12)
    assert dice(a, b) == dice(b, a) and iou(a, b) == iou(b, a)


def test_segmentation_metrics_equals_the_single_functions() -> None:
    a = blob((20, 40, 36), 3)
    b = blob((20, 40, 36), 4)
    sp, tol = (3.0, 0.8, 0.8), 1.5
    combined = segmentation_metrics(a, b, sp, tol)
    assert list(combined) == ["dice", "iou", "nsd", "hd95"]
    assert combined == all_metrics(a, b, sp, tol)
    assert all(isinstance(v, float) for v in combined.values())


@pytest.mark.parametrize("seed", range(4))
def test_cropping_changes_nothing(seed: int) -> None:
    # (1) the internal crop vs no crop (both padded by one voxel) on the same arrays
    shape, spacing = ((30, 34), (0.6, 1.3)) if seed % 2 else ((10, 22, 18), (2.0, 0.6, 0.75))
    a = blob(shape, seed, sigma=2.0)
    b = blob(shape, seed + 50, sigma=2.0)
    pa, pb = np.pad(a, 7), np.pad(b, 7)  # empty margin, so the crop really cuts
    cropped = metrics_module._crop_pair(pa, pb, crop=True)
    uncropped = metrics_module._crop_pair(pa, pb, crop=False)
    assert cropped[0].size < uncropped[0].size
    for tol in (0.5, 2.0, 5.0):
        assert metrics_module._nsd(*cropped, spacing, tol) == pytest.approx(
            metrics_module._nsd(*uncropped, spacing, tol), abs=1e-12
        )
    assert metrics_module._hd95(*cropped, spacing) == pytest.approx(metrics_module._hd95(*uncropped, spacing), abs=1e-12)
    # (2) objects touching the image border score as on a larger canvas (outside = background)
    direct = segmentation_metrics(a, b, spacing)
    padded = segmentation_metrics(pa, pb, spacing)
    assert direct == pytest.approx(padded, abs=1e-12)
    # (3) and the position on the canvas does not matter
    shifted = segmentation_metrics(np.pad(a, [(3, 11)] * a.ndim), np.pad(b, [(3, 11)] * b.ndim), spacing)
    assert shifted == pytest.approx(direct, abs=1e-12)


def _force_path(monkeypatch, force: str) -> None:
    # The cost model picks the dense transform when tree cost > EDT cost per voxel * voxels.
    monkeypatch.setattr(metrics_module, "_EDT_US_PER_VOXEL", 1e12 if force == "tree" else 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_tree_and_dense_distance_paths_agree(monkeypatch, seed: int) -> None:
    shape, spacing = ((40, 44), (0.9, 0.4)) if seed % 2 else ((12, 24, 20), (3.0, 0.7, 0.7))
    a = blob(shape, seed)
    b = blob(shape, seed + 7)
    results = {}
    for force in ("tree", "dense"):
        _force_path(monkeypatch, force)
        results[force] = {tol: segmentation_metrics(a, b, spacing, tol) for tol in (0.5, 1.0, 2.0, 4.0)}
    for tol, values in results["tree"].items():
        assert values == pytest.approx(results["dense"][tol], rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# agreement with MONAI where MONAI is right, and where it differs


def _monai(pred: np.ndarray, ref: np.ndarray, spacing, tol: float) -> dict[str, float]:
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    def onehot(mask: np.ndarray):  # B=1, C=1: the single channel is the foreground
        return torch.as_tensor(mask.astype(np.float32))[None, None]

    p, r = onehot(pred), onehot(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation warnings in 1.5+
        return {
            "dice": compute_dice(p, r, include_background=True).item(),
            "nsd": compute_surface_dice(
                p, r, [tol], include_background=True, spacing=list(spacing), use_subvoxels=True
            ).item(),
            "nsd_voxels": compute_surface_dice(p, r, [tol], include_background=True, spacing=list(spacing)).item(),
            "hd95": compute_hausdorff_distance(
                p, r, include_background=True, percentile=95, spacing=list(spacing)
            ).item(),
        }


@pytest.mark.parametrize(
    "shape,spacing,seed",
    [
        ((64, 56), (1.0, 1.0), 0),
        ((64, 56), (0.4, 1.7), 1),
        ((16, 40, 36), (1.0, 1.0, 1.0), 2),
        ((16, 40, 36), (3.0, 0.7, 0.9), 3),
        ((16, 40, 36), (0.5, 2.0, 1.25), 4),
    ],
)
def test_matches_monai_on_non_empty_masks(shape, spacing, seed) -> None:
    a = blob(shape, seed)
    b = blob(shape, seed + 1000)
    ours = segmentation_metrics(a, b, spacing, 2.0)
    ref = _monai(a, b, spacing, 2.0)
    assert ours["dice"] == pytest.approx(ref["dice"], rel=1e-6)  # MONAI sums in float32
    assert ours["nsd"] == pytest.approx(ref["nsd"], rel=1e-5)  # = compute_surface_dice(use_subvoxels=True)
    assert ours["hd95"] == pytest.approx(ref["hd95"], rel=1e-5)  # = compute_hausdorff_distance(percentile=95)


def test_monai_default_nsd_counts_voxels_not_surfels() -> None:
    # The evidence behind the module docstring: for the cube shifted one slice at (3, 1, 1) mm,
    # MONAI's default NSD counts boundary voxels unweighted: within 2 mm are the 324 zero-distance
    # voxels plus the 28 (1 mm) and 20 (2 mm) inner voxels of the z=14 face (see the cube test) out
    # of 488 per mask: 372/488 = 0.762; the surfel definition (medfm, challenge) gives 0.876.
    ref = square((30, 30, 30), (5, 5, 5), 10)
    pred = square((30, 30, 30), (6, 5, 5), 10)
    monai = _monai(pred, ref, (3.0, 1.0, 1.0), 2.0)
    assert monai["nsd_voxels"] == pytest.approx(372 / 488, rel=1e-6)
    assert monai["nsd"] == pytest.approx(normalized_surface_dice(pred, ref, (3.0, 1.0, 1.0)), rel=1e-6)
    assert normalized_surface_dice(pred, ref, (3.0, 1.0, 1.0)) == pytest.approx(0.87573, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# speed (generous bounds for a loaded 2-core CI machine; typical: ~5 ms and ~1 s)


def _ellipse_pair(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = [n / 2 for n in shape]
    radii = [0.3 * n * s for n, s in zip(shape, spacing, strict=True)]

    def ellipsoid(offset: float, scale: float) -> np.ndarray:
        total = 0
        for g, c, s, r in zip(grid, centre, spacing, radii, strict=True):
            total = total + ((g - c - offset) * s / (r * scale)) ** 2
        return total <= 1

    return ellipsoid(2.0, 1.0), ellipsoid(0.0, 0.97)


def test_large_3d_case_is_finite_and_close() -> None:
    """A CT-sized case (timings live in benchmarks/metrics_speed.py, not in tests)."""
    spacing = (2.5, 0.8, 0.8)
    pred, ref = _ellipse_pair((100, 512, 512), spacing)
    values = segmentation_metrics(pred, ref, spacing)
    assert 0.9 < values["dice"] < 1.0 and all(math.isfinite(v) for v in values.values())
