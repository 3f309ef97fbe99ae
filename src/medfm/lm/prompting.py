"""How chat messages become one prompt string: the tokenizer's own chat template, or a named format.

Published medical LMs were trained with different prompt layouts (PMC-LLaMA and MedLLaMA with
Alpaca's ``### Instruction: ... ### Response:``, base LMs such as BioGPT with plain text); asking
them in another layout costs accuracy silently, so the format travels with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medfm.errors import MedfmError, PromptError

Message = dict[str, str]

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class PromptFormat:
    """A turn-based prompt layout: ``system`` text first, then each user turn in ``user`` and each
    assistant turn in ``assistant`` (``{content}`` is replaced), ending with ``reply`` (the cue the
    model answers after). ``stop`` lists strings that end an answer (the next turn's marker).
    ``name == "chat-template"`` means: use the tokenizer's own chat template instead."""

    name: str
    system: str = ""
    user: str = "{content}\n"
    assistant: str = "{content}\n"
    reply: str = ""
    stop: tuple[str, ...] = ()
    description: str = ""


PROMPT_FORMATS: dict[str, PromptFormat] = {
    format.name: format
    for format in (
        PromptFormat("chat-template", description="the tokenizer's own chat template (e.g. SmolLM2's ChatML)"),
        PromptFormat(
            "alpaca", system=ALPACA_PREAMBLE, user="### Instruction:\n{content}\n\n",
            assistant="### Response:\n{content}\n\n", reply="### Response:\n", stop=("### Instruction:",),
            description="Stanford Alpaca's layout, used by PMC-LLaMA and MedLLaMA",
        ),
        PromptFormat(
            "human-bot", user="<human>: {content}\n", assistant="<bot>: {content}\n", reply="<bot>:",
            stop=("<human>:",),
            description="two speaker markers, for BLOOM chat fine-tunes such as ClinicalGPT "
                        "(its exact template is not published; this layout is medfm's choice)",
        ),
        PromptFormat(
            "question-answer", user="Question: {content}\n", assistant="Answer: {content}\n", reply="Answer:",
            stop=("\nQuestion:",),
            description="plain text for base (not instruction-tuned) LMs such as BioGPT and BioMedLM",
        ),
    )
}


def prompt_format(name: str) -> PromptFormat:
    """The named format, or a `MedfmError` listing the known ones."""
    try:
        return PROMPT_FORMATS[name]
    except KeyError:
        raise MedfmError(f"unknown prompt format '{name}' (one of: {', '.join(PROMPT_FORMATS)})") from None


def render(format: PromptFormat, messages: Sequence[Message], tokenizer: Any = None) -> str:
    """The prompt for ``messages`` (``{"role": "system"|"user"|"assistant", "content": ...}``),
    ending where the model's next answer starts."""
    if not messages:
        raise PromptError("a chat prompt needs at least one message")
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
            raise PromptError(f"a chat message needs a role (system, user or assistant) and text content, got {message!r}")
    if format.name == "chat-template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise MedfmError("prompt format 'chat-template' needs a tokenizer that has a chat template")
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    system = " ".join(message["content"] for message in messages if message["role"] == "system")
    parts = [f"{system}\n\n" if system else format.system]
    for message in messages:
        if message["role"] != "system":
            template = format.user if message["role"] == "user" else format.assistant
            parts.append(template.format(content=message["content"]))
    parts.append(format.reply)
    return "".join(parts)
