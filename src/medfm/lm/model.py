"""A causal language model with its tokenizer and prompt format: chat prompts, streaming generation
with a KV cache, and log-likelihood scoring of given continuations.

Scoring encodes the shared prefix once and then runs every continuation as one batch over a copy
of its key/value cache, so ranking the options of a question costs about one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medfm.errors import PromptError
from medfm.lm.prompting import Message, PromptFormat, render


@dataclass(frozen=True)
class ContinuationScore:
    """The summed log-likelihood (natural log) of one continuation given a prefix, with its length in
    tokens and characters so callers can normalise (per token or per character)."""

    logprob: float
    tokens: int
    chars: int


@dataclass
class LanguageModel:
    """A loaded causal LM: ``model`` (a transformers ``PreTrainedModel``), ``tokenizer``, its
    ``name`` (registry name, folder or file) and ``prompt_format``; ``card`` is the catalog id when
    the model is a registry entry."""

    model: Any
    tokenizer: Any
    name: str
    prompt_format: PromptFormat
    card: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The most tokens the model attends to (None: no fixed limit, e.g. BLOOM's ALiBi)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def chat_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages`` in this model's format, ending where its answer starts."""
        return render(self.prompt_format, messages, self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: the tokenizer's special tokens (e.g. LLaMA's BOS) are added unless
        the text already starts with the BOS token's text (as a chat template writes it)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def _check_length(self, tokens: int, what: str) -> None:
        limit = self.context_length
        if limit is not None and tokens > limit:
            raise PromptError(f"{what} is {tokens} tokens, over {self.name}'s context length of {limit}")

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
        stop: Sequence[str] = (),
    ) -> str:
        """The model's continuation of ``prompt``: greedy at ``temperature`` 0, else sampled (seeded by
        ``seed``); ends at an end-of-sequence token, at one of ``stop`` or the format's stop strings
        (not included), or after ``max_new_tokens``. ``stream`` receives the text piece by piece."""
        ids = self.encode(prompt)
        self._check_length(len(ids), "the prompt")
        limit = self.context_length
        if limit is not None:
            max_new_tokens = min(max_new_tokens, limit - len(ids))
        stops = tuple(stop) + self.prompt_format.stop
        holdback = max((len(text) for text in stops), default=1) - 1
        end_ids = self._end_token_ids()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        new_ids: list[int] = []
        text, sent = "", 0
        past = None
        inputs = torch.tensor([ids], device=self.device)
        for _ in range(max_new_tokens):
            output = self.model(input_ids=inputs, cache=past, use_cache=True)
            past = output.cache
            logits = output.logits[0, -1].float()
            if temperature > 0:
                probabilities = torch.softmax(logits / temperature, dim=-1).cpu()
                token = int(torch.multinomial(probabilities, 1, generator=generator))
            else:
                token = int(logits.argmax())
            if token in end_ids:
                break
            new_ids.append(token)
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
            cut = min((text.find(marker) for marker in stops if marker in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
            ready = len(text) - holdback
            if stream is not None and ready > sent and not text.endswith("\ufffd"):
                stream(text[sent:ready])
                sent = ready
            inputs = torch.tensor([[token]], device=self.device)
        if stream is not None and len(text) > sent:
            stream(text[sent:])
        return text

    def _end_token_ids(self) -> set[int]:
        ends = self.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [ends]) - {None}
        if self.tokenizer.eos_token_id is not None:
            ends.add(self.tokenizer.eos_token_id)
        return ends

    def _start_token_id(self) -> int:
        start = self.tokenizer.bos_token_id
        start = start if start is not None else self.tokenizer.eos_token_id
        if start is None:
            raise PromptError(f"{self.name}: an empty prefix has no token to condition on (no BOS or EOS token)")
        return start

    def score(self, prefix: str, continuations: Sequence[str]) -> list[float]:
        """Summed log-likelihood of each continuation given ``prefix`` (see `score_details` for the
        token and character counts)."""
        return [result.logprob for result in self.score_details(prefix, continuations)]

    @torch.inference_mode()
    def score_details(self, prefix: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        """Log-likelihood, token count and character count of each continuation given ``prefix``.

        The prefix runs once; its key/value cache is repeated for a right-padded batch of the
        continuations (padding sits after the real tokens, so causal attention never sees it).
        A continuation is tokenised on its own, so start it with the space the text would have.
        """
        if not continuations:
            return []
        # an empty prefix conditions on the start (or end) of sequence token, as at a document's start
        prefix_ids = self.encode(prefix) or [self._start_token_id()]
        encoded = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
        for text, ids in zip(continuations, encoded):
            if not ids:
                raise PromptError(f"the continuation {text!r} encodes to no token")
            self._check_length(len(prefix_ids) + len(ids), "the prompt with its continuation")
        output = self.model(input_ids=torch.tensor([prefix_ids], device=self.device), use_cache=True)
        first = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
        longest = max(len(ids) for ids in encoded)
        results = [float(first[ids[0]]) for ids in encoded]
        if longest > 1:
            cache = output.cache
            cache.batch_repeat_interleave(len(encoded))
            pad = encoded[0][0]
            batch = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in encoded], device=self.device)
            logprobs = torch.log_softmax(self.model(input_ids=batch[:, :-1], cache=cache).logits.float(), -1)
            for row, ids in enumerate(encoded):
                steps = torch.arange(len(ids) - 1, device=self.device)
                results[row] += float(logprobs[row, steps, batch[row, 1:len(ids)]].sum())
        return [ContinuationScore(value, len(ids), len(text)) for value, ids, text in zip(results, encoded, continuations)]
