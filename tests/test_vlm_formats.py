"""Published vision-language layouts on tiny random checkpoints that the tests write themselves:
LLaVA-Med v1.5's folder (LLaVA's keys, the CLIP tower in its own folder) and transformers' llava
folder (transformers 4 and 5 key layouts). Each is compared with a forward pass written here from
the original architecture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfm.vlm.formats import load_llava_folder
from tests.vlm_tiny import QFORMER, VISION, lavis_qformer_layers, lavis_qformer_reference, llama_config, tiny_tokenizer

IMAGE = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
QUESTION = "is there a pleural effusion ?"


def _clip_vision_state(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    return tower, {f"vision_model.{k}": v for k, v in tower.state_dict().items()}  # as CLIPModel files name them


def llava_reference(tower, projector: list[torch.Tensor], lm, tokenizer, prompt: str, pixels: torch.Tensor,
                    select_layer: int = -2) -> torch.Tensor:
    """LLaVA's forward: CLIP hidden layer ``select_layer`` without the class token, Linear-GELU-Linear,
    the prompt tokenized per chunk around ``<image>`` (BOS on the first only), the image features
    spliced in, the LM run on the embeddings."""
    features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    w0, b0, w2, b2 = projector
    image = F.linear(F.gelu(F.linear(features, w0, b0)), w2, b2)[0]
    before, after = prompt.split("<image>")
    ids_before = tokenizer(before).input_ids
    ids_after = tokenizer(after).input_ids[1:]  # LLaVA strips the BOS of later chunks
    table = lm.get_input_embeddings().weight
    embeds = torch.cat([table[ids_before], image, table[ids_after]]).unsqueeze(0)
    return lm(inputs_embeds=embeds).logits


def write_llava_med(folder: Path) -> tuple[Path, Path]:
    """A LLaVA-Med v1.5 folder (LlavaMistralForCausalLM keys, mlp2x_gelu projector) and the CLIP
    folder its ``mm_vision_tower`` names, tiny and random."""
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = tiny_tokenizer()
    config = {**llama_config(len(tokenizer)), "model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
              "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": VISION["hidden_size"],
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "sliding_window": None}
    torch.manual_seed(1)
    lm = MistralForCausalLM(MistralConfig(**{k: v for k, v in config.items() if not k.startswith("mm_")}))
    state = dict(lm.state_dict())
    g = torch.Generator().manual_seed(2)
    hidden, width = VISION["hidden_size"], config["hidden_size"]
    state |= {"model.mm_projector.0.weight": torch.randn(width, hidden, generator=g) * 0.2,
              "model.mm_projector.0.bias": torch.randn(width, generator=g) * 0.1,
              "model.mm_projector.2.weight": torch.randn(width, width, generator=g) * 0.2,
              "model.mm_projector.2.bias": torch.randn(width, generator=g) * 0.1}
    folder.mkdir(parents=True)
    half = len(state) // 2  # sharded, as the published 7B folder
    keys = sorted(state)
    save_file({k: state[k].contiguous() for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k].contiguous() for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    clip_folder = folder.parent / "clip-vit"
    clip_folder.mkdir()
    _, tower_state = _clip_vision_state(3)
    text_part = {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.tensor(1.0)}
    save_file({**tower_state, **text_part}, clip_folder / "model.safetensors")  # a whole CLIPModel: the text tower is left out
    (clip_folder / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": VISION}))
    return folder, clip_folder


@pytest.fixture(scope="module")
def llava_med(tmp_path_factory):
    folder, clip_folder = write_llava_med(tmp_path_factory.mktemp("llava-med") / "llava-med-v1.5-mistral-7b")
    return load_llava_folder(folder, vision_tower=clip_folder), folder, clip_folder


def test_llava_med_matches_llava_forward(llava_med):
    from safetensors.torch import load_file
    from transformers import MistralConfig, MistralForCausalLM

    model, folder, clip_folder = llava_med
    tower, _ = _clip_vision_state(3)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    config = json.loads((folder / "config.json").read_text())
    lm = MistralForCausalLM(MistralConfig(**{k: v for k, v in config.items() if not k.startswith("mm_")})).eval()
    lm.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.mm_projector.")})
    projector = [state[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")]
    turns = [(QUESTION, None)]
    prompt = model.prompt_format.render(turns)
    assert prompt == "[INST] <image>\n" + QUESTION + " [/INST]"
    pixels = model.pixels(IMAGE)
    with torch.no_grad():
        expected = llava_reference(tower, projector, lm, model.tokenizer, prompt, pixels)
        actual = model.logits(model.prepare(turns, IMAGE))
    assert actual.shape == expected.shape and actual.shape[1] > VISION_TOKENS
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


VISION_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2


def test_llava_med_preprocess_pads_to_a_square(llava_med):
    model = llava_med[0]
    pixels = model.pixels(IMAGE)
    assert pixels.shape == (1, 3, VISION["image_size"], VISION["image_size"])
    assert torch.all(pixels[0, :, :, 0] == 0)  # 40x30 padded left and right with the mean (0 after normalising)


def test_llava_med_generates_and_scores(llava_med):
    model = llava_med[0]
    pieces = []
    text = model.generate(model.prepare([(QUESTION, None)], IMAGE), max_new_tokens=5, stream=pieces.append)
    assert isinstance(text, str) and "".join(pieces).strip() == text
    scores = model.score([(QUESTION, None)], IMAGE, ["yes", "no"])
    assert len(scores) == 2 and all(s < 0 for s in scores) and scores[0] != scores[1]


def test_llava_med_without_the_tower_names_the_fix(tmp_path):
    from medfm.errors import CheckpointError

    folder, _ = write_llava_med(tmp_path / "llava-med")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_llava_folder(folder, vision_tower=tmp_path / "clip-vit")


# transformers' llava folder


def write_transformers_llava(folder: Path, layout: int) -> torch.nn.Module:
    """A transformers llava folder (CLIP + Llama), tiny and random; ``layout`` 4 renames the keys
    as transformers 4 saved them."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**llama_config(len(tokenizer))),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(4)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers' default init leaves the projector biases at zero
        for parameter in model.model.multi_modal_projector.parameters():
            parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    if layout == 4:
        file = folder / "model.safetensors"
        from safetensors.torch import load_file

        renamed = {}
        for key, value in load_file(file).items():
            if key.startswith("model.language_model."):
                key = "language_model.model." + key.removeprefix("model.language_model.")
            elif key.startswith("lm_head."):
                key = "language_model." + key
            else:
                key = key.removeprefix("model.")
            renamed[key] = value
        save_file(renamed, file)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": {"height": 28, "width": 28}}))
    return model


