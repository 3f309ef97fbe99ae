"""Interactive correction (``medfm evaluate --prompt iterative:K``): where the clicks land, that the
mode is deterministic, and that clicks help on an easy case; one placement shared with the trainer."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from medfm.errors import OptionError
from medfm.evaluate.metrics import dice
from medfm.evaluate.runner import correct_iteratively, evaluate
from medfm.evaluate.simulate import check_mode, iterative_clicks, simulate_prompts
from medfm.prompts import Box, correction_click
from medfm.train.trainer import largest_error_clicks
from tests.test_cli import run_medfm
from tests.test_predictor import needs_litemedsam, tiny_model  # noqa: F401 - fixture


def test_the_click_lands_in_the_largest_error_region_with_its_sign() -> None:
    truth = np.zeros((40, 60), bool)
    truth[10:30, 10:40] = True
    missed = truth.copy()
    missed[10:30, 30:40] = False  # a 20 x 10 region missed ...
    missed[0:3, 50:53] = True  # ... and a small false one
    row, col, label = correction_click(missed, truth)
    assert label == 1 and 10 <= row < 30 and 30 <= col < 40
    assert col in (34, 35) and 14 <= row <= 25  # on its medial axis, 5 px from every edge, not at a rim
    overshoot = truth.copy()
    overshoot[30:38, 0:50] = True  # the largest error is now false
    row, col, label = correction_click(overshoot, truth)
    assert label == 0 and 30 <= row < 38 and not truth[row, col]
    assert correction_click(truth, truth) is None


def test_the_trainer_places_its_clicks_with_the_same_function() -> None:
    truth = np.zeros((1, 1, 16, 16), np.float32)
    truth[..., 4:12, 4:12] = 1
    logits = torch.full((1, 1, 16, 16), -5.0)  # nothing predicted: one positive click at the centre
    points, labels = largest_error_clicks(logits, torch.from_numpy(truth), image_size=64)
    row, col, label = correction_click(np.zeros((16, 16), bool), truth[0, 0] > 0.5)
    assert labels.tolist() == [[label]] == [[1]]
    assert points[0, 0].tolist() == [(col + 0.5) * 4, (row + 0.5) * 4]


def test_modes_parse_and_unknown_ones_are_one_line_before_any_model() -> None:
    assert iterative_clicks("iterative:5") == 5 and iterative_clicks("points:5") is None
    check_mode("iterative:0")
    for bad in ("iterative", "iterative:x", "clicks:3", "points:0"):
        with pytest.raises(OptionError, match="unknown prompt mode"):
            check_mode(bad)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:12] = 1
    assert [p.box for p in simulate_prompts(mask, "iterative:3")] == [p.box for p in simulate_prompts(mask, "box")]
    with pytest.raises(OptionError, match="unknown prompt mode"):
        evaluate(["no-such-model"], [], prompt="iterative")  # refused before the (unknown) model loads
    result = run_medfm("evaluate", "--data", ".", "--out", "/nonexistent-never-written", "--model", "no-such-model",
                       "--prompt", "iterate:3")
    assert result.returncode != 0 and "unknown prompt mode 'iterate:3'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _disk_image() -> tuple[np.ndarray, np.ndarray]:
    """A bright disk (the target) and a dimmer bar touching it on a dark, slightly noisy background."""
    yy, xx = np.mgrid[:160, :200]
    truth = (yy - 80) ** 2 + (xx - 90) ** 2 < 35**2
    image = 20 + 200 * truth + 90 * ((abs(yy - 80) < 8) & (xx > 120) & (xx < 185))
    image = image + np.random.default_rng(0).normal(0, 4, truth.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


@functools.lru_cache(maxsize=2)
def _predictor(model: str | None = None):  # noqa: ANN202 - a predictor over the disk image, loaded and encoded once
    from medfm.segment.model import DEFAULT_MODEL, load

    predictor = load(model or DEFAULT_MODEL).predictor()
    predictor.set_image(_disk_image()[0])
    return predictor


def _passes(clicks: int, model: str | None = None) -> tuple[list, np.ndarray]:
    predictor, truth = _predictor(model), _disk_image()[1]
    box = Box.from_mask(truth)
    loose = Box(box.x0, box.y0, box.x1 + 60, box.y1)  # the box takes in the bar: errors to correct
    passes, clicks_placed = correct_iteratively(predictor, loose, truth, clicks)
    assert clicks_placed is not None and len(clicks_placed.coords) == len(passes) - 1
    return passes, truth


@needs_litemedsam
def test_a_correction_click_helps_on_an_easy_case_and_the_mode_is_deterministic() -> None:
    passes, truth = _passes(2)
    scores = [dice(p.masks[0], truth) for p in passes]
    assert len(passes) == 3 and scores[1] > scores[0] + 0.01, scores  # the first click fixes part of the overshoot
    again, _ = _passes(2)
    assert all(np.array_equal(a.masks, b.masks) for a, b in zip(passes, again))


@needs_litemedsam
@pytest.mark.xfail(strict=True, reason="today's default learnt from boxes only: from the second correction on, "
                   "the clicks and mask prompt lower its Dice (0.917 -> 0.80 here); issue 19's retrain is to fix it")
def test_corrections_never_lower_dice_on_an_easy_case() -> None:
    passes, truth = _passes(3)
    scores = [dice(p.masks[0], truth) for p in passes]
    assert all(later >= earlier - 1e-3 for earlier, later in zip(scores, scores[1:])), scores


@needs_litemedsam
def test_the_clicks_model_keeps_gaining_over_five_corrections() -> None:
    """What issue 19 asked of the retrain, on the easy case: each correction click (with the previous
    logits as mask_input) keeps or raises the Dice. The shipped clicks model goes 0.890 -> 0.916 (stage 2
    did too); its first stage fell back after the third click (0.905 -> 0.899) and the default collapses (0.08)."""
    passes, truth = _passes(5, "medfm-litemedsam-clicks")
    scores = [dice(p.masks[0], truth) for p in passes]
    assert len(passes) == 6 and scores[-1] > scores[0] + 0.02, scores
    assert all(later >= earlier - 1e-3 for earlier, later in zip(scores, scores[1:])), scores


def test_iterative_rows_and_report_on_a_real_case(seg_data, tiny_model, tmp_path) -> None:  # noqa: F811 - fixture
    from medfm.evaluate.report import write_outputs

    evaluation = evaluate([tiny_model], seg_data, datasets=["busi_breast_ultrasound"], limit_per_dataset=1,
                          prompt=["box", "iterative:2"])
    by_mode = {mode: [r for r in evaluation.rows if r.prompt == mode] for mode in ("box", "iterative:2")}
    assert by_mode["box"] and len(by_mode["iterative:2"]) == len(by_mode["box"])
    paths = write_outputs(evaluation, tmp_path, {"tiny": tiny_model}, ["box", "iterative:2"])
    assert "iterative:2" in paths["report"].read_text()
