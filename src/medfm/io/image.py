"""`MedicalImage`: pixel data together with the geometry that places it in the patient.

Conventions (documented once, used everywhere):

* ``array`` is 2D ``(H, W)`` or ``(H, W, C)`` for photographs and slides, 3D ``(Z, Y, X)`` for
  volumes (x along the last axis, as in the CVPR 2024 "MedSAM on Laptop" challenge files).
* ``spacing``, ``origin`` and ``direction`` are given **in array-axis order** for the spatial axes:
  ``spacing[i]`` is the physical size (mm) of one step along array axis ``i``;
  ``direction[:, i]`` is the unit vector of axis ``i`` in world coordinates; ``origin`` is the world
  position of the centre of the first voxel. World coordinates of 3D images are DICOM/ITK LPS
  (x to the patient's left, y to posterior, z to superior); NIfTI's RAS is converted on read and
  back on write, so a mask written ``like=image`` lands on exactly the input's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Maps RAS world coordinates to LPS and back (it is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class MedicalImage:
    """An image array with its spacing, origin, direction, modality and source metadata."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    modality: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: Format-specific objects a writer needs to reproduce the source exactly (the NIfTI header,
    #: the DICOM datasets of a series); never shown, never required.
    native: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.direction = np.asarray(self.direction, dtype=np.float64)
        n = self.spatial_ndim
        if len(self.spacing) != n or len(self.origin) != n or self.direction.shape != (n, n):
            raise ValueError(
                f"geometry of a {n}D image needs {n} spacings, {n} origin values and a "
                f"{n}x{n} direction; got {self.spacing}, {self.origin}, {self.direction.shape}"
            )

    @property
    def is_volume(self) -> bool:
        """True for 3D volumes ``(Z, Y, X)``."""
        return self.metadata.get("kind") == "volume"

    @property
    def spatial_ndim(self) -> int:
        """2 for images (with or without a channel axis), 3 for volumes."""
        return 3 if self.metadata.get("kind") == "volume" else 2

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape without the channel axis: ``(H, W)`` or ``(Z, Y, X)``."""
        return tuple(self.array.shape[: self.spatial_ndim])

    @property
    def channels(self) -> int:
        """Number of channels (1 for grey images and volumes)."""
        return 1 if self.array.ndim == self.spatial_ndim else int(self.array.shape[-1])

    @property
    def affine(self) -> np.ndarray:
        """Homogeneous matrix mapping an array index (in array-axis order) to world coordinates."""
        n = self.spatial_ndim
        matrix = np.eye(n + 1)
        matrix[:n, :n] = self.direction * np.asarray(self.spacing, dtype=np.float64)[None, :]
        matrix[:n, n] = self.origin
        return matrix

    def orientation(self) -> str:
        """Anatomical axis codes of a volume in array-axis order, e.g. ``"SPL"`` for (Z, Y, X).

        Each letter is the LPS direction an axis points to (L/R, P/A, S/I), as ITK reports it.
        """
        if not self.is_volume:
            return "image (rows down, columns right)"
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        codes = []
        for axis in range(3):
            vector = self.direction[:, axis]
            dominant = int(np.argmax(np.abs(vector)))
            codes.append(letters[dominant][0 if vector[dominant] > 0 else 1])
        return "".join(codes)

    def slice(self, index: int) -> MedicalImage:
        """One axial slice ``array[index]`` of a volume as a 2D image that keeps its in-plane spacing."""
        if not self.is_volume:
            raise ValueError("slice() needs a 3D volume")
        depth = self.array.shape[0]
        if not -depth <= index < depth:
            raise IndexError(f"slice {index} is outside the volume's {depth} slices")
        index %= depth
        return MedicalImage(
            array=self.array[index],
            spacing=(float(self.spacing[1]), float(self.spacing[2])),
            origin=(0.0, 0.0),
            direction=np.eye(2),
            modality=self.modality,
            metadata={**self.metadata, "kind": "image", "slice_index": index},
            path=self.path,
        )

    def intensity_range(self) -> tuple[float, float]:
        """Minimum and maximum intensity."""
        return float(self.array.min()), float(self.array.max())

    def summary(self) -> dict[str, Any]:
        """What ``medfm info`` shows: shape, spacing, orientation, modality, intensity statistics."""
        low, high = self.intensity_range()
        # one copy in the array's own dtype (for the percentiles' partition), never a float64 one
        p_low, p_high = np.percentile(self.array, [0.5, 99.5])
        return {
            "path": str(self.path) if self.path else None,
            "format": self.metadata.get("format"),
            "kind": "volume" if self.is_volume else "image",
            "shape": list(self.array.shape),
            "axes": "(Z, Y, X)" if self.is_volume else ("(H, W, C)" if self.channels > 1 else "(H, W)"),
            "dtype": str(self.array.dtype),
            "channels": self.channels,
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
            "origin_mm": [round(float(o), 4) for o in self.origin],
            "orientation": self.orientation(),
            "modality": self.modality,
            "intensity": {
                "min": low,
                "max": high,
                "mean": float(self.array.mean(dtype=np.float64)),
                "p0.5": float(p_low),
                "p99.5": float(p_high),
            },
        }


def image_geometry_2d(spacing: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """Geometry keywords of a plain 2D image: its own pixel grid, origin at the first pixel."""
    return {"spacing": tuple(float(s) for s in spacing), "origin": (0.0, 0.0), "direction": np.eye(2)}
