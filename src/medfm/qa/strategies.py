"""Med-PaLM 2's answering strategies on any `LanguageModel`: zero-shot and few-shot option scoring,
chain-of-thought, self-consistency and ensemble refinement (generation with answer extraction).

Closed answers are chosen by the log-likelihood of each option's text after the question, length
normalised (`NORMALISATIONS`); the reasoning strategies generate, then read the answer's letter
from "the answer is X" or, where the model wrote none, score the options after its reasoning.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from medfm.errors import OptionError
from medfm.lm import ContinuationScore, LanguageModel
from medfm.qa.datasets import QAItem

NORMALISATIONS = ("char", "token", "sum")
# Per character: on the shared text sets (SmolLM2-135M, zero-shot, first 20 items of each of the four
# sets, benchmarks/qa_harness.py) it got 30/80 right, per token 27/80, the raw sum 25/80: within the
# noise of so few items, but never worse overall, and unlike per-token it does not depend on how a
# tokenizer happens to split an option. summary.json reports all three for every scored run.
DEFAULT_NORMALISATION = "char"
STRATEGY_NAMES = ("zero-shot", "few-shot", "cot", "self-consistency", "ensemble-refinement")
SAMPLING_TEMPERATURE = 0.7
COT_INSTRUCTION = ("Think step by step, then finish with the sentence 'The answer is X.', "
                   "where X is the letter of the correct option.")
ANSWER_CUE = "Therefore, the answer is"
_ANSWER = re.compile(r"answer is[:\s]*\(?\**([A-H])\b")


@dataclass(frozen=True)
class Strategy:
    """A parsed ``--strategy``: its name and its count (K exemplars, or N reasoning paths)."""

    name: str
    count: int = 0

    def __str__(self) -> str:
        return f"{self.name}:{self.count}" if self.count else self.name

    @property
    def generates(self) -> bool:
        return self.name in ("cot", "self-consistency", "ensemble-refinement")


def parse_strategy(text: str) -> Strategy:
    """``zero-shot``, ``few-shot:K``, ``cot``, ``self-consistency:N`` or ``ensemble-refinement:N``."""
    name, _, count = text.strip().partition(":")
    counted = name in ("few-shot", "self-consistency", "ensemble-refinement")
    if name not in STRATEGY_NAMES or bool(count) != counted or (count and not count.isdigit()) or (counted and int(count) < 1):
        raise OptionError(f"unknown strategy '{text}': one of zero-shot, few-shot:K, cot, self-consistency:N, "
                          "ensemble-refinement:N (K, N >= 1)")
    return Strategy(name, int(count) if count else 0)


@dataclass
class Answer:
    """What a strategy chose for one item: the option key (None: no answer), the option scores
    (key -> log-likelihood, tokens, characters) and the generated texts, and how it was read."""

    prediction: str | None
    scores: dict[str, ContinuationScore] = field(default_factory=dict)
    generations: list[str] = field(default_factory=list)
    method: str = "scored"


def question_text(item: QAItem, instruction: str = "") -> str:
    """The question as one user message: context, question, lettered options, instruction."""
    lines = [item.context, ""] if item.context else []
    lines += [item.question, *(f"{key}. {text}" for key, text in item.options.items())]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def pick(scores: dict[str, ContinuationScore], normalisation: str) -> str:
    """The option with the highest log-likelihood under ``normalisation`` (first on ties)."""
    return max(scores, key=lambda key: normalised(scores[key], normalisation))


def normalised(score: ContinuationScore, normalisation: str) -> float:
    if normalisation == "char":
        return score.logprob / max(score.chars, 1)
    if normalisation == "token":
        return score.logprob / max(score.tokens, 1)
    return score.logprob


def score_options(lm: LanguageModel, prefix: str, item: QAItem) -> dict[str, ContinuationScore]:
    """Each option's text scored as the continuation of ``prefix`` (one prefix pass for all)."""
    separator = "" if prefix[-1:].isspace() else " "
    keys = list(item.options)
    details = lm.score_details(prefix, [separator + item.options[key] for key in keys])
    return dict(zip(keys, details))


def derived_seed(seed: int, item: QAItem, path: int) -> int:
    """A sampling seed for reasoning path ``path`` of ``item``: fixed by the run's seed, so reruns and
    resumed runs sample the same paths."""
    return int(hashlib.sha256(f"{seed}:{item.dataset}:{item.id}:{path}".encode()).hexdigest()[:8], 16)


def exemplars_for(pool: Sequence[QAItem], count: int, seed: int, dataset: str) -> list[QAItem]:
    """``count`` exemplars from a dataset's separate exemplar split, the same for all its items."""
    chosen = list(pool)
    random.Random(f"{seed}:{dataset}").shuffle(chosen)
    return chosen[:count]


def answer(lm: LanguageModel, item: QAItem, strategy: Strategy, *, exemplars: Sequence[QAItem] = (),
           normalisation: str = DEFAULT_NORMALISATION, seed: int = 0, max_new_tokens: int = 192) -> Answer:
    """Answer ``item`` with ``strategy``; ``exemplars`` are used by few-shot."""
    if not strategy.generates:
        messages = []
        for example in exemplars if strategy.name == "few-shot" else ():
            messages += [{"role": "user", "content": question_text(example)},
                         {"role": "assistant", "content": example.options[example.answer]}]
        prefix = lm.chat_prompt([*messages, {"role": "user", "content": question_text(item)}])
        scores = score_options(lm, prefix, item)
        return Answer(pick(scores, normalisation), scores)
    prompt = lm.chat_prompt([{"role": "user", "content": question_text(item, COT_INSTRUCTION)}])
    if strategy.name == "cot":
        reasoning = lm.generate(prompt, max_new_tokens)
        return _read_answer(lm, item, prompt, reasoning, normalisation)
    paths = [lm.generate(prompt, max_new_tokens, temperature=SAMPLING_TEMPERATURE, seed=derived_seed(seed, item, path))
             for path in range(strategy.count)]
    if strategy.name == "self-consistency":
        readings = [_read_answer(lm, item, prompt, path, normalisation) for path in paths]
        votes = Counter(reading.prediction for reading in readings if reading.prediction)
        order = [reading.prediction for reading in readings]
        winner = max(votes, key=lambda key: (votes[key], -order.index(key))) if votes else None
        methods = Counter(reading.method for reading in readings)
        return Answer(winner, {}, paths, "vote of " + ", ".join(f"{n} {m}" for m, n in sorted(methods.items())))
    attempts = "\n\n".join(f"Attempt {number}: {path.strip()}" for number, path in enumerate(paths, 1))
    refine = question_text(item, f"Here are {len(paths)} attempts at this question:\n\n{attempts}\n\n"
                                 f"Consider them critically. {COT_INSTRUCTION}")
    refine_prompt = lm.chat_prompt([{"role": "user", "content": refine}])
    final = lm.generate(refine_prompt, max_new_tokens)
    reading = _read_answer(lm, item, refine_prompt, final, normalisation)
    return Answer(reading.prediction, reading.scores, [*paths, final], reading.method)


def _read_answer(lm: LanguageModel, item: QAItem, prompt: str, reasoning: str, normalisation: str) -> Answer:
    """The letter after "the answer is" in ``reasoning``; else the option scored highest after it."""
    found = [letter for letter in _ANSWER.findall(reasoning) if letter in item.options]
    if found:
        return Answer(found[-1], {}, [reasoning], "extracted")
    scores = score_options(lm, f"{prompt}{reasoning.rstrip()}\n{ANSWER_CUE}", item)
    return Answer(pick(scores, normalisation), scores, [reasoning], "scored after reasoning")
