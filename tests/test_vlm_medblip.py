"""MedBLIP (github.com/Qybc/MedBLIP) on tiny random checkpoints written here in its trainer's layout
(``model.state_dict()``: ``visual_encoder.patch_embed_3d`` / ``pos_embed_3d`` and the EVA blocks,
``ln_vision``, LAVIS' ``Qformer.bert``, ``query_tokens``, ``proj``, the fp16 LM as ``lm_model.*`` with
GPT-2's mask buffers, the contrastive heads). The volume preparation is compared with MedBLIP's
``dataset.py`` re-done here (SimpleITK read, min-max, aspect-kept trilinear resize, centred pad), and
the logits with a forward pass written here from MedBLIP's ``eva_vit.py`` / LAVIS' Q-Former /
``modeling_medblip_biomedlm.generate`` (the text's embeddings, then the image tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.vlm_tiny import QFORMER, lavis_qformer_layers, lavis_qformer_reference

EVA = {"hidden": 176, "layers": 2, "heads": 2, "mlp": 96, "patch": 4, "grid": 3}  # head width 88, as ViT-g
LM_WIDTH, POSITIONS = 32, 64
WORDS = ["Question:", "Answer:", "what", "will", "this", "subject", "be", "diagnosed", "with", "?", "dementia", "not",
         "demented", "mild", "cognitive", "impairment", "the", "brain", "is", "atrophy", "no", "yes", "."]
QUESTION = "what will this subject be diagnosed with ?"


def tokenizer_for(kind: str):
    """A word-level fast tokenizer: GPT-2's adds nothing in front, BioGPT's puts ``</s>`` first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = {"gpt2": ["<|endoftext|>", "<unk>"], "t5": ["<pad>", "</s>", "<unk>"]}.get(kind, ["<s>", "<pad>", "</s>", "<unk>"])
    vocabulary = {token: index for index, token in enumerate(special + WORDS)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>")
    if kind == "t5":  # T5's tokenizer ends every text with </s>
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def t5_config(vocabulary: int):
    """A tiny FLAN-T5: gated GELU (tanh approximation, as FLAN-T5's config says), lm_head untied."""
    from transformers import T5Config

    return T5Config(vocab_size=vocabulary, d_model=LM_WIDTH, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


def language_model(kind: str, vocabulary: int):
    from transformers import BioGptConfig, BioGptForCausalLM, GPT2Config, GPT2LMHeadModel, T5ForConditionalGeneration

    torch.manual_seed(7)
    if kind == "t5":
        model = T5ForConditionalGeneration(t5_config(vocabulary))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocabulary, LM_WIDTH) * 0.5)  # FLAN-T5's own head
        return model.eval()
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocabulary, n_embd=LM_WIDTH, n_layer=2, n_head=2, n_positions=POSITIONS,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return BioGptForCausalLM(BioGptConfig(vocab_size=vocabulary, hidden_size=LM_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=40, max_position_embeddings=POSITIONS, pad_token_id=1,
                                          bos_token_id=0, eos_token_id=2)).eval()


