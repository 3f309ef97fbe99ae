"""Prompts simulated from a ground-truth label map, deterministic from a seed.

The evaluation protocol of the survey's visually prompted models: a tight box per class (or per
connected component), a jittered box (corners shifted as in MedSAM-style training), or K clicks
inside the target, the first at its centre-most pixel, optionally with N negative clicks around it;
or interactive correction (``iterative:K``): the tight box, then K clicks, each placed by
`medfm.prompts.correction_click` on the largest error of the mask the model gave so far (the
evaluation runs that loop; this module gives its starting box and parses the mode).

Every prompt is drawn from its own random generator, seeded by ``(seed, label, component)``, so
the same ``(mask, mode, seed)`` always gives the same prompts and adding a label to the mask does
not change the prompts of the others.

A prompt that makes little sense for its target is reported, not silently scored: ``note`` says
why (a box around a thin or scattered structure covers much of the image while the target fills
little of it; one box over many separate components; a few clicks for many components).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medfm.errors import OptionError
from medfm.prompts import Box, Points, jitter_box

__all__ = ["MODES", "SimulatedPrompt", "check_mode", "iterative_clicks", "simulate_prompts"]

MODES = ("box", "box-jitter", "points:K", "points:K+N", "iterative:K")

#: A box is questionable when the target fills less than this share of it ...
THIN_FILL = 0.10
#: ... while the box covers more than this share of the image.
THIN_COVER = 0.25
#: A single box (or a few clicks) over more than this many components is questionable.
MAX_COMPONENTS = 20
#: Negative clicks come from the target's box grown by this fraction of its size on each side.
NEGATIVE_MARGIN = 0.10

# 8-connectivity: pixels touching at a corner belong to the same component (a thin diagonal
# vessel is one structure, not hundreds).
_CONNECTIVITY = np.ones((3, 3), dtype=bool)
_POINTS = re.compile(r"points:(\d+)(?:\+(\d+))?")
_ITERATIVE = re.compile(r"iterative:(\d+)")


def iterative_clicks(mode: str) -> int | None:
    """``"iterative:K"`` -> K (the correction clicks after the box); None for every other mode."""
    match = _ITERATIVE.fullmatch(mode) if isinstance(mode, str) else None
    return int(match.group(1)) if match else None


def check_mode(mode: str) -> None:
    """Raise `OptionError` with one line for a prompt mode `simulate_prompts` does not know (before
    any model loads)."""
    try:
        _parse_mode(mode)
    except ValueError as error:
        raise OptionError(str(error)) from None


@dataclass(frozen=True)
class SimulatedPrompt:
    """One prompt for one target: a label (and connected component) of the ground truth."""

    label: int
    box: Box | None
    points: Points | None
    component: int | None  #: connected-component index (0-based, raster order) when per-component, else None
    note: str | None  #: why this prompt is questionable for its target, else None


def simulate_prompts(
    mask: np.ndarray,
    mode: str,
    seed: int = 0,
    *,
    per_component: bool = False,
    jitter: int = 5,
    min_component_pixels: int = 10,
) -> list[SimulatedPrompt]:
    """Prompts for every foreground label of a 2D label map ``mask`` (0 = background).

    ``mode``:

    - ``"box"``: the tight box of each label (of each connected component with ``per_component``).
    - ``"box-jitter"``: that box with each of its four sides moved outwards independently by a
      uniform integer in ``[0, jitter]``, clipped to the image, as MedSAM's training does (a loose
      box, never one that cuts into the target).
    - ``"points:K"``: K positive clicks; the first is the centre-most pixel of the target (the
      maximum of its distance transform, the image border counting as boundary; among equal
      maxima, the one nearest their mean), the others random target pixels (away from the
      boundary where the target has such pixels), without repetition while there are enough.
    - ``"iterative:K"``: the tight box, as ``"box"`` (the K correction clicks depend on the model's
      masks: `medfm.evaluate.runner` places them with `medfm.prompts.correction_click`).
    - ``"points:K+N"``: the same K positives, then N negative clicks on pixels not of the target's
      label (other classes count as background) inside the target's box grown by 10% on each side,
      or anywhere outside the label when that box holds none.

    With ``per_component`` the targets are the 8-connected components of each label, numbered in
    raster order of their first pixel; components of fewer than ``min_component_pixels`` pixels
    are skipped (their index is kept, so indices do not depend on that threshold). Prompts come
    sorted by label, then component. Clicks are ``(x, y)`` pixel positions, boxes inclusive pixel
    indices (see `medfm.prompts`).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"simulate_prompts needs a 2D label map, got an array of shape {mask.shape}")
    positives, negatives = _parse_mode(mode)
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    prompts: list[SimulatedPrompt] = []
    for label in (int(value) for value in np.unique(mask) if value != 0):
        target_all = mask == label
        components, count = ndimage.label(target_all, structure=_CONNECTIVITY)
        if per_component:
            sizes = np.bincount(components.ravel(), minlength=count + 1)
            windows = ndimage.find_objects(components)
            targets = [
                (index - 1, windows[index - 1], components[windows[index - 1]] == index, 1)
                for index in range(1, count + 1)
                if sizes[index] >= min_component_pixels
            ]
        else:
            window = ndimage.find_objects(target_all.astype(np.int8))[0]
            targets = [(None, window, target_all[window], count)]
        for component, window, target, n_components in targets:
            # ``target`` is the target's own bounding window of the mask; ``offset`` its (row, col)
            offset = (window[0].start, window[1].start)
            rng = np.random.default_rng([seed, label, 0 if component is None else component + 1])
            tight = Box(float(offset[1]), float(offset[0]), float(window[1].stop - 1), float(window[0].stop - 1))
            if positives is None:  # a box mode
                box = (jitter_box(tight, rng, jitter, height=mask.shape[0], width=mask.shape[1])
                       if mode == "box-jitter" else tight)
                note = _box_note(int(target.sum()), tight, n_components, mask.shape)
                prompts.append(SimulatedPrompt(label, box, None, component, note))
            else:
                points, note = _points(target, offset, mask, label, positives, negatives, n_components, rng)
                prompts.append(SimulatedPrompt(label, None, points, component, note))
    return prompts


