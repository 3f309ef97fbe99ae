"""The long fuzzing campaign of medfm's readers: thousands of seeded mutations of small real files.

Issue 14's bar: over at least 3,000 mutated files (PNG, JPEG, TIFF, BMP, NIfTI, MHA/MHD, NRRD,
npz, DICOM files of several transfer syntaxes, a zipped DICOM series), no exception other than
medfm's own, no crash, no timeout and no read over 2 GiB. Each file is read with
``medfm.read_image`` (then ``summary()``, as ``medfm info`` does) in a worker process whose
address space may grow at most ``--memory-gib`` over what its imports take, with ``--timeout``
seconds per read; a crash or a hang is recorded and the worker replaced.

    .venv/bin/python benchmarks/fuzz_readers.py [--files 3000] [--seed 0] [--timeout 30] [--memory-gib 2]

Prints the outcome counts (ok / medfm error by type / other exception / crash / timeout /
over-memory), the worker's peak resident memory, and every file that was not ok or a medfm error.
The test suite runs the same harness on a few hundred files (tests/test_fuzz_readers.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from litemedsam_speed import cpu_name  # noqa: E402

from tests.fuzz_harness import ReaderWorker, make_seeds, mutated_files, outcome_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=3000, help="mutated files (spread evenly over the seeds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per read")
    parser.add_argument("--memory-gib", type=float, default=2.0, help="address space a read may add, GiB")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="medfm-fuzz-") as folder:
        seeds = make_seeds(Path(folder) / "seeds")
        files = mutated_files(seeds, Path(folder) / "mutated", args.files, args.seed)
        started = time.perf_counter()
        with ReaderWorker(memory_limit=int(args.memory_gib * (1 << 30)), timeout=args.timeout) as worker:
            results = [(kind, worker.read(path)) for kind, path in files]
        seconds = time.perf_counter() - started
        bad = [(path, outcome) for (_, path), (_, outcome) in zip(files, results) if not outcome.acceptable]
        print(f"medfm readers fuzz campaign: {len(files)} files from {len(seeds)} seeds ({', '.join(sorted(seeds))}), "
              f"seed {args.seed}, {seconds:.0f} s on {cpu_name()}")
        print(f"limits per read: {args.timeout:g} s, +{args.memory_gib:g} GiB address space")
        print()
        print(f"{'outcome':<34}{'files':>8}")
        counts = outcome_table(results)
        for label in ("ok", *sorted(k for k in counts if k.startswith("medfm")), "other", "crash", "timeout", "over-memory"):
            print(f"{label:<34}{counts.get(label, 0):>8}")
        print(f"{'total':<34}{len(results):>8}")
        print()
        print(f"peak resident memory of the reader process: {worker.peak_rss_kib / 1024:.0f} MiB (imports included)")
        for path, outcome in bad:
            print(f"\n{path.name}: {outcome.outcome} {outcome.type} {outcome.message}\n{outcome.where}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
