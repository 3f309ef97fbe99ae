"""The medical question-answering harness: MedQA, PubMedQA, MedMCQA and MMLU's medical subjects,
scored with Med-PaLM 2's strategies on any `medfm.lm` language model (``medfm qa``)."""

from medfm.qa.datasets import QADataset, QAItem, read_dataset
from medfm.qa.harness import SUMMARY_HEADER, evaluate, summary_table, wilson_interval
from medfm.qa.strategies import DEFAULT_NORMALISATION, NORMALISATIONS, Strategy, answer, parse_strategy

__all__ = [
    "DEFAULT_NORMALISATION",
    "NORMALISATIONS",
    "SUMMARY_HEADER",
    "QADataset",
    "QAItem",
    "Strategy",
    "answer",
    "evaluate",
    "parse_strategy",
    "read_dataset",
    "summary_table",
    "wilson_interval",
]