# --------------------------------------------------------------------------------------------------


def _parse_mode(mode: str) -> tuple[int | None, int]:
    """``"box"``/``"box-jitter"``/``"iterative:K"`` -> (None, 0); ``"points:K+N"`` -> (K, N)."""
    if mode in ("box", "box-jitter") or iterative_clicks(mode) is not None:
        return None, 0
    match = _POINTS.fullmatch(mode) if isinstance(mode, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"unknown prompt mode {mode!r}; modes: 'box', 'box-jitter', 'points:K' (K >= 1 positive clicks, "
            "e.g. 'points:1'), 'points:K+N' (K positive + N negative clicks, e.g. 'points:1+1') and 'iterative:K' "
            "(a box, then K correction clicks on the largest error, e.g. 'iterative:5')"
        )
    return int(match.group(1)), int(match.group(2) or 0)


def _box_note(target_pixels: int, box: Box, n_components: int, shape: tuple[int, ...]) -> str | None:
    notes = []
    box_area = (box.x1 - box.x0 + 1) * (box.y1 - box.y0 + 1)
    cover = box_area / float(shape[0] * shape[1])
    fill = target_pixels / box_area
    if fill < THIN_FILL and cover > THIN_COVER:
        notes.append(
            f"box covers {cover:.0%} of the image; the target fills {fill:.0%} of it (thin or scattered structure)"
        )
    if n_components > MAX_COMPONENTS:
        notes.append(f"one box over {n_components} separate components")
    return "; ".join(notes) or None


def _points(
    target: np.ndarray,
    offset: tuple[int, int],
    mask: np.ndarray,
    label: int,
    positives: int,
    negatives: int,
    n_components: int,
    rng: np.random.Generator,
) -> tuple[Points, str | None]:
    """Clicks for ``target``, the boolean bounding window of the target at ``offset`` in ``mask``."""
    notes = []
    # distance to the nearest non-target pixel, the image border counting as one (within the
    # target's window padded by one pixel this is exactly the distance over the whole image)
    distance = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(distance >= distance.max())
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    first = (int(rows[nearest]), int(cols[nearest]))
    coords = [first]

    if positives > 1:
        inner = np.argwhere(distance >= 2)  # off the boundary, where the target is thick enough
        pool = inner if len(inner) > 1 else np.argwhere(target)
        pool = pool[~((pool[:, 0] == first[0]) & (pool[:, 1] == first[1]))]
        if len(pool) == 0:
            pool = np.array([first])
        picks = rng.choice(len(pool), size=positives - 1, replace=len(pool) < positives - 1)
        coords.extend((int(r), int(c)) for r, c in pool[picks])
    coords = [(r + offset[0], c + offset[1]) for r, c in coords]
    labels = [1] * len(coords)

    if n_components > MAX_COMPONENTS:
        notes.append(f"the target has {n_components} separate components; {positives} click(s) reach at most "
                     f"{positives} of them")

    if negatives:
        height, width = mask.shape
        box_h, box_w = target.shape
        margin_y, margin_x = int(np.ceil(NEGATIVE_MARGIN * box_h)), int(np.ceil(NEGATIVE_MARGIN * box_w))
        y0, x0 = max(0, offset[0] - margin_y), max(0, offset[1] - margin_x)
        y1, x1 = min(height, offset[0] + box_h + margin_y), min(width, offset[1] + box_w + margin_x)
        pool = np.argwhere(mask[y0:y1, x0:x1] != label) + (y0, x0)
        if len(pool) == 0:
            pool = np.argwhere(mask != label)
        if len(pool) == 0:
            notes.append("no background pixel for negative clicks")
        else:
            picks = rng.choice(len(pool), size=negatives, replace=len(pool) < negatives)
            coords.extend((int(r), int(c)) for r, c in pool[picks])
            labels.extend([0] * negatives)

    xy = np.array([(c, r) for r, c in coords], dtype=np.float64)
    return Points(xy, np.array(labels, dtype=np.int64)), "; ".join(notes) or None
