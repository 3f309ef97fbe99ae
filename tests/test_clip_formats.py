"""Published layouts on tiny random checkpoints that the tests write themselves: BiomedCLIP's
open_clip hub folder (timm ViT + Hugging Face BERT) and CheXzero's OpenAI CLIP state dict. Each is
compared with a forward pass written here from the original architectures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medfm
from medfm.clip.preprocess import CHEXZERO_PREPROCESS
from tests.test_clip_model import WORDS, tiny_bert_config

HIDDEN, EMBED, PATCH, IMAGE = 128, 32, 16, 32  # 2 heads of 64, a 2x2 patch grid


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * 0.05


# BiomedCLIP


def write_biomedclip(folder: Path, pooler: str = "cls_last_hidden_state_pooler") -> Path:
    """An open_clip hf-hub folder in BiomedCLIP's layout, tiny and random."""
    from transformers import BertConfig, BertModel

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    state = {"visual.trunk.cls_token": _randn(g, 1, 1, HIDDEN), "visual.trunk.pos_embed": _randn(g, 1, 5, HIDDEN),
             "visual.trunk.patch_embed.proj.weight": _randn(g, HIDDEN, 3, PATCH, PATCH),
             "visual.trunk.patch_embed.proj.bias": _randn(g, HIDDEN),
             "visual.trunk.norm.weight": 1 + _randn(g, HIDDEN), "visual.trunk.norm.bias": _randn(g, HIDDEN),
             "visual.head.proj.weight": _randn(g, EMBED, HIDDEN), "logit_scale": torch.tensor(4.0)}
    for i in range(2):
        block = f"visual.trunk.blocks.{i}."
        shapes = {"norm1": (HIDDEN,), "attn.qkv": (3 * HIDDEN, HIDDEN), "attn.proj": (HIDDEN, HIDDEN), "norm2": (HIDDEN,),
                  "mlp.fc1": (2 * HIDDEN, HIDDEN), "mlp.fc2": (HIDDEN, 2 * HIDDEN)}
        for name, shape in shapes.items():
            state[f"{block}{name}.weight"] = (1 + _randn(g, *shape)) if name.startswith("norm") else _randn(g, *shape) * 4
            state[f"{block}{name}.bias"] = _randn(g, shape[0])
    torch.manual_seed(1)
    bert = BertModel(BertConfig(**tiny_bert_config(len(WORDS) + 5, HIDDEN)))  # with its pooler: open_clip files may hold one
    state.update({f"text.transformer.{k}": v for k, v in bert.state_dict().items()})
    middle = (HIDDEN + EMBED) // 2  # open_clip's MLP projection width
    state["text.proj.0.weight"], state["text.proj.2.weight"] = _randn(g, middle, HIDDEN) * 4, _randn(g, EMBED, middle) * 4
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    config = {"model_cfg": {"embed_dim": EMBED,
                            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                                           "timm_proj": "linear", "image_size": IMAGE},
                            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                         "hf_proj_type": "mlp", "hf_pooler_type": pooler, "context_length": 256}},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return folder


def timm_vit_reference(state: dict, pixels: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """timm's VisionTransformer (pre-norm blocks, LayerNorm eps 1e-6, exact GELU, class token after
    the final norm) and open_clip's linear head."""
    p = "visual.trunk."
    x = F.conv2d(pixels, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[p + "cls_token"].expand(len(x), -1, -1), x], 1) + state[p + "pos_embed"]
    ln = lambda t, n: F.layer_norm(t, (HIDDEN,), state[f"{n}.weight"], state[f"{n}.bias"], eps=1e-6)
    lin = lambda t, n: F.linear(t, state[f"{n}.weight"], state[f"{n}.bias"])
    for i in range(2):
        b = f"{p}blocks.{i}."
        batch, tokens, _ = x.shape
        q, k, v = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        x = x + lin(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, HIDDEN), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return F.normalize(ln(x, p + "norm")[:, 0] @ state["visual.head.proj.weight"].T, dim=-1)


