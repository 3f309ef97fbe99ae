"""medfm segment-batch on Ray Data: one local Ray instance (2 CPUs, 127.0.0.1) for the whole module."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

import medfm
from medfm.batch import segment_batch
from medfm.segment.model import SegmentationModel, load
from medfm.segment.predictor import Predictor
from tests.test_batch import picture, rows_of, tiny_folder, write_prompts  # noqa: F401 - fixture

ray = pytest.importorskip("ray", reason="the Ray engine's tests need pip install 'medfm[ray]'")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """Ray started once for the module; its workers import medfm (and these tests) from where this process does."""
    here = [str(Path(medfm.__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1])]
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(here + ([saved] if saved else []))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20,
             log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def test_ray_gives_the_local_engines_masks_and_a_rerun_does_no_work(seg_data, tiny_folder, tmp_path) -> None:
    busi = seg_data / "busi_breast_ultrasound" / "images"
    volume = seg_data / "volumes3d_ct_mri" / "images" / "totalseg_example_ct.nii.gz"
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(volume.read_bytes()[:5000])
    lines = [{"image": str(path), "boxes": [[10, 10, 100, 90]]} for path in sorted(busi.glob("*.png"))[:3]]
    lines += [
        {"image": str(busi / "busi_benign_001.png"), "boxes": [[215, 107, 265, 132]], "points": [[240, 120]], "id": "click"},
        {"image": str(volume), "boxes": [[20, 20, 90, 80]], "slice": 15, "id": "ct-slice"},
        {"image": str(volume), "box3d": [[20, 20, 14, 90, 80, 16]], "id": "ct-3d"},
        {"image": str(corrupt), "boxes": [[1, 1, 9, 9]], "slice": 1, "id": "corrupt"},
    ]
    prompts = write_prompts(tmp_path / "prompts.jsonl", lines)
    local = segment_batch(prompts, tmp_path / "local", model=str(tiny_folder))
    on_ray = segment_batch(prompts, tmp_path / "ray", model=str(tiny_folder), engine="ray")
    assert (local.ok, local.errors) == (on_ray.ok, on_ray.errors) == (6, 1)
    local_rows = {row["id"]: row for row in rows_of(tmp_path / "local")}
    ray_rows = {row["id"]: row for row in rows_of(tmp_path / "ray")}
    assert sorted(local_rows) == sorted(ray_rows) and len(ray_rows) == 7
    assert ray_rows["corrupt"]["status"] == "error" and str(corrupt) in ray_rows["corrupt"]["error"]
    for case_id, row in ray_rows.items():
        assert row["status"] == local_rows[case_id]["status"] and row["hash"] == local_rows[case_id]["hash"]
        if row["status"] == "ok":
            ours, theirs = medfm.read_image(row["output"]), medfm.read_image(local_rows[case_id]["output"])
            np.testing.assert_array_equal(ours.array, theirs.array)
            assert ours.spatial_shape == medfm.read_image(row["image"]).spatial_shape
    assert ray_rows["ct-3d"]["output"].endswith(".nii.gz") and medfm.read_image(ray_rows["ct-3d"]["output"]).array[14:17].any()

    before = (tmp_path / "ray" / "results.jsonl").read_bytes()
    again = segment_batch(prompts, tmp_path / "ray", model=str(tiny_folder), engine="ray")
    assert (again.ok, again.errors, again.skipped) == (0, 0, 7)
    assert (tmp_path / "ray" / "results.jsonl").read_bytes() == before


class _DiesOnceMidBatch(Predictor):
    """Kills its own worker process on its second image, once per test (a marker file remembers)."""

    marker: Path

    def set_image(self, *args, **kwargs) -> None:
        self.images = getattr(self, "images", 0) + 1
        if self.images == 2 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        super().set_image(*args, **kwargs)


def _model_that_kills_its_worker(folder: Path, marker: Path) -> SegmentationModel:
    model = load(folder)
    predictor = type("Dies", (_DiesOnceMidBatch,), {"marker": marker})
    model.predictor = lambda **options: predictor(model, **options)
    return model


def test_a_killed_worker_is_replaced_and_every_case_is_reported_once(tiny_folder, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    lines = [{"image": str(picture(images / f"{n}.png", n)), "boxes": [[2, 2, 40, 30]]} for n in range(6)]
    prompts = write_prompts(tmp_path / "prompts.jsonl", lines)
    marker = tmp_path / "killed"
    summary = segment_batch(prompts, tmp_path / "out", engine="ray", workers=1,
                            model=functools.partial(_model_that_kills_its_worker, tiny_folder, marker))
    assert marker.exists(), "the worker was not killed: the test proved nothing"
    assert (summary.ok, summary.errors) == (6, 0)
    rows = rows_of(tmp_path / "out")
    assert sorted(row["id"] for row in rows) == [str(n) for n in range(6)]
    assert all(Path(row["output"]).is_file() for row in rows)


def _report_without_times(folder: Path) -> tuple[str, list[dict], dict]:
    """``report.html``, ``cases.csv`` and ``summary.json`` of an evaluation without what timing gives."""
    import csv
    import json
    import re

    html = re.sub(r"Time: [^<]*?re-segmenting the gallery\)", "Time: -", (folder / "report.html").read_text())
    with open(folder / "cases.csv", newline="") as handle:
        cases = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]
    summary = json.loads((folder / "summary.json").read_text())
    return html, cases, {k: v for k, v in summary.items() if not k.endswith("seconds")}


def test_evaluate_on_ray_gives_the_local_engines_rows_and_report(seg_data, tiny_folder, tmp_path) -> None:
    from medfm.data.datasets import discover_cases
    from medfm.evaluate.report import write_outputs
    from medfm.evaluate.runner import evaluate

    cases = [case for name in ("busi_breast_ultrasound", "brain_mri_t1_aseg_slices")
             for case in discover_cases(seg_data, datasets=[name], limit_per_dataset=2 if name.startswith("busi") else 1)]
    model = load(tiny_folder)
    local = evaluate([model], cases, prompt=["box", "points:2"])
    on_ray = evaluate([model], cases, prompt=["box", "points:2"], engine="ray", workers=2, progress=True)
    assert len({row.case for row in local.rows}) == 3 and len(local.rows) > 3
    assert on_ray.cases == local.cases
    assert [(r.dataset, r.case, r.label, r.prompt, r.note) for r in on_ray.rows] == \
        [(r.dataset, r.case, r.label, r.prompt, r.note) for r in local.rows]
    for ours, theirs in zip(on_ray.rows, local.rows):
        assert abs(ours.dice - theirs.dice) <= 1e-6 and abs(ours.iou - theirs.iou) <= 1e-6
    for name, evaluation in (("local", local), ("ray", on_ray)):
        write_outputs(evaluation, tmp_path / name, {model.name: model}, ["box", "points:2"])
    ours, theirs = _report_without_times(tmp_path / "ray"), _report_without_times(tmp_path / "local")
    assert "Time: -" in ours[0] and "data:image/png;base64," in ours[0]
    assert ours == theirs  # the same tables, plots (PNG bytes) and gallery, cases.csv and summary.json


class _DiesOnItsProcesssSecondImage(Predictor):
    """Kills its worker process at the second image that process encodes, once per test."""

    marker: Path
    images = 0  # per process: each worker unpickles the class anew

    def set_image(self, *args, **kwargs) -> None:
        type(self).images += 1
        if type(self).images == 2 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        super().set_image(*args, **kwargs)


def test_a_killed_evaluation_actor_is_restarted_and_every_target_is_reported_once(seg_data, tiny_folder, tmp_path) -> None:
    from medfm.data.datasets import discover_cases
    from medfm.evaluate.runner import evaluate

    cases = discover_cases(seg_data, datasets=["busi_breast_ultrasound"], limit_per_dataset=3)
    marker = tmp_path / "killed"
    dying = load(tiny_folder)
    dying.predictor = functools.partial(type("Dies", (_DiesOnItsProcesssSecondImage,), {"marker": marker}), dying)
    on_ray = evaluate([dying], cases, engine="ray", workers=1)
    assert marker.exists(), "the actor was not killed: the test proved nothing"
    local = evaluate([load(tiny_folder)], cases)
    assert [(r.case, r.label, r.prompt, r.dice) for r in on_ray.rows] == [(r.case, r.label, r.prompt, r.dice) for r in local.rows]
    assert len({(r.case, r.label) for r in on_ray.rows}) == len(on_ray.rows) >= 3