@pytest.mark.parametrize("layout", [4, 5])
def test_transformers_llava_matches_transformers(tmp_path, layout):
    reference = write_transformers_llava(tmp_path / "llava", layout)
    model = load_llava_folder(tmp_path / "llava")
    turns = [(QUESTION, None)]
    prompt = model.prompt_format.render(turns)
    assert prompt == "USER: <image>\n" + QUESTION + " ASSISTANT:"
    pixels = model.pixels(IMAGE)
    before, after = prompt.split("<image>")
    ids = (model.tokenizer(before).input_ids + [reference.config.image_token_id] * VISION_TOKENS
           + model.tokenizer(after, add_special_tokens=False).input_ids)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        actual = model.logits(model.prepare(turns, IMAGE))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert model.generate(model.prepare(turns, IMAGE), max_new_tokens=3) is not None


# XrayGPT (MiniGPT-4: EVA ViT + ln_vision + BLIP-2 Q-Former + llama_proj)

EVA = {"hidden": 176, "layers": 2, "heads": 2, "mlp": 96, "patch": 14, "image": 28}  # head width 88, as ViT-g


def write_xraygpt(folder: Path) -> tuple[Path, Path, Path]:
    """XrayGPT's three files, tiny and random: the LAVIS BLIP-2 checkpoint (EVA ViT, ln_vision,
    Q-Former with its text-only parts, query tokens), XrayGPT's ``{'model': {llama_proj...}}`` and
    the Vicuna (LLaMA) folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    h, f = EVA["hidden"], EVA["mlp"]
    blip2 = {"visual_encoder.cls_token": r(1, 1, h), "visual_encoder.pos_embed": r(1, 5, h),
             "visual_encoder.patch_embed.proj.weight": r(h, 3, 14, 14), "visual_encoder.patch_embed.proj.bias": r(h),
             "ln_vision.weight": 1 + r(h), "ln_vision.bias": r(h), "query_tokens": r(1, QFORMER["queries"], QFORMER["hidden"])}
    for i in range(EVA["layers"]):
        b = f"visual_encoder.blocks.{i}."
        blip2 |= {b + "norm1.weight": 1 + r(h), b + "norm1.bias": r(h), b + "attn.qkv.weight": r(3 * h, h),
                  b + "attn.q_bias": r(h), b + "attn.v_bias": r(h), b + "attn.proj.weight": r(h, h), b + "attn.proj.bias": r(h),
                  b + "norm2.weight": 1 + r(h), b + "norm2.bias": r(h), b + "mlp.fc1.weight": r(f, h), b + "mlp.fc1.bias": r(f),
                  b + "mlp.fc2.weight": r(h, f), b + "mlp.fc2.bias": r(h)}
    q = QFORMER["hidden"]
    blip2 |= {"Qformer.bert.embeddings.LayerNorm.weight": 1 + r(q), "Qformer.bert.embeddings.LayerNorm.bias": r(q),
              "Qformer.bert.embeddings.word_embeddings.weight": r(30, q), "Qformer.bert.embeddings.position_embeddings.weight": r(8, q),
              "Qformer.cls.predictions.bias": r(30)}
    blip2 |= lavis_qformer_layers(r, h)
    folder.mkdir(parents=True)
    torch.save({"model": blip2}, folder / "blip2_pretrained_flant5xxl.pth")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(6)
    llama = LlamaForCausalLM(LlamaConfig(**llama_config(len(tokenizer))))
    llama.save_pretrained(folder / "vicuna_radiology")
    tokenizer.save_pretrained(folder / "vicuna_radiology")
    torch.save({"model": {"llama_proj.weight": r(32, q), "llama_proj.bias": r(32)}}, folder / "xraygpt_pretrained1.pth")
    return folder / "xraygpt_pretrained1.pth", folder / "blip2_pretrained_flant5xxl.pth", folder / "vicuna_radiology"


def minigpt4_reference(blip2: dict, proj: dict, lm, tokenizer, prompt: str, pixels: torch.Tensor) -> torch.Tensor:
    """MiniGPT-4's forward: ln_vision(EVA ViT) -> Q-Former bert(query_embeds=query_tokens) -> llama_proj,
    spliced at <ImageHere> with the BOS on the first segment only (``get_context_emb``)."""
    v = lambda n: blip2[f"visual_encoder.{n}"]  # noqa: E731
    h = EVA["hidden"]
    x = F.conv2d(pixels, v("patch_embed.proj.weight"), v("patch_embed.proj.bias"), stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token"), x], 1) + v("pos_embed")
    for i in range(EVA["layers"]):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (h,), v(b + "norm1.weight"), v(b + "norm1.bias"), eps=1e-6)
        bias = torch.cat([v(b + "attn.q_bias"), torch.zeros(h), v(b + "attn.v_bias")])
        qkv = F.linear(y, v(b + "attn.qkv.weight"), bias).reshape(1, -1, 3, EVA["heads"], 88).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(qkv[0] * 88 ** -0.5 @ qkv[1].transpose(-2, -1), -1) @ qkv[2]
        x = x + F.linear(attention.transpose(1, 2).reshape(1, -1, h), v(b + "attn.proj.weight"), v(b + "attn.proj.bias"))
        y = F.layer_norm(x, (h,), v(b + "norm2.weight"), v(b + "norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, v(b + "mlp.fc1.weight"), v(b + "mlp.fc1.bias"))), v(b + "mlp.fc2.weight"), v(b + "mlp.fc2.bias"))
    image = F.layer_norm(x, (h,), blip2["ln_vision.weight"], blip2["ln_vision.bias"], eps=1e-6)

    t = lavis_qformer_reference(blip2, image)
    tokens = F.linear(t, proj["llama_proj.weight"], proj["llama_proj.bias"])[0]
    before, after = prompt.split("<ImageHere>")
    table = lm.get_input_embeddings().weight
    ids_before = tokenizer(before, add_special_tokens=True).input_ids
    ids_after = tokenizer(after, add_special_tokens=False).input_ids
    return lm(inputs_embeds=torch.cat([table[ids_before], tokens, table[ids_after]]).unsqueeze(0)).logits


def test_xraygpt_matches_minigpt4_forward(tmp_path):
    from transformers import LlamaForCausalLM

    from medfm.vlm.formats import load_xraygpt

    checkpoint, blip2_file, vicuna = write_xraygpt(tmp_path / "xraygpt")
    model = load_xraygpt(checkpoint, blip2_file, vicuna)
    blip2 = torch.load(blip2_file, weights_only=True)["model"]
    proj = torch.load(checkpoint, weights_only=True)["model"]
    lm = LlamaForCausalLM.from_pretrained(vicuna).eval()
    turns = [("is there a pleural effusion ?", None)]
    prompt = model.prompt_format.render(turns)
    assert prompt.endswith("###Patient: <Img><ImageHere></Img> is there a pleural effusion ?###Doctor:")
    pixels = model.pixels(IMAGE)
    assert pixels.shape == (1, 3, EVA["image"], EVA["image"])  # stretched, as BLIP-2's eval processor
    with torch.no_grad():
        expected = minigpt4_reference(blip2, proj, lm, model.tokenizer, prompt, pixels)
        actual = model.logits(model.prepare(turns, IMAGE))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert isinstance(model.answer(turns, IMAGE, max_new_tokens=3), str)


def test_xraygpt_names_the_file_that_lacks_its_part(tmp_path):
    from medfm.errors import CheckpointError
    from medfm.vlm.formats import load_xraygpt

    checkpoint, blip2_file, vicuna = write_xraygpt(tmp_path / "xraygpt")
    with pytest.raises(CheckpointError, match="blip2_pretrained_flant5xxl.pth: holds no llama_proj"):
        load_xraygpt(blip2_file, blip2_file, vicuna)


def test_xraygpt_loads_by_name_from_one_folder(tmp_path):
    from medfm.errors import InputFileError
    from medfm.vlm.api import load

    checkpoint, _, _ = write_xraygpt(tmp_path / "xraygpt")
    assert load("xraygpt", weights=tmp_path / "xraygpt").prompt_format.name == "xraygpt"
    checkpoint.unlink()
    with pytest.raises(InputFileError, match="one other .pth"):
        load("xraygpt", weights=tmp_path / "xraygpt")


def test_cli_ask_report_and_chat_with_a_llava_folder(tmp_path, capsys, monkeypatch):
    import medfm
    from medfm.cli import main

    def run(*argv: str) -> str:
        monkeypatch.setattr("sys.argv", ["medfm", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    write_transformers_llava(tmp_path / "llava", 5)
    image = tmp_path / "cxr.png"
    medfm.write_image(IMAGE, image)
    folder = str(tmp_path / "llava")
    answer = json.loads(run("ask", str(image), QUESTION, "--model", folder, "--json", "--choices", "yes", "no"))["answer"]
    assert answer in {"yes", "no"}
    assert run("report", str(image), "--model", folder, "--max-new-tokens", "3").endswith("\n")
    replies = iter(["what is shown ?", "is there a finding ?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    assert run("chat", str(image), "--model", folder, "--max-new-tokens", "2").count("model> ") == 2


# Med-Flamingo (OpenFlamingo: CLIP ViT-L/14 tokens -> perceiver; gated cross-attention every N LLaMA layers)


def write_med_flamingo(folder: Path) -> tuple[Path, Path, Path]:
    """Med-Flamingo's model.pt (perceiver, gated cross-attention before layers 1 and 3 of 4, the
    trained embeddings of the added tokens), the LLaMA folder and the CLIP folder, tiny and random."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(8)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    d, inner, text = VISION["hidden_size"], 64, 32
    state = {"perceiver.latents": r(3, d), "perceiver.norm.weight": 1 + r(d), "perceiver.norm.bias": r(d)}
    for i in range(2):
        p = f"perceiver.layers.{i}."
        state |= {p + "0.norm_media.weight": 1 + r(d), p + "0.norm_media.bias": r(d), p + "0.norm_latents.weight": 1 + r(d),
                  p + "0.norm_latents.bias": r(d), p + "0.to_q.weight": r(inner, d), p + "0.to_kv.weight": r(2 * inner, d),
                  p + "0.to_out.weight": r(d, inner), p + "1.0.weight": 1 + r(d), p + "1.0.bias": r(d),
                  p + "1.1.weight": r(4 * d, d), p + "1.3.weight": r(d, 4 * d)}
    for i in (1, 3):
        p = f"lang_encoder.gated_cross_attn_layers.{i}."
        block = {"attn.norm.weight": 1 + r(text), "attn.norm.bias": r(text), "attn.to_q.weight": r(inner, text),
                 "attn.to_kv.weight": r(2 * inner, d), "attn.to_out.weight": r(text, inner), "attn_gate": r(1) + 0.5,
                 "ff.0.weight": 1 + r(text), "ff.0.bias": r(text), "ff.1.weight": r(4 * text, text),
                 "ff.3.weight": r(text, 4 * text), "ff_gate": r(1) + 0.5}
        state |= {p + k: v for k, v in block.items()}
        state |= {f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.{k}": v for k, v in block.items()}  # FlamingoLayer's copy
    tokenizer = tiny_tokenizer()
    rows = len(tokenizer) + 2  # <|endofchunk|> and <PAD> added by OpenFlamingo (<image> is already in this one)
    state |= {"lang_encoder.model.embed_tokens.weight": r(rows, text), "lang_encoder.lm_head.weight": r(rows, text)}
    folder.mkdir(parents=True)
    torch.save(state, folder / "model.pt")
    torch.manual_seed(9)
    llama = LlamaForCausalLM(LlamaConfig(**{**llama_config(len(tokenizer)), "num_hidden_layers": 4}))
    llama.save_pretrained(folder / "llama-7b")
    tokenizer.save_pretrained(folder / "llama-7b")
    (folder / "clip-vit-large-patch14").mkdir()
    save_file(_clip_vision_state(10)[1], folder / "clip-vit-large-patch14" / "model.safetensors")
    (folder / "clip-vit-large-patch14" / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": VISION}))
    return folder / "model.pt", folder / "llama-7b", folder / "clip-vit-large-patch14"


def open_flamingo_reference(state: dict, tower, lm, ids: torch.Tensor, image_id: int, pixels: torch.Tensor) -> torch.Tensor:
    """OpenFlamingo's forward (helpers.py): ln_post'ed patch tokens -> PerceiverResampler; before
    each gated layer, MaskedCrossAttention (text attends only after its <image>) and the FF, each
    through a tanh gate; injected here with forward pre-hooks on transformers' LLaMA layers."""
    heads, dh = 1, 64

    def attention(q, k, v, mask=None):
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dh).transpose(1, 2)  # noqa: E731
        sim = (split(q) * dh ** -0.5) @ split(k).transpose(-2, -1)
        if mask is not None:
            sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(-1)
        if mask is not None:
            attn = attn.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return (attn @ split(v)).transpose(1, 2).flatten(2)

    def ln(x, prefix):
        return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-5)

    def ff(x, prefix):
        return F.linear(F.gelu(F.linear(ln(x, prefix + ".0"), state[prefix + ".1.weight"])), state[prefix + ".3.weight"])

    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    media = tower.post_layernorm(hidden)[:, 1:]
    latents = state["perceiver.latents"][None]
    for i in range(2):
        p = f"perceiver.layers.{i}."
        x, lat = ln(media, p + "0.norm_media"), ln(latents, p + "0.norm_latents")
        k, v = F.linear(torch.cat([x, lat], 1), state[p + "0.to_kv.weight"]).chunk(2, -1)
        latents = F.linear(attention(F.linear(lat, state[p + "0.to_q.weight"]), k, v), state[p + "0.to_out.weight"]) + latents
        latents = ff(latents, p + "1") + latents
    media = ln(latents, "perceiver.norm")
    text_time = (ids == image_id).cumsum(-1)
    mask = (text_time[None, None, :, None] == 1).expand(1, heads, len(ids), media.shape[1])

    def hook(index):
        def gated(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            p = f"lang_encoder.gated_cross_attn_layers.{index}."
            k, v = F.linear(media, state[p + "attn.to_kv.weight"]).chunk(2, -1)
            q = F.linear(ln(x, p + "attn.norm"), state[p + "attn.to_q.weight"])
            x = F.linear(attention(q, k, v, mask), state[p + "attn.to_out.weight"]) * state[p + "attn_gate"].tanh() + x
            x = ff(x, p + "ff") * state[p + "ff_gate"].tanh() + x
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return gated

    handles = [lm.model.layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in (1, 3)]
    try:
        return lm(input_ids=ids[None]).logits
    finally:
        for handle in handles:
            handle.remove()


def test_med_flamingo_matches_open_flamingo_forward(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from medfm.vlm.formats import load_med_flamingo

    checkpoint, llama_folder, clip_folder = write_med_flamingo(tmp_path / "med-flamingo")
    model = load_med_flamingo(checkpoint, llama_folder, clip_folder)
    state = torch.load(checkpoint, weights_only=True)
    tower, _ = _clip_vision_state(10)
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lm = LlamaForCausalLM.from_pretrained(llama_folder).eval()
    lm.resize_token_embeddings(len(tokenizer))
    lm.model.embed_tokens.weight.data.copy_(state["lang_encoder.model.embed_tokens.weight"])
    lm.lm_head.weight.data.copy_(state["lang_encoder.lm_head.weight"])
    turns = [("is there a pleural effusion ?", None)]
    prompt = model.prompt_format.render(turns)
    assert prompt.endswith("question. <image>Question: is there a pleural effusion ? Answer:")
    ids = torch.tensor(tokenizer(prompt).input_ids)
    pixels = model.pixels(IMAGE)
    with torch.no_grad():
        expected = open_flamingo_reference(state, tower, lm, ids, tokenizer.convert_tokens_to_ids("<image>"), pixels)
        actual = model.logits(model.prepare(turns, IMAGE))
        without_image = model.logits(model.prepare(turns, None))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(actual[0, -1], without_image[0, -1], atol=1e-3)  # the gates are open: the image matters
    assert isinstance(model.answer(turns, IMAGE, max_new_tokens=4), str)
    assert len(model.score(turns, IMAGE, ["yes", "no"])) == 2


def test_med_flamingo_loads_by_name_from_one_folder(tmp_path):
    from medfm.errors import InputFileError
    from medfm.vlm.api import load

    write_med_flamingo(tmp_path / "med-flamingo")
    assert load("med-flamingo", weights=tmp_path / "med-flamingo").prompt_format.name == "med-flamingo"
    (tmp_path / "med-flamingo" / "clip-vit-large-patch14" / "config.json").unlink()
    with pytest.raises(InputFileError, match="one CLIP folder"):
        load("med-flamingo", weights=tmp_path / "med-flamingo")


def test_a_bundled_registry_entry_loads_its_llava_folder(tmp_path):
    # how a medfm-trained vision-language model shipped in the package registers (``bundled:`` is a
    # folder below medfm/; an absolute path stands in for it here)
    from medfm.catalog.registry import ModelEntry

    folder = tmp_path / "tiny-llava"
    write_transformers_llava(folder, 5)
    entry = ModelEntry("tiny-bundled-vlm", "vlm", "llava-med", "medfm.vlm.api:build_llava", f"bundled:{folder}", "",
                       prompts=("text",), offline=True)
    model = entry.build()
    assert hasattr(model, "answer")
