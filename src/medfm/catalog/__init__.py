"""The model catalog: one card per system of the survey (plus SAM and LiteMedSAM), kept as data.

Each card is a JSON file in ``cards/``. The files are read once, validated field by field against
the vocabularies below, and served as frozen :class:`ModelCard` objects. A card that does not
validate stops the load with a :class:`~medfm.errors.MedfmError` naming the file and the problem.
A card's ``medfm_names`` are not in its file: they are the names `medfm.catalog.registry` registers
for it, so each name is written once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from medfm.catalog import registry
from medfm.errors import MedfmError

SUBCATEGORIES: dict[str, tuple[str, ...]] = {
    "visually-prompted": ("adaptation", "generalist"),
    "textually-prompted": ("contrastive", "generative", "hybrid", "conversational"),
}
MODALITIES = (
    "CT", "MRI", "X-ray", "ultrasound", "endoscopy", "dermoscopy", "fundus", "histopathology",
    "microscopy", "PET", "OCT", "mammography", "text",
)
TASKS = (
    "segmentation", "uncertainty-estimation", "classification", "retrieval", "grounding",
    "report-generation", "captioning", "vqa", "question-answering", "chat",
)
PROMPT_TYPES = ("box", "point", "mask", "text", "none")
# What medfm supports of a system today: nothing yet ("planned"), the architecture with random
# weights, the published weights, a training recipe, a training-free method or study that medfm
# runs over the models it loads, weights medfm trained and ships; or nothing it can run (no public
# weights).
SUPPORT_LEVELS = (
    "planned", "architecture", "runs-published-weights", "trainable-recipe", "runs-as-method", "medfm-trained",
    "closed-weights",
)

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_ARXIV_ID = re.compile(r"\d{4}\.\d{4,5}")


@dataclass(frozen=True)
class ModelCard:
    """What the catalog knows about one system: its paper, its place in the survey, what medfm runs."""

    id: str
    name: str
    paper: str
    authors: str
    year: int
    arxiv: str | None
    url: str
    category: str
    subcategory: str
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    prompt_types: tuple[str, ...]
    code: str | None
    weights: str | None
    license: str
    support: str
    medfm_names: tuple[str, ...]
    notes: str

    def to_dict(self) -> dict[str, Any]:
        """The card as plain JSON data, in the layout of its file."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


_FIELDS = tuple(field.name for field in dataclasses.fields(ModelCard) if field.name != "medfm_names")
_TEXT_FIELDS = ("id", "name", "paper", "authors", "url", "category", "subcategory", "license", "support", "notes")
_OPTIONAL_TEXT_FIELDS = ("arxiv", "code", "weights")
_LIST_FIELDS: dict[str, tuple[str, ...]] = {
    "modalities": MODALITIES,
    "tasks": TASKS,
    "prompt_types": PROMPT_TYPES,
}


def list_models(
    category: str | None = None,
    modality: str | None = None,
    prompt: str | None = None,
    support: str | None = None,
) -> list[ModelCard]:
    """The cards that match every given filter, sorted by category, then name.

    Filters are case-insensitive. ``category`` takes a category (``visually-prompted``,
    ``textually-prompted``) or a subcategory (``adaptation``, ``contrastive``, ...); ``modality``,
    ``prompt`` and ``support`` take one value of their vocabulary. A value outside the vocabulary
    raises :class:`MedfmError` with the closest valid spellings.
    """
    categories = (*SUBCATEGORIES, *(sub for subs in SUBCATEGORIES.values() for sub in subs))
    wanted_category = category and _canonical(category, categories, "category")
    wanted_modality = modality and _canonical(modality, MODALITIES, "modality")
    wanted_prompt = prompt and _canonical(prompt, PROMPT_TYPES, "prompt type")
    wanted_support = support and _canonical(support, SUPPORT_LEVELS, "support level")
    cards = [
        card
        for card in _catalog()
        if (not wanted_category or wanted_category in (card.category, card.subcategory))
        and (not wanted_modality or wanted_modality in card.modalities)
        and (not wanted_prompt or wanted_prompt in card.prompt_types)
        and (not wanted_support or wanted_support == card.support)
    ]
    return sorted(cards, key=lambda card: (card.category, card.name.lower()))


