"""Text metrics (`medfm.evaluate.text`) against values computed by hand."""

from __future__ import annotations

import math

import pytest

from medfm.evaluate.text import corpus_bleu, corpus_rouge_l, finding_f1, label_findings, rouge_l, text_scores

HYP, REF = "The cat sat on the mat.", "the cat is on the mat"


def test_rouge_l_by_hand() -> None:
    # tokens: the cat sat on the mat . (7) / the cat is on the mat (6); LCS "the cat on the mat" = 5
    precision, recall = 5 / 7, 5 / 6
    assert rouge_l(HYP, REF) == pytest.approx(2 * precision * recall / (precision + recall))
    assert rouge_l("", REF) == 0.0
    assert corpus_rouge_l([REF, "x"], [REF, "y"]) == pytest.approx(0.5)


def test_bleu4_by_hand() -> None:
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # 1-grams 5/6; 2-grams 3/5 -> (3+1)/(5+1); 3-grams 1/4 -> 2/5; 4-grams 0/3 -> 1/4; equal lengths: no penalty
    assert corpus_bleu([hyp], [ref]) == pytest.approx((5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    assert corpus_bleu([ref], [ref]) == pytest.approx(1.0)
    # a short hypothesis: brevity penalty exp(1 - 6/3), 1-grams 3/3, 2-grams (2+1)/(2+1), 3-grams (1+1)/(1+1), 4-grams 1/1
    assert corpus_bleu(["the cat is"], [ref]) == pytest.approx(math.exp(1 - 6 / 3))
    assert corpus_bleu(["dog"], [ref]) == 0.0


def test_finding_labeller_and_f1() -> None:
    assert label_findings("Bilateral opacities. No pleural effusion.") == {"Lung Opacity"}
    assert label_findings("Patient intubated; small left effusion without pneumothorax") == {"Support Devices", "Pleural Effusion"}
    hyps = ["Bilateral opacities. No pleural effusion.", "Consolidation in the right lower lobe."]
    refs = ["Pleural effusion and consolidation.", "right lower lobe consolidation, no pneumothorax"]
    # pair 1: predicted {opacity}, true {effusion, consolidation}: fp 1, fn 2; pair 2: tp 1
    assert finding_f1(hyps, refs) == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert finding_f1(["normal"], ["clear"]) == 1.0
    scores = text_scores(hyps, refs)
    assert set(scores) == {"rouge_l", "bleu4", "finding_f1"}
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])
