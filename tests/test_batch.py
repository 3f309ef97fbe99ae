"""medfm segment-batch on the local engine: prompts file parsing, outputs, error rows, resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medfm
import medfm.batch.stages
from medfm.batch import segment_batch
from medfm.batch.cases import read_cases
from medfm.batch.results import ResultsLog
from medfm.errors import MissingDependencyError
from medfm.preprocess import LITEMEDSAM_PREPROCESS
from medfm.prompts import Box
from medfm.segment.model import SegmentationModel
from medfm.segment.run import segment
from medfm.segment.sam import build_sam
from tests.conftest import EXAMPLES
from tests.test_predictor import TINY_TINYVIT


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random LiteMedSAM-shaped model saved as a medfm model folder (loadable by path, also on Ray)."""
    torch.manual_seed(0)
    network = build_sam("litemedsam", encoder=TINY_TINYVIT, decoder_mlp_dim=64).eval()
    return SegmentationModel(network, LITEMEDSAM_PREPROCESS, "tiny", "litemedsam").save_pretrained(tmp_path_factory.mktemp("tiny") / "tiny")


def write_prompts(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def picture(path: Path, seed: int, size: tuple[int, int] = (48, 64)) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size, dtype=np.uint8)).save(path)
    return path


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_each_line_becomes_a_case_or_one_clear_error(tmp_path) -> None:
    picture(tmp_path / "scan.png", 0)
    prompts = write_prompts(tmp_path / "prompts.jsonl", [
        {"image": "scan.png", "boxes": [[1, 2, 30, 40]], "id": "a/b"},
        {"image": "scan.png", "boxes": [[1, 2, 30, 40]], "id": "a_b"},  # the same file name as a/b
        {"image": "scan.png", "points": [[5, 5], [9, 9, 0]], "id": "a/b"},
        "{not json",
        {"image": "scan.png", "box": [[1, 2, 3, 4]]},
        {"image": "scan.png", "boxes": [[1, 2, 3]]},
        {"image": "scan.png", "box3d": [[1, 2, 3, 4, 5, 6]], "slice": 2},
        {"image": "scan.png", "boxes": [[1, 2, 30, 40]], "id": "scan"},  # out == the prompts' folder: scan.png
        "",
        {"boxes": [[1, 2, 3, 4]]},
    ])
    cases = read_cases(prompts, tmp_path)
    assert [c.line for c in cases] == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    first, *rest = cases
    assert first.error is None and first.output == tmp_path / "a_b.png" and first.image == tmp_path / "scan.png"
    errors = [c.error for c in rest]
    assert "would collide with case 'a/b'" in errors[0]
    assert "id 'a/b' is taken by an earlier line" in errors[1] and rest[1].id != "a/b"
    assert errors[2].startswith(f"{prompts}:4: not a JSON object")
    assert errors[3].startswith(f"{prompts}:5: unknown key(s) ['box']")
    assert "takes 4 numbers" in errors[4] and "do not combine" in errors[5]
    assert "would replace an input" in errors[6]
    assert errors[7] == f'{prompts}:10: "image" (a path) is required'
    assert len({c.id for c in cases}) == len(cases)


def test_local_batch_writes_each_mask_once_and_a_rerun_does_no_work(tiny_folder, tmp_path, monkeypatch) -> None:
    images = tmp_path / "images"
    images.mkdir()
    first, second = picture(images / "first.png", 1), picture(images / "second.png", 2, (40, 40))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    prompts = write_prompts(tmp_path / "prompts.jsonl", [
        {"image": "images/first.png", "boxes": [[4, 4, 40, 30], [30, 10, 60, 44]]},
        {"image": "images/first.png", "boxes": [[10, 5, 50, 40]], "points": [[20, 20], [45, 38, 0]], "id": "clicks"},
        {"image": "images/second.png", "points": [[20, 20]]},
        {"image": "images/corrupt.png", "boxes": [[1, 1, 5, 5]]},
        {"image": "images/second.png", "boxes": [[1, 1, 50, 5]], "id": "outside"},
    ])
    out = tmp_path / "masks"
    model = medfm.segment.model.load(tiny_folder)
    encodes = []
    monkeypatch.setattr(SegmentationModel, "predictor", lambda self, **kw: _counting(self, encodes))
    summary = segment_batch(prompts, out, model=lambda: model)
    assert (summary.ok, summary.errors, summary.skipped) == (3, 2, 0)
    assert len(encodes) == 2  # one encoder pass per image, shared by its cases
    rows = {row["id"]: row for row in rows_of(out)}
    assert sorted(rows) == ["clicks", "corrupt", "first", "outside", "second"]
    assert "corrupt.png" in rows["corrupt"]["error"] and rows["corrupt"]["status"] == "error"
    assert "(line 5): box" in rows["outside"]["error"] and "outside the 40x40 image" in rows["outside"]["error"]
    # the same masks as `medfm segment` (segment/run.py) gives for each case
    monkeypatch.undo()
    two_boxes = rows["first"]
    expected = segment(first, [Box(4, 4, 40, 30), Box(30, 10, 60, 44)], model=model).label_map
    np.testing.assert_array_equal(medfm.read_image(two_boxes["output"]).array, expected)
    assert len(two_boxes["scores"]) == 2 and two_boxes["output"].endswith(".png")
    clicks = medfm.Points([[20, 20], [45, 38]], [1, 0])
    np.testing.assert_array_equal(medfm.read_image(rows["clicks"]["output"]).array,
                                  segment(first, [Box(10, 5, 50, 40)], clicks, model=model).label_map)
    np.testing.assert_array_equal(medfm.read_image(rows["second"]["output"]).array,
                                  segment(second, points=medfm.Points([[20, 20]], [1]), model=model).label_map)

    before = (out / "results.jsonl").read_bytes()
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("*.png")}
    encodes.clear()
    monkeypatch.setattr(SegmentationModel, "predictor", lambda self, **kw: _counting(self, encodes))
    again = segment_batch(prompts, out, model=lambda: model)
    assert (again.ok, again.errors, again.skipped) == (0, 0, 5) and encodes == []
    assert (out / "results.jsonl").read_bytes() == before
    assert {path: path.stat().st_mtime_ns for path in out.glob("*.png")} == stamps

    picture(images / "second.png", 3, (40, 40))  # a changed input: its cases, and only they, are redone
    (out / "clicks.png").unlink()  # a lost mask is redone too
    redone = segment_batch(prompts, out, model=lambda: model)
    assert (redone.ok, redone.errors, redone.skipped) == (2, 1, 2)
    final = rows_of(out)
    assert len(final) == 5 and len({row["id"] for row in final}) == 5  # one row a case after the rerun


