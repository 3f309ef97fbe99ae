"""The dual encoder, zero-shot scoring, retrieval, losses and BioViL-T's fusion, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medfm
from medfm.clip import (
    DualEncoder,
    class_embeddings,
    classify,
    infonce_loss,
    retrieve_images,
    retrieve_texts,
    semantic_matching_loss,
)
from medfm.clip.losses import semantic_targets
from medfm.clip.preprocess import ImagePreprocess
from medfm.clip.temporal import TemporalFusionHead
from medfm.clip.zeroshot import zero_shot_probabilities

WORDS = ["no", "pneumonia", "normal", "melanoma", "nevus", "a", "chest", "x", "-", "ray", "showing", "of", "image", "lung", "effusion"]


def tiny_bert_tokenizer(folder: Path):
    """A WordPiece tokenizer over a dozen words, written to ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(str(folder / "vocab.txt"))


def tiny_bert_config(vocab_size: int, hidden: int = 32, heads: int = 2) -> dict:
    return {"vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": heads,
            "intermediate_size": 2 * hidden, "max_position_embeddings": 64}


def tiny_config(**changes: object) -> dict:
    """A CLIP-vision + BERT dual encoder, a few thousand parameters."""
    config = {
        "name": "tiny",
        "image_backbone": {"kind": "clip-vision", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                              "num_attention_heads": 2, "image_size": 32, "patch_size": 16}},
        "text_backbone": {"kind": "bert", "config": tiny_bert_config(len(WORDS) + 5), "pool": "cls"},
        "image_projection": "linear",
        "text_projection": "mlp",
        "embed_dim": 16,
        "context_length": 32,
        "tokenizer": "folder",
        "preprocess": ImagePreprocess(image_size=32).to_dict(),
        "templates": {"X-ray": ["{}", "a chest x-ray showing {}"]},
    }
    config.update(changes)
    return config


@pytest.fixture()
def tiny(tmp_path: Path) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(tiny_config(), tiny_bert_tokenizer(tmp_path / "tokenizer")).eval()


def random_png(path: Path, seed: int, size: tuple[int, int] = (40, 52)) -> Path:
    rng = np.random.default_rng(seed)
    medfm.write_image(np.repeat(rng.integers(0, 255, size, dtype=np.uint8)[..., None], 3, axis=-1), path)
    return path


