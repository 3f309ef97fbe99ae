"""Train medfm-clip-small on ../shared/data/vl and write it to src/medfm/clip/weights/medfm-clip-small.

Three steps, each cached so the next can be rerun alone (run with ``nice``; 1 CPU thread):

1. ``features``: the frozen LiteMedSAM encoder's pooled feature maps of a deterministic subset of
   each collection's training and held-out images (the encoder dominates the cost on a CPU: ~0.3 s
   per image; every dermoscopy training image, 300 of each chest collection, 150 held-out each);
2. ``train``: the frozen MiniLM text features of every training text, then the image head and both
   projections with MedCLIP's semantic-matching loss (soft targets from label vectors), plus
   CheXzero's "no {finding}" texts, for ``--epochs``; ``--balance 1`` draws the classes of each
   collection equally often, ``--validation`` leaves out the validation part of the training side
   (`medfm.clip.data.is_validation`) that every choice was made on;
3. the zero-shot table is ``benchmarks/clip_zero_shot.py`` on the same cache (``--split validation``
   for the validation part, ``--model FOLDER`` for a run written elsewhere).

    nice -n 10 python scripts/train_clip_small.py features
    nice -n 10 python scripts/train_clip_small.py train --validation --balance 1 --prompts v2   # v2 as shipped
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from medfm.clip.data import (
    DATASETS,
    TASKS,
    DERMOSCOPY_V2,
    TEMPLATES,
    VLRecord,
    is_held_out,
    is_validation,
    read_records,
    training_texts,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "vl"
CACHE = REPO / "out" / "clip_small_cache"
OUTPUT = REPO / "src" / "medfm" / "clip" / "weights" / "medfm-clip-small"
#: Images per side whose features are computed (the frozen encoder takes ~0.3 s per image at 112 px on
#: one thread of the shared CPU); chosen by a hash of the id, so each subset is deterministic and a
#: larger limit extends a smaller one. The held-out 150 are those of every published table.
LIMITS = {"train": 300, "held_out": 150}
#: Per-collection training limits above ``LIMITS["train"]``: every training image of the two
#: dermoscopy collections (melanoma is the weak zero-shot task; v1 saw 300 of each).
TRAIN_LIMITS = {"ham10000_skin": 2000, "isic2017_skin": 2000}


def subset(records: list[VLRecord]) -> dict[str, list[VLRecord]]:
    """Training and held-out records of one collection, capped at ``TRAIN_LIMITS`` / ``LIMITS``."""
    order = sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    held = [r for r in order if is_held_out(r)]
    train = [r for r in order if not is_held_out(r)]
    limit = TRAIN_LIMITS.get(records[0].dataset, LIMITS["train"]) if records else 0
    return {"train": train[:limit], "held_out": held[: LIMITS["held_out"]]}


def features(args: argparse.Namespace) -> None:
    """Cache the frozen image features, one file per dataset and side."""
    from medfm.clip.preprocess import SMALL_PREPROCESS, image_rgb
    from medfm.clip.towers import SamEncoderBackbone
    from medfm.io.writers import atomic_path

    backbone = SamEncoderBackbone(image_size=SMALL_PREPROCESS.image_size)
    CACHE.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        for side, records in subset(read_records(args.data, dataset)).items():
            path = CACHE / f"{dataset}.{side}.pt"
            if path.is_file() and torch.load(path, weights_only=True)["ids"] == [r.id for r in records]:
                continue
            grids = []
            for start in range(0, len(records), 16):
                batch = torch.stack([SMALL_PREPROCESS(image_rgb(r.image)) for r in records[start : start + 16]])
                with torch.inference_mode():
                    grids.append(backbone(batch).half())
                print(f"{dataset} {side} {start + len(batch)}/{len(records)}", flush=True)
            with atomic_path(path) as temporary:
                torch.save({"ids": [r.id for r in records], "grids": torch.cat(grids)}, temporary)


def load_cache(dataset: str, side: str, folder: Path = CACHE) -> tuple[list[VLRecord], torch.Tensor]:
    """The cached records (in cache order) and their (N, C, g, g) float32 feature maps."""
    cached = torch.load(folder / f"{dataset}.{side}.pt", weights_only=True)
    by_id = {r.id: r for r in read_records(DATA, dataset)}
    return [by_id[i] for i in cached["ids"]], cached["grids"].float()


def prompt_templates(name: str) -> dict[str, tuple[str, ...]]:
    """The prompt ensembles per modality: ``v1`` (medfm-clip-small v1) or ``v2`` (wider dermoscopy)."""
    return TEMPLATES if name == "v1" else {**TEMPLATES, "dermoscopy": DERMOSCOPY_V2}


def sampling_weights(records: list[VLRecord], power: float) -> torch.Tensor:
    """Per-image draw weights: (count of its collection's images with the same labels) ** -power, so
    ``power`` 1 balances the classes within each collection (melanoma is a fifth of ISIC 2017), 0 is uniform;
    each collection keeps its total weight (its share of the images)."""
    counts = Counter((r.dataset, r.labels) for r in records)
    weights = torch.tensor([counts[r.dataset, r.labels] ** -power for r in records], dtype=torch.float64)
    for dataset in {r.dataset for r in records}:
        rows = torch.tensor([r.dataset == dataset for r in records])
        weights[rows] *= rows.sum() / weights[rows].sum()
    return weights


def prompt_loss(
    model: torch.nn.Module,
    image_embeds: torch.Tensor,
    text_cache: torch.Tensor,
    prompt_rows: dict[tuple[str, str], torch.Tensor],
    tasks: list[tuple[str, str]],
    task_of: torch.Tensor,
    class_of: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of each image's zero-shot scoring (its collection's classes, each the mean of its
    prompt ensemble as `medfm.clip.zeroshot.class_embeddings` forms it) against its class: the
    contrastive loss only ever sees one sampled prompt per image, this trains the ensemble itself."""
    total = image_embeds.new_zeros(())
    for task in task_of.unique().tolist():
        rows = prompt_rows[tasks[task]]
        classes = F.normalize(F.normalize(model.text_projection(text_cache[rows]), dim=-1).mean(1), dim=-1)
        mine = task_of == task
        logits = model.logit_scale.exp() * image_embeds[mine] @ classes.T
        total = total + F.cross_entropy(logits, class_of[mine], reduction="sum")
    return total / len(task_of)


def train(args: argparse.Namespace) -> None:
    """Train the head and projections on the cached features and save medfm-clip-small."""
    from medfm.clip.losses import semantic_matching_loss
    from medfm.clip.model import small_model

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    templates = prompt_templates(args.prompts)
    records, grids = [], []
    for dataset in args.datasets:
        part, grid = load_cache(dataset, "train")
        part, grid = part[: args.limit], grid[: args.limit]  # the cache is in hash order: a prefix is v1's subset
        keep = [i for i, r in enumerate(part) if not (args.validation and is_validation(r))]
        records += [part[i] for i in keep]
        grids.append(grid[keep])
    grids = torch.cat(grids)
    pools = [training_texts(r, templates) for r in records]
    vocabulary = sorted({label for pool in pools for _, labels in pool for label in labels})
    index = {label: i for i, label in enumerate(vocabulary)}
    # the zero-shot prompts of each collection and modality: (classes, templates) rows into the text cache
    tasks = sorted({(r.dataset, r.modality) for r in records})
    prompts = {key: [[template.format(label) for template in templates.get(key[1], ("{}",))]
                     for label in TASKS[key[0]].labels] for key in tasks}
    strings = sorted({text for pool in pools for text, _ in pool} | {t for rows in prompts.values() for row in rows for t in row})
    model = small_model(templates)
    with torch.inference_mode():
        text_cache = torch.cat([model.text_features(strings[i : i + 64]) for i in range(0, len(strings), 64)])
    row = {text: i for i, text in enumerate(strings)}
    prompt_rows = {key: torch.tensor([[row[t] for t in texts] for texts in rows]) for key, rows in prompts.items()}
    task_of = torch.tensor([tasks.index((r.dataset, r.modality)) for r in records])
    class_of = torch.tensor([TASKS[r.dataset].target(r) for r in records])
    weights = sampling_weights(records, args.balance)
    print(f"{len(records)} images ({'without' if args.validation else 'with'} the validation part), "
          f"{len(strings)} texts, {len(vocabulary)} labels", flush=True)

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
        order = torch.multinomial(weights, len(records), replacement=True).tolist() if args.balance \
            else torch.randperm(len(records)).tolist()
        total = 0.0
        for start in range(0, len(order), args.batch):
            batch = order[start : start + args.batch]
            if len(batch) < 2:  # BatchNorm needs two images; a lone last image waits for the next epoch
                continue
            chosen = [rng.choice(pools[i]) for i in batch]
            texts = text_cache[[row[text] for text, _ in chosen]]
            image_embeds = model.embed_image_features(grids[batch] + args.noise * torch.randn_like(grids[batch]))
            text_embeds = model.embed_text_features(texts)
            loss = semantic_matching_loss(image_embeds, text_embeds, image_labels[batch],
                                          torch.stack([vector(labels) for _, labels in chosen]), model.logit_scale.exp())
            if args.class_loss:
                loss = loss + args.class_loss * prompt_loss(model, image_embeds, text_cache, prompt_rows, tasks,
                                                            task_of[batch], class_of[batch])
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
    parser.add_argument("--prompts", choices=["v1", "v2"], default="v2", help="prompt ensembles (see prompt_templates).")
    parser.add_argument("--balance", type=float, default=0.0,
                        help="class-balanced draws: weight (class count) ** -BALANCE within each collection (0: uniform).")
    parser.add_argument("--class-loss", type=float, default=0.0,
                        help="weight of the prompt-ensemble classification loss (prompt_loss) beside the contrastive one.")
    parser.add_argument("--limit", type=int, default=None,
                        help="train on at most LIMIT cached images per collection (300: v1's subset).")
    parser.add_argument("--validation", action="store_true",
                        help="leave out the validation part of the training side (medfm.clip.data.is_validation).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: 1).")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"features": features, "train": train}[args.step](args)


if __name__ == "__main__":
    main()