def test_volume_lines_take_a_slice_step_and_refinement(tiny_folder, tmp_path, monkeypatch) -> None:
    shutil.copy(EXAMPLES / "totalseg_example_ct.nii.gz", tmp_path / "ct.nii.gz")
    box3d = [[20, 20, 10, 90, 80, 20]]
    prompts = write_prompts(tmp_path / "prompts.jsonl", [
        {"image": "ct.nii.gz", "box3d": box3d, "id": "every"},
        {"image": "ct.nii.gz", "box3d": box3d, "slice_step": 4, "refine_below": 0.9, "id": "stepped"},
        {"image": "ct.nii.gz", "box3d": box3d, "slice_step": 0, "id": "zero"},
        {"image": "ct.nii.gz", "box3d": box3d, "refine_below": 0.9, "id": "unstepped"},
        {"image": "ct.nii.gz", "boxes": [[1, 2, 30, 40]], "slice": 3, "slice_step": 4, "id": "flat"},
    ])
    seen = []
    real = medfm.batch.stages.segment_volume
    monkeypatch.setattr(medfm.batch.stages, "segment_volume",
                        lambda *a, **k: seen.append((k["slice_step"], k["refine_below"])) or real(*a, **k))
    model = medfm.segment.model.load(tiny_folder)
    summary = segment_batch(prompts, tmp_path / "out", model=lambda: model)
    rows = {row["id"]: row for row in rows_of(tmp_path / "out")}
    assert (summary.ok, summary.errors) == (2, 3) and sorted(seen) == [(1, None), (4, 0.9)]
    assert "slice step must be a whole number" in rows["zero"]["error"]
    assert "give a slice step above 1" in rows["unstepped"]["error"]
    assert "apply to 3D boxes" in rows["flat"]["error"]
    unchanged = read_cases(prompts, tmp_path / "out")[0].prompt
    assert "slice_step" not in unchanged  # a line without the options hashes as before they existed


def _counting(model: SegmentationModel, calls: list) -> object:
    """A real predictor whose set_image calls are recorded."""
    predictor = medfm.segment.predictor.Predictor(model)
    encode = predictor.set_image

    def set_image(*args, **kwargs) -> None:
        calls.append(args)
        encode(*args, **kwargs)

    predictor.set_image = set_image
    return predictor


def test_a_line_cut_by_a_crash_is_dropped_and_the_case_redone(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"id": "a", "status": "ok"}) + "\n" + '{"id": "b", "sta')
    log = ResultsLog(path)
    assert list(log.rows) == ["a"] and path.read_text() == json.dumps({"id": "a", "status": "ok"}) + "\n"
    log.append({"id": "b", "status": "ok"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_ray_engine_without_ray_says_how_to_install(tiny_folder, tmp_path, monkeypatch) -> None:
    picture(tmp_path / "scan.png", 0)
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"image": "scan.png", "boxes": [[1, 2, 30, 40]]}])
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'medfm\[ray\]'"):
        segment_batch(prompts, tmp_path / "out", model=str(tiny_folder), engine="ray")


def test_cli_segment_batch(tiny_folder, tmp_path, monkeypatch, capsys) -> None:
    from medfm.cli import main

    picture(tmp_path / "scan.png", 0)
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"image": "scan.png", "boxes": [[1, 2, 30, 40]]}, "[1, 2]"])
    monkeypatch.setattr(sys, "argv", ["medfm", "segment-batch", "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                                      "--model", str(tiny_folder)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert "1 done, 1 error(s), 0 already done" in capsys.readouterr().out
    assert (tmp_path / "out" / "scan.png").is_file()
    monkeypatch.setattr(sys, "argv", ["medfm", "segment-batch", "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "none.jsonl: cannot read the prompts file" in capsys.readouterr().err
    # an --out that is the prompts file, or a folder holding it: one line, exit 2, the prompts untouched
    before = prompts.read_bytes()
    for out in (prompts, tmp_path):
        monkeypatch.setattr(sys, "argv", ["medfm", "segment-batch", "--prompts", str(prompts), "--out", str(out)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert prompts.read_bytes() == before


def test_evaluate_on_ray_without_ray_says_how_to_install(tmp_path, monkeypatch) -> None:
    from medfm.evaluate.runner import evaluate

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"medfm evaluate --engine ray .*pip install 'medfm\[ray\]'"):
        evaluate([], tmp_path, engine="ray")  # said before any case is looked for or model loaded
