"""The OpenVINO backend of the image encoder (medfm.segment.openvino_backend): same embedding as
torch, converted once and cached atomically, validated before anything loads, and a one-line
install hint without openvino. No timing here (benchmarks/litemedsam_speed.py measures speed)."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

from medfm.errors import MissingDependencyError, OptionError
from medfm.preprocess import LITEMEDSAM_PREPROCESS
from medfm.prompts import Box
from medfm.segment import model as model_module
from medfm.segment.model import SegmentationModel
from medfm.segment.sam import build_sam
from tests.conftest import EXAMPLES
from tests.test_cli import run_medfm
from tests.test_sam_core import randomise

openvino = pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'medfm[openvino]'")

from medfm.segment.openvino_backend import (  # noqa: E402 - after the importorskip
    IR_NAME,
    OpenVINOEncoder,
    converted_encoder,
    encoder_key,
    require_openvino,
)

#: windows 7 on 16 cells and 14 on 8: padded attention windows, as LiteMedSAM's at 256 px
TINY_TINYVIT = dict(embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_sizes=(7, 7, 14, 7))
BOX = "215 107 265 132"
#: the user's cache, which the real-model test keeps using (the tiny tests get their own)
USER_MEDFM_HOME = os.environ.get("MEDFM_HOME")


@pytest.fixture(scope="module")
def tiny_core():
    torch.manual_seed(0)
    return randomise(build_sam("litemedsam", image_size=64, encoder=TINY_TINYVIT, decoder_mlp_dim=64), 0).eval()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One $MEDFM_HOME for the module: the tiny encoder is converted once (the slow step) and reused."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def own_cache(home, monkeypatch):
    """Tests convert into the module's $MEDFM_HOME (the real-model test keeps the user's cache)."""
    monkeypatch.setenv("MEDFM_HOME", str(home))


@pytest.fixture(scope="module")
def converted(tiny_core, home):
    """The tiny encoder's IR folder under ``home/openvino``, converted once for the module."""
    return converted_encoder(tiny_core.image_encoder, 64, home / "openvino")


def test_converted_tiny_encoder_matches_torch(tiny_core, converted, home) -> None:
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = tiny_core.encode(pixels)
    encoder = OpenVINOEncoder(tiny_core.image_encoder, 64, threads=1, root=home / "openvino")
    assert encoder.folder == converted
    got = encoder(pixels)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    with pytest.raises(ValueError, match="expected pixel_values of shape"):
        encoder(torch.zeros(1, 3, 32, 32))


def test_the_ir_is_cached_reused_and_written_atomically(tiny_core, converted, monkeypatch) -> None:
    ov = require_openvino()
    root = converted.parent
    assert converted.name == encoder_key(tiny_core.image_encoder, 64) and (converted / IR_NAME).is_file()
    assert [p.name for p in root.iterdir()] == [converted.name]  # no temporary folder left behind

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the IR is cached")

    monkeypatch.setattr(ov, "convert_model", no_conversion)
    assert converted_encoder(tiny_core.image_encoder, 64, root) == converted

    # other weights -> another key; a crash while writing leaves neither a folder nor a temporary
    changed = build_sam("litemedsam", image_size=64, encoder=TINY_TINYVIT, decoder_mlp_dim=64).image_encoder.eval()
    assert encoder_key(changed, 64) != converted.name
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: ov.Core().read_model(converted / IR_NAME))

    def crash(model, path, **kwargs):
        path.write_text("<half an IR")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ov, "save_model", crash)
        with pytest.raises(OSError, match="disk full"):
            converted_encoder(changed, 64, root)
    assert [p.name for p in root.iterdir()] == [converted.name]
    # written whole, it lands under its own key beside the first
    assert (converted_encoder(changed, 64, root) / IR_NAME).is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([converted.name, encoder_key(changed, 64)])


def test_predictor_with_the_backend_gives_the_torch_masks(tiny_core, converted) -> None:
    model = SegmentationModel(tiny_core, dataclasses.replace(LITEMEDSAM_PREPROCESS, image_size=64), "tiny", "litemedsam")
    image = np.random.default_rng(0).integers(0, 255, (90, 160), dtype=np.uint8)
    results = {}
    for backend in ("torch", "openvino"):
        predictor = model.predictor(backend=backend)
        predictor.set_image(image)
        results[backend] = predictor.predict(boxes=[Box(20, 10, 120, 80), Box(5, 5, 60, 60)])
    scale = np.abs(results["torch"].low_res_logits).max()
    assert np.abs(results["openvino"].low_res_logits - results["torch"].low_res_logits).max() < 1e-4 * scale
    assert (results["openvino"].masks == results["torch"].masks).mean() > 0.999


