"""Issue 14, loading: no code runs from a checkpoint on any path that loads one; model folders are
checked against the SHA-256 in their config.json; non-finite model output is an error, never an
empty mask; an unusable device and a foreign run state are one-line errors before any work.

Every checkpoint here is tiny and written by the test itself.
"""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

import medfm
import medfm.clip
from medfm.cli import main
from medfm.device import resolve_device
from medfm.errors import CheckpointError, ModelOutputError, OptionError
from medfm.hub import sha256_of
from medfm.io import MedicalImage
from medfm.io.writers import write_model_folder
from medfm.preprocess import LITEMEDSAM_PREPROCESS
from medfm.prompts import Box, Box3D
from medfm.safe_load import HASHES_FIELD, MODEL_WEIGHTS, read_torch_file
from medfm.segment.checkpoints import load_state_dict_file
from medfm.segment.model import BUNDLED_DIR, SegmentationModel
from medfm.segment.sam import build_sam
from medfm.train import Recipe, TrainConfig
from medfm.train.trainer import STATE_NAME, Trainer
from tests.conftest import EXAMPLES
from tests.test_predictor import TINY_TINYVIT
from tests.test_train_recipes import write_tiny_base

BUNDLED_FOLDERS = [BUNDLED_DIR / "medfm-litemedsam-ft", BUNDLED_DIR / "medfm-litemedsam-clicks", Path(medfm.__file__).parent / "clip" / "weights" / "medfm-clip-small"]


# -- code in checkpoints ------------------------------------------------------------------------------


