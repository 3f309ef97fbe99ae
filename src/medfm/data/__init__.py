"""Datasets for evaluation, training and batch jobs alike: discovery of the layouts users have
(medfm's own, manifests, nnU-Net raw, volumes) and splits by patient."""

from medfm.data.datasets import Case, discover_cases, split_cases

__all__ = ["Case", "discover_cases", "split_cases"]