def test_backend_option_is_checked_before_anything_loads(monkeypatch, tmp_path) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the backend was checked")

    monkeypatch.setattr(model_module, "_load", no_loading)
    with pytest.raises(OptionError, match="unknown backend 'onnx'; choose one of torch, openvino"):
        model_module.load(backend="onnx")
    out = tmp_path / "m.png"
    for args in (
        ("segment", str(EXAMPLES / "busi_benign_001.png"), "--box", BOX, "-o", str(out)),
        ("segment-batch", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "b")),
        ("evaluate", "--data", str(EXAMPLES), "--out", str(tmp_path / "e")),
    ):
        (tmp_path / "p.jsonl").write_text("")
        result = run_medfm(*args, "--backend", "onnx")
        assert result.returncode == 2, (args[0], result.stderr)
        assert "unknown backend 'onnx'" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not (tmp_path / "b").exists() and not (tmp_path / "e").exists()


def test_missing_openvino_is_a_one_line_install_hint(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'medfm\[openvino\]'"):
        require_openvino()
    monkeypatch.setattr(model_module, "_load", lambda *a, **k: pytest.fail("loaded without openvino"))
    with pytest.raises(MissingDependencyError):
        model_module.load(backend="openvino")
    out = tmp_path / "m.png"
    result = run_medfm("segment", str(EXAMPLES / "busi_benign_001.png"), "--box", BOX, "-o", str(out),
                       "--backend", "openvino")
    assert result.returncode != 0 and not out.exists()
    assert "pip install 'medfm[openvino]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_litemedsam_masks_hold_on_shared_images(seg_data, monkeypatch) -> None:
    """The adoption check of the backend: Dice >= 0.995 against torch's masks on real images of
    four modalities (the first case with a label of each dataset); the IR stays in the user's cache."""
    import medfm
    from medfm.evaluate.metrics import dice
    from tests.test_predictor import needs_litemedsam  # noqa: F401 - the weights come with the package

    if USER_MEDFM_HOME is None:
        monkeypatch.delenv("MEDFM_HOME")
    else:
        monkeypatch.setenv("MEDFM_HOME", USER_MEDFM_HOME)
    model = medfm.load()
    predictors = {backend: model.predictor(backend=backend) for backend in ("torch", "openvino")}
    checked = 0
    for dataset in ("busi_breast_ultrasound", "kvasir_seg_polyp_sample", "covid_cxr_lungs_v7", "brain_mri_tumor_slices"):
        images = sorted((seg_data / dataset / "images").glob("*"))
        if not images:
            continue
        mask = medfm.read_image(seg_data / dataset / "masks" / f"{images[0].stem}.png").array
        ys, xs = np.nonzero(mask == mask.max())
        box = Box(xs.min(), ys.min(), xs.max(), ys.max())
        masks = {}
        for backend, predictor in predictors.items():
            predictor.set_image(images[0])
            masks[backend] = predictor.predict(boxes=[box]).masks[0]
        assert dice(masks["openvino"], masks["torch"]) >= 0.995, dataset
        checked += 1
    assert checked >= 3


def test_train_fills_the_embedding_cache_with_openvino_as_torch_does(tmp_path) -> None:
    """`medfm train --backend openvino` only encodes the frozen-encoder cache: its entries match the
    torch-filled ones to float16 rounding, and a recipe that trains the encoder refuses it up front."""
    from safetensors.torch import load_file

    from medfm.errors import MedfmError
    from medfm.train import Recipe, TrainConfig
    from medfm.train.trainer import Trainer
    from tests.test_train_recipes import write_tiny_base, write_tiny_dataset

    base, data = write_tiny_base(tmp_path / "base"), write_tiny_dataset(tmp_path / "data", images=3)
    caches = {}
    for backend in ("torch", "openvino"):
        caches[backend] = tmp_path / f"cache-{backend}"
        config = TrainConfig(base=str(base), data=data, out=tmp_path / f"run-{backend}", recipe=Recipe("decoder"),
                             epochs=1, max_steps=1, batch_size=2, validation_fraction=0.3,
                             cache_embeddings=caches[backend], backend=backend)
        Trainer(config, lambda text: None).fit()
    names = sorted(p.name for p in caches["torch"].iterdir())
    assert names and names == sorted(p.name for p in caches["openvino"].iterdir())
    for name in names:
        expected = load_file(str(caches["torch"] / name))["embedding"].float()
        got = load_file(str(caches["openvino"] / name))["embedding"].float()
        assert float((got - expected).abs().max()) <= 2e-3 * float(expected.abs().max())
    full = TrainConfig(base=str(base), data=data, out=tmp_path / "run-full", recipe=Recipe("full"), backend="openvino")
    with pytest.raises(MedfmError, match="only fills the embedding cache of a frozen image encoder"):
        Trainer(full, lambda text: None)
    assert not (tmp_path / "run-full").exists()
