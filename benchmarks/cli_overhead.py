"""The fixed cost of a ``medfm`` call against the model's own time.

Each command runs as a fresh process, as a user runs it (median of ``--repeats``):

- ``medfm --help`` and an option mistake (a ``--box`` with three numbers): start-up and parsing only;
- ``medfm segment`` of the bundled 416x416 ultrasound with the default model: the whole call, and
  the encoder + decoder time the command itself reports; the difference is the fixed cost (Python,
  imports, reading the image, loading the model, writing the mask).

Then, in this process: importing ``medfm.cli``, and loading the default model.

    python benchmarks/cli_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from litemedsam_speed import cpu_name  # noqa: E402 - the benchmarks' one description of the CPU

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "busi_benign_001.png"
MEDFM = [sys.executable, "-m", "medfm"]


def wall(command: list[str], expect: int) -> tuple[float, str]:
    """Seconds a command takes and its stdout; its exit code must be ``expect``."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if result.returncode != expect:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}, not {expect}:\n{result.stderr}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    with tempfile.TemporaryDirectory() as folder:
        mask = str(Path(folder) / "mask.png")
        runs = {
            "medfm --help": (MEDFM + ["--help"], 0),
            "option error (--box with 3 numbers)": (MEDFM + ["segment", str(EXAMPLE), "--box", "1", "2", "3", "-o", mask], 2),
            "medfm segment (416 px, default model)": (
                MEDFM + ["segment", str(EXAMPLE), "--box", "215", "107", "265", "132", "-o", mask], 0),
        }
        times, model_seconds = {}, []
        for name, (command, code) in runs.items():
            samples = []
            for _ in range(repeats):
                seconds, stdout = wall(command, code)
                samples.append(seconds)
                found = re.search(r"encoder ([\d.]+) s, decoder (\d+) ms", stdout)
                if found:
                    model_seconds.append(float(found[1]) + float(found[2]) / 1000)
            times[name] = statistics.median(samples)
    started = time.perf_counter()
    import medfm.cli  # noqa: F401 - what every call imports before it parses

    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    import medfm

    medfm.load()
    load_seconds = time.perf_counter() - started
    model = statistics.median(model_seconds)
    segment = times["medfm segment (416 px, default model)"]
    print(f"medfm CLI overhead on {cpu_name()}, median of {repeats} fresh processes each")
    for name, seconds in times.items():
        print(f"  {name:42s} {seconds:6.2f} s")
    print(f"  {'  of which the model (encoder + decoder)':42s} {model:6.2f} s")
    print(f"  {'  fixed cost of the call':42s} {segment - model:6.2f} s ({(segment - model) / segment:.0%})")
    print(f"  {'import medfm.cli (in process)':42s} {import_seconds:6.2f} s")
    print(f"  {'medfm.load() default, torch import incl.':42s} {load_seconds:6.2f} s")


if __name__ == "__main__":
    main()