def write_medblip(folder: Path, kind: str = "gpt2", lm_in_checkpoint: bool = True) -> dict[str, torch.Tensor]:
    """``folder/epoch3.pth`` (MedBLIP's trainer's state dict) and ``folder/lm`` (config + tokenizer;
    the LM's weights there too when ``lm_in_checkpoint`` is False); returns the state dict."""
    g = torch.Generator().manual_seed(11)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    half = lambda t: t.half()  # noqa: E731 - convert_weights_to_fp16: the ViT's Linear layers are stored in fp16
    # small activations, so that the LayerNorms' eps (1e-6 in the ViT, 1e-5 in ln_vision) shows in the outputs
    small = lambda *shape: r(*shape) * 0.05  # noqa: E731
    h, f, p = EVA["hidden"], EVA["mlp"], EVA["patch"]
    state = {"visual_encoder.cls_token": small(1, 1, h), "visual_encoder.pos_embed_3d": small(1, 1 + EVA["grid"] ** 3, h),
             "visual_encoder.patch_embed_3d.proj.weight": small(h, 1, p, p, p), "visual_encoder.patch_embed_3d.proj.bias": small(h),
             "ln_vision.weight": 1 + r(h), "ln_vision.bias": r(h), "query_tokens": r(1, QFORMER["queries"], QFORMER["hidden"])}
    for i in range(EVA["layers"]):
        b = f"visual_encoder.blocks.{i}."
        state |= {b + "norm1.weight": 1 + r(h), b + "norm1.bias": r(h), b + "attn.qkv.weight": half(r(3 * h, h)),
                  b + "attn.q_bias": r(h), b + "attn.v_bias": r(h), b + "attn.proj.weight": half(small(h, h)),
                  b + "attn.proj.bias": half(small(h)), b + "norm2.weight": 1 + r(h), b + "norm2.bias": r(h),
                  b + "mlp.fc1.weight": half(r(f, h)), b + "mlp.fc1.bias": half(r(f)), b + "mlp.fc2.weight": half(small(h, f)),
                  b + "mlp.fc2.bias": half(small(h))}
    q = QFORMER["hidden"]
    # MedBLIP sets Qformer.cls, word_embeddings and position_embeddings to None: only the buffer stays
    state |= {"Qformer.bert.embeddings.LayerNorm.weight": 1 + r(q), "Qformer.bert.embeddings.LayerNorm.bias": r(q),
              "Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1)}
    state |= lavis_qformer_layers(r, h)
    state |= {f"{name}_proj.{kind_}": r(16, q) if kind_ == "weight" else r(16) for name in ("vision", "text", "qa")
              for kind_ in ("weight", "bias")}
    state |= {"temp": torch.tensor(0.07), "proj.weight": r(LM_WIDTH, q), "proj.bias": r(LM_WIDTH)}
    tokenizer = tokenizer_for(kind)
    lm = language_model(kind, len(tokenizer))
    if kind == "t5":  # MedBLIP's T5 model: t5_proj, and the LM in bf16 as t5_model.*
        state["t5_proj.weight"], state["t5_proj.bias"] = state.pop("proj.weight"), state.pop("proj.bias")
        state |= {f"t5_model.{k}": v.bfloat16() for k, v in lm.state_dict().items()}
        t5_config(len(tokenizer)).save_pretrained(folder / "lm")
    elif lm_in_checkpoint:
        state |= {f"lm_model.{k}": v.half() for k, v in lm.state_dict().items()}
        if kind == "gpt2":  # the persistent buffers of the GPT-2 copy MedBLIP ships
            for i in range(2):
                state[f"lm_model.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.bool)).view(
                    1, 1, POSITIONS, POSITIONS)
                state[f"lm_model.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        lm.config.save_pretrained(folder / "lm")
    else:
        lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    torch.save(state, folder / "epoch3.pth")
    return state


def medblip_dataset_volume(path: Path, size: int) -> torch.Tensor:
    """MedBLIP's ``ImageTextContrastiveDataset.__getitem__``: SimpleITK, norm_img, pad_img."""
    import SimpleITK as sitk

    img = torch.FloatTensor(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(float))
    img = (img - img.min()) / (img.max() - img.min())
    x, y, z = img.shape
    largest = max(x, y, z)
    new = (int(size * x / largest), int(size * y / largest), int(size * z / largest))
    img = F.interpolate(img.unsqueeze(0).unsqueeze(0), size=new, mode="trilinear", align_corners=True)
    out = torch.zeros((1, 1, size, size, size))
    x0, y0, z0 = (int((size - n) / 2) for n in new)
    out[:, :, x0:x0 + new[0], y0:y0 + new[1], z0:z0 + new[2]] = img
    return out


def eva_3d_reference(state: dict, volume: torch.Tensor) -> torch.Tensor:
    """``ln_vision(visual_encoder(image))``: MedBLIP's EVA ViT with its 3D patch embedding."""
    s = {k: v.float() for k, v in state.items()}
    v = lambda n: s[f"visual_encoder.{n}"]  # noqa: E731
    h, p = EVA["hidden"], EVA["patch"]
    x = F.conv3d(volume, v("patch_embed_3d.proj.weight"), v("patch_embed_3d.proj.bias"), stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token"), x], 1) + v("pos_embed_3d")
    for i in range(EVA["layers"]):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (h,), v(b + "norm1.weight"), v(b + "norm1.bias"), eps=1e-6)
        bias = torch.cat([v(b + "attn.q_bias"), torch.zeros(h), v(b + "attn.v_bias")])
        qkv = F.linear(y, v(b + "attn.qkv.weight"), bias).reshape(1, -1, 3, EVA["heads"], 88).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(qkv[0] * 88**-0.5 @ qkv[1].transpose(-2, -1), -1) @ qkv[2]
        x = x + F.linear(attention.transpose(1, 2).reshape(1, -1, h), v(b + "attn.proj.weight"), v(b + "attn.proj.bias"))
        y = F.layer_norm(x, (h,), v(b + "norm2.weight"), v(b + "norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, v(b + "mlp.fc1.weight"), v(b + "mlp.fc1.bias"))), v(b + "mlp.fc2.weight"),
                         v(b + "mlp.fc2.bias"))
    return F.layer_norm(x, (h,), s["ln_vision.weight"], s["ln_vision.bias"], eps=1e-5)  # nn.LayerNorm's default


def medblip_reference(state: dict, lm, kind: str, tokenizer, prompt: str, volume: torch.Tensor) -> torch.Tensor:
    """`eva_3d_reference` -> Q-Former bert(query_embeds) -> proj; the LM on [embedded prompt, image
    tokens] (``MedBLIPModel_biomedlm.generate``'s first step)."""
    s = {k: v.float() for k, v in state.items()}
    image = eva_3d_reference(state, volume)
    t = lavis_qformer_reference(s, image)
    tokens = F.linear(t, s["proj.weight"], s["proj.bias"])
    if kind == "image-tokens":
        return tokens
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    table = lm.transformer.wte if kind == "gpt2" else lm.biogpt.embed_tokens  # BioGPT's embedding carries its scale
    return lm(inputs_embeds=torch.cat([table(ids), tokens], dim=1)).logits


def write_volume(path: Path, shape: tuple[int, int, int] = (9, 14, 6), seed: int = 3) -> Path:
    import nibabel as nib

    data = np.random.default_rng(seed).normal(100, 30, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 0.9, 3.0, 1.0])), path)
    return path


