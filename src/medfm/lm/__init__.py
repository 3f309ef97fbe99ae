"""Causal language models behind one loader (registry names, transformers folders, hub ids, GGUF
files), with chat prompts, streaming generation and log-likelihood scoring.

``medfm.lm.load("smollm2-135m")`` gives a `LanguageModel`; the vision-language models of
`medfm.vlm` and the QA harness of `medfm.qa` build on it. The named LMs are registered in
`medfm.catalog.registry` (family ``lm``).
"""

from medfm.lm.loading import DEFAULT_LM, available_lms, load
from medfm.lm.model import ContinuationScore, LanguageModel
from medfm.lm.prompting import PROMPT_FORMATS, Message, PromptFormat, prompt_format, render

__all__ = [
    "DEFAULT_LM",
    "PROMPT_FORMATS",
    "ContinuationScore",
    "LanguageModel",
    "Message",
    "PromptFormat",
    "available_lms",
    "load",
    "prompt_format",
    "render",
]
