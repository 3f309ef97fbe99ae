"""Tiny random pieces for the vision-language tests: a word-level tokenizer, CLIP and Llama configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

WORDS = ["[", "[/", "]", "INST", "USER", "ASSISTANT", ":", "is", "there", "a", "pleural", "effusion", "?", "yes", "no",
         "the", "lungs", "are", "clear", ".", "###", "Patient", "Doctor", "<", ">", "Img", "/", "</", "finding", "image",
         "pneumonia", "normal", "describe", "report", "chest", "x", "-", "ray", "<|im_start|>", "<|im_end|>"]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
#: a CLIP ViT: 28 px in 14 px patches (4 patch tokens + the class token), 3 layers
VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 2,
          "image_size": 28, "patch_size": 14, "projection_dim": 16}


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer that adds ``<s>`` in front, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def llama_config(vocab_size: int, hidden: int = 32) -> dict[str, Any]:
    """A 2-layer Llama/Mistral with grouped-query attention."""
    return {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False}


#: a LAVIS BLIP-2 Q-Former: cross-attention every other layer, head width 64 as BERT-base
QFORMER = {"hidden": 128, "layers": 2, "mlp": 48, "queries": 3}


def lavis_qformer_layers(random: Callable[..., Any], vision_width: int) -> dict[str, Any]:
    """The encoder layers of a tiny LAVIS Q-Former (``Qformer.bert.encoder.layer.*``), as BLIP-2's
    checkpoints store them: the text FFN beside the query FFN; ``random(*shape)`` draws a tensor."""
    q, m, state = QFORMER["hidden"], QFORMER["mlp"], {}
    for i in range(QFORMER["layers"]):
        b = f"Qformer.bert.encoder.layer.{i}."
        for attention in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            width = vision_width if attention == "crossattention" else q
            for name in ("query", "key", "value"):
                state |= {f"{b}{attention}.self.{name}.weight": random(q, q if name == "query" else width),
                          f"{b}{attention}.self.{name}.bias": random(q)}
            state |= {f"{b}{attention}.output.dense.weight": random(q, q), f"{b}{attention}.output.dense.bias": random(q),
                      f"{b}{attention}.output.LayerNorm.weight": 1 + random(q), f"{b}{attention}.output.LayerNorm.bias": random(q)}
        for branch in ("", "_query"):  # the text FFN (unused to answer) and the query FFN
            state |= {f"{b}intermediate{branch}.dense.weight": random(m, q), f"{b}intermediate{branch}.dense.bias": random(m),
                      f"{b}output{branch}.dense.weight": random(q, m), f"{b}output{branch}.dense.bias": random(q),
                      f"{b}output{branch}.LayerNorm.weight": 1 + random(q), f"{b}output{branch}.LayerNorm.bias": random(q)}
    return state


def lavis_qformer_reference(state: dict[str, Any], image: Any) -> Any:
    """BLIP-2's Q-Former forward written out (``bert(query_embeds=query_tokens, encoder_hidden_states=image)``):
    the query tokens after every layer, from a checkpoint's ``Qformer.bert.*`` and ``query_tokens``."""
    import torch
    import torch.nn.functional as F

    qb = lambda n: state[f"Qformer.bert.{n}"].float()  # noqa: E731
    q = QFORMER["hidden"]
    ln = lambda t, n: F.layer_norm(t, (q,), qb(n + ".weight"), qb(n + ".bias"), eps=1e-12)  # noqa: E731
    lin = lambda t, n: F.linear(t, qb(n + ".weight"), qb(n + ".bias"))  # noqa: E731

    def attend(t, context, n):  # noqa: ANN001, ANN202
        split = lambda z: z.reshape(1, -1, q // 64, 64).transpose(1, 2)  # noqa: E731
        scores = split(lin(t, n + ".self.query")) @ split(lin(context, n + ".self.key")).transpose(-2, -1) / 8.0
        out = (torch.softmax(scores, -1) @ split(lin(context, n + ".self.value"))).transpose(1, 2).reshape(1, -1, q)
        return ln(t + lin(out, n + ".output.dense"), n + ".output.LayerNorm")

    t = ln(state["query_tokens"].float(), "embeddings.LayerNorm")
    for i in range(QFORMER["layers"]):
        b = f"encoder.layer.{i}."
        t = attend(t, t, b + "attention")
        if i % 2 == 0:
            t = attend(t, image, b + "crossattention")
        t = ln(t + lin(F.gelu(lin(t, b + "intermediate_query.dense")), b + "output_query.dense"), b + "output_query.LayerNorm")
    return t
