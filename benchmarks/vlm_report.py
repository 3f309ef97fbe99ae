"""Report drafts on held-out COVID-19 collection images (split by patient, `is_held_out`) against
their clinical notes: medfm-vlm-small's `medfm.report` draft vs a nearest-neighbour baseline (the
note of the training image most similar by medfm-clip-small's image embedding, cosine), scored by
ROUGE-L, BLEU-4 and finding F1 (`medfm.evaluate.text`); with medfm-vlm-small's time to first
token, tokens per second and the process's peak memory on this CPU.

    PYTHONPATH=src python benchmarks/vlm_report.py --images 20 [--vlm RUN/best] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from litemedsam_speed import cpu_name  # noqa: E402

import medfm  # noqa: E402
from medfm.clip.data import is_held_out, read_records  # noqa: E402
from medfm.evaluate.text import text_scores  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=20, help="held-out images with a note (the first in file order)")
    parser.add_argument("--vlm", default="medfm-vlm-small", help="registered name or a folder medfm train-vlm wrote")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=150, help="train-vlm --limit (its feature cache gives the neighbours' embeddings)")
    args = parser.parse_args(argv)
    import torch

    from medfm.vlm.api import load

    model = load(args.vlm)
    clip = model.encoder.clip
    records = [r for r in read_records(args.data_root, "covid_cxr_notes") if r.texts]
    test = [r for r in records if is_held_out(r)][: args.images]
    from vlm_closed_questions import training_embeddings

    index, embeddings = training_embeddings(args.data_root, model, args.limit)
    train = [r for r in records if r.image in index]  # the training images medfm-vlm-small saw (train + val)
    train_embeddings = embeddings[[index[r.image] for r in train]]
    read = lambda r: medfm.read_image(r.image, modality=r.modality)  # noqa: E731
    references, drafts, neighbours = [], [], []
    first_token, generation, generated_tokens = [], 0.0, 0
    for record in test:
        image = read(record)
        references.append(record.texts[0])
        nearest = int((clip.encode_image(image) @ train_embeddings.T).argmax())
        neighbours.append(train[nearest].texts[0])
        start = time.perf_counter()
        seen: list[float] = []
        draft = medfm.report(image, model, max_new_tokens=args.max_new_tokens,
                             stream=lambda piece: seen.append(time.perf_counter()))
        end = time.perf_counter()
        drafts.append(draft)
        if seen:
            first_token.append(seen[0] - start)
            tokens = len(model.tokenizer(draft, add_special_tokens=False).input_ids)
            if tokens > 1:
                generation += end - seen[0]
                generated_tokens += tokens - 1
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}; n = {len(test)} held-out images with notes "
          f"(of {len(train)} training notes for the neighbour)")
    print("| method | ROUGE-L | BLEU-4 | finding F1 |")
    print("| --- | --- | --- | --- |")
    for name, hypotheses in ((model.name, drafts), ("nearest neighbour (medfm-clip-small embedding)", neighbours)):
        scores = text_scores(hypotheses, references)
        print(f"| {name} | {scores['rouge_l']:.3f} | {scores['bleu4']:.3f} | {scores['finding_f1']:.2f} |")
    ttft = sorted(first_token)[len(first_token) // 2] if first_token else float("nan")
    rate = generated_tokens / generation if generation else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{model.name}: time to first token (median) {ttft:.2f} s, {rate:.1f} tokens/s after it, "
          f"peak resident memory {peak:.0f} MiB (the whole process, medfm-clip-small included)")
    for draft, reference in list(zip(drafts, references))[:3]:
        print(f"\n  draft: {draft!r}\n  note:  {reference[:200]!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
