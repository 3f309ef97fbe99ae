"""`VisionLanguageModel`: image encoder -> connector -> causal language model, the shape shared by
LLaVA / LLaVA-Med (CLIP + MLP) and MiniGPT-4 / XrayGPT (EVA ViT + Q-Former + linear).

The connector's output tokens replace the prompt's image placeholder: the prompt is split at the
placeholder, each piece tokenized (the first with the tokenizer's BOS, as LLaVA's
``tokenizer_image_token`` and MiniGPT-4's ``get_context_emb`` do) and embedded, and the image
tokens go between, so the LM runs on ``inputs_embeds``. Generation streams through transformers'
``generate`` with its KV cache; closed questions are answered by the log-likelihood of each choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medfm.clip.preprocess import ImageLike, ImagePreprocess, image_rgb
from medfm.errors import PromptError
from medfm.lm.prompting import PromptFormat, render

#: (question, answer) turns of a conversation; the last answer is ``None`` while it is awaited.
Turns = Sequence[tuple[str, str | None]]


@dataclass(frozen=True)
class ImagePromptFormat:
    """How a model's conversations about an image are written: the turns in a `medfm.lm`
    ``text`` format, the first question opened by ``image``, which holds the ``placeholder``
    where the image's tokens go (``image_after_turn``: ``image`` follows the first question's
    whole turn instead, as MedBLIP puts the image after ``Question: ... Answer: ``)."""

    name: str
    text: PromptFormat
    image: str = "<image>\n"
    placeholder: str = "<image>"
    image_after_turn: bool = False

    @property
    def stop(self) -> tuple[str, ...]:
        """Where an answer ends (the next turn's marker)."""
        return self.text.stop

    @property
    def answer_opening(self) -> str:
        """What comes between the reply cue and an answer's first word (e.g. a space)."""
        return self.text.assistant.split("{content}")[0].removeprefix(self.text.reply)

    def render(self, turns: Turns, image: bool = True, tokenizer: Any = None) -> str:
        """The prompt text of ``turns`` (the image in the first question when ``image``)."""
        opening = image and not self.image_after_turn
        messages = []
        for index, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": (self.image if opening and index == 0 else "") + question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        text = render(self.text, messages, tokenizer)
        if image and self.image_after_turn:
            first_turn = self.text.system + self.text.user.format(content=turns[0][0])
            if not text.startswith(first_turn):
                raise PromptError(f"the {self.name} format cannot place the image after the first question")
            text = first_turn + self.image + text[len(first_turn):]
        return text


#: LLaVA-Med v1.5 (``--conv-mode mistral_instruct``)
LLAVA_MED = ImagePromptFormat("llava-med", PromptFormat("llava-med", user="[INST] {content} [/INST]",
                                                        assistant=" {content}</s>"))
#: LLaVA-1.5 as the transformers llava folders are prompted
LLAVA = ImagePromptFormat("llava", PromptFormat("llava", user="USER: {content} ", assistant="ASSISTANT: {content}</s>",
                                                reply="ASSISTANT:"))
#: XrayGPT (MiniGPT-4's conversation, "###" separated)
XRAYGPT = ImagePromptFormat("xraygpt", PromptFormat(
    "xraygpt",
    system="A chat between a patient and an experienced Doctor.If you are a doctor, please answer the medical questions "
    "based on the patient's description. Give the following medical scan: <Img>ImageContent</Img>.You will be able "
    "to see the medical scan once I provide it to you. Please answer the patients questions.",
    user="###Patient: {content}", assistant="###Doctor: {content}", reply="###Doctor:", stop=("###",),
), image="<Img><ImageHere></Img> ", placeholder="<ImageHere>")
#: Med-Flamingo's VQA prompt (its demo's few-shot layout; the image token opens each question)
MED_FLAMINGO = ImagePromptFormat("med-flamingo", PromptFormat(
    "med-flamingo",
    system="You are a helpful medical assistant. You are being provided with images, a question about the image and an "
    "answer. Follow the examples and answer the last question. ",
    user="{content}", assistant=" Answer: {content}<|endofchunk|>", reply=" Answer:", stop=("<|endofchunk|>",),
), image="<image>Question: ", placeholder="<image>")
#: MedBLIP (Qybc/MedBLIP; the LM, or FLAN-T5's encoder, reads ``Question: ... Answer: `` and then
#: the image's query tokens, as its training and ``generate`` put the text before the image; the
#: answer follows them; later turns are medfm's layout, MedBLIP was trained on one)
MEDBLIP = ImagePromptFormat("medblip", PromptFormat(
    "medblip", user="Question: {content} Answer: ", assistant="{content} ", stop=("Question:",),
), image="<image>", placeholder="<image>", image_after_turn=True)
FORMATS = {f.name: f for f in (LLAVA_MED, LLAVA, XRAYGPT, MED_FLAMINGO, MEDBLIP)}


class VisionLanguageModel(nn.Module):
    """Image encoder + connector + causal LM (transformers) + tokenizer + prompt format."""

    def __init__(self, name: str, encoder: nn.Module, connector: nn.Module, language_model: nn.Module, tokenizer: Any,
                 prompt_format: ImagePromptFormat, preprocess: ImagePreprocess) -> None:
        super().__init__()
        self.name = name
        self.encoder = encoder
        self.connector = connector
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.preprocess = preprocess

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The LM's longest sequence (positions), when its config says."""
        config = self.language_model.config
        return getattr(config, "max_position_embeddings", None)

    # image side
    def pixels(self, image: ImageLike) -> Tensor:
        """(1, 3, S, S) encoder input of a 2D image (file, `MedicalImage` or array)."""
        return self.preprocess(image_rgb(image)).unsqueeze(0).to(self.device)

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """(B, M, D): the connector's tokens for the LM."""
        dtype = next(self.encoder.parameters()).dtype
        return self.connector(self.encoder(pixels.to(dtype)))

    # text side
    def embed(self, prompt: str, image_tokens: Tensor | None) -> Tensor:
        """(1, L, D) input embeddings of ``prompt`` with ``image_tokens`` at its placeholder."""
        placeholder = self.prompt_format.placeholder
        pieces = prompt.split(placeholder)
        if image_tokens is None and len(pieces) > 1:
            raise PromptError(f"the prompt holds the image placeholder {placeholder!r} but no image was given")
        if image_tokens is not None and len(pieces) != 2:
            raise PromptError(f"the prompt must hold the image placeholder {placeholder!r} exactly once")
        embedding = self.language_model.get_input_embeddings()
        parts = []
        for index, piece in enumerate(pieces):
            if index:
                parts.append(image_tokens[0].to(embedding.weight.dtype))
            ids = self.tokenizer(piece, add_special_tokens=index == 0, return_tensors="pt").input_ids[0]
            parts.append(embedding(ids.to(self.device)))
        embeds = torch.cat(parts).unsqueeze(0)
        self._check_context(embeds.shape[1])
        return embeds

    def _check_context(self, length: int) -> None:
        limit = self.context_length
        if limit is not None and length > limit:
            raise PromptError(f"the prompt takes {length} tokens (image included), more than {self.name}'s context of {limit}")

    def prepare(self, turns: Turns, image: ImageLike | None) -> Tensor:
        """The input embeddings of a conversation about ``image`` (or none)."""
        tokens = None if image is None else self.image_tokens(self.pixels(image))
        return self.embed(self.prompt_format.render(turns, image is not None, self.tokenizer), tokens)

    def logits(self, embeds: Tensor) -> Tensor:
        """(1, L, vocabulary) next-token logits over input embeddings."""
        return self.language_model(inputs_embeds=embeds).logits

    # answers
    @torch.inference_mode()
    def generate(self, embeds: Tensor, max_new_tokens: int = 128, *, temperature: float = 0.0, seed: int | None = None,
                 stream: Callable[[str], None] | None = None) -> str:
        """The text the LM continues ``embeds`` with (greedy at temperature 0), cut at the prompt
        format's stop strings or the end-of-sequence token; ``stream`` gets each new piece."""
        from transformers import StoppingCriteriaList

        if seed is not None:
            torch.manual_seed(seed)
        collector = TextCollector(self.tokenizer, self.prompt_format.stop, stream)
        limit = self.context_length
        if limit is not None:
            max_new_tokens = max(1, min(max_new_tokens, limit - embeds.shape[1]))
        eos = self.tokenizer.eos_token_id
        self.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            top_p=None, top_k=None, streamer=collector, stopping_criteria=StoppingCriteriaList([collector.stopped]),
            eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
        )
        return collector.finish()

    def answer(self, turns: Turns, image: ImageLike | None, *, max_new_tokens: int = 128, temperature: float = 0.0,
               seed: int | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The model's reply to the last turn of a conversation about ``image``."""
        return self.generate(self.prepare(turns, image), max_new_tokens, temperature=temperature, seed=seed, stream=stream)

    @torch.inference_mode()
    def score(self, turns: Turns, image: ImageLike | None, continuations: Sequence[str]) -> list[float]:
        """The log-likelihood of each continuation as the model's reply to the last turn (written as
        the prompt format writes answers, e.g. after a space). The prompt (image included) runs
        once; its key/value cache is repeated for a right-padded batch of the continuations."""
        prompt = self.prompt_format.render(turns, image is not None, self.tokenizer)
        tokens = None if image is None else self.image_tokens(self.pixels(image))
        prefix = self.embed(prompt, tokens)
        tail = prompt.split(self.prompt_format.placeholder)[-1]
        opening = self.prompt_format.answer_opening
        encoded = [continuation_ids(self.tokenizer, tail, opening + continuation).tolist() for continuation in continuations]
        self._check_context(prefix.shape[1] + max(len(ids) for ids in encoded))
        output = self.language_model(inputs_embeds=prefix, use_cache=True)
        first = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
        scores = [float(first[ids[0]]) for ids in encoded]
        longest = max(len(ids) for ids in encoded)
        if longest > 1:
            cache = output.cache
            cache.batch_repeat_interleave(len(encoded))
            pad = encoded[0][0]
            batch = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in encoded], device=self.device)
            logits = self.language_model(input_ids=batch[:, :-1], cache=cache).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for row, ids in enumerate(encoded):
                steps = torch.arange(len(ids) - 1, device=self.device)
                scores[row] += float(log_probs[row, steps, batch[row, 1 : len(ids)]].sum())
        return scores


