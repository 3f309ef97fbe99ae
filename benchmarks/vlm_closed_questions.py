"""Closed questions about held-out images (split by patient/lesion as medfm-clip-small's training):
the default `medfm ask` model (medfm-clip-small's findings as text -> SmolLM2-135M), the same LM
with the image removed (no findings), and medfm-clip-small's zero-shot answer, with the time per
answer on this CPU.

    PYTHONPATH=src python benchmarks/vlm_closed_questions.py --images 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from litemedsam_speed import cpu_name  # noqa: E402

import medfm  # noqa: E402
from medfm.clip.data import is_held_out, read_records  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vl"
#: dataset -> (question, the finding whose presence makes the answer "yes", zero-shot classes)
QUESTIONS = {
    "pneumoniamnist": ("Does this chest X-ray show pneumonia?", "pneumonia", ("pneumonia", "normal")),
    "isic2017_skin": ("Is this skin lesion a melanoma?", "melanoma", ("melanoma", "benign nevus or seborrheic keratosis")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=20, help="held-out images per dataset")
    args = parser.parse_args(argv)
    from medfm.vlm.api import cached

    pipeline = cached("medfm-experts-smollm2")
    print(f"CPU: {cpu_name()}")
    print("| dataset | question | n | majority answer | experts -> SmolLM2 | SmolLM2, image removed | medfm-clip-small zero-shot | s per answer (experts) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset, (question, finding, classes) in QUESTIONS.items():
        records = [r for r in read_records(args.data_root, dataset) if is_held_out(r)][: args.images]
        truth = ["yes" if finding in r.labels else "no" for r in records]
        with_image, without, zero_shot, seconds = [], [], [], 0.0
        for record in records:
            image = medfm.read_image(record.image, modality=record.modality)
            start = time.perf_counter()
            with_image.append(medfm.ask(image, question, pipeline, choices=["yes", "no"]))
            seconds += time.perf_counter() - start
            scores = pipeline.language_model.score(pipeline.prompt([(question, None)], None), ["yes", "no"])
            without.append("yes" if scores[0] > scores[1] else "no")
            probabilities = medfm.classify(image, list(classes), pipeline.classifier)
            zero_shot.append("yes" if max(probabilities, key=probabilities.get) == finding else "no")
        accuracy = lambda answers: sum(a == t for a, t in zip(answers, truth)) / len(truth)  # noqa: E731
        majority = max(("yes", "no"), key=truth.count)
        print(f"| {dataset} | {question} | {len(truth)} | {accuracy([majority] * len(truth)):.2f} ({majority}) | "
              f"{accuracy(with_image):.2f} | {accuracy(without):.2f} | {accuracy(zero_shot):.2f} | {seconds / len(truth):.1f} |")
        print(f"  answers given (experts -> SmolLM2): yes {with_image.count('yes')}, no {with_image.count('no')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
