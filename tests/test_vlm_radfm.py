"""RadFM on a tiny random checkpoint that the tests write in its published layout
(``pytorch_model.bin`` with ``embedding_layer.*`` and ``lang_model.*`` keys, training-only parts
included; ``Language_files`` with a LLaMA config as quirky as the real one). The forward pass is
compared with one written here from RadFM's code (``vit_3d.py``, ``position_encoding.py``,
``helpers.py``, ``my_embedding_layer.py``) and its preprocessing with RadFM's data pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.vlm_tiny import WORDS, llama_config

QUESTION = "is there a pleural effusion ?"
DIM, HEADS, MLP, LATENTS, WIDTH = 24, 2, 40, 32, 32  # ViT/perceiver width (divisible by 3), LM width
RNG = np.random.default_rng(0)
VOLUME = RNG.normal(100, 30, (7, 20, 24)).astype(np.float32)  # (Z, Y, X): 7 slices -> depth 8


def volume_image(array: np.ndarray = VOLUME, path: Path | None = None):
    """A `MedicalImage` volume of ``array`` (Z, Y, X), 1 mm voxels."""
    from medfm.io import MedicalImage

    return MedicalImage(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), metadata={"kind": "volume"}, path=path)


def tiny_llama_tokenizer():
    """A word-level tokenizer with LLaMA's first three tokens and no image tokens (RadFM adds them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_radfm(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """RadFM's pytorch_model.bin (tiny: 2-block ViT, 2-layer perceiver, 2-layer LLaMA; RadFM's own
    patch sizes and position tables) and Language_files/, as the repository and hub ship them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    tokenizer = tiny_llama_tokenizer()
    vocabulary, patch_dim, inner = len(tokenizer), 3 * 32 * 32 * 4, HEADS * 64
    v, p = "embedding_layer.vision_encoder.", "embedding_layer.perceiver."
    state = {v + "to_patch_embedding.1.weight": 1 + r(patch_dim), v + "to_patch_embedding.1.bias": r(patch_dim),
             v + "to_patch_embedding.2.weight": r(DIM, patch_dim) * 0.1, v + "to_patch_embedding.2.bias": r(DIM),
             v + "to_patch_embedding.3.weight": 1 + r(DIM), v + "to_patch_embedding.3.bias": r(DIM),
             v + "pos_embedding.row_embed.weight": r(16, DIM // 3), v + "pos_embedding.col_embed.weight": r(16, DIM // 3),
             v + "pos_embedding.dep_embed.weight": r(128, DIM // 3)}
    for i in range(2):
        b = f"{v}transformer.layers.{i}."
        state |= {b + "0.norm.weight": 1 + r(DIM), b + "0.norm.bias": r(DIM), b + "0.fn.to_qkv.weight": r(3 * inner, DIM),
                  b + "0.fn.to_out.0.weight": r(DIM, inner), b + "0.fn.to_out.0.bias": r(DIM),
                  b + "1.norm.weight": 1 + r(DIM), b + "1.norm.bias": r(DIM), b + "1.fn.net.0.weight": r(MLP, DIM),
                  b + "1.fn.net.0.bias": r(MLP), b + "1.fn.net.3.weight": r(DIM, MLP), b + "1.fn.net.3.bias": r(DIM)}
        b = f"{p}layers.{i}."
        state |= {b + "0.norm_media.weight": 1 + r(DIM), b + "0.norm_media.bias": r(DIM), b + "0.norm_latents.weight": 1 + r(DIM),
                  b + "0.norm_latents.bias": r(DIM), b + "0.to_q.weight": r(inner, DIM), b + "0.to_kv.weight": r(2 * inner, DIM),
                  b + "0.to_out.weight": r(DIM, inner), b + "1.0.weight": 1 + r(DIM), b + "1.0.bias": r(DIM),
                  b + "1.1.weight": r(4 * DIM, DIM), b + "1.3.weight": r(DIM, 4 * DIM)}
    state |= {p + "latents": r(LATENTS, DIM) * 5, p + "norm.weight": 1 + r(DIM), p + "norm.bias": r(DIM),
              "embedding_layer.fc.weight": r(WIDTH, DIM), "embedding_layer.fc.bias": r(WIDTH),
              "embedding_layer.figure_token_weight": r(2, WIDTH),
              # training-only parts the published file carries (Med-KEBERT matching, segmentation head)
              "embedding_layer.bert_projection_fc.weight": r(DIM, 8), "embedding_layer.cls_head.weight": r(1, DIM // 8),
              "embedding_layer.transformer_decoder.norm.weight": r(DIM)}
    config = {**llama_config(vocabulary, WIDTH), "num_key_value_heads": 4}
    torch.manual_seed(seed + 1)
    lm = LlamaForCausalLM(LlamaConfig(**config))
    state |= {f"lang_model.{k}": t for k, t in lm.state_dict().items()}
    state["lang_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # transformers 4.28 saved these
    state["embedding_layer.weight"] = state["lang_model.model.embed_tokens.weight"]  # tied, as RadFM assigns it
    folder.mkdir(parents=True)
    torch.save(state, folder / "pytorch_model.bin")
    files = folder / "Language_files"
    tokenizer.save_pretrained(files)
    # as the repository's config: LLaMA-1's early conversion (bos 0, eos 1, pad -1), max_sequence_length
    quirky = {**{k: v for k, v in config.items() if k != "max_position_embeddings"}, "bos_token_id": 0, "eos_token_id": 1,
              "pad_token_id": -1, "max_sequence_length": 2048, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (files / "config.json").write_text(json.dumps(quirky))
    return state


@pytest.fixture(scope="module")
def radfm(tmp_path_factory):
    from medfm.vlm.radfm import load_radfm

    folder = tmp_path_factory.mktemp("radfm") / "RadFM"
    state = write_radfm(folder)
    return load_radfm(folder), folder, state


# RadFM's code, written again here


def radfm_volume_reference(zyx: np.ndarray) -> torch.Tensor:
    """``radiopaedia.py``'s resize_image and min-max, then ``stack_images``: (3, 512, 512, D)."""
    import cv2
    from scipy import ndimage

    image = zyx.transpose(1, 2, 0)  # RadFM's arrays keep the slices last
    image = cv2.resize(image, (512, 512), interpolation=cv2.INTER_LINEAR)  # the slices are OpenCV's channels
    image = np.concatenate([image[np.newaxis]] * 3, axis=0)
    depth_zoom = 64 / image.shape[3] if image.shape[-1] > 64 else 1
    image = ndimage.zoom(image, (3 / image.shape[0], 512 / image.shape[1], 512 / image.shape[2], depth_zoom), order=0)
    image = (image - image.min()) / (image.max() - image.min())
    target_d, biggest = 4, image.shape[3]
    for candidate in range(4, 65, 4):
        if abs(candidate - biggest) < abs(target_d - biggest):
            target_d = candidate
    return F.interpolate(torch.tensor(image).unsqueeze(0), size=(512, 512, target_d))[0]


def radfm_reference(state: dict, lm, ids: list[int], vision_x: torch.Tensor) -> torch.Tensor:
    """MyEmbedding's 'Text' forward (ViT, perceiver, fc, one-hot lookup in the extended table),
    then the LLaMA on the embeddings. ``vision_x``: (C, H, W, D), one scan."""
    v = lambda n: state[f"embedding_layer.vision_encoder.{n}"]  # noqa: E731
    pr = lambda n: state[f"embedding_layer.perceiver.{n}"]  # noqa: E731
    ln = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps=1e-5)  # noqa: E731

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], -1, 64).transpose(1, 2)

    channels, height, width, depth = vision_x.shape
    patches = vision_x[None].unfold(2, 32, 32).unfold(3, 32, 32).unfold(4, 4, 4)  # (1, C, h, w, f, 32, 32, 4)
    h, w, f = patches.shape[2:5]
    x = patches.permute(0, 2, 3, 4, 5, 6, 7, 1).reshape(1, h * w * f, -1)
    x = ln(x, v("to_patch_embedding.1.weight"), v("to_patch_embedding.1.bias"))
    x = ln(F.linear(x, v("to_patch_embedding.2.weight"), v("to_patch_embedding.2.bias")),
           v("to_patch_embedding.3.weight"), v("to_patch_embedding.3.bias"))
    i = (torch.arange(h) + 1) * (16 // h) - 1
    j = (torch.arange(w) + 1) * (16 // w) - 1
    k = (torch.arange(f) + 1) * (128 // f) - 1
    grid_i, grid_j, grid_k = torch.meshgrid(i, j, k, indexing="ij")
    pos = torch.cat([v("pos_embedding.row_embed.weight")[grid_i], v("pos_embedding.col_embed.weight")[grid_j],
                     v("pos_embedding.dep_embed.weight")[grid_k]], dim=-1).reshape(1, h * w * f, -1)
    x = x + pos
    for layer in range(2):
        b = f"transformer.layers.{layer}."
        y = ln(x, v(b + "0.norm.weight"), v(b + "0.norm.bias"))
        q, kk, vv = map(heads, F.linear(y, v(b + "0.fn.to_qkv.weight")).chunk(3, dim=-1))
        attention = torch.softmax(q @ kk.transpose(-1, -2) * 64 ** -0.5, dim=-1) @ vv
        x = F.linear(attention.transpose(1, 2).flatten(2), v(b + "0.fn.to_out.0.weight"), v(b + "0.fn.to_out.0.bias")) + x
        y = ln(x, v(b + "1.norm.weight"), v(b + "1.norm.bias"))
        x = F.linear(F.gelu(F.linear(y, v(b + "1.fn.net.0.weight"), v(b + "1.fn.net.0.bias"))),
                     v(b + "1.fn.net.3.weight"), v(b + "1.fn.net.3.bias")) + x
    latents = pr("latents")[None]
    for layer in range(2):
        b = f"layers.{layer}."
        media = ln(x, pr(b + "0.norm_media.weight"), pr(b + "0.norm_media.bias"))
        lat = ln(latents, pr(b + "0.norm_latents.weight"), pr(b + "0.norm_latents.bias"))
        q = heads(F.linear(lat, pr(b + "0.to_q.weight"))) * 64 ** -0.5
        kk, vv = map(heads, F.linear(torch.cat([media, lat], dim=1), pr(b + "0.to_kv.weight")).chunk(2, dim=-1))
        sim = q @ kk.transpose(-1, -2)
        out = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1) @ vv
        latents = F.linear(out.transpose(1, 2).flatten(2), pr(b + "0.to_out.weight")) + latents
        y = ln(latents, pr(b + "1.0.weight"), pr(b + "1.0.bias"))
        latents = F.linear(F.gelu(F.linear(y, pr(b + "1.1.weight"))), pr(b + "1.3.weight")) + latents
    latents = ln(latents, pr("norm.weight"), pr("norm.bias"))
    tokens = F.linear(latents[0], state["embedding_layer.fc.weight"], state["embedding_layer.fc.bias"])
    table = torch.cat([state["embedding_layer.weight"], state["embedding_layer.figure_token_weight"], tokens])
    embeds = F.one_hot(torch.tensor(ids), table.shape[0]).to(table.dtype) @ table
    return lm(inputs_embeds=embeds[None]).logits


def radfm_ids(tokenizer, vocabulary: int, question: str) -> list[int]:
    """``<s><image><image0>...<image31></image>question`` as RadFM's extended tokenizer numbers it."""
    image = [vocabulary] + [vocabulary + 2 + n for n in range(LATENTS)] + [vocabulary + 1]
    return [1, *image, *tokenizer(question, add_special_tokens=False).input_ids]


def _reference_lm(state: dict, folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "Language_files" / "config.json").read_text())
    lm = LlamaForCausalLM(LlamaConfig(**{**config, "pad_token_id": None})).eval()
    lm.load_state_dict({k.removeprefix("lang_model."): t for k, t in state.items()
                        if k.startswith("lang_model.") and not k.endswith("inv_freq")})
    return lm


# the tests


def test_volume_preprocessing_matches_radfm_pipeline():
    from medfm.vlm.radfm import volume_pixels

    volume = RNG.normal(0, 1, (70, 12, 10)).astype(np.float32)  # > 64 slices: zoomed to 64, then 64 deep
    pixels = volume_pixels(volume)
    expected = radfm_volume_reference(volume)
    assert pixels.shape == expected.shape == (3, 512, 512, 64)
    torch.testing.assert_close(pixels, expected.float(), atol=1e-6, rtol=0)
    small = volume_pixels(VOLUME)
    assert small.shape == (3, 512, 512, 8) and float(small.min()) == 0 and float(small.max()) == 1
    torch.testing.assert_close(small, radfm_volume_reference(VOLUME).float(), atol=1e-6, rtol=0)
    assert volume_pixels(np.full((3, 8, 8), 7.0)).abs().sum() == 0  # a constant volume: zeros, not NaN


def test_radfm_matches_radfm_forward_on_a_volume(radfm):
    model, folder, state = radfm
    volume = volume_image()
    turns = [(QUESTION, None)]
    prompt = model.prompt_format.render(turns)
    assert prompt == "<image>" + "".join(f"<image{n}>" for n in range(LATENTS)) + "</image>" + QUESTION
    vocabulary = len(tiny_llama_tokenizer())
    ids = radfm_ids(model.tokenizer, vocabulary, QUESTION)
    assert model.token_ids(prompt) == ids
    pixels = model.pixels(volume)
    torch.testing.assert_close(pixels[0], radfm_volume_reference(VOLUME).float(), atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = radfm_reference(state, _reference_lm(state, folder), ids, pixels[0])
        actual = model.logits(model.prepare(turns, volume))
        text_only = model.logits(model.prepare(turns, None))
    assert actual.shape == (1, len(ids), vocabulary)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert text_only.shape[1] == len(ids) - LATENTS - 2
    with torch.no_grad():  # the image matters
        changed = model.logits(model.prepare(turns, volume_image(VOLUME[::-1].copy())))
    assert not torch.allclose(changed[0, -1], actual[0, -1], atol=1e-4)


def test_radfm_takes_a_2d_image_four_deep(radfm):
    from PIL import Image

    model, folder, state = radfm
    rgb = RNG.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    pixels = model.pixels(rgb)
    assert pixels.shape == (1, 3, 512, 512, 4)
    expected = torch.tensor(np.asarray(Image.fromarray(rgb).resize((512, 512), Image.BICUBIC)) / 255.0).permute(2, 0, 1)
    for d in range(4):  # the demo's unsqueeze(-1) then interpolate to depth 4: the same image 4 times
        torch.testing.assert_close(pixels[0, ..., d], expected.float(), atol=1e-6, rtol=0)
    with torch.no_grad():
        expected_logits = radfm_reference(state, _reference_lm(state, folder),
                                          radfm_ids(model.tokenizer, len(tiny_llama_tokenizer()), QUESTION), pixels[0])
        torch.testing.assert_close(model.logits(model.prepare([(QUESTION, None)], rgb)), expected_logits, atol=1e-5, rtol=0)


def test_safetensors_copy_loads_the_same(radfm, tmp_path):
    from safetensors.torch import save_file

    from medfm.vlm.radfm import load_radfm

    model, folder, state = radfm
    copy = tmp_path / "radfm-st"
    copy.mkdir()
    save_file({k: t.clone().contiguous() for k, t in state.items()}, copy / "model.safetensors")
    (copy / "Language_files").symlink_to(folder / "Language_files")
    other = load_radfm(copy)
    with torch.no_grad():
        expected = model.logits(model.prepare([(QUESTION, None)], volume_image()))
        torch.testing.assert_close(other.logits(other.prepare([(QUESTION, None)], volume_image())), expected, atol=0, rtol=0)


def test_ask_and_cli_on_a_nifti_volume(radfm, tmp_path, capsys, monkeypatch):
    import nibabel

    import medfm
    from medfm.cli import main

    model, folder, _ = radfm
    path = tmp_path / "volume.nii.gz"
    nibabel.save(nibabel.Nifti1Image(VOLUME.transpose(2, 1, 0), np.eye(4)), str(path))
    answer = medfm.ask(path, QUESTION, model, max_new_tokens=4)
    assert isinstance(answer, str)
    assert len(model.score([(QUESTION, None)], medfm.read_image(path), ["yes", "no"])) == 2
    assert isinstance(medfm.ask(path, QUESTION, model, slice_index=3, max_new_tokens=2), str)  # one slice, 4 deep
    assert isinstance(medfm.report(path, model, max_new_tokens=2), str)
    from medfm.vlm.api import Conversation

    chat = Conversation(path, model)
    chat.say(QUESTION, max_new_tokens=2)
    assert chat.image.is_volume and isinstance(chat.say("describe", max_new_tokens=2), str)

    def run(*argv: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["medfm", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        return exit_info.value.code, out.out, out.err

    code, out, _ = run("ask", str(path), QUESTION, "--model", "radfm", "--weights", str(folder), "--json", "--max-new-tokens", "3")
    assert code == 0 and json.loads(out)["model"] == "radfm" and isinstance(json.loads(out)["answer"], str)
    code, _, err = run("ask", str(path), "  ", "--model", "radfm", "--weights", str(folder))
    assert code == 2 and err.strip() == "error: the question is empty"
    code, _, err = run("ask", str(path), QUESTION, "--model", "radfm", "--weights", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Language_files" in err


def test_a_2d_model_still_refuses_a_whole_volume(tmp_path):
    from medfm.errors import InputFileError
    from medfm.vlm.api import image_2d, takes_volumes

    assert takes_volumes("radfm") and not takes_volumes("llava-med") and not takes_volumes(None)
    volume = volume_image(path=tmp_path / "v.nii.gz")
    assert image_2d(volume, volumes=True) is volume
    with pytest.raises(InputFileError, match="pass a slice"):
        image_2d(volume)


def test_bad_radfm_folders_say_what_is_wrong(tmp_path):
    from medfm.errors import CheckpointError, MedfmError
    from medfm.vlm.api import load

    with pytest.raises(MedfmError, match="weights=FOLDER holding its pytorch_model.bin"):
        load("radfm")
    state = write_radfm(tmp_path / "radfm")
    weights = tmp_path / "radfm" / "pytorch_model.bin"
    torch.save({k: t for k, t in state.items() if not k.startswith("embedding_layer.vision_encoder.")}, weights)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: holds no embedding_layer.vision_encoder.\* weights"):
        load("radfm", weights=tmp_path / "radfm")
    torch.save({k: t for k, t in state.items() if k != "embedding_layer.perceiver.layers.1.0.to_q.weight"}, weights)
    with pytest.raises(CheckpointError, match="perceiver and fc's weights do not match its architecture: missing perceiver.layers.1.0.to_q"):
        load("radfm", weights=tmp_path / "radfm")
    torch.save({**state, "embedding_layer.something_new": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match="unexpected weights for RadFM: embedding_layer.something_new"):
        load("radfm", weights=tmp_path / "radfm")
    weights.unlink()
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors or pytorch_model\\*.bin"):
        load("radfm", weights=tmp_path / "radfm")
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read with weights_only=True"):
        load("radfm", weights=tmp_path / "radfm")
    with pytest.raises(MedfmError, match="no such folder"):
        load("radfm", weights=tmp_path / "nowhere")
