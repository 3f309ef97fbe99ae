"""Closed questions about held-out images (split by patient/lesion as medfm-clip-small's training and
medfm-vlm-small's, `medfm.clip.data.is_held_out`): medfm-vlm-small (trained connector + LoRA on
SmolLM2-135M), the same model with the image removed, medfm-clip-small zero-shot, a linear probe on
medfm-clip-small's image embeddings (trained on the training split), the held-out majority answer,
and optionally (``--experts``, slow) the experts pipeline medfm-experts-smollm2 with its
image-removed LM. Answers are the choice of highest log-likelihood (``medfm.ask(..., choices=)``).
Each cell is "accuracy / balanced accuracy" (the mean of the per-class recalls over the classes
present): on ISIC (18 % melanoma) always answering "no" scores 0.82 / 0.50, so accuracy alone
rewards a model that ignores the image.

    PYTHONPATH=src python benchmarks/vlm_closed_questions.py --images 30 [--vlm RUN/best] [--experts]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from litemedsam_speed import cpu_name  # noqa: E402

import medfm  # noqa: E402
from medfm.clip.data import TASKS, is_held_out, read_records  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vl"
#: dataset -> (question, choices, the answer of a record)
QUESTIONS = {
    "pneumoniamnist": ("Does this chest X-ray show pneumonia?", ("yes", "no"),
                       lambda r: "yes" if "pneumonia" in r.labels else "no"),
    "ham10000_skin": ("What type of skin lesion is shown in this dermoscopic image?", TASKS["ham10000_skin"].classes,
                      lambda r: r.labels[0]),
    "isic2017_skin": ("Is this skin lesion a melanoma?", ("yes", "no"), lambda r: "yes" if "melanoma" in r.labels else "no"),
}


def zero_shot_answer(probabilities: dict[str, float], dataset: str, choices: tuple[str, ...]) -> str:
    """medfm-clip-small's class as the question's answer (yes/no: is the finding the top class)."""
    top = max(probabilities, key=probabilities.get)
    if choices == ("yes", "no"):
        return "yes" if top == TASKS[dataset].classes[0] else "no"
    return top


def accuracy_cell(given: list[str], truth: list[str]) -> str:
    """Accuracy and balanced accuracy of the answers given against the true ones, as one cell."""
    accuracy = sum(a == t for a, t in zip(given, truth)) / len(truth)
    recalls = [sum(a == t for a, t in zip(given, truth) if t == c) / truth.count(c) for c in set(truth)]
    return f"{accuracy:.2f} / {sum(recalls) / len(recalls):.2f}"


def linear_probe(train_x, train_y, classes: int, weight_decay: float = 1e-3):
    """Multinomial logistic regression on embeddings (L-BFGS, L2): returns a predict function."""
    import torch

    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda x: (x @ weight.detach() + bias.detach()).argmax(1)


def training_embeddings(data_root: Path, model, limit: int):
    """medfm-clip-small's embeddings of the training images `medfm train-vlm --limit` used, from its
    feature cache when there is one (the tower's first token is the scaled embedding), else
    computed: (records by image path, embeddings)."""
    import torch

    from medfm.hub import cache_dir
    from medfm.train.vlm_data import feature_cache_key, image_features, read_vl_data

    data = read_vl_data([data_root], 2, limit)
    cache = cache_dir() / "vlm-features" / f"{feature_cache_key(model.encoder_spec, data.images)}.safetensors"
    features = image_features(model.encoder, model.preprocess, data.images, data.modalities, cache)
    embeddings = torch.nn.functional.normalize(features[:, 0].float(), dim=-1)
    return {path: index for index, path in enumerate(data.images)}, embeddings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=30, help="held-out images per dataset (the first in file order)")
    parser.add_argument("--probe-images", type=int, default=150,
                        help="training images per dataset for the linear probe (train-vlm --limit: its feature cache)")
    parser.add_argument("--vlm", default="medfm-vlm-small", help="registered name or a folder medfm train-vlm wrote")
    parser.add_argument("--datasets", nargs="+", default=list(QUESTIONS), choices=list(QUESTIONS))
    parser.add_argument("--experts", action="store_true", help="also the experts pipeline (about 9 s per answer here)")
    args = parser.parse_args(argv)
    import torch

    from medfm.vlm.api import cached, load

    model = load(args.vlm)
    clip = model.encoder.clip  # medfm-clip-small, the tower medfm-vlm-small is built on
    pipeline = cached("medfm-experts-smollm2") if args.experts else None
    index, train_embeddings = training_embeddings(args.data_root, model, args.probe_images)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}")
    header = ["dataset", "n", "majority (held-out)", f"{model.name}", f"{model.name}, image removed",
              "medfm-clip-small zero-shot", "medfm-clip-small linear probe", "s per answer (vlm)"]
    if pipeline is not None:
        header += ["experts -> SmolLM2", "experts, image removed"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for dataset in args.datasets:
        question, choices, answer_of = QUESTIONS[dataset]
        records = read_records(args.data_root, dataset)
        test = [r for r in records if is_held_out(r)][: args.images]
        train = [r for r in records if r.image in index]
        truth = [answer_of(r) for r in test]
        answers: dict[str, list[str]] = {key: [] for key in ("vlm", "blind", "zero", "experts", "experts_blind")}
        seconds = 0.0
        for record in test:
            image = medfm.read_image(record.image, modality=record.modality)
            start = time.perf_counter()
            answers["vlm"].append(medfm.ask(image, question, model, choices=list(choices)))
            seconds += time.perf_counter() - start
            blind = model.score([(question, None)], None, list(choices))
            answers["blind"].append(choices[max(range(len(choices)), key=blind.__getitem__)])
            classes = list(TASKS[dataset].classes)
            answers["zero"].append(zero_shot_answer(medfm.classify(image, classes, clip), dataset, choices))
            if pipeline is not None:
                answers["experts"].append(medfm.ask(image, question, pipeline, choices=list(choices)))
                scores = pipeline.language_model.score(pipeline.prompt([(question, None)], None), list(choices))
                answers["experts_blind"].append(choices[max(range(len(choices)), key=scores.__getitem__)])
        train_y = torch.tensor([choices.index(answer_of(r)) for r in train])
        predict = linear_probe(train_embeddings[[index[r.image] for r in train]], train_y, len(choices))
        test_embeddings = clip.encode_image([medfm.read_image(r.image, modality=r.modality) for r in test])
        answers["probe"] = [choices[i] for i in predict(test_embeddings).tolist()]
        majority = max(set(truth), key=truth.count)
        row = [dataset, str(len(truth)), f"{accuracy_cell([majority] * len(truth), truth)} ({majority})",
               *(accuracy_cell(answers[key], truth) for key in ("vlm", "blind", "zero", "probe")), f"{seconds / len(truth):.2f}"]
        if pipeline is not None:
            row += [accuracy_cell(answers["experts"], truth), accuracy_cell(answers["experts_blind"], truth)]
        print("| " + " | ".join(row) + " |", flush=True)
        counts = {c: answers["vlm"].count(c) for c in choices if answers["vlm"].count(c)}
        print(f"  {model.name} answers given: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
