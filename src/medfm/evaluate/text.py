"""Metrics for generated text (report drafts) against references:

* **ROUGE-L**: the F-measure (beta 1) of the longest common subsequence of tokens, per pair,
  averaged over the corpus;
* **BLEU-4**: corpus-level (Papineni et al.): clipped n-gram precisions for n = 1..4 summed over
  the corpus, geometric mean, brevity penalty from the total lengths; smoothed by adding 1 to
  numerator and denominator of n > 1 (Lin & Och 2004's "add-one", so one missing 4-gram does not
  zero the score);
* **finding F1**: a small CheXpert-style labeller (`label_findings`: keyword patterns per finding,
  a finding negated by "no", "without", "negative for", "free of", "clear of" within the same
  clause is absent) applied to hypothesis and reference; micro-averaged F1 of positive findings
  over the corpus.

Tokens are lower-cased words and punctuation marks (``\\w+`` or one non-space character).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")
#: CheXpert's observation labels (those that occur in free text), each with its keyword patterns
FINDINGS: dict[str, tuple[str, ...]] = {
    "Atelectasis": (r"atelecta\w*",),
    "Cardiomegaly": (r"cardiomegaly", r"enlarged (?:cardiac|heart)", r"heart (?:size )?(?:is )?enlarged"),
    "Consolidation": (r"consolidat\w*",),
    "Edema": (r"(?:pulmonary )?o?edema",),
    "Enlarged Cardiomediastinum": (r"(?:widened|enlarged) (?:cardio)?mediastinum",),
    "Fracture": (r"fractur\w*",),
    "Lung Lesion": (r"nodul\w*", r"mass(?:es)?", r"lesions?", r"cavit\w*"),
    "Lung Opacity": (r"opacit\w*", r"ground[- ]glass", r"infiltrat\w*", r"haziness", r"shadowing"),
    "Pleural Effusion": (r"(?:pleural )?effusions?",),
    "Pleural Other": (r"pleural thickening", r"fibrothorax"),
    "Pneumonia": (r"pneumonia", r"pneumonitis"),
    "Pneumothorax": (r"pneumothora\w*",),
    "Support Devices": (r"intubat\w*", r"endotracheal", r"tube", r"catheter", r"line", r"pacemaker", r"ventilat\w*"),
}
NEGATIONS = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|resolved|absence of|ruled out)\b")
_CLAUSE = re.compile(r"[.;:\n]|\bbut\b|\bhowever\b|\bwith\b")
_COMPILED = {name: re.compile(r"\b(?:" + "|".join(patterns) + r")\b") for name, patterns in FINDINGS.items()}


def tokens(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _TOKEN.findall(text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            current = row[j]
            row[j] = previous + 1 if x == y else max(row[j], row[j - 1])
            previous = current
    return row[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 of one pair (0 when either is empty)."""
    h, r = tokens(hypothesis), tokens(reference)
    common = _lcs(h, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(h), common / len(r)
    return 2 * precision * recall / (precision + recall)


def corpus_rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs."""
    _same_length(hypotheses, references)
    return sum(rouge_l(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` with one reference per hypothesis, add-one smoothing for n > 1."""
    _same_length(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    hypothesis_length = reference_length = 0
    for hypothesis, reference in zip(hypotheses, references):
        h, r = tokens(hypothesis), tokens(reference)
        hypothesis_length += len(h)
        reference_length += len(r)
        for n in range(1, max_n + 1):
            hyp, ref = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(count, ref[gram]) for gram, count in hyp.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hypothesis_length == 0 or matches[0] == 0:
        return 0.0
    log_precision = math.log(matches[0] / totals[0])
    log_precision += sum(math.log((matches[n] + 1) / (totals[n] + 1)) for n in range(1, max_n))
    brevity = 1.0 if hypothesis_length > reference_length else math.exp(1 - reference_length / hypothesis_length)
    return brevity * math.exp(log_precision / max_n)


def label_findings(text: str) -> set[str]:
    """The findings ``text`` mentions as present: a keyword match not preceded by a negation in its clause."""
    present = set()
    for clause in _CLAUSE.split(text.lower()):
        for name, pattern in _COMPILED.items():
            for match in pattern.finditer(clause):
                if not NEGATIONS.search(clause[: match.start()]):
                    present.add(name)
                    break
    return present


def finding_f1(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Micro-averaged F1 of the positive findings `label_findings` reads in each pair (1.0 when
    neither side mentions any finding anywhere: nothing to get wrong)."""
    _same_length(hypotheses, references)
    tp = fp = fn = 0
    for hypothesis, reference in zip(hypotheses, references):
        h, r = label_findings(hypothesis), label_findings(reference)
        tp, fp, fn = tp + len(h & r), fp + len(h - r), fn + len(r - h)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-L, BLEU-4 and finding F1 of a corpus."""
    return {"rouge_l": corpus_rouge_l(hypotheses, references), "bleu4": corpus_bleu(hypotheses, references),
            "finding_f1": finding_f1(hypotheses, references)}


def _same_length(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need as many hypotheses as references, and some: got {len(hypotheses)} and {len(references)}")
