"""Fuzzing the readers: a few hundred seeded mutations of small real files, each read in a worker
process with memory and time limits; the only acceptable outcomes are an image or a medfm error.

``MEDFM_FUZZ_SEED`` picks another set of mutations (the default is fixed so failures reproduce);
``benchmarks/fuzz_readers.py`` runs the long campaign.
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz_harness import ReaderWorker, make_seeds, mutated_files, outcome_table

FILES_PER_RUN = 400


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    pytest.importorskip("SimpleITK")
    return make_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


def test_seeds_read_cleanly(seeds) -> None:
    with ReaderWorker() as worker:
        outcomes = {kind: worker.read(path) for kind, path in seeds.items()}
    assert {kind: outcome.outcome for kind, outcome in outcomes.items()} == dict.fromkeys(seeds, "ok"), outcomes


def test_mutated_files_give_an_image_or_a_medfm_error(seeds, tmp_path) -> None:
    seed = int(os.environ.get("MEDFM_FUZZ_SEED", "14"))
    files = mutated_files(seeds, tmp_path, FILES_PER_RUN, seed)
    with ReaderWorker(timeout=20) as worker:
        results = [(kind, worker.read(path)) for kind, path in files]
    failures = [f"{path.name}: {outcome.outcome} {outcome.type} {outcome.message}\n{outcome.where}"
                for (_, path), (_, outcome) in zip(files, results) if not outcome.acceptable]
    assert not failures, f"seed {seed}, {outcome_table(results)}:\n" + "\n".join(failures[:5])
    counts = outcome_table(results)
    assert counts["ok"] > 0 and counts["medfm InputFileError"] > 0  # the mutations reach both sides
