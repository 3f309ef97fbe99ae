"""Tiny random pieces for the vision-language tests: a word-level tokenizer, CLIP and Llama configs."""

from __future__ import annotations

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