def test_biomedclip_open_clip_folder_matches_the_original_towers(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = write_biomedclip(tmp_path / "BiomedCLIP")
    model = medfm.clip.load(folder)
    assert model.preprocess.image_size == IMAGE and model.preprocess.resize == "shortest-side-crop"
    assert model.config["context_length"] == 256 and float(model.logit_scale.detach()) == 4.0
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    expected = timm_vit_reference(state, model.pixels([rgb]))
    assert torch.allclose(model.encode_image(rgb), expected, atol=1e-5)
    # text: the BERT's class token through open_clip's MLP projection
    bert = BertModel(BertConfig(**tiny_bert_config(len(WORDS) + 5, HIDDEN)), add_pooling_layer=False).eval()
    bert.load_state_dict({k.removeprefix("text.transformer."): v for k, v in state.items()
                          if k.startswith("text.transformer.") and ".pooler." not in k})
    tokens = model.tokenizer(["no pneumonia"], return_tensors="pt")
    cls = bert(**tokens).last_hidden_state[:, 0]
    projected = F.gelu(cls @ state["text.proj.0.weight"].T) @ state["text.proj.2.weight"].T
    assert torch.allclose(model.encode_text("no pneumonia"), F.normalize(projected, dim=-1), atol=1e-5)
    # and it saves as a medfm folder that loads back the same
    again = medfm.clip.load(model.save_pretrained(tmp_path / "converted"))
    assert torch.allclose(again.encode_image(rgb), expected, atol=1e-5)


def test_open_clip_layouts_medfm_does_not_map_are_refused(tmp_path: Path) -> None:
    folder = write_biomedclip(tmp_path / "pooled", pooler="cls_pooler")
    with pytest.raises(medfm.CheckpointError, match="open_clip_config.json.*timm ViT"):
        medfm.clip.load(folder)
    folder = write_biomedclip(tmp_path / "broken")
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    del state["visual.trunk.norm.weight"]
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(medfm.CheckpointError, match="no 'visual.trunk.norm.weight'"):
        medfm.clip.load(folder)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(medfm.CheckpointError, match="open_clip_pytorch_model.bin: cannot be read"):
        medfm.clip.load(folder)


# CheXzero / OpenAI CLIP


def write_clip_tokenizer(folder: Path):
    """OpenAI CLIP's byte-level BPE tokenizer over single letters (no merges)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {f"{c}</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", **special}))
    return AutoTokenizer.from_pretrained(str(folder))


def openai_clip_state(vocab: int = 54, context: int = 16) -> dict[str, torch.Tensor]:
    """OpenAI CLIP ViT keys as CheXzero saves them (width 128, one block per tower)."""
    g = torch.Generator().manual_seed(2)
    state = {"visual.class_embedding": _randn(g, HIDDEN), "visual.positional_embedding": _randn(g, 5, HIDDEN),
             "visual.conv1.weight": _randn(g, HIDDEN, 3, PATCH, PATCH), "visual.proj": _randn(g, HIDDEN, EMBED),
             "token_embedding.weight": _randn(g, vocab, HIDDEN) * 10, "positional_embedding": _randn(g, context, HIDDEN),
             "text_projection": _randn(g, HIDDEN, EMBED), "logit_scale": torch.tensor(4.6052)}
    for norm in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        state[f"{norm}.weight"], state[f"{norm}.bias"] = 1 + _randn(g, HIDDEN), _randn(g, HIDDEN)
    for tower in ("visual.transformer", "transformer"):
        block = f"{tower}.resblocks.0."
        shapes = {"attn.in_proj_": (3 * HIDDEN, HIDDEN), "attn.out_proj.": (HIDDEN, HIDDEN), "ln_1.": (HIDDEN,), "ln_2.": (HIDDEN,),
                  "mlp.c_fc.": (4 * HIDDEN, HIDDEN), "mlp.c_proj.": (HIDDEN, 4 * HIDDEN)}
        for name, shape in shapes.items():
            state[f"{block}{name}weight"] = (1 + _randn(g, *shape)) if name.startswith("ln") else _randn(g, *shape) * 4
            state[f"{block}{name}bias"] = _randn(g, shape[0])
    return state


def _openai_block(state: dict, block: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenAI CLIP's ResidualAttentionBlock (nn.MultiheadAttention, QuickGELU, LayerNorm eps 1e-5)."""
    attention = torch.nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
    attention.load_state_dict({"in_proj_weight": state[block + "attn.in_proj_weight"], "in_proj_bias": state[block + "attn.in_proj_bias"],
                               "out_proj.weight": state[block + "attn.out_proj.weight"], "out_proj.bias": state[block + "attn.out_proj.bias"]})
    ln = lambda t, n: F.layer_norm(t, (HIDDEN,), state[f"{block}{n}.weight"], state[f"{block}{n}.bias"])
    h = ln(x, "ln_1")
    x = x + attention(h, h, h, attn_mask=mask, need_weights=False)[0]
    hidden = F.linear(ln(x, "ln_2"), state[block + "mlp.c_fc.weight"], state[block + "mlp.c_fc.bias"])
    return x + F.linear(hidden * torch.sigmoid(1.702 * hidden), state[block + "mlp.c_proj.weight"], state[block + "mlp.c_proj.bias"])


def test_chexzero_state_dict_matches_openai_clip(tmp_path: Path) -> None:
    tokenizer = write_clip_tokenizer(tmp_path / "tokenizer")
    state = openai_clip_state()
    torch.save(state, tmp_path / "best_64_5e-05_original_22000_0.864.pt")
    model = medfm.clip.load("chexzero", weights=tmp_path / "best_64_5e-05_original_22000_0.864.pt", tokenizer=tmp_path / "tokenizer")
    assert model.preprocess.image_size == IMAGE and model.preprocess.resize == CHEXZERO_PREPROCESS.resize
    assert model.preprocess.mean == CHEXZERO_PREPROCESS.mean and model.config["context_length"] == 16
    rgb = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    pixels = model.pixels([rgb])
    ln = lambda t, n: F.layer_norm(t, (HIDDEN,), state[f"{n}.weight"], state[f"{n}.bias"])
    with torch.no_grad():
        x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
        x = torch.cat([state["visual.class_embedding"].expand(1, 1, -1), x], 1) + state["visual.positional_embedding"]
        x = _openai_block(state, "visual.transformer.resblocks.0.", ln(x, "visual.ln_pre"), None)
        image = F.normalize(ln(x[:, 0], "visual.ln_post") @ state["visual.proj"], dim=-1)
        ids = torch.tensor(tokenizer("no pneumonia")["input_ids"])[None]
        x = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
        causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
        x = ln(_openai_block(state, "transformer.resblocks.0.", x, causal), "ln_final")
        text = F.normalize(x[0, ids[0].tolist().index(tokenizer.eos_token_id)] @ state["text_projection"], dim=-1)
    assert torch.allclose(model.encode_image(rgb), image, atol=1e-5)
    # padded in a batch with a shorter text: the end-of-text pooling is unchanged
    assert torch.allclose(model.encode_text(["a", "no pneumonia"])[1], text, atol=1e-5)
    probabilities = medfm.classify(rgb, ["pneumonia"], model=model, method="pos-neg")
    assert 0 < probabilities["pneumonia"] < 1


def test_chexzero_mistakes_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(medfm.CheckpointError, match="chexzero.*weights=<file>"):
        medfm.clip.load("chexzero")
    state = openai_clip_state()
    torch.save(state, tmp_path / "clip.pt")
    with pytest.raises(medfm.CheckpointError, match="does not say its preprocessing"):
        medfm.clip.load(tmp_path / "clip.pt")
    write_clip_tokenizer(tmp_path / "tokenizer")
    resnet = {k: v for k, v in state.items() if not k.startswith("visual.conv1")} | {"visual.layer1.0.conv1.weight": torch.zeros(1)}
    torch.save(resnet, tmp_path / "rn50.pt")
    with pytest.raises(medfm.CheckpointError, match="ResNet"):
        medfm.clip.load("chexzero", weights=tmp_path / "rn50.pt", tokenizer=tmp_path / "tokenizer")
    del state["ln_final.weight"]
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(medfm.CheckpointError, match="ln_final.weight"):
        medfm.clip.load("chexzero", weights=tmp_path / "partial.pt", tokenizer=tmp_path / "tokenizer")