def get_card(name: str) -> ModelCard:
    """The card whose id, display name (any case) or one of whose medfm names is ``name``."""
    index = _index()
    card = index.get(name.strip().lower())
    if card is None:
        close = difflib.get_close_matches(name.strip().lower(), index, n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; `medfm models` lists them all"
        raise MedfmError(f"no model named '{name}' in the catalog{hint}")
    return card


#: the columns of `cards_table_rows`: ``--model`` is a name the family loaders take (one row per
#: registered name; "-" for a card medfm cannot load by name), ``offline`` whether it loads with no
#: download and no weights= (from the registry)
CARD_TABLE_COLUMNS = ("name", "--model", "family", "offline", "year", "category", "modalities", "prompts", "support")


def cards_table_rows(cards: list[ModelCard]) -> list[list[str]]:
    """One row per registered name of each card (one row for a card without names), in the order
    of `CARD_TABLE_COLUMNS`."""
    rows = []
    for card in cards:
        about = [str(card.year), f"{card.category}/{card.subcategory}", ", ".join(card.modalities) or "-",
                 ", ".join(card.prompt_types) or "-", card.support]
        entries = registry.entries_of_card(card.id)
        rows += [[card.name, entry.name, entry.family, "yes" if entry.offline else "no", *about] for entry in entries]
        rows += [] if entries else [[card.name, "-", "-", "-", *about]]
    return rows


def card_record(card: ModelCard) -> dict[str, Any]:
    """The card as JSON data with its registered models (name, family, offline, weights source),
    what ``medfm models --json`` prints."""
    models = [{"name": entry.name, "family": entry.family, "offline": entry.offline, "weights": entry.weights}
              for entry in registry.entries_of_card(card.id)]
    return card.to_dict() | {"models": models}


def table_title(cards: list[ModelCard]) -> str:
    """What the table counts: cards (systems and medfm's own models), loadable names, offline ones."""
    entries = [entry for card in cards for entry in registry.entries_of_card(card.id)]
    return (f"{len(cards)} model cards, {len(entries)} loadable by --model name, "
            f"{sum(entry.offline for entry in entries)} of them offline")


@functools.cache
def _catalog() -> tuple[ModelCard, ...]:
    cards = _load_cards(resources.files(__name__) / "cards")
    orphans = sorted({entry.card for entry in registry.ENTRIES} - {card.id for card in cards})
    if orphans:
        raise MedfmError(f"model registry: no card for {', '.join(orphans)} (add cards/<id>.json)")
    return cards


@functools.cache
def _index() -> dict[str, ModelCard]:
    return {key: card for card in _catalog() for key in _lookup_keys(card)}


def _lookup_keys(card: ModelCard) -> set[str]:
    return {card.id, card.name.lower(), *card.medfm_names}


def _load_cards(directory: Traversable) -> tuple[ModelCard, ...]:
    """Read and validate every ``*.json`` card in ``directory``.

    Besides each card's own fields, checks that no two cards share an id, a display name or a
    medfm name, so that :func:`get_card` is unambiguous.
    """
    cards: list[ModelCard] = []
    owner: dict[str, str] = {}  # lookup key -> file that claims it
    for entry in sorted(directory.iterdir(), key=lambda entry: entry.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedfmError(f"model card {entry.name}: not valid JSON ({exc})") from exc
        card = _parse_card(data, entry.name)
        for key in sorted(_lookup_keys(card)):
            if key in owner:
                raise MedfmError(
                    f"model card {entry.name}: '{key}' (id, name or medfm name) is already used by "
                    f"{owner[key]}; ids, names and medfm names must be unique across the catalog"
                )
            owner[key] = entry.name
        cards.append(card)
    if not cards:
        raise MedfmError(f"no model cards found in {directory}")
    return tuple(cards)


def _parse_card(data: Any, filename: str) -> ModelCard:
    """Validate one card's JSON data and build the :class:`ModelCard`; errors name ``filename``."""

    def fail(problem: str) -> MedfmError:
        return MedfmError(f"model card {filename}: {problem}")

    if not isinstance(data, dict):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    missing = [name for name in _FIELDS if name not in data]
    unknown = [name for name in data if name not in _FIELDS]
    if missing:
        raise fail(f"missing field(s): {', '.join(missing)}")
    if "medfm_names" in unknown:
        raise fail("'medfm_names' is not written in a card: register each name once in medfm/catalog/registry.py")
    if unknown:
        raise fail(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(_FIELDS)})")

    for name in _TEXT_FIELDS:
        if not isinstance(data[name], str) or not data[name].strip():
            raise fail(f"'{name}' must be a non-empty string, got {data[name]!r}")
    for name in _OPTIONAL_TEXT_FIELDS:
        if data[name] is not None and (not isinstance(data[name], str) or not data[name].strip()):
            raise fail(f"'{name}' must be a non-empty string or null, got {data[name]!r}")
    for name in ("url", "code"):
        if data[name] is not None and not data[name].startswith(("https://", "http://")):
            raise fail(f"'{name}' must be an http(s) URL, got {data[name]!r}")
    if not _SLUG.fullmatch(data["id"]):
        raise fail(f"'id' must be a lowercase slug like 'sam-med2d', got {data['id']!r}")
    if data["arxiv"] is not None and not _ARXIV_ID.fullmatch(data["arxiv"]):
        raise fail(f"'arxiv' must be an arXiv id like '2304.12306' or null, got {data['arxiv']!r}")
    year = data["year"]
    if not isinstance(year, int) or isinstance(year, bool) or not 1990 <= year <= 2100:
        raise fail(f"'year' must be an integer year, got {year!r}")

    if data["category"] not in SUBCATEGORIES:
        raise fail(_outside("category", data["category"], tuple(SUBCATEGORIES)))
    subcategories = SUBCATEGORIES[data["category"]]
    if data["subcategory"] not in subcategories:
        raise fail(_outside(f"subcategory of {data['category']}", data["subcategory"], subcategories))
    if data["support"] not in SUPPORT_LEVELS:
        raise fail(_outside("support", data["support"], SUPPORT_LEVELS))

    for name, vocabulary in _LIST_FIELDS.items():
        values = data[name]
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            raise fail(f"'{name}' must be a list of strings, got {values!r}")
        if len(set(values)) != len(values):
            raise fail(f"'{name}' lists a value twice: {values!r}")
        for value in values:
            if value not in vocabulary:
                raise fail(_outside(name, value, vocabulary))

    names = tuple(entry.name for entry in registry.entries_of_card(data["id"]))
    return ModelCard(**{key: tuple(value) if key in _LIST_FIELDS else value for key, value in data.items()},
                     medfm_names=names)


def _outside(what: str, value: object, vocabulary: tuple[str, ...]) -> str:
    return f"{what} {value!r} is not one of: {', '.join(vocabulary)}"


def _canonical(value: str, vocabulary: tuple[str, ...], what: str) -> str:
    """``value`` spelled as in ``vocabulary`` (case-insensitive), or a MedfmError with suggestions."""
    by_lower = {word.lower(): word for word in vocabulary}
    if value.strip().lower() in by_lower:
        return by_lower[value.strip().lower()]
    close = difflib.get_close_matches(value.strip().lower(), by_lower, n=3, cutoff=0.5)
    suggestion = f"; did you mean: {', '.join(by_lower[word] for word in close)}?" if close else ""
    raise MedfmError(f"unknown {what} '{value}'{suggestion} (one of: {', '.join(vocabulary)})")
