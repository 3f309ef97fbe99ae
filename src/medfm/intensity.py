"""Intensity presets: CT windows, MR percentile clipping and min-max, all mapping to [0, 1].

Every model's preprocessing calls `normalize` with the preset named in its checkpoint config, so
one tested place decides how Hounsfield units or MR signal become model input. Statistics are
computed over whatever array is passed: pass the whole volume (not one slice) to normalise a
volume consistently; `scaler` takes them once from a volume and applies them to any slice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from medfm.errors import OptionError

#: CT windows as (level, width) in Hounsfield units, the radiology reading-room defaults.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 150.0),
    "mediastinum": (50.0, 350.0),
}


#: Every name `preset` takes (besides the ``ct:`` prefix and the aliases mri and percentile).
PRESET_NAMES: tuple[str, ...] = (*CT_WINDOWS, "mr", "minmax", "none")


@dataclass(frozen=True)
class IntensityPreset:
    """How to map raw intensities to [0, 1].

    ``kind`` is ``"window"`` (``level``/``width`` in the image's units, e.g. HU),
    ``"percentile"`` (clip to the ``lower``/``upper`` percentiles, then min-max), ``"minmax"``,
    or ``"none"`` (cast only; for inputs already in [0, 1]).
    """

    kind: str
    level: float | None = None
    width: float | None = None
    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self) -> None:
        if self.kind not in {"window", "percentile", "minmax", "none"}:
            raise ValueError(f"unknown intensity preset kind '{self.kind}'")
        if self.kind == "window" and (self.level is None or self.width is None or self.width <= 0):
            raise ValueError("a window needs a level and a positive width")
        if self.kind == "percentile" and not 0.0 <= self.lower < self.upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.lower}, {self.upper}")

    def to_dict(self) -> dict:
        """JSON-ready form, as stored in a checkpoint's preprocessing config."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def preset(name: str) -> IntensityPreset:
    """A named preset: a CT window (``"ct:lung"`` or ``"lung"``), ``"mr"`` (0.5-99.5 percentiles),
    ``"minmax"`` or ``"none"``."""
    key = name.lower().removeprefix("ct:").replace("-", "_").replace(" ", "_")
    if key in CT_WINDOWS:
        level, width = CT_WINDOWS[key]
        return IntensityPreset("window", level=level, width=width)
    if key in {"mr", "mri", "percentile"}:
        return IntensityPreset("percentile")
    if key in {"minmax", "none"}:
        return IntensityPreset(key)
    raise OptionError(f"unknown intensity preset '{name}'; choose one of {', '.join(PRESET_NAMES)}")


def default_preset(modality: str | None) -> IntensityPreset:
    """The preset a modality gets when the user names none: CT soft tissue, MR percentiles, else min-max."""
    normalized = (modality or "").upper()
    if normalized == "CT":
        return preset("soft_tissue")
    if normalized in {"MR", "MRI"}:
        return preset("mr")
    return preset("minmax")


#: Words in a structure's name that call for a CT window other than soft tissue.
TARGET_WINDOWS = {"lung": "lung", "pulmonary": "lung", "airway": "lung", "bone": "bone", "vertebra": "bone",
                  "rib": "bone", "skull": "bone", "femur": "bone", "pelvis": "bone", "sacrum": "bone"}


def window_for_target(name: str | None) -> IntensityPreset:
    """The CT window a named structure is best seen in: lung for lungs and airways, bone for bones,
    soft tissue otherwise (the reading-room choice a radiologist makes per structure)."""
    lowered = (name or "").lower()
    for word, window in TARGET_WINDOWS.items():
        if word in lowered:
            return preset(window)
    return preset("soft_tissue")


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and scale to [0, 1] (float32)."""
    low = level - width / 2.0
    return np.clip((np.asarray(values, dtype=np.float32) - low) / width, 0.0, 1.0)


def min_max(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Scale ``[low, high]`` (the array's own range by default) to [0, 1]; a constant image gives zeros."""
    values = np.asarray(values, dtype=np.float32)
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def percentile_clip(values: np.ndarray, lower: float = 0.5, upper: float = 99.5, foreground_only: bool = True) -> np.ndarray:
    """Clip to the given percentiles and scale to [0, 1], as MR preprocessing does.

    With ``foreground_only`` the percentiles are taken over non-zero voxels, so the air/background
    that fills most of a skull-stripped or cropped MR volume does not set the range.
    """
    values = np.asarray(values, dtype=np.float32)
    return min_max(values, *_percentiles(values, lower, upper, foreground_only))


def _percentiles(values: np.ndarray, lower: float, upper: float, foreground_only: bool = True) -> tuple[float, float]:
    sample = values[values != 0] if foreground_only and np.any(values != 0) else values
    low, high = np.percentile(sample, [lower, upper])
    return float(low), float(high)


def scaler(values: np.ndarray, spec: IntensityPreset | str) -> Callable[[np.ndarray], np.ndarray]:
    """A preset fitted to ``values``: the function that maps them, or any part of them (a slice),
    to float32 [0, 1] exactly as `normalize` maps the whole. Percentiles and min/max are taken here,
    once; what it then does to each voxel depends on that voxel alone."""
    spec = preset(spec) if isinstance(spec, str) else spec
    if spec.kind == "window":
        return lambda part: apply_window(part, spec.level, spec.width)
    if spec.kind in ("percentile", "minmax"):
        values = np.asarray(values, dtype=np.float32)
        low, high = (_percentiles(values, spec.lower, spec.upper) if spec.kind == "percentile"
                     else (float(values.min()), float(values.max())))
        return lambda part: min_max(part, low, high)
    return lambda part: np.asarray(part, dtype=np.float32)


def normalize(values: np.ndarray, spec: IntensityPreset | str) -> np.ndarray:
    """Apply a preset (or its name) and return float32 values in [0, 1]."""
    return scaler(values, spec)(values)