def reference_lm(state: dict, kind: str, vocabulary: int):
    lm = language_model(kind, vocabulary)
    lm_state = {k.removeprefix("lm_model."): v.float() for k, v in state.items()
                if k.startswith("lm_model.") and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    lm.load_state_dict(lm_state)
    return lm


@pytest.mark.parametrize("kind", ["gpt2", "biogpt"])
def test_medblip_matches_its_forward_on_a_volume(tmp_path, kind):
    from medfm.vlm.medblip import load_medblip

    state = write_medblip(tmp_path, kind)
    model = load_medblip(tmp_path / "epoch3.pth", tmp_path / "lm")
    volume = write_volume(tmp_path / "brain.nii.gz")
    size = EVA["grid"] * EVA["patch"]
    pixels = model.pixels(volume)
    torch.testing.assert_close(pixels, medblip_dataset_volume(volume, size), atol=0, rtol=0)
    turns = [(QUESTION, None)]
    prompt = model.prompt_format.render(turns)
    assert prompt == f"Question: {QUESTION} Answer: <image>"
    follow_up = model.prompt_format.render([(QUESTION, "dementia"), ("is there atrophy ?", None)])
    assert follow_up == f"Question: {QUESTION} Answer: <image>dementia Question: is there atrophy ? Answer: "
    lm = reference_lm(state, kind, len(model.tokenizer))
    with torch.no_grad():
        expected = medblip_reference(state, lm, kind, model.tokenizer, prompt.removesuffix("<image>"), pixels)
        actual = model.logits(model.prepare(turns, volume))
        torch.testing.assert_close(model.encoder(pixels), eva_3d_reference(state, pixels), atol=1e-5, rtol=0)
    assert actual.shape[1] == len(model.tokenizer(prompt.removesuffix("<image>")).input_ids) + QFORMER["queries"]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert isinstance(model.answer(turns, volume, max_new_tokens=3), str)
    scores = model.score(turns, volume, ["dementia", "not demented"])
    assert len(scores) == 2 and all(np.isfinite(scores))


def test_medblip_takes_the_lm_weights_from_its_folder_when_the_checkpoint_lacks_them(tmp_path):
    from medfm.vlm.medblip import load_medblip

    write_medblip(tmp_path, "gpt2", lm_in_checkpoint=False)
    model = load_medblip(tmp_path / "epoch3.pth", tmp_path / "lm")
    assert model.language_model.config.model_type == "gpt2"


def test_medfm_ask_runs_medblip_on_a_whole_nifti_volume(tmp_path, capsys, monkeypatch):
    import medfm
    from medfm.cli import main

    write_medblip(tmp_path / "medblip", "gpt2")
    volume = write_volume(tmp_path / "brain.nii.gz")
    answer = medfm.ask(volume, QUESTION, model="medblip", weights=tmp_path / "medblip", max_new_tokens=3)
    assert isinstance(answer, str)
    assert medfm.ask(volume, QUESTION, model="medblip", weights=tmp_path / "medblip",
                     choices=["dementia", "not demented"]) in {"dementia", "not demented"}
    conversation = medfm.vlm.api.Conversation(volume, "medblip", weights=tmp_path / "medblip")
    assert all(isinstance(conversation.say(text, max_new_tokens=2), str) for text in (QUESTION, "is there atrophy ?"))
    assert isinstance(medfm.vlm.api.report(volume, conversation.model, max_new_tokens=2), str)
    monkeypatch.setattr("sys.argv", ["medfm", "ask", str(volume), QUESTION, "--model", "medblip", "--weights",
                                     str(tmp_path / "medblip"), "--max-new-tokens", "2", "--json"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0 and json.loads(capsys.readouterr().out)["model"] == "medblip"


def test_medblip_refuses_bad_inputs_in_one_line(tmp_path):
    import medfm
    from medfm.errors import CheckpointError, InputFileError, MedfmError
    from medfm.vlm.medblip import load_medblip

    state = write_medblip(tmp_path / "medblip", "gpt2")
    volume = write_volume(tmp_path / "brain.nii.gz")
    weights = tmp_path / "medblip"

    def refusal(error_type, call) -> str:
        with pytest.raises(error_type) as info:
            call()
        assert "\n" not in str(info.value)
        return str(info.value)

    # inputs, refused before the model loads
    assert "leave out --slice" in refusal(InputFileError, lambda: medfm.ask(volume, QUESTION, model="medblip", weights=weights,
                                                                            slice_index=2))
    image = tmp_path / "slice.png"
    medfm.write_image(np.zeros((8, 8), np.uint8) + 5, image)
    assert "is a 2D image: medblip reads whole 3D volumes" in refusal(
        InputFileError, lambda: medfm.ask(image, QUESTION, model="medblip", weights=weights))
    assert "publishes no weights: pass weights=FOLDER" in refusal(MedfmError, lambda: medfm.vlm.api.load("medblip"))
    model = load_medblip(weights / "epoch3.pth", weights / "lm")
    flat = write_volume(tmp_path / "flat.nii.gz", (1, 30, 30))
    assert "too thin" in refusal(InputFileError, lambda: model.pixels(flat))
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.full((5, 6, 7), 3, np.int16), np.eye(4)), tmp_path / "constant.nii.gz")
    assert "constant.nii.gz: is constant" in refusal(InputFileError, lambda: model.pixels(tmp_path / "constant.nii.gz"))

    # checkpoints
    broken = {k: v for k, v in state.items() if not k.startswith("proj.")}
    torch.save(broken, weights / "epoch3.pth")
    assert "epoch3.pth: holds no proj.weight" in refusal(CheckpointError, lambda: load_medblip(weights / "epoch3.pth", weights / "lm"))
    t5 = {k.replace("lm_model.", "t5_model."): v for k, v in state.items()}
    torch.save(t5, weights / "epoch3.pth")
    assert "holds no t5_proj.weight: not a checkpoint of MedBLIP's FLAN-T5 model" in refusal(
        CheckpointError, lambda: load_medblip(weights / "epoch3.pth", weights / "lm"))
    shrunk = dict(state, **{"visual_encoder.blocks.0.mlp.fc1.weight": torch.zeros(3, EVA["hidden"])})
    torch.save(shrunk, weights / "epoch3.pth")
    assert "3D EVA ViT's weights do not match" in refusal(CheckpointError, lambda: load_medblip(weights / "epoch3.pth",
                                                                                               weights / "lm"))
    torch.save({k: v for k, v in state.items() if k != "visual_encoder.blocks.1.attn.q_bias"}, weights / "epoch3.pth")
    assert "3D EVA ViT lacks visual_encoder.blocks.1.attn.q_bias" in refusal(
        CheckpointError, lambda: load_medblip(weights / "epoch3.pth", weights / "lm"))
    torch.save(state | {"extra.weight": torch.zeros(2)}, weights / "epoch3.pth")
    assert "unexpected weights for MedBLIP's causal-LM model: extra.weight" in refusal(
        CheckpointError, lambda: load_medblip(weights / "epoch3.pth", weights / "lm"))
    torch.save(state, weights / "epoch3.pth")
    config = json.loads((weights / "lm" / "config.json").read_text())
    (weights / "lm" / "config.json").write_text(json.dumps(config | {"n_embd": 2 * LM_WIDTH}))
    assert f"proj.weight maps into {LM_WIDTH} dimensions" in refusal(CheckpointError, lambda: load_medblip(weights / "epoch3.pth",
                                                                                                  weights / "lm"))
    (weights / "epoch3.pth").write_bytes(b"not a checkpoint")
    assert "epoch3.pth: cannot be read with weights_only=True" in refusal(
        CheckpointError, lambda: load_medblip(weights / "epoch3.pth", weights / "lm"))
    (weights / "epoch4.pth").write_bytes(b"")
    assert "needs exactly one MedBLIP checkpoint" in refusal(InputFileError, lambda: medfm.vlm.api.load("medblip", weights=weights))


def test_medblip_flan_t5_variant_matches_its_forward(tmp_path):
    from transformers import T5ForConditionalGeneration

    from medfm.vlm.medblip import MedBlipT5Model, load_medblip

    state = write_medblip(tmp_path, "t5")
    model = load_medblip(tmp_path / "epoch3.pth", tmp_path / "lm")
    assert isinstance(model, MedBlipT5Model)
    volume = write_volume(tmp_path / "brain.nii.gz")
    turns = [(QUESTION, None)]
    prompt = model.prompt_format.render(turns).removesuffix("<image>")
    config = t5_config(len(model.tokenizer))
    config.dense_act_fn = "gelu"  # modeling_medblip_t5.py overrides FLAN-T5's activation
    reference = T5ForConditionalGeneration(config).eval()
    reference.lm_head.weight = torch.nn.Parameter(torch.empty(len(model.tokenizer), LM_WIDTH))
    reference.load_state_dict({k.removeprefix("t5_model."): v.float() for k, v in state.items() if k.startswith("t5_model.")})
    s = {k.replace("t5_proj.", "proj."): v for k, v in state.items()}
    pixels = model.pixels(volume)
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, -1] == 1  # the prompt's </s> comes before the image tokens, as in MedBLIP
    decoder = torch.tensor([[0, 5, 9]])
    with torch.no_grad():
        image = medblip_reference(s, None, "image-tokens", None, prompt, pixels)
        expected = reference(inputs_embeds=torch.cat([reference.get_input_embeddings()(ids), image], 1), decoder_input_ids=decoder).logits
        actual = model.logits(model.prepare(turns, volume), decoder)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert isinstance(model.answer(turns, volume, max_new_tokens=3), str)
    scores = model.score(turns, volume, ["dementia", "not demented"])
    with torch.no_grad():  # "not demented": log p(not | start) + log p(demented | start, not)
        embeds = model.prepare(turns, volume)
        words = model.tokenizer("not demented", add_special_tokens=False).input_ids
        log_probs = torch.log_softmax(model.logits(embeds, torch.tensor([[0, words[0]]])), -1)[0]
    assert scores[1] == pytest.approx(float(log_probs[0, words[0]] + log_probs[1, words[1]]), abs=1e-5)
