"""Train medfm-clip-small on ../shared/data/vl and write it to src/medfm/clip/weights/medfm-clip-small.

Three steps, each cached so the next can be rerun alone (run with ``nice``; 2 CPU threads):

1. ``features``: the frozen LiteMedSAM encoder's pooled feature maps of a deterministic subset of
   each collection's training and held-out images (the encoder dominates the cost on a CPU);
2. ``train``: the frozen MiniLM text features of every training text, then the image head and both
   projections with MedCLIP's semantic-matching loss (soft targets from label vectors), plus
   CheXzero's "no {finding}" texts, for ``--epochs``;
3. the zero-shot table is ``benchmarks/clip_zero_shot.py`` on the same cache.

    nice -n 10 python scripts/train_clip_small.py features
    nice -n 10 python scripts/train_clip_small.py train
"""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

import torch

from medfm.clip.data import (
    DATASETS,
    VLRecord,
    is_held_out,
    read_records,
    training_texts,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "vl"
CACHE = REPO / "out" / "clip_small_cache"
OUTPUT = REPO / "src" / "medfm" / "clip" / "weights" / "medfm-clip-small"
#: Images per dataset and side whose features are computed (the frozen encoder takes ~1 s per image at 112 px
#: on 2 shared CPU cores); chosen by a hash of the id, so the subset is deterministic.
LIMITS = {"train": 300, "held_out": 150}


def subset(records: list[VLRecord]) -> dict[str, list[VLRecord]]:
    """Training and held-out records of one collection, each capped at ``LIMITS``."""
    order = sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    held = [r for r in order if is_held_out(r)]
    train = [r for r in order if not is_held_out(r)]
    return {"train": train[: LIMITS["train"]], "held_out": held[: LIMITS["held_out"]]}


def features(args: argparse.Namespace) -> None:
    """Cache the frozen image features, one file per dataset and side."""
    from medfm.clip.preprocess import SMALL_PREPROCESS, image_rgb
    from medfm.clip.towers import SamEncoderBackbone

    backbone = SamEncoderBackbone(image_size=SMALL_PREPROCESS.image_size)
    CACHE.mkdir(parents=True, exist_ok=True)
    for dataset in DATASETS:
        for side, records in subset(read_records(args.data, dataset)).items():
            path = CACHE / f"{dataset}.{side}.pt"
            if path.is_file():
                continue
            grids = []
            for start in range(0, len(records), 16):
                batch = torch.stack([SMALL_PREPROCESS(image_rgb(r.image)) for r in records[start : start + 16]])
                with torch.inference_mode():
                    grids.append(backbone(batch).half())
                print(f"{dataset} {side} {start + len(batch)}/{len(records)}", flush=True)
            torch.save({"ids": [r.id for r in records], "grids": torch.cat(grids)}, path)


def load_cache(dataset: str, side: str, folder: Path = CACHE) -> tuple[list[VLRecord], torch.Tensor]:
    """The cached records (in cache order) and their (N, C, g, g) float32 feature maps."""
    cached = torch.load(folder / f"{dataset}.{side}.pt", weights_only=True)
    by_id = {r.id: r for r in read_records(DATA, dataset)}
    return [by_id[i] for i in cached["ids"]], cached["grids"].float()


def train(args: argparse.Namespace) -> None:
    """Train the head and projections on the cached features and save medfm-clip-small."""
    from medfm.clip.losses import semantic_matching_loss
    from medfm.clip.model import small_model

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    records, grids = [], []
    for dataset in args.datasets:
        part, grid = load_cache(dataset, "train")
        records += part
        grids.append(grid)
    grids = torch.cat(grids)
    pools = [training_texts(r) for r in records]
    vocabulary = sorted({label for pool in pools for _, labels in pool for label in labels})
    index = {label: i for i, label in enumerate(vocabulary)}
    strings = sorted({text for pool in pools for text, _ in pool})
    model = small_model()
    with torch.inference_mode():
        text_cache = torch.cat([model.text_features(strings[i : i + 64]) for i in range(0, len(strings), 64)])
    row = {text: i for i, text in enumerate(strings)}
    print(f"{len(records)} images, {len(strings)} texts, {len(vocabulary)} labels", flush=True)

    def vector(labels: tuple[str, ...]) -> torch.Tensor:
        out = torch.zeros(len(vocabulary))
        out[[index[label] for label in labels]] = 1.0
        return out

    image_labels = torch.stack([vector(r.targets) for r in records])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(records) + args.batch - 1) // args.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(records)).tolist()
        total = 0.0
        for start in range(0, len(order), args.batch):
            batch = order[start : start + args.batch]
            chosen = [rng.choice(pools[i]) for i in batch]
            texts = text_cache[[row[text] for text, _ in chosen]]
            image_embeds = model.embed_image_features(grids[batch] + args.noise * torch.randn_like(grids[batch]))
            text_embeds = model.embed_text_features(texts)
            loss = semantic_matching_loss(image_embeds, text_embeds, image_labels[batch],
                                          torch.stack([vector(labels) for _, labels in chosen]), model.logit_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}: loss {total / len(order):.4f}", flush=True)
    model.eval()
    model.save_pretrained(args.output)
    print(f"wrote {args.output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["features", "train"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise", type=float, default=0.05, help="Gaussian noise on the cached features (augmentation).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = parser.parse_args()
    # the encoder is worth 2 threads; the small training steps run faster on one (no thread hand-offs)
    torch.set_num_threads(2 if args.step == "features" else 1)
    {"features": features, "train": train}[args.step](args)


if __name__ == "__main__":
    main()