class FileWritingModule(torch.nn.Module):
    """Scripted, its ``__setstate__`` runs inside ``torch.jit.load`` and maps (so creates) ``target``
    (TorchScript needs ``typing.List`` in the annotations)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(4))
        self.target = target

    @torch.jit.export
    def __getstate__(self) -> List[str]:
        return [self.target]

    @torch.jit.export
    def __setstate__(self, state: List[str]) -> None:
        self.target = state[0]
        self.weight = torch.from_file(state[0], True, 4, dtype=torch.uint8).fill_(65).float()
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory) -> tuple[Path, Path]:
    """(archive, marker): loading the archive with torch.jit.load writes the marker, checked here so
    that the refusals below cannot pass for a payload that would not have run anyway."""
    folder = tmp_path_factory.mktemp("torchscript")
    archive, marker = folder / "model.pth", folder / "written-by-the-checkpoint"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own: scripting is deprecated
        torch.jit.script(FileWritingModule(str(marker))).save(str(archive))
        torch.jit.load(str(archive))
    assert marker.read_bytes() == b"AAAA"
    marker.unlink()
    return archive, marker


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return write_tiny_base(tmp_path_factory.mktemp("base") / "tiny")


def train_config(base: str | Path, out: Path, resume: bool = False) -> TrainConfig:
    """A run whose data folder does not exist: an error about the base or state.pt proves it came first."""
    return TrainConfig(base=str(base), data=out.parent / "no-such-data", out=out, recipe=Recipe("decoder"), device="cpu",
                       resume=resume)


def delta_folder_on(base: Path, folder: Path) -> Path:
    """A model folder whose config.json names ``base`` as the base of its trained tensors."""
    config = {"medfm_format": 1, "task": "promptable-segmentation", "name": "delta", "arch": "litemedsam", "network": {},
              "preprocess": LITEMEDSAM_PREPROCESS.to_dict(), "base": str(base), "recipe": {"name": "decoder"}, "delta": True}
    return write_model_folder(folder, config, {"mask_decoder.iou_token.weight": torch.zeros(1, 256)})


def resume_with_state(state: Path, base: Path, tmp: Path) -> Trainer:
    out = tmp / "run"
    out.mkdir()
    shutil.copy(state, out / STATE_NAME)
    return Trainer(train_config(base, out, resume=True), log=lambda text: None)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``medfm ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["medfm", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


ENTRY_PATHS: dict[str, Callable[..., object]] = {
    "medfm.load(path)": lambda path, tmp, base: medfm.load(path),
    "load('sam-med2d', weights=)": lambda path, tmp, base: medfm.load("sam-med2d", weights=path),
    "load('msa', weights=)": lambda path, tmp, base: medfm.load("msa", weights=path),
    "load('samed', weights=, lora=)": lambda path, tmp, base: medfm.load("samed", weights=path, lora=path),
    "load('litemedsam', weights=)": lambda path, tmp, base: medfm.load("litemedsam", weights=path),
    "a folder naming it as base": lambda path, tmp, base: medfm.load(delta_folder_on(path, tmp / "delta")),
    "train --base": lambda path, tmp, base: Trainer(train_config(path, tmp / "run"), log=lambda text: None),
    "clip.load('chexzero', weights=)": lambda path, tmp, base: medfm.clip.load("chexzero", weights=path),
}


@pytest.mark.parametrize("entry", ENTRY_PATHS)
def test_a_torchscript_archive_is_refused_before_it_runs(entry, torchscript, tiny_base, tmp_path) -> None:
    archive, marker = torchscript
    with pytest.raises(CheckpointError, match="TorchScript archive") as error:
        ENTRY_PATHS[entry](archive, tmp_path, tiny_base)
    assert str(archive) in str(error.value)
    assert not marker.exists()


def test_segment_and_evaluate_with_a_torchscript_model_exit_2(torchscript, monkeypatch, capsys, tmp_path) -> None:
    archive, marker = torchscript
    code, err = cli(monkeypatch, capsys, "segment", str(EXAMPLES / "busi_benign_001.png"), "--box", "215", "107", "265",
                    "132", "--model", str(archive), "-o", str(tmp_path / "mask.png"))
    assert code == 2 and "TorchScript archive" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "data").mkdir()
    code, err = cli(monkeypatch, capsys, "evaluate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "report"),
                    "--model", str(archive))
    assert code == 2 and "TorchScript archive" in err
    assert not marker.exists() and not (tmp_path / "mask.png").exists()


class Call:
    """Pickles as a call of ``function(*args)``: what a malicious pickle does."""

    def __init__(self, function: Callable, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Call]:
    return {
        "os.system": Call(os.system, f"touch {marker}"),
        "subprocess.call": Call(subprocess.call, ["touch", str(marker)]),
        "builtins.exec": Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("kind", ["os.system", "subprocess.call", "builtins.exec"])
@pytest.mark.parametrize("layout", ["torch.save", "bare pickle"])
def test_pickle_payloads_are_refused_and_never_run(kind, layout, tmp_path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "model.pth"
    payload = {"model": payloads(marker)[kind]}
    if layout == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for load in (load_state_dict_file, medfm.load):
        with pytest.raises(CheckpointError) as error:
            load(path)
        assert str(path) in str(error.value)
    assert not marker.exists()


def test_a_payload_beside_real_weights_is_stood_in_for_and_the_tensors_come_back(tmp_path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "trained.pth"
    weights = {"layer.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"model": weights, "optimizer": payloads(marker)["subprocess.call"], "epoch": 3}, path)
    obj, stood_in = read_torch_file(path)
    assert [name.rsplit(".", 1)[-1] for name in stood_in] == ["call"]  # pickle spells it commands.call
    torch.testing.assert_close(load_state_dict_file(path), weights)
    assert not marker.exists()


# -- model folders carry the SHA-256 of their weights --------------------------------------------------


@pytest.mark.parametrize("folder", BUNDLED_FOLDERS, ids=lambda folder: folder.name)
def test_bundled_folders_record_the_hash_of_their_weights(folder) -> None:
    import json

    config = json.loads((folder / "config.json").read_text())
    assert config[HASHES_FIELD] == {MODEL_WEIGHTS: sha256_of(folder / MODEL_WEIGHTS)}


@pytest.mark.parametrize("folder", BUNDLED_FOLDERS, ids=lambda folder: folder.name)
def test_a_flipped_byte_in_a_bundled_folder_is_a_checkpoint_error(folder, tmp_path) -> None:
    copy = Path(shutil.copytree(folder, tmp_path / folder.name))
    weights = copy / MODEL_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    load = medfm.clip.load if "clip" in folder.name else medfm.load
    with pytest.raises(CheckpointError, match="SHA-256 differs") as error:
        load(copy)
    assert str(weights) in str(error.value)


@pytest.fixture(scope="module")
def tiny_model() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel(build_sam("litemedsam", encoder=TINY_TINYVIT, decoder_mlp_dim=64).eval(),
                             LITEMEDSAM_PREPROCESS, "tiny", "litemedsam")


def test_saved_folders_record_the_hash_and_older_folders_load_with_a_warning(tiny_model, tmp_path) -> None:
    import json

    folder = tiny_model.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config[HASHES_FIELD][MODEL_WEIGHTS] == sha256_of(folder / MODEL_WEIGHTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        medfm.load(folder)
    del config[HASHES_FIELD]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no SHA-256"):
        medfm.load(folder)


# -- non-finite model output ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_model(tiny_model) -> SegmentationModel:
    """The tiny model with one NaN in its mask decoder, as a flipped exponent bit would leave it."""
    network = build_sam("litemedsam", encoder=TINY_TINYVIT, decoder_mlp_dim=64).eval()
    network.load_state_dict(tiny_model.network.state_dict())
    with torch.no_grad():
        network.mask_decoder.upscale_conv1.weight[0, 0, 0, 0] = float("nan")
    return SegmentationModel(network, LITEMEDSAM_PREPROCESS, "broken", "litemedsam")


@pytest.mark.parametrize("optimize", [True, False])
def test_non_finite_logits_are_an_error_naming_the_model(broken_model, optimize) -> None:
    predictor = broken_model.predictor(optimize=optimize)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8))
    with pytest.raises(ModelOutputError, match="model 'broken' gave non-finite mask logits"):
        predictor.predict(boxes=[Box(10, 10, 50, 40)])


def test_non_finite_logits_fail_2d_and_3d_segmentation(broken_model) -> None:
    from medfm.segment.predictor import as_image
    from medfm.segment.run import segment
    from medfm.segment.volume import segment_volume

    image = as_image(np.full((48, 48), 90, np.uint8) + np.eye(48, dtype=np.uint8) * 60)
    with pytest.raises(ModelOutputError, match="broken"):
        segment(image, [Box(5, 5, 40, 40)], model=broken_model)
    volume = MedicalImage(array=np.random.default_rng(1).normal(0, 100, (3, 40, 40)).astype(np.int16), spacing=(1.0, 1.0, 1.0),
                          origin=(0.0, 0.0, 0.0), direction=np.eye(3), modality="CT", metadata={"kind": "volume"})
    with pytest.raises(ModelOutputError, match="broken"):
        segment_volume(broken_model.predictor(), volume, [Box3D(5, 5, 0, 30, 30, 2)])


def test_non_finite_clip_embeddings_are_an_error(tmp_path) -> None:
    from medfm.clip.model import DualEncoder
    from tests.test_clip_model import random_png, tiny_bert_tokenizer, tiny_config

    model = DualEncoder(tiny_config(), tiny_bert_tokenizer(tmp_path / "tokenizer")).eval()
    with torch.no_grad():
        next(model.image_projection.parameters()).fill_(float("nan"))
    with pytest.raises(ModelOutputError, match="model 'tiny' gave non-finite image embeddings"):
        medfm.classify(random_png(tmp_path / "x.png", 0), ["pneumonia", "normal"], model)


# -- devices -------------------------------------------------------------------------------------------


def usable(device: str) -> bool:
    try:
        resolve_device(device)
    except OptionError:
        return False
    return True


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "xpu", "gpu", "cuda:x"])
def test_an_unusable_device_is_an_option_error_before_loading(device) -> None:
    if device in ("cuda", "mps") and (torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()):
        pytest.skip(f"{device} is usable here")
    if device == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(OptionError, match=f"device '{device}'"):
        resolve_device(device)
    with pytest.raises(OptionError, match=f"device '{device}'"):  # not "unknown model": the device comes first
        medfm.load("no-such-model", device=device)


def test_cpu_and_auto_resolve() -> None:
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_segment_with_an_unusable_device_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path) -> None:
    device = next(d for d in ("cuda", "cuda:7", "mps") if not usable(d))
    code, err = cli(monkeypatch, capsys, "segment", str(tmp_path / "not-read.png"), "--box", "1", "2", "3", "4",
                    "-o", str(tmp_path / "mask.png"), "--device", device)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"device '{device}' is not available" in err


# -- resuming a run from a foreign or corrupt state.pt ------------------------------------------------


@pytest.mark.parametrize("state", ["foreign", "corrupt", "wrong tensors", "torchscript"])
def test_resume_with_a_foreign_or_corrupt_state_is_a_checkpoint_error(state, tiny_base, torchscript, tmp_path) -> None:
    path = tmp_path / STATE_NAME
    if state == "torchscript":
        shutil.copy(torchscript[0], path)
        match = "TorchScript archive"
    elif state == "foreign":
        torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1}, path)
        match = "not the state of a medfm training run"
    elif state == "corrupt":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
        match = "truncated or corrupt"
    else:
        fields = dict(model={"w": torch.zeros(2)}, optimizer={}, scheduler={}, torch_rng=torch.get_rng_state(), epoch=1,
                      step=1, best=0.5, history="[]", seconds=1.0, recipe=Recipe("decoder").to_dict(),
                      base=str(tiny_base.resolve()))
        torch.save(fields, path)
        match = "not the ones the decoder recipe trains"
    with pytest.raises(CheckpointError, match=match) as error:
        resume_with_state(path, tiny_base, tmp_path)
    assert str(tmp_path / "run" / STATE_NAME) in str(error.value)
    assert not torchscript[1].exists()