def test_encoders_give_unit_embeddings_and_the_folder_round_trips(tiny: DualEncoder, tmp_path: Path) -> None:
    image = random_png(tmp_path / "a.png", 0)
    grey = np.random.default_rng(1).integers(0, 4000, (30, 20)).astype(np.int16)
    images = tiny.encode_image([image, medfm.read_image(image), grey])
    texts = tiny.encode_text(["pneumonia", "no pneumonia"])
    assert images.shape == (3, 16) and texts.shape == (2, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(images[0], images[1])  # a path and its MedicalImage agree
    folder = tiny.save_pretrained(tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["task"] == "zero-shot-classification"
    again = medfm.clip.load(folder)
    assert torch.allclose(again.encode_image(image), images[:1], atol=1e-6)
    assert torch.allclose(again.encode_text(["pneumonia", "no pneumonia"]), texts, atol=1e-6)


def test_a_folder_whose_weights_miss_a_tower_is_refused(tiny: DualEncoder, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from medfm.io.writers import write_model_folder

    folder = tiny.save_pretrained(tmp_path / "model")
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("text_projection")}
    write_model_folder(folder, json.loads((folder / "config.json").read_text()), state)  # its hash fits: the check is the tower
    with pytest.raises(medfm.CheckpointError, match="missing text_projection"):
        medfm.clip.load(folder)


def test_prompt_ensemble_averages_the_templates(tiny: DualEncoder) -> None:
    templates = ["{}", "a chest x-ray showing {}"]
    ensemble = class_embeddings(tiny, ["pneumonia", "normal"], templates)
    each = tiny.encode_text(["pneumonia", "a chest x-ray showing pneumonia"])
    assert torch.allclose(ensemble[0], F.normalize(each.mean(0), dim=-1), atol=1e-6)
    assert tiny.templates("X-ray") == tuple(templates) and tiny.templates(None) == ("{}",)


def test_softmax_and_chexzero_positive_negative_scoring(tiny: DualEncoder, tmp_path: Path) -> None:
    image = random_png(tmp_path / "a.png", 0)
    probabilities = classify(image, ["pneumonia", "normal", "effusion"], model=tiny)
    assert list(probabilities) == ["pneumonia", "normal", "effusion"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # CheXzero: each finding against "no {finding}", independently
    embeds = tiny.encode_image(image)
    scores = classify(image, ["pneumonia", "effusion"], model=tiny, method="pos-neg", templates=["{}"])
    scale = tiny.logit_scale.detach().exp()
    for finding, score in scores.items():
        positive, negative = tiny.encode_text([finding, f"no {finding}"])
        expected = torch.softmax(scale * torch.stack([embeds[0] @ positive, embeds[0] @ negative]), 0)[0]
        assert score == pytest.approx(float(expected), abs=1e-5)
    single = zero_shot_probabilities(tiny, embeds, ["pneumonia"], method="pos-neg")
    assert single.shape == (1, 1) and 0 < float(single) < 1


@pytest.mark.parametrize("labels, method, message", [
    (["pneumonia"], "softmax", "one label"), (["a", "a"], "softmax", "repeat"), ([], "pos-neg", "non-empty"),
    (["a", "b"], "vote", "unknown zero-shot method"),
])
def test_bad_labels_are_prompt_errors(tiny: DualEncoder, labels: list[str], method: str, message: str) -> None:
    with pytest.raises(medfm.PromptError, match=message):
        classify(np.zeros((8, 8), np.uint8), labels, model=tiny, method=method)


def test_retrieval_both_ways(tiny: DualEncoder, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    paths = [random_png(folder / f"{i}.png", i) for i in range(3)]
    (folder / "notes.txt").write_text("not an image")
    hits = retrieve_images("pneumonia", folder, model=tiny, top_k=2)
    assert len(hits) == 2 and hits[0][1] >= hits[1][1] and {h[0] for h in hits} <= set(paths)
    expected = tiny.encode_image(paths) @ tiny.encode_text("pneumonia")[0]
    assert hits[0][1] == pytest.approx(float(expected.max()), abs=1e-5)
    texts = retrieve_texts(paths[0], ["pneumonia", "normal", "melanoma"], model=tiny, top_k=5)
    assert [t for t, _ in texts] != [] and len(texts) == 3 and texts[0][1] >= texts[-1][1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(medfm.InputFileError, match="no image files"):
        retrieve_images("x", tmp_path / "empty", model=tiny)


def test_volumes_are_refused_naming_the_file(tiny: DualEncoder) -> None:
    volume = medfm.MedicalImage(np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3),
                                metadata={"kind": "volume"}, path=Path("scan.nii.gz"))
    with pytest.raises(medfm.InputFileError, match="scan.nii.gz.*3D volume"):
        tiny.encode_image(volume)


def test_infonce_matches_its_definition_and_trains(tiny: DualEncoder, tmp_path: Path) -> None:
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    logits = 10.0 * images @ texts.T
    manual = -(logits.log_softmax(1).diag().mean() + logits.T.log_softmax(1).diag().mean()) / 2
    assert float(infonce_loss(images, texts, 10.0)) == pytest.approx(float(manual), abs=1e-5)
    assert float(infonce_loss(images, images, 100.0)) < 1e-3  # aligned pairs: nothing to learn
    # a few steps on the tiny model lower the loss on a fixed batch
    tiny.train()
    pixels = torch.randn(4, 3, 32, 32)
    tokens = tiny.tokenizer(["pneumonia", "normal", "melanoma", "nevus"], padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam([p for p in tiny.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        logits = tiny(pixels, tokens["input_ids"], tokens["attention_mask"])
        loss = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_semantic_matching_soft_targets() -> None:
    # two images of the same finding: each text of that finding is half-and-half, not a false negative
    image_labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets = semantic_targets(image_labels, image_labels, temperature=0.01)
    assert torch.allclose(targets[0], torch.tensor([0.5, 0.5, 0.0]), atol=1e-4)
    # one-hot distinct labels and paired embeddings: InfoNCE is the sharp-temperature limit
    torch.manual_seed(1)
    images, texts = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    eye = torch.eye(3)
    assert float(semantic_matching_loss(images, texts, eye, eye, 5.0, temperature=1e-3)) == pytest.approx(
        float(infonce_loss(images, texts, 5.0)), abs=1e-4)


def test_semantic_matching_trains_on_unpaired_and_label_only_data() -> None:
    """MedCLIP's decoupling: 3 images against 5 texts, an unlabeled image left out, gradients to both sides."""
    torch.manual_seed(2)
    images = torch.randn(4, 8, requires_grad=True)
    texts = torch.randn(5, 8, requires_grad=True)
    image_labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0]])  # last: no labels
    text_labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    loss = semantic_matching_loss(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), image_labels, text_labels, 10.0)
    loss.backward()
    assert torch.isfinite(loss) and images.grad[:3].abs().sum() > 0 and texts.grad.abs().sum() > 0
    assert images.grad[3].abs().sum() == 0
    # pulling each image to the mean of its matching texts lowers the loss
    with torch.no_grad():
        targets = semantic_targets(image_labels[:3], text_labels)
        moved = torch.cat([F.normalize(targets @ F.normalize(texts, dim=-1), dim=-1), images[3:]])
    better = semantic_matching_loss(moved, F.normalize(texts, dim=-1), image_labels, text_labels, 10.0)
    assert float(better.detach()) < float(loss.detach())


def test_biovil_t_fusion_of_a_prior_image() -> None:
    torch.manual_seed(3)
    head = TemporalFusionHead(channels=8, grid=4, dim=16, depth=1, heads=2)
    current, prior = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    alone, fused = head(current), head(current, prior)
    assert alone.shape == fused.shape == (2, 24)
    assert torch.equal(alone[:, :8], current.mean(dim=(2, 3))) and torch.equal(fused[:, :8], alone[:, :8])  # static part
    assert torch.allclose(alone[:, 8:], head.missing_prior.flatten().expand(2, -1))  # no prior: the learned stand-in
    assert not torch.allclose(fused[:, 8:], alone[:, 8:])
    assert not torch.allclose(head(prior, current)[:, 8:], fused[:, 8:])  # which image is the prior matters
    assert not torch.allclose(head(current, prior.flip(-1))[:, 8:], fused[:, 8:])  # the prior's layout matters
    fused.sum().backward()
    assert head.transformer.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0 and head.missing_prior.grad is None


def test_dual_encoder_with_a_temporal_head_takes_prior_images(tmp_path: Path) -> None:
    """BioViL-T's layout: a patch-grid image backbone (LiteMedSAM's TinyViT, tiny and random here),
    the fusion head, and a text tower; prior images are optional."""
    torch.manual_seed(4)
    tinyvit = {"embed_dims": [8, 16, 16, 16], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 2], "window_sizes": [7, 7, 7, 7],
               "out_chans": 16}
    config = tiny_config(image_backbone={"kind": "litemedsam", "image_size": 32, "grid": 4, "pretrained": False, **tinyvit},
                         image_head={"kind": "temporal-fusion", "channels": 16, "grid": 4, "dim": 16, "depth": 1, "heads": 2},
                         preprocess=ImagePreprocess(image_size=32, resize="longest-side", interpolation="area",
                                                    normalization="minmax", mean=None, std=None).to_dict())
    model = DualEncoder(config, tiny_bert_tokenizer(tmp_path / "tokenizer")).eval()
    current, prior = random_png(tmp_path / "now.png", 0), random_png(tmp_path / "before.png", 1)
    alone, fused = model.encode_image(current), model.encode_image(current, prior=prior)
    assert alone.shape == fused.shape == (1, 16) and not torch.allclose(alone, fused)
    again = medfm.clip.load(model.save_pretrained(tmp_path / "model"))
    assert torch.allclose(again.encode_image(current, prior=prior), fused, atol=1e-5)
    with pytest.raises(medfm.MedfmError, match="prior images"):
        model.encode_image([current, current], prior=[prior])


def test_a_model_without_temporal_head_refuses_a_prior(tiny: DualEncoder) -> None:
    with pytest.raises(medfm.MedfmError, match="no temporal head"):
        tiny.encode_image(np.zeros((8, 8), np.uint8), prior=np.zeros((8, 8), np.uint8))


def test_preprocessing_modes() -> None:
    rgb = np.full((20, 40, 3), 255, np.uint8)
    centred = ImagePreprocess(image_size=10, resize="longest-side-center", normalization="minmax", mean=None, std=None)(rgb)
    corner = ImagePreprocess(image_size=10, resize="longest-side", interpolation="area", normalization="minmax", mean=None, std=None)(rgb)
    cropped = ImagePreprocess(image_size=10)(rgb)
    assert centred.shape == corner.shape == cropped.shape == (3, 10, 10)
    assert float(corner[:, 5:].abs().sum()) == 0 and float(corner[:, :5].abs().sum()) == 0  # flat image: min-max gives 0
    mean_std = ImagePreprocess(image_size=10, resize="longest-side-center")(rgb)
    assert float(mean_std[:, :2].abs().sum()) == 0 and float(mean_std[:, 8:].abs().sum()) == 0  # centred: padding above and below
    assert float(mean_std[:, 3:7].abs().min()) > 0
    assert torch.allclose(cropped[0], torch.full((10, 10), (1 - 0.48145466) / 0.26862954), atol=1e-4)
    with pytest.raises(ValueError, match="needs mean and std"):
        ImagePreprocess(mean=None)
