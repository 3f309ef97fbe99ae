"""Training (medfm.train): every recipe trains a few steps on a tiny random LiteMedSAM-shaped model
and a tiny synthetic dataset (PNG images and a NIfTI volume), saves, reloads with the same
predictions, and resumes; the partial recipes save only what they trained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import medfm
from medfm.errors import MedfmError
from medfm.data.datasets import discover_cases
from medfm.preprocess import LITEMEDSAM_PREPROCESS
from medfm.segment.model import SegmentationModel
from medfm.segment.sam import build_sam
from medfm.train import Recipe, TrainConfig
from medfm.train.data import SampleOptions, SegmentationSamples, sample_refs
from medfm.segment.variants import merge_for_inference
from medfm.train.trainer import Trainer

TINY = {"embed_dims": (16, 24, 32, 40), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 2), "window_sizes": (7, 7, 7, 7)}


def write_tiny_base(folder: Path) -> Path:
    """A random LiteMedSAM-shaped model at 64 px input, saved as a medfm model folder."""
    torch.manual_seed(0)
    network = build_sam("litemedsam", image_size=64, encoder=TINY, decoder_mlp_dim=64)
    preprocess = dataclasses.replace(LITEMEDSAM_PREPROCESS, image_size=64)
    return SegmentationModel(network, preprocess, "tiny", "litemedsam").save_pretrained(folder)


def write_tiny_dataset(folder: Path, images: int = 4, volume: bool = True) -> Path:
    """images/<id>.png + masks/<id>.png with two labels, and one NIfTI volume with 2 foreground slices."""
    import nibabel as nib

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        image = rng.integers(0, 60, (48, 64), dtype=np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        y, x = rng.integers(5, 25, 2)
        mask[y : y + 15, x : x + 20] = 1
        mask[30:40, 40:55] = 2
        image[mask > 0] += 120
        Image.fromarray(image).save(folder / "images" / f"c{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"c{i}.png")
    if volume:
        values = rng.normal(0, 50, (40, 40, 5)).astype(np.float32)
        labels = np.zeros((40, 40, 5), np.uint8)
        labels[10:25, 12:30, 1:3] = 1
        values[labels > 0] += 200
        nib.save(nib.Nifti1Image(values, np.eye(4)), folder / "images" / "v0.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / "masks" / "v0.nii.gz")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    return write_tiny_base(root / "base"), write_tiny_dataset(root / "data")


def config(setup, out: Path, recipe: str, **options) -> TrainConfig:
    base, data = setup
    values = {"epochs": 1, "max_steps": 2, "batch_size": 2, "validation_fraction": 0.3, "click_iterations": 1}
    return TrainConfig(base=str(base), data=data, out=out, recipe=Recipe(recipe), **(values | options))


def predictions(model: SegmentationModel, **options) -> np.ndarray:
    predictor = model.predictor(**options)
    predictor.set_image(np.random.default_rng(1).integers(0, 255, (48, 64), dtype=np.uint8))
    return predictor.predict(boxes=[[5, 5, 40, 30], [20, 10, 60, 44]]).logits  # two prompts on one image


@pytest.mark.parametrize(
    "recipe,options,delta_prefixes",
    [
        ("decoder", {}, {"mask_decoder."}),
        ("full", {}, None),
        ("lora", {"prompt": "clicks"}, {"mask_decoder.", "lora_"}),
        ("adapter", {"prompt": "clicks"}, {"mask_decoder.", ".adapter."}),
        ("autoprompt", {}, {"prompt_generator."}),
    ],
)
def test_recipe_trains_saves_reloads_and_resumes(setup, tmp_path, recipe, options, delta_prefixes) -> None:
    trainer = Trainer(config(setup, tmp_path / "run", recipe, **options), lambda text: None)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    result = trainer.fit()
    after = trainer.network.state_dict()
    trained = set(trainer.trained)
    changed = {k for k in trained if not torch.equal(before[k], after[k])}
    assert changed, "no trained tensor changed"
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trained and "running_" not in k)

    saved = load_file(str(result.last / "model.safetensors"))
    config_json = json.loads((result.last / "config.json").read_text())
    assert config_json["recipe"]["name"] == recipe and config_json["base"] == str(setup[0].resolve())
    if delta_prefixes is None:
        assert set(saved) == set(after) and not config_json["delta"]
    else:
        assert set(saved) == trained and config_json["delta"]
        assert all(any(p in key for p in delta_prefixes) for key in saved)

    reloaded = medfm.load(result.last)
    trained_model = SegmentationModel(merge_for_inference(trainer.network).eval(), reloaded.preprocess, "t", "litemedsam")
    logits = predictions(reloaded)
    np.testing.assert_allclose(logits, predictions(trained_model, optimize=False), atol=1e-4)
    if recipe == "autoprompt":  # prompt-free: every prompt gets the same mask
        np.testing.assert_array_equal(logits[0], logits[1])

    resumed = Trainer(config(setup, tmp_path / "run", recipe, epochs=2, max_steps=None, resume=True, **options),
                      lambda text: None).fit()
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_samples_slices_cache_and_prompts(setup, tmp_path) -> None:
    base, data = setup
    cases = discover_cases(data)
    refs = sample_refs(cases, slices_per_volume=1)
    assert [r.slice_index for r in refs if r.case.is_volume] == [1] and len(refs) == 5
    preprocess = medfm.load(base).preprocess
    train = SegmentationSamples(refs, preprocess, 64, SampleOptions(box_jitter=4), seed=3)
    first, again = train[0], train[0]
    assert first["pixels"].shape == (3, 64, 64) and first["target"].shape == (1, 64, 64)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a sample depends on (seed, epoch, index)
    train.set_epoch(1)
    assert not all(torch.equal(first[k], train[0][k]) for k in first)
    box = first["box"].numpy()
    assert box[0] < box[2] and box[1] < box[3] and (box >= 0).all() and (box <= 63).all()


def test_existing_run_needs_resume_and_bad_options_are_clear(setup, tmp_path) -> None:
    Trainer(config(setup, tmp_path / "run", "decoder"), lambda text: None).fit()
    with pytest.raises(MedfmError, match="--resume"):
        Trainer(config(setup, tmp_path / "run", "decoder"), lambda text: None).fit()
    with pytest.raises(MedfmError, match="unknown recipe"):
        Recipe("samed-ish")
    with pytest.raises(MedfmError, match="name no Linear layer"):
        wrong = dataclasses.replace(config(setup, tmp_path / "other", "lora"), recipe=Recipe("lora", lora_targets=("q_proj",)))
        Trainer(wrong, lambda text: None)


def test_blend_with_base_moves_the_trained_tensors_back_linearly(setup, tmp_path) -> None:
    from medfm.errors import OptionError
    from medfm.train.recipes import blend_with_base

    result = Trainer(config(setup, tmp_path / "run", "decoder", max_steps=3), lambda text: None).fit()
    base = medfm.load(setup[0]).network.state_dict()
    trained = load_file(str(result.last / "model.safetensors"))
    half = blend_with_base(result.last, 0.5, tmp_path / "half")
    blended = load_file(str(half / "model.safetensors"))
    assert set(blended) == set(trained)
    changed = [key for key in trained if not torch.equal(trained[key], base[key])]
    assert changed
    for key in changed:
        torch.testing.assert_close(blended[key], (base[key] + trained[key]) / 2)
    assert json.loads((half / "config.json").read_text())["blend"]["alpha"] == 0.5
    np.testing.assert_allclose(predictions(medfm.load(blend_with_base(result.last, 0.0, tmp_path / "zero"))),
                               predictions(medfm.load(setup[0])), atol=1e-5)  # alpha 0 is the base
    np.testing.assert_allclose(predictions(medfm.load(blend_with_base(result.last, 1.0, tmp_path / "one"))),
                               predictions(medfm.load(result.last)), atol=1e-5)
    with pytest.raises(OptionError, match="alpha"):
        blend_with_base(result.last, 1.5, tmp_path / "bad")
    from tests.test_cli import run_medfm

    command = run_medfm("blend", str(result.last), "-o", str(tmp_path / "cli"), "--alpha", "0.5")
    assert command.returncode == 0, command.stderr
    from_cli = load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert all(torch.equal(from_cli[key], blended[key]) for key in blended)
    refused = run_medfm("blend", str(result.last), "-o", str(tmp_path / "bad"), "--alpha", "2")
    assert refused.returncode == 2 and "alpha" in refused.stderr and not (tmp_path / "bad").exists()
    import shutil

    from medfm.errors import CheckpointError

    broken = shutil.copytree(result.last, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 differs"):
        blend_with_base(broken, 0.5, tmp_path / "bad")
    with pytest.raises(CheckpointError):
        blend_with_base(tmp_path / "nowhere", 0.5, tmp_path / "bad")
    lora = Trainer(config(setup, tmp_path / "lora", "lora", max_steps=1), lambda text: None).fit()
    with pytest.raises(OptionError, match="lora run cannot be blended"):
        blend_with_base(lora.last, 0.5, tmp_path / "bad")


def test_embedding_cache_follows_file_contents_not_paths_or_times(setup, tmp_path) -> None:
    import shutil

    from medfm.train.data import EmbeddingCache

    base, data = setup
    preprocess = medfm.load(base).preprocess
    refs = [r for r in sample_refs(discover_cases(data)) if not r.case.is_volume][:2]
    cache = EmbeddingCache(tmp_path / "cache", "tiny", preprocess)
    cache.fill(refs, lambda pixels: torch.ones(len(pixels), 4, 2, 2))
    copy = shutil.copytree(data, tmp_path / "copy")  # new paths and times, same bytes
    copied = [r for r in sample_refs(discover_cases(copy)) if not r.case.is_volume][:2]
    fresh = EmbeddingCache(tmp_path / "cache", "tiny", preprocess)
    assert [fresh.path(r) for r in copied] == [cache.path(r) for r in refs]
    assert all(fresh.path(r).is_file() for r in copied)
    image = Image.open(copied[0].case.image_path)
    np.asarray(image)  # load before overwriting
    Image.fromarray(255 - np.asarray(image)).save(copied[0].case.image_path)  # same name, new contents
    assert fresh.path(copied[0]) != cache.path(refs[0]) and fresh.path(copied[1]) == cache.path(refs[1])
    assert EmbeddingCache(tmp_path / "cache", "other", preprocess).path(refs[1]) != cache.path(refs[1])


def test_a_delta_over_a_frozen_encoder_shares_its_bases_embedding_cache(setup, tmp_path, monkeypatch) -> None:
    """A second stage from a decoder run embeds its images exactly as the first did: same cache
    identity, no re-encoding; a run that changed the encoder (LoRA) gets its own."""
    from medfm.train.trainer import _base_id

    base = str(setup[0])
    decoder = Trainer(config(setup, tmp_path / "decoder", "decoder"), lambda text: None).fit()
    lora = Trainer(config(setup, tmp_path / "lora", "lora"), lambda text: None).fit()
    assert _base_id(str(decoder.best)) == (str(decoder.best.resolve()), _base_id(base)[1])
    assert _base_id(str(lora.best))[1] not in (_base_id(base)[1], _base_id(str(decoder.best))[1])
    missing = []
    fill = Trainer._fill_cache
    monkeypatch.setattr(Trainer, "_fill_cache", lambda self, cache, refs: missing.append(
        sum(not cache.path(r).is_file() for r in refs)) or fill(self, cache, refs))
    stage2 = config(setup, tmp_path / "stage2", "decoder", cache_embeddings=tmp_path / "decoder" / "embedding-cache")
    Trainer(dataclasses.replace(stage2, base=str(decoder.best)), lambda text: None).fit()
    assert missing == [0]  # every embedding was already there


def test_mixed_weights_choose_the_prompt_kinds_drawn(setup, tmp_path, monkeypatch) -> None:
    from medfm.train import trainer as trainer_module

    generator = torch.Generator().manual_seed(0)
    draws = [trainer_module.draw_mixed(generator, 3, {"iterative": 1.0})[0] for _ in range(50)]
    assert set(draws) == {"iterative"}
    default = {trainer_module.draw_mixed(generator, 3)[0] for _ in range(200)}
    assert default == set(trainer_module.MIXED_KINDS)
    drawn = []
    real = trainer_module.mixed_passes
    monkeypatch.setattr(trainer_module, "mixed_passes", lambda *a, **k: drawn.append(a[3]) or real(*a, **k))
    result = Trainer(config(setup, tmp_path / "run", "decoder", prompt="mixed", mixed_weights={"box+clicks": 2.0}),
                     lambda text: None).fit()
    assert result.best.exists() and drawn[:2] == ["box+clicks", "box+clicks"]  # the 2 steps; validation's own passes follow
    for weights, message in [({"boxes": 1.0}, "unknown mixed prompt kind"), ({"box": 0.0}, "not all 0"),
                             ({"box": -1.0, "iterative": 2.0}, "numbers >= 0")]:
        with pytest.raises(MedfmError, match=message):
            config(setup, tmp_path / "bad", "decoder", prompt="mixed", mixed_weights=weights).prompt_mode()
    with pytest.raises(MedfmError, match="only apply to --prompt mixed"):
        config(setup, tmp_path / "bad", "decoder", prompt="box", mixed_weights={"box": 1.0}).prompt_mode()


def test_cli_mixed_weights_parse_or_say_why() -> None:
    from medfm.cli import _mixed_weights

    assert _mixed_weights("box=0.2, iterative=0.8") == {"box": 0.2, "iterative": 0.8} and _mixed_weights(None) is None
    with pytest.raises(medfm.OptionError, match="kind=weight pairs"):
        _mixed_weights("box:0.2")
