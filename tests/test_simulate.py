"""Prompts simulated from ground truth: hand-checkable boxes and clicks, jitter bounds, determinism, notes."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.evaluate.simulate import SimulatedPrompt, simulate_prompts
from medfm.prompts import Box


def rectangle(shape=(100, 120), rows=(10, 30), cols=(20, 60), label=1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = label
    return mask


def test_tight_box_of_a_rectangle():
    [prompt] = simulate_prompts(rectangle(), "box")
    assert prompt == SimulatedPrompt(label=1, box=Box(20, 10, 60, 30), points=None, component=None, note=None)


def test_box_per_label():
    mask = rectangle()
    mask[50:60, 70:90] = 3
    prompts = simulate_prompts(mask, "box")
    assert [(p.label, p.box) for p in prompts] == [(1, Box(20, 10, 60, 30)), (3, Box(70, 50, 89, 59))]


def test_centre_most_point_of_a_rectangle_is_its_centre():
    [prompt] = simulate_prompts(rectangle(rows=(10, 30), cols=(20, 60)), "points:1")
    assert prompt.box is None
    np.testing.assert_array_equal(prompt.points.coords, [[40, 20]])  # (x, y)
    np.testing.assert_array_equal(prompt.points.labels, [1])


def test_centre_of_a_rectangle_at_the_image_border():
    # the image border counts as boundary: the centre is not pushed towards the edge
    [prompt] = simulate_prompts(rectangle(rows=(0, 20), cols=(0, 40)), "points:1")
    np.testing.assert_array_equal(prompt.points.coords, [[20, 10]])


def test_centre_of_an_even_rectangle_is_within_half_a_pixel():
    [prompt] = simulate_prompts(rectangle(rows=(10, 29), cols=(20, 59)), "points:1")
    x, y = prompt.points.coords[0]
    assert abs(x - 39.5) <= 0.5 and abs(y - 19.5) <= 0.5


def test_positive_points_lie_inside_the_target():
    mask = rectangle()
    [prompt] = simulate_prompts(mask, "points:5")
    coords = prompt.points.coords.astype(int)
    assert len(coords) == 5 and (prompt.points.labels == 1).all()
    assert (mask[coords[:, 1], coords[:, 0]] == 1).all()
    assert len({tuple(c) for c in coords}) == 5  # no repeats while the target has enough pixels


def test_negative_points_lie_in_the_background_near_the_target():
    mask = rectangle(shape=(200, 200), rows=(80, 119), cols=(60, 139))
    [prompt] = simulate_prompts(mask, "points:2+4", seed=7)
    points = prompt.points
    np.testing.assert_array_equal(points.labels, [1, 1, 0, 0, 0, 0])
    negatives = points.coords[points.labels == 0].astype(int)
    assert (mask[negatives[:, 1], negatives[:, 0]] == 0).all()
    # inside the box grown by 10% (4 rows, 8 columns) on each side
    assert (negatives[:, 0] >= 52).all() and (negatives[:, 0] <= 147).all()
    assert (negatives[:, 1] >= 76).all() and (negatives[:, 1] <= 123).all()


def test_negative_points_when_background_is_scarce():
    mask = np.ones((30, 30), dtype=np.uint8)
    mask[0, 0] = 0  # the only background pixel: both negatives land on it
    [prompt] = simulate_prompts(mask, "points:1+2")
    np.testing.assert_array_equal(prompt.points.coords[prompt.points.labels == 0], [[0, 0], [0, 0]])
    full = np.ones((30, 30), dtype=np.uint8)
    [prompt] = simulate_prompts(full, "points:1+2")
    assert prompt.points.labels.tolist() == [1] and "no background pixel" in prompt.note


def test_negatives_may_land_on_other_classes_but_never_on_the_target():
    mask = rectangle(shape=(60, 60), rows=(10, 49), cols=(10, 49))
    mask[:, :10] = 2  # another class fills the left margin
    for prompt in simulate_prompts(mask, "points:1+20", seed=1):
        xy = prompt.points.coords[prompt.points.labels == 0].astype(int)
        assert (mask[xy[:, 1], xy[:, 0]] != prompt.label).all()


def test_jitter_stays_within_bounds_and_inside_the_image():
    mask = rectangle(shape=(64, 64), rows=(2, 40), cols=(30, 61))
    tight = Box(30, 2, 61, 40)
    seen = set()
    for seed in range(200):
        [prompt] = simulate_prompts(mask, "box-jitter", seed=seed, jitter=5)
        box = prompt.box
        box.check_inside(64, 64)
        for got, ref in zip(box.as_array(), tight.as_array(), strict=True):
            assert abs(got - ref) <= 5
            assert float(got).is_integer()
        assert box.x0 <= tight.x0 and box.y0 <= tight.y0 and box.x1 >= tight.x1 and box.y1 >= tight.y1  # only grows
        seen.add(tuple(box.as_array()))
    assert len(seen) > 50  # the corners do move
    xs0 = {b[0] for b in seen}
    assert min(xs0) == 25 and max(xs0) == 30  # the full outward range [0, 5] is used
    assert {b[1] for b in seen} == {0, 1, 2}  # clipped at the top edge
    assert max(b[2] for b in seen) == 63  # clipped at the right edge


def test_jitter_zero_is_the_tight_box():
    assert simulate_prompts(rectangle(), "box-jitter", jitter=0) == simulate_prompts(rectangle(), "box")


def test_jitter_of_a_one_pixel_target_keeps_the_box_valid():
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[10, 10] = 1
    for seed in range(50):
        [prompt] = simulate_prompts(mask, "box-jitter", seed=seed, jitter=3)
        assert prompt.box.x0 <= prompt.box.x1 and prompt.box.y0 <= prompt.box.y1


@pytest.mark.parametrize("mode", ["box", "box-jitter", "points:3", "points:2+3"])
def test_deterministic(mode):
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 64)) > 0.7).astype(np.uint8) * rng.integers(1, 4, (64, 64)).astype(np.uint8)
    first = simulate_prompts(mask, mode, seed=5, per_component=True, min_component_pixels=2)
    again = simulate_prompts(mask.copy(), mode, seed=5, per_component=True, min_component_pixels=2)
    assert len(first) == len(again) > 0
    for a, b in zip(first, again, strict=True):
        assert (a.label, a.box, a.component, a.note) == (b.label, b.box, b.component, b.note)
        if a.points is not None:
            np.testing.assert_array_equal(a.points.coords, b.points.coords)
            np.testing.assert_array_equal(a.points.labels, b.points.labels)


def test_other_seeds_give_other_prompts():
    mask = rectangle()
    boxes = {simulate_prompts(mask, "box-jitter", seed=seed)[0].box for seed in range(10)}
    assert len(boxes) > 1
    clicks = {tuple(simulate_prompts(mask, "points:3", seed=seed)[0].points.coords.ravel()) for seed in range(10)}
    assert len(clicks) > 1


def test_adding_a_label_does_not_change_the_others():
    mask = rectangle()
    before = simulate_prompts(mask, "points:3+2", seed=4)
    mask[70:90, 80:110] = 2
    after = simulate_prompts(mask, "points:3+2", seed=4)
    assert len(after) == 2
    np.testing.assert_array_equal(before[0].points.coords[:3], after[0].points.coords[:3])
    jitter_before = simulate_prompts(rectangle(), "box-jitter", seed=4)[0]
    jitter_after = simulate_prompts(mask, "box-jitter", seed=4)[0]
    assert jitter_before == jitter_after


def test_per_component_boxes_of_two_blobs():
    mask = np.zeros((50, 80), dtype=np.uint8)
    mask[5:15, 10:20] = 1
    mask[30:45, 50:70] = 1
    mask[25, 2] = 1  # a 1-pixel speck: skipped
    prompts = simulate_prompts(mask, "box", per_component=True)
    assert [(p.component, p.box) for p in prompts] == [(0, Box(10, 5, 19, 14)), (2, Box(50, 30, 69, 44))]
    [whole] = simulate_prompts(mask, "box")
    assert whole.box == Box(2, 5, 69, 44) and whole.component is None
    clicks = simulate_prompts(mask, "points:1", per_component=True)
    np.testing.assert_array_equal([c.points.coords[0] for c in clicks], [[14, 9], [59, 37]])
    assert len(simulate_prompts(mask, "box", per_component=True, min_component_pixels=1)) == 3


def test_diagonally_touching_pixels_are_one_component():
    line = np.eye(30, dtype=np.uint8)
    assert len(simulate_prompts(line, "box", per_component=True, min_component_pixels=1)) == 1


def test_note_for_a_thin_diagonal_line_across_the_image():
    line = np.eye(100, dtype=np.uint8)
    [prompt] = simulate_prompts(line, "box")
    assert prompt.box == Box(0, 0, 99, 99)
    assert prompt.note == "box covers 100% of the image; the target fills 1% of it (thin or scattered structure)"
    assert simulate_prompts(line, "box-jitter")[0].note == prompt.note


def test_no_note_for_a_compact_blob():
    yy, xx = np.mgrid[:100, :100]
    blob = (((yy - 50) ** 2 + (xx - 45) ** 2) < 30**2).astype(np.uint8)
    for mode in ("box", "box-jitter", "points:1", "points:1+1"):
        assert simulate_prompts(blob, mode)[0].note is None, mode


def test_note_for_many_components_under_one_box():
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[2:58:4, 2:58:4] = 1  # 14 x 14 = 196 isolated dots
    [prompt] = simulate_prompts(mask, "box")
    assert "one box over 196 separate components" in prompt.note
    assert "196 separate components" in simulate_prompts(mask, "points:2")[0].note
    few = np.zeros((60, 60), dtype=np.uint8)
    few[5:20, 5:20] = few[35:50, 35:50] = 1  # two blobs: a box over both is a fair prompt
    assert simulate_prompts(few, "box")[0].note is None


def test_empty_mask_gives_no_prompts():
    assert simulate_prompts(np.zeros((10, 10), np.uint8), "box") == []


@pytest.mark.parametrize("mode", ["boxes", "points", "points:0", "points:a", "points:1+", "point:1", ""])
def test_unknown_mode_lists_the_modes(mode):
    with pytest.raises(ValueError, match="'box', 'box-jitter', 'points:K'"):
        simulate_prompts(rectangle(), mode)


def test_needs_a_2d_mask():
    with pytest.raises(ValueError, match="2D"):
        simulate_prompts(np.zeros((2, 5, 5), np.uint8), "box")


