"""The evaluation runner and its outputs, on a small real subset."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medfm.evaluate.report import comparison_table, crop_window, structure_table, write_outputs
from medfm.evaluate.runner import CaseResult, evaluate, summarize
from tests.test_cli import run_medfm
from tests.test_predictor import needs_litemedsam, tiny_model  # noqa: F401 - fixture


def _row(dataset: str, dice: float, note: str | None = None, model: str = "m") -> CaseResult:
    return CaseResult(model, dataset, "CT", "c", 1, "t", "box", dice, dice / (2 - dice), 0.5, 3.0, 0.1, note)


def test_summary_means_medians_and_questionable_prompts_by_hand() -> None:
    rows = [_row("a", 0.9), _row("a", 0.7), _row("a", 0.2, note="box covers 90% of the image"), _row("b", 0.4)]
    summary = summarize(rows)["m"]
    assert summary["datasets"]["a"]["n"] == 2 and summary["excluded_questionable_prompts"] == 1
    assert summary["datasets"]["a"]["dice"]["mean"] == pytest.approx(0.8)
    assert summary["datasets"]["a"]["dice"]["median"] == pytest.approx(0.8)
    assert summary["mean_over_datasets"]["dice"] == pytest.approx((0.8 + 0.4) / 2)  # datasets weigh equally
    header, body = comparison_table({"m": summary})
    assert header == ["dataset", "m Dice / NSD"] and body[-1][0] == "mean over datasets"


def test_structures_are_not_pooled_and_the_table_names_units() -> None:
    rows = [_row("ct", 0.9), _row("ct", 0.5), _row("us", 0.6)]
    rows[1].target = "tumour"
    rows[2].spacing_assumed = True
    entry = summarize(rows)["m"]
    assert entry["structures"]["ct"]["t"]["dice"]["mean"] == pytest.approx(0.9)
    assert entry["structures"]["ct"]["tumour"]["dice"]["mean"] == pytest.approx(0.5)
    header, body = structure_table(entry, ["us"])
    assert header[-1] == "HD95 median" and [r[:3] for r in body] == [["ct", "t", "1"], ["ct", "tumour", "1"], ["us", "t", "1"]]
    assert body[0][-1] == "3.0 mm" and body[2][-1] == "3.0 px"


def test_crop_window_holds_the_target_and_its_box_with_a_margin() -> None:
    region = np.zeros((200, 300), bool)
    region[100:104, 150:156] = True  # a 6 x 4 px target
    from medfm.prompts import Box

    x0, y0, x1, y1 = crop_window(region, Box(148, 98, 160, 106), region.shape)
    assert x0 < 148 and y0 < 98 and x1 > 160 and y1 > 106  # box and target inside
    assert x1 - x0 < 60 and y1 - y0 < 60  # zoomed, not the whole image
    assert crop_window(np.zeros((5, 7), bool), None, (5, 7)) == (0, 0, 6, 4)
    assert crop_window(np.ones((5, 7), bool), None, (5, 7)) == (0, 0, 6, 4)  # clipped to the image


def test_runner_on_real_2d_and_3d_cases(seg_data, tiny_model, tmp_path) -> None:
    evaluation = evaluate([tiny_model], seg_data, datasets=["busi_breast_ultrasound", "volumes3d_ct_mri"], limit_per_dataset=1,
                          prompt="box")
    by_dataset = {r.dataset for r in evaluation.rows}
    assert by_dataset == {"busi_breast_ultrasound", "volumes3d_ct_mri"}
    volume_rows = [r for r in evaluation.rows if r.dataset == "volumes3d_ct_mri"]
    assert volume_rows and all(r.prompt == "box3d" for r in volume_rows)
    for row in evaluation.rows:
        assert 0 <= row.dice <= 1 and 0 <= row.nsd <= 1 and row.hd95 >= 0 and not np.isnan(row.hd95)
    paths = write_outputs(evaluation, tmp_path, {"tiny": tiny_model}, "box")
    with open(paths["cases"]) as handle:
        assert len(list(csv.DictReader(handle))) == len(evaluation.rows)
    summary = json.loads(paths["summary"].read_text())
    assert summary["cases"] == 2 and set(summary["models"]["tiny"]["datasets"]) == by_dataset
    assert summary["tolerance_mm"] == 2.0 and summary["spacing_assumed_datasets"] == ["busi_breast_ultrasound"]
    assert summary["seconds"] >= summary["evaluation_seconds"] + summary["report_seconds"] - 0.01
    assert len(summary["model_weights"]["tiny"]) == 12
    structures = summary["models"]["tiny"]["structures"]
    assert set(structures) == by_dataset and len(structures["volumes3d_ct_mri"]) == len(volume_rows)
    report = paths["report"].read_text()
    assert report.count("<img") >= 3 and "busi_breast_ultrasound" in report
    for text in ("href='cases.csv'", "HD95 median", "IoU mean", "tolerance of 2 mm", "1 px taken as 1 mm",
                 summary["model_weights"]["tiny"], "re-segmenting the gallery"):
        assert text in report


def test_sam_u_rows_carry_uncertainty(seg_data, tiny_model) -> None:
    evaluation = evaluate([tiny_model], seg_data, datasets=["busi_breast_ultrasound"], limit_per_dataset=3, uncertainty=True)
    assert all(r.prompt == "box+sam-u" and r.mean_uncertainty is not None for r in evaluation.rows)
    assert "uncertainty" in summarize(evaluation.rows)["tiny"]


@needs_litemedsam
def test_medfm_evaluate_command(seg_data, tmp_path) -> None:
    result = run_medfm("evaluate", "--data", str(seg_data), "--dataset", "busi_breast_ultrasound", "--limit", "2",
                       "--prompt", "points:3", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    from medfm.segment.model import DEFAULT_MODEL

    assert summary["prompt"] == "points:3" and summary["models"][DEFAULT_MODEL]["datasets"]["busi_breast_ultrasound"]["n"] == 2
    bad = run_medfm("evaluate", "--data", str(seg_data), "--dataset", "no_such_dataset", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "no_such_dataset" in bad.stderr


def test_models_with_one_image_encoder_share_each_encoding(seg_data, tiny_model, monkeypatch) -> None:
    import copy

    import torch

    from medfm.evaluate.runner import encoder_owners
    from medfm.segment.predictor import Predictor

    tuned = copy.deepcopy(tiny_model)  # a decoder fine-tune: same encoder, other decoder
    tuned.name = "tuned"
    with torch.no_grad():
        tuned.network.mask_decoder.iou_token.weight.add_(0.5)
        tuned.network.mask_decoder.upscale_conv1.bias.add_(0.3)
    other = copy.deepcopy(tiny_model)  # another encoder
    other.name = "other"
    with torch.no_grad():
        next(other.network.image_encoder.parameters()).add_(0.1)
    assert encoder_owners([tiny_model, tuned, other, copy.deepcopy(tiny_model)]) == [0, 0, 2, 0]

    options = {"datasets": ["busi_breast_ultrasound"], "limit_per_dataset": 2, "prompt": "box"}
    alone = {m.name: evaluate([m], seg_data, **options).rows for m in (tiny_model, tuned, other)}
    encodings = []
    original = Predictor.set_image
    monkeypatch.setattr(Predictor, "set_image", lambda self, *a, **k: (encodings.append(self.model.name), original(self, *a, **k))[1])
    together = evaluate([tiny_model, tuned, other], seg_data, **options).rows
    assert encodings == ["tiny", "other"] * 2  # two cases: one encoding for tiny and tuned, one for other
    for name, rows in alone.items():
        mine = [r for r in together if r.model == name]
        assert [(r.case, r.label, r.dice) for r in mine] == [(r.case, r.label, r.dice) for r in rows]
    assert any(a.dice != b.dice for a, b in zip(alone["tiny"], alone["tuned"]))  # the decoders differ
