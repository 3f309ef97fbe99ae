"""transformers SamModel folders and Hugging Face hub ids (e.g. wanglab/medsam-vit-base)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm.errors import CheckpointError
from medfm.prompts import Box
from medfm.segment.model import load, load_transformers_sam
from tests.conftest import EXAMPLES

TINY = dict(image_size=64, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
            encoder=dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=3, patch_size=8))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import SamConfig, SamImageProcessor, SamModel

    config = SamConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                           window_size=3, global_attn_indexes=[1], output_channels=32, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=16),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32, layer_norm_eps=1e-5),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "medsam-tiny"
    SamModel(config).save_pretrained(folder)
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_transformers_folder_carries_its_preprocessing(hf_folder) -> None:
    model = load_transformers_sam(hf_folder, arch="sam_vit_b", **TINY)
    assert model.preprocess.image_size == 64 and model.preprocess.resize == "longest-side"
    np.testing.assert_allclose(model.preprocess.pixel_mean, [123.675, 116.28, 103.53], rtol=1e-6)  # 255 x ImageNet mean
    np.testing.assert_allclose(model.preprocess.pixel_std, [58.395, 57.12, 57.375], rtol=1e-6)
    predictor = model.predictor()
    predictor.set_image(EXAMPLES / "busi_benign_001.png")
    assert predictor.predict(boxes=[Box(215, 107, 265, 132)]).masks.shape == (1, 416, 416)


def test_bad_transformers_folder_and_offline_hub_id(hf_folder, tmp_path, monkeypatch) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "preprocessor_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(broken)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))
    with pytest.raises(CheckpointError, match="offline"):
        load("wanglab/medsam-vit-base")
