"""Batch jobs and the engines that run them: a prompts file segmented on one process or on Ray."""

from medfm.batch.engines import BatchSummary, segment_batch

__all__ = ["BatchSummary", "segment_batch"]
