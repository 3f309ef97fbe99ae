"""Tiny random causal-LM checkpoints in the published layouts (LLaMA, BLOOM, GPT-2, BioGPT), written
with ``save_pretrained`` together with a small byte-level BPE tokenizer, for the loader and QA tests."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Question: Which vitamin deficiency causes scurvy? Answer: vitamin C",
    "The chest radiograph shows clear lungs and a normal heart size.",
    "A 45-year-old man presents with fever, cough and difficulty breathing.",
    "Options: A. yes B. no C. maybe. The answer is (A) because the trial met its endpoint.",
    "### Instruction: ### Response: <human>: <bot>: <|im_start|> <|im_end|>",
]
SIZES = dict(vocab_size=320, hidden_size=32, layers=2, heads=4, context=512)
LAYOUTS = ("llama", "bloom", "gpt2", "biogpt")


def tiny_config(layout: str):
    """A transformers config of ``layout`` at a tiny size (hidden 32, 2 layers, 512 positions)."""
    from transformers import BioGptConfig, BloomConfig, GPT2Config, LlamaConfig

    v, h, n, heads, context = (SIZES[key] for key in ("vocab_size", "hidden_size", "layers", "heads", "context"))
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if layout == "llama":
        return LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=64, num_hidden_layers=n,
                           num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=context, **ids)
    if layout == "bloom":
        return BloomConfig(vocab_size=v, hidden_size=h, n_layer=n, n_head=heads, **ids)
    if layout == "gpt2":
        return GPT2Config(vocab_size=v, n_embd=h, n_layer=n, n_head=heads, n_positions=context, **ids)
    if layout == "biogpt":
        return BioGptConfig(vocab_size=v, hidden_size=h, intermediate_size=64, num_hidden_layers=n,
                            num_attention_heads=heads, max_position_embeddings=context, **ids)
    raise ValueError(layout)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (every text encodes) with BOS ``<s>`` = 0 and EOS ``</s>`` = 1."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=SIZES["vocab_size"], special_tokens=["<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def write_tiny_lm(layout: str, folder: Path, seed: int = 0) -> Path:
    """Write a random ``layout`` causal LM and the tiny tokenizer to ``folder``; returns it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(layout))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
