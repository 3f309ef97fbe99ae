"""The one box jitter and its variants (evaluation: outwards; training: both ways; SAM-U: any amount)."""

from __future__ import annotations

import numpy as np

from medfm.prompts import Box, jitter_box


def test_outwards_only_never_tightens_and_stays_inside() -> None:
    box = Box(2, 3, 10, 12)
    for seed in range(50):
        moved = jitter_box(box, np.random.default_rng(seed), 4, height=14, width=12)
        assert moved.x0 <= box.x0 and moved.y0 <= box.y0 and moved.x1 >= box.x1 and moved.y1 >= box.y1
        assert moved.x0 >= 0 and moved.y0 >= 0 and moved.x1 <= 11 and moved.y1 <= 13
        assert box.x0 - moved.x0 <= 4 and moved.y1 - box.y1 <= 4
        assert all(float(v).is_integer() for v in moved.as_array())


def test_inwards_stops_at_the_centre_so_a_small_box_never_inverts() -> None:
    box = Box(20, 20, 21, 22)  # far smaller than the inward reach
    for seed in range(50):
        for whole_pixels in (True, False):
            moved = jitter_box(box, np.random.default_rng(seed), 6, 6, height=64, width=64, whole_pixels=whole_pixels)
            assert moved.x0 <= 20 <= moved.x1 and moved.y0 <= 21 <= moved.y1  # the centre (20.5, 21) stays inside


def test_the_draws_are_the_generators() -> None:
    box = Box(10, 10, 30, 30)
    grow = np.random.default_rng(7).integers(-2, 5 + 1, size=4)  # inwards 2, outwards 5
    moved = jitter_box(box, np.random.default_rng(7), 5, 2, height=64, width=64)
    assert moved == Box(10 - grow[0], 10 - grow[1], 30 + grow[2], 30 + grow[3])
    shift = np.random.default_rng(7).uniform(-3, 3, size=4)
    moved = jitter_box(box, np.random.default_rng(7), 3, 3, height=64, width=64, whole_pixels=False)
    np.testing.assert_allclose(moved.as_array(), box.as_array() + shift * [-1, -1, 1, 1])