def continuation_ids(tokenizer: Any, prefix: str, continuation: str) -> Tensor:
    """The token ids ``continuation`` adds after ``prefix`` (tokenized together, so a word keeps the
    tokens it has in running text); on its own when the prefix's tokens change at the boundary."""
    before = tokenizer(prefix, add_special_tokens=False).input_ids
    both = tokenizer(prefix + continuation, add_special_tokens=False).input_ids
    together = len(both) > len(before) and both[: len(before)] == before
    ids = both[len(before):] if together else tokenizer(continuation.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise PromptError(f"the choice {continuation!r} has no tokens")
    return torch.tensor(ids)


class TextCollector:
    """A transformers streamer that decodes the generated tokens, hands each new piece of text to
    ``stream`` and stops generation at a stop string (which it leaves out)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], stream: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.stream = stream
        self.ids: list[int] = []
        self.sent = 0
        self.done = False
        self._started = False

    def put(self, value: Tensor) -> None:
        """Called by ``generate`` with the prompt first (skipped), then each new token."""
        if not self._started:  # inputs_embeds: generate hands over an empty prompt first
            self._started = True
            if value.numel() == 0 or value.dim() > 1 and value.shape[-1] != 1:
                return
        self.ids.extend(int(v) for v in value.flatten())
        self._emit(final=False)

    def end(self) -> None:
        """Called by ``generate`` at the end."""
        self._emit(final=True)

    def stopped(self, input_ids: Tensor, scores: Tensor, **_: Any) -> Tensor:
        """A stopping criterion: true once a stop string was generated."""
        return torch.full((input_ids.shape[0],), self.done, dtype=torch.bool, device=input_ids.device)

    def text(self) -> str:
        """The decoded answer so far, cut at the first stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            if stop in text:
                self.done = True
                text = text[: text.index(stop)]
        return text

    def _emit(self, final: bool) -> None:
        text = self.text()
        # hold back what could be the start of a stop string, or a character still being decoded
        ready = len(text) if final or self.done else _safe_length(text, self.stop)
        if self.stream is not None and ready > self.sent:
            self.stream(text[self.sent : ready])
        self.sent = max(self.sent, ready)

    def finish(self) -> str:
        """The whole answer, stripped."""
        return self.text().strip()


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown: not a trailing replacement character (half a UTF-8
    character) nor a trailing prefix of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:size]):
                end -= size
                break
    return end
