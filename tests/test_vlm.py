"""The vision-language assembly at tiny sizes: every encoder and connector kind runs, the image
tokens land at the placeholder, and `ask` / `report` / `Conversation` / the CLI refuse bad input in
one line before any model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medfm
from medfm.clip.preprocess import ImagePreprocess
from medfm.errors import InputFileError, PromptError
from medfm.io import MedicalImage
from medfm.io.image import image_geometry_2d
from medfm.vlm.api import Conversation, ask, report
from medfm.vlm.connectors import build_connector
from medfm.vlm.encoders import build_encoder
from medfm.vlm.model import LLAVA, VisionLanguageModel, XRAYGPT
from tests.vlm_tiny import VISION, llama_config, tiny_tokenizer

IMAGE = MedicalImage(np.random.default_rng(1).integers(0, 255, (32, 32)).astype(np.uint8), **image_geometry_2d())


def tiny_vlm(connector: dict | None = None, prompt_format=LLAVA, max_positions: int = 256) -> VisionLanguageModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    encoder = build_encoder({"kind": "clip-vision", "config": VISION})
    lm = LlamaForCausalLM(LlamaConfig(**{**llama_config(len(tokenizer)), "max_position_embeddings": max_positions}))
    network = build_connector(connector or {"kind": "mlp"}, encoder.out_dim, lm.config.hidden_size)
    preprocess = ImagePreprocess(image_size=VISION["image_size"])
    return VisionLanguageModel("tiny", encoder, network, lm, tokenizer, prompt_format, preprocess).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_vlm()


QFORMER = {"kind": "qformer", "num_query_tokens": 3,
           "config": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
                      "cross_attention_frequency": 2, "vocab_size": 10}}


@pytest.mark.parametrize("spec, tokens", [({"kind": "linear"}, 4), ({"kind": "mlp"}, 4), (QFORMER, 3)])
def test_connectors_place_their_tokens_at_the_placeholder(spec, tokens):
    vlm = tiny_vlm(spec)
    with torch.no_grad():
        image_tokens = vlm.image_tokens(vlm.pixels(IMAGE))
        with_image = vlm.prepare([("is there a pleural effusion ?", None)], IMAGE)
        without = vlm.prepare([("is there a pleural effusion ?", None)], None)
    assert image_tokens.shape == (1, tokens, 32)
    # "USER: <image>\nquestion ASSISTANT:" -> <s> USER: [image] question... ; the text alone has no image
    prefix = len(vlm.tokenizer("USER: ").input_ids)
    torch.testing.assert_close(with_image[0, prefix : prefix + tokens], image_tokens[0])
    assert with_image.shape[1] == without.shape[1] + tokens


def test_litemedsam_encoder_gives_grid_tokens():
    encoder = build_encoder({"kind": "litemedsam", "image_size": 64, "grid": 2, "pretrained": False})
    with torch.no_grad():
        tokens = encoder(torch.rand(1, 3, 64, 64))
    assert tokens.shape == (1, 4, 256)
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen, as medfm-clip-small's tower


def test_prompt_formats_render_conversations():
    turns = [("what is shown ?", "the lungs"), ("is there a finding ?", None)]
    assert LLAVA.render(turns) == "USER: <image>\nwhat is shown ? ASSISTANT: the lungs</s>USER: is there a finding ? ASSISTANT:"
    text = XRAYGPT.render(turns[1:])
    assert text.endswith("###Patient: <Img><ImageHere></Img> is there a finding ?###Doctor:") and text.count("<ImageHere>") == 1


def test_ask_answers_and_chooses_exactly_one_choice(model):
    pieces = []
    answer = ask(IMAGE, "is there a pleural effusion ?", model, max_new_tokens=4, stream=pieces.append)
    assert "".join(pieces).strip() == answer
    choice = ask(IMAGE, "is there a pleural effusion ?", model, choices=[" yes", "no"])
    assert choice in {" yes", "no"}  # one of the choices exactly as given
    choice = choice.strip()
    scores = model.score([("is there a pleural effusion ?", None)], IMAGE, ["yes", "no"])
    assert choice == ["yes", "no"][int(np.argmax(scores))]


def test_report_and_conversation_run(model):
    assert isinstance(report(IMAGE, model, max_new_tokens=3), str)
    conversation = Conversation(IMAGE, model)
    conversation.say("what is shown ?", max_new_tokens=3)
    conversation.say("is there a finding ?", max_new_tokens=3)
    assert len(conversation.turns) == 2 and all(answer is not None for _, answer in conversation.turns)


@pytest.mark.parametrize("question, choices, match", [
    ("  ", None, "empty"), ("is there a finding ?", ["yes"], "at least two"), ("is it ?", ["yes", "yes"], "distinct"),
])
def test_bad_questions_are_refused(model, question, choices, match):
    with pytest.raises(PromptError, match=match):
        ask(IMAGE, question, model, choices=choices)


def test_a_volume_needs_a_slice(model):
    volume = MedicalImage(np.random.default_rng(2).random((3, 16, 16), dtype=np.float32), spacing=(1.0, 1.0, 1.0),
                          origin=(0.0, 0.0, 0.0), direction=np.eye(3), metadata={"kind": "volume"}, path="scan.nii.gz")
    with pytest.raises(InputFileError, match="scan.nii.gz: is a 3D volume"):
        ask(volume, "is there a finding ?", model)
    assert isinstance(ask(volume, "is there a finding ?", model, slice_index=1, max_new_tokens=2), str)


def test_a_prompt_longer_than_the_context_is_refused():
    short = tiny_vlm(max_positions=12)
    with pytest.raises(PromptError, match="more than tiny's context of 12"):
        ask(IMAGE, "is there a pleural effusion ? " * 3, short)


def test_cli_ask_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    from medfm.cli import main

    image = tmp_path / "cxr.png"
    medfm.write_image(np.zeros((16, 16), dtype=np.uint8), image)
    for argv, expected in [(["ask", str(image), " "], "the question is empty"),
                           (["ask", str(image), "is it ?", "--choices", "yes"], "at least two choices"),
                           (["ask", str(tmp_path / "missing.png"), "is it ?"], "missing.png")]:
        monkeypatch.setattr("sys.argv", ["medfm", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert expected in error and error.count("\n") == 1


# the experts-to-text pipeline (Visual Med-Alpaca's idea) with the shipped medfm-clip-small


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from medfm.clip import load as load_classifier
    from medfm.lm import load as load_lm
    from medfm.vlm.experts import ExpertPipeline
    from tests.tiny_lm import write_tiny_lm

    folder = write_tiny_lm("llama", tmp_path_factory.mktemp("lm") / "tiny-llama")
    language_model = load_lm(folder)
    language_model.model.config.max_position_embeddings = 2048  # rotary positions: the byte-level findings text needs ~400
    return ExpertPipeline(load_classifier("medfm-clip-small"), language_model)


def test_pipeline_describes_the_image_and_the_lm_answers_from_it(pipeline):
    from medfm.clip import classify

    cxr = MedicalImage(np.random.default_rng(3).integers(0, 255, (64, 64)).astype(np.uint8), modality="X-ray",
                       **image_geometry_2d())
    findings = pipeline.findings(cxr)
    expected = classify(cxr, ["pneumonia", "normal"], pipeline.classifier)
    assert "Image type: a chest x-ray (from the file)." in findings
    assert f"pneumonia {expected['pneumonia']:.2f}" in findings and "COVID-19" in findings
    prompt = pipeline.prompt([("is there pneumonia?", None)], cxr)
    assert findings in prompt and prompt.index(findings) < prompt.index("is there pneumonia?")
    assert isinstance(ask(cxr, "is there pneumonia?", pipeline, max_new_tokens=4), str)
    assert ask(cxr, "is there pneumonia?", pipeline, choices=["yes", "no"]) in {"yes", "no"}


def test_pipeline_infers_the_image_kind_when_the_file_does_not_say(pipeline):
    findings = pipeline.findings(IMAGE)
    assert "Image type: " in findings and "(probability " in findings
