"""Visual prompts: boxes and clicks in input-pixel coordinates (x to the right, y down).

A box ``Box(x0, y0, x1, y1)`` uses the convention of MedSAM and segment-anything: the corners are
pixel indices, so the tight box of a mask is ``(min col, min row, max col, max row)``, and
``Box.from_mask`` gives exactly that. Everything is validated against the image it is used with,
so an inverted box or a click outside the image is a `PromptError`, never a silent clamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfm.errors import PromptError


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x0, y0, x1, y1)`` in input pixels, corners inclusive."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(np.isfinite(v) for v in values):
            raise PromptError(f"box {values} has a non-finite coordinate")
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise PromptError(f"box {values} is inverted: it needs x0 <= x1 and y0 <= y1")

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Box:
        """The tight box around the non-zero pixels of a 2D mask."""
        rows, cols = np.nonzero(np.asarray(mask))
        if rows.size == 0:
            raise PromptError("cannot take the box of an empty mask")
        return cls(float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))

    def check_area(self) -> None:
        """Raise `PromptError` for a box of zero width or height: a line or a point outlines nothing
        a model could segment (`from_mask` of a one-pixel-wide structure gives such boxes, so this
        is the check of user prompts, not of the constructor)."""
        if self.x1 == self.x0 or self.y1 == self.y0:
            raise PromptError(f"box ({self.x0:g}, {self.y0:g}, {self.x1:g}, {self.y1:g}) has zero area "
                              "(x0 == x1 or y0 == y1): draw it around the structure")

    def as_array(self) -> np.ndarray:
        """``[x0, y0, x1, y1]`` as float64."""
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.float64)

    def check_inside(self, height: int, width: int) -> None:
        """Raise `PromptError` unless the box lies within an image of this size."""
        if self.x0 < 0 or self.y0 < 0 or self.x1 > width - 1 or self.y1 > height - 1:
            raise PromptError(
                f"box ({self.x0:g}, {self.y0:g}, {self.x1:g}, {self.y1:g}) reaches outside the "
                f"{width}x{height} image (valid x 0..{width - 1}, y 0..{height - 1})"
            )


@dataclass(frozen=True)
class Points:
    """Clicks: ``coords`` (K, 2) as (x, y) input pixels, ``labels`` (K,) 1 positive / 0 negative."""

    coords: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(coords) == 0:
            raise PromptError("a point prompt needs at least one point")
        if len(coords) != len(labels):
            raise PromptError(f"{len(coords)} points but {len(labels)} labels")
        if not np.isin(labels, (0, 1)).all():
            raise PromptError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(labels.tolist()))}")
        if not np.isfinite(coords).all():
            raise PromptError("a point has a non-finite coordinate")
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "labels", labels)

    @classmethod
    def positive(cls, *xy: Sequence[float]) -> Points:
        """Positive clicks at the given (x, y) positions."""
        return cls(np.asarray(xy, dtype=np.float64), np.ones(len(xy), dtype=np.int64))

    def check_inside(self, height: int, width: int) -> None:
        """Raise `PromptError` unless every point lies within an image of this size."""
        x, y = self.coords[:, 0], self.coords[:, 1]
        outside = (x < 0) | (y < 0) | (x > width - 1) | (y > height - 1)
        if outside.any():
            bad = self.coords[outside][0]
            raise PromptError(f"point ({bad[0]:g}, {bad[1]:g}) lies outside the {width}x{height} image")


@dataclass(frozen=True)
class Box3D:
    """A 3D box in voxel indices of a ``(Z, Y, X)`` volume, corners inclusive, written as the CVPR 2024
    "MedSAM on Laptop" challenge does: ``(x0, y0, z0, x1, y1, z1)`` with x along the last axis."""

    x0: int
    y0: int
    z0: int
    x1: int
    y1: int
    z1: int

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.z0, self.x1, self.y1, self.z1)
        if any(float(v) != int(v) for v in values):
            raise PromptError(f"3D box {values} must hold whole voxel indices")
        if self.x1 < self.x0 or self.y1 < self.y0 or self.z1 < self.z0:
            raise PromptError(f"3D box {values} is inverted or has an empty range: it needs x0 <= x1, y0 <= y1, z0 <= z1")

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Box3D:
        """The tight 3D box around the non-zero voxels of a ``(Z, Y, X)`` mask."""
        zs, ys, xs = np.nonzero(np.asarray(mask))
        if zs.size == 0:
            raise PromptError("cannot take the box of an empty mask")
        return cls(int(xs.min()), int(ys.min()), int(zs.min()), int(xs.max()), int(ys.max()), int(zs.max()))

    def box2d(self) -> Box:
        """The in-plane part as a 2D box."""
        return Box(float(self.x0), float(self.y0), float(self.x1), float(self.y1))

    def check_inside(self, shape: tuple[int, int, int]) -> None:
        """Raise `PromptError` unless the box lies within a volume of this ``(Z, Y, X)`` shape."""
        depth, height, width = shape
        if self.x0 < 0 or self.y0 < 0 or self.z0 < 0 or self.x1 >= width or self.y1 >= height or self.z1 >= depth:
            raise PromptError(
                f"3D box ({self.x0}, {self.y0}, {self.z0}, {self.x1}, {self.y1}, {self.z1}) reaches outside the volume "
                f"(x 0..{width - 1}, y 0..{height - 1}, z 0..{depth - 1})"
            )


def jitter_box(box: Box, rng: np.random.Generator, outwards: float, inwards: float = 0, *, height: int, width: int,
               whole_pixels: bool = True) -> Box:
    """``box`` with each side moved by its own draw from ``[-inwards, outwards]`` pixels (positive
    loosens the box, negative tightens it): whole pixels (``rng.integers``) or any amount
    (``rng.uniform``). A side moved inwards stops at the box's centre, so the box never inverts, and
    every side stays within the ``width`` x ``height`` image.

    Its variants: MedSAM-style evaluation prompts (outwards only), training (outwards by up to J,
    inwards by up to J // 2) and SAM-U (any amount, both ways alike).
    """
    if whole_pixels:
        shift = rng.integers(-inwards, outwards + 1, size=4)
    else:
        shift = rng.uniform(-inwards, outwards, size=4)
    corners = box.as_array()
    moved = corners + shift * np.array([-1, -1, 1, 1])
    centre = (corners[:2] + corners[2:]) / 2
    moved[:2] = np.minimum(moved[:2], np.floor(centre))
    moved[2:] = np.maximum(moved[2:], np.ceil(centre))
    x0, y0, x1, y1 = np.clip(moved, 0, [width - 1, height - 1, width - 1, height - 1])
    return Box(float(x0), float(y0), float(x1), float(y1))


def correction_click(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int, int] | None:
    """The next click of an annotator correcting ``predicted`` against ``truth`` (2D boolean
    masks): the centre-most pixel (distance-transform maximum) of the largest 8-connected error
    region, positive (1) where the target was missed, negative (0) where the mask overshoots.
    -> (row, col, label), or None when the mask is already exact. Interactive evaluation
    (``iterative:K``) and mixed-prompt training place their clicks with it."""
    from scipy import ndimage

    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    wrong = predicted != truth
    if not wrong.any():
        return None
    regions, count = ndimage.label(wrong, structure=np.ones((3, 3), dtype=bool))
    largest = 1 + int(np.argmax(np.bincount(regions.ravel(), minlength=count + 1)[1:]))
    window = ndimage.find_objects(regions)[largest - 1]
    region = regions[window] == largest
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    row, col = row + window[0].start, col + window[1].start
    return int(row), int(col), int(truth[row, col])
