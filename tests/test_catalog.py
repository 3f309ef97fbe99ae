"""The model catalog: every system of the survey has a valid card, and the look-ups work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from medfm.catalog import (
    CARD_TABLE_COLUMNS,
    MODALITIES,
    PROMPT_TYPES,
    SUBCATEGORIES,
    SUPPORT_LEVELS,
    TASKS,
    ModelCard,
    _load_cards,
    cards_table_rows,
    get_card,
    list_models,
    table_title,
)
from medfm.catalog import registry
from medfm.errors import CheckpointError, MedfmError
from medfm.preprocess import PreprocessConfig

TEXTUALLY_PROMPTED = {
    "MedCLIP", "CheXzero", "BioViL-T", "BiomedCLIP",  # contrastive
    "Med-PaLM 2", "Clinical-BERT", "Med-Flamingo",  # generative
    "MedBLIP",  # hybrid
    "XrayGPT", "LLaVA-Med", "Visual Med-Alpaca", "PMC-LLaMA", "ClinicalGPT",  # conversational
}
VISUALLY_PROMPTED = {
    "SAM-U", "SAMed", "AutoSAM", "MedSAM", "Medical SAM Adapter", "SAM-Med2D", "LiteMedSAM",  # adaptation
    "SAM", "SAM zero-shot study", "RadFM", "BiomedGPT", "Med-PaLM M", "GMAI",  # generalist
}
# language models medfm loads that the survey does not list (SmolLM2 is the offline default LM;
# BioMedLM and BioGPT are the language models of MedBLIP and the biomedical GPT layouts)
LANGUAGE_MODELS = {"SmolLM2", "BioMedLM", "BioGPT"}
SAM_FAMILY = {"SAM", "MedSAM", "LiteMedSAM", "SAM-Med2D", "Medical SAM Adapter", "SAM-U", "SAM zero-shot study"}
MEDFM_MODELS = {"medfm-litemedsam-ft", "medfm-litemedsam-clicks", "medfm-clip-small", "medfm-experts-smollm2", "medfm-vlm-small",
                "medfm-lm-small"}  # medfm's own, beside the survey's systems
NO_PUBLIC_WEIGHTS = {
    "Med-PaLM 2", "Med-PaLM M", "GMAI", "Clinical-BERT", "Visual Med-Alpaca",
}
CARDS_DIR = Path(str(resources.files("medfm.catalog") / "cards"))


def names(cards: list[ModelCard]) -> set[str]:
    return {card.name for card in cards}


def test_every_system_of_the_survey_has_a_card():
    assert len(TEXTUALLY_PROMPTED | VISUALLY_PROMPTED) == 26
    assert names(list_models()) == TEXTUALLY_PROMPTED | VISUALLY_PROMPTED | MEDFM_MODELS | LANGUAGE_MODELS


def test_every_card_validates_and_matches_its_file():
    cards = _load_cards(CARDS_DIR)
    assert len(cards) == len(list(CARDS_DIR.glob("*.json"))) == 26 + len(MEDFM_MODELS) + len(LANGUAGE_MODELS)
    for card in cards:
        on_disk = json.loads((CARDS_DIR / f"{card.id}.json").read_text(encoding="utf-8"))
        assert card.to_dict() == on_disk | {"medfm_names": [entry.name for entry in registry.entries_of_card(card.id)]}
        assert card.subcategory in SUBCATEGORIES[card.category]
        assert set(card.modalities) <= set(MODALITIES)
        assert set(card.tasks) <= set(TASKS)
        assert set(card.prompt_types) <= set(PROMPT_TYPES)
        assert card.support in SUPPORT_LEVELS


def test_every_registered_name_is_on_its_card_and_resolves_in_its_family():
    cards = {card.id: card for card in list_models()}
    for entry in registry.ENTRIES:
        assert entry.name in cards[entry.card].medfm_names and get_card(entry.name).id == entry.card
        assert callable(registry.resolve_reference(entry.builder)), entry.name
        if entry.family == "segment":  # published SAM-family weights carry their preprocessing
            assert entry.weights_kind == "bundled" or isinstance(entry.preprocessing(), PreprocessConfig)
        # a card that loads by name runs its weights, runs them as a method, or has the architecture
        assert entry.support not in ("planned", "closed-weights", "trainable-recipe"), entry.name
    from medfm.clip.model import load as load_clip  # noqa: F401 - each family's loader takes its names
    from medfm.lm import available_lms
    from medfm.segment.model import available_models
    from medfm.vlm.api import check_name

    assert available_models() == sorted(registry.names("segment")) and available_lms() == registry.names("lm")
    for name in registry.names("vlm"):
        if registry.get(name).weights_kind != "none":
            check_name(name)
    assert set(registry.DEFAULTS.values()) <= {entry.name for entry in registry.ENTRIES if entry.offline}


def test_a_name_given_to_the_wrong_family_says_where_it_belongs():
    from medfm.clip.model import load as load_clip
    from medfm.lm import load as load_lm
    from medfm.segment.model import load as load_segment
    from medfm.vlm.api import check_name

    with pytest.raises(MedfmError, match=r"unknown model 'medfm-clip-small' \('medfm-clip-small' is of the clip family: medfm classify"):
        load_segment("medfm-clip-small")
    with pytest.raises(MedfmError, match=r"'litemedsam' is of the segment family: medfm segment / medfm.load"):
        load_clip("litemedsam")
    with pytest.raises(MedfmError, match=r"'medfm-experts-smollm2' is of the vlm family: medfm ask"):
        load_lm("medfm-experts-smollm2")
    with pytest.raises(MedfmError, match=r"'smollm2-135m' is of the lm family: medfm qa"):
        check_name("smollm2-135m")


@pytest.fixture
def offline(monkeypatch):
    """No network: only what ships with medfm and its wheels (and medfm's cache) can load."""
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", [entry.name for entry in registry.ENTRIES if entry.offline])
def test_what_says_it_runs_offline_loads_offline(offline, name):
    model = family_loader(registry.get(name).family)(name)  # the family's loader, as a user calls it
    assert model.name == name


def family_loader(family: str):  # noqa: ANN201 - the public loader of a family
    from medfm.clip.model import load as load_clip
    from medfm.lm import load as load_lm
    from medfm.segment.model import load as load_segment
    from medfm.vlm.api import load as load_vlm

    return {"segment": load_segment, "clip": load_clip, "lm": load_lm, "vlm": load_vlm}[family]


@pytest.mark.parametrize("name", [entry.name for entry in registry.ENTRIES if entry.weights_kind in ("url", "none")])
def test_what_needs_a_download_or_a_file_says_so_through_its_family_loader(offline, monkeypatch, tmp_path, name):
    # the family's loader finds the name in the registry and refuses at once, before any work: a
    # download offline with an empty cache names the address; weights nobody publishes say what to pass
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path))
    entry = registry.get(name)
    expected = "not cached and medfm is offline: download https://" if entry.weights_kind == "url" else entry.weights_location
    with pytest.raises(MedfmError) as refusal:
        family_loader(entry.family)(name)
    assert expected in str(refusal.value)


def test_a_bad_registry_entry_names_itself():
    good = registry.get("litemedsam")
    for changes, problem in [
        ({"family": "audio"}, "family 'audio'"),
        ({"weights": "ftp:x"}, "weights kind 'ftp'"),
        ({"offline": True, "weights": "url:https://example.org/x.pth"}, "offline=True"),
        ({"builder": "medfm.segment.model.load"}, "module:function"),
    ]:
        with pytest.raises(MedfmError, match=f"entry 'litemedsam': .*{problem}"):
            registry._check((dataclasses.replace(good, **changes),))
    with pytest.raises(MedfmError, match="registered twice"):
        registry._check((good, good))


def test_support_tells_the_truth_today():
    assert names(list_models(support="closed-weights")) == NO_PUBLIC_WEIGHTS
    running = list_models(support="runs-published-weights")
    assert {card.id for card in running} == {"litemedsam", "sam", "medsam", "sam-med2d", "samed", "chexzero", "biomedclip", "smollm2"}
    assert all(card.medfm_names for card in running)
    # MSA publishes no weights: medfm runs its architecture on the user's own checkpoints; BioViL-T's
    # prior-image fusion is built and tested, its weights not loaded; the published medical LMs load
    # from the user's folder or their hub id, tested on tiny random checkpoints in their layouts
    language = {"pmc-llama", "clinicalgpt", "biomedlm", "biogpt", "llava-med", "xraygpt", "med-flamingo", "medblip",
                "radfm"}
    assert {card.id for card in list_models(support="architecture")} == {"msa", "biovil-t"} | language
    assert all(card.medfm_names for card in list_models(support="architecture") if card.id != "biovil-t")
    # MedCLIP's semantic-matching loss trains medfm's dual encoders; AutoSAM's prompt generator is a recipe
    from medfm.clip import semantic_matching_loss  # noqa: F401 - MedCLIP's recipe exists
    from medfm.segment.variants import RECIPES

    assert {card.id for card in list_models(support="trainable-recipe")} == {"medclip", "autosam"}
    assert "autoprompt" in RECIPES and "--recipe autoprompt" in get_card("autosam").notes
    # SAM-U and the zero-shot study run over loaded models: the commands their cards name exist;
    # medfm-experts-smollm2 runs over medfm-clip-small and SmolLM2
    from medfm.segment.uncertainty import predict_with_uncertainty  # noqa: F401 - SAM-U

    assert {card.id for card in list_models(support="runs-as-method")} == {"sam-u", "sam-zero-shot-study", "medfm-experts-smollm2"}
    assert (Path(__file__).parents[1] / "benchmarks" / "zero_shot_study.py").is_file()
    # medfm's own models ship in the package and load by the names their cards give
    trained = list_models(support="medfm-trained")
    shipped = {entry.name for entry in registry.ENTRIES if entry.weights_kind == "bundled"}
    assert {name for card in trained for name in card.medfm_names} == shipped >= {registry.DEFAULTS["segment"]}
    assert "default" not in get_card("litemedsam").notes.split("medfm's default")[0].lower()
    assert {card.support for card in list_models()} == set(SUPPORT_LEVELS)
    assert all(card.weights is None for card in list_models(support="closed-weights"))


def test_to_dict_is_json_with_lists():
    data = get_card("medsam").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["prompt_types"] == ["box"] and data["medfm_names"] == ["medsam"]


def test_filter_by_category_and_subcategory():
    assert names(list_models(category="textually-prompted")) == TEXTUALLY_PROMPTED | LANGUAGE_MODELS | {"medfm-clip-small", "medfm-experts-smollm2", "medfm-vlm-small", "medfm-lm-small"}
    assert names(list_models(category="Visually-Prompted")) == VISUALLY_PROMPTED | {"medfm-litemedsam-ft", "medfm-litemedsam-clicks"}
    assert names(list_models(category="contrastive")) == {"MedCLIP", "CheXzero", "BioViL-T", "BiomedCLIP", "medfm-clip-small"}
    assert names(list_models(category="hybrid")) == {"MedBLIP"}


def test_filter_by_modality_is_case_insensitive():
    ct = names(list_models(modality="ct"))
    assert {"MedSAM", "SAMed", "SAM-Med2D", "LiteMedSAM", "RadFM"} <= ct
    assert not ct & {"CheXzero", "MedCLIP", "SAM", "PMC-LLaMA"}
    assert names(list_models(modality="x-RAY")) >= {"CheXzero", "MedCLIP", "BioViL-T", "XrayGPT"}


def test_filter_by_prompt_box_gives_the_sam_family():
    assert names(list_models(prompt="box")) == SAM_FAMILY | {"medfm-litemedsam-ft", "medfm-litemedsam-clicks"}
    assert names(list_models(prompt="mask")) == {"SAM", "SAM-Med2D"}
    assert names(list_models(prompt="none")) == {"SAMed", "AutoSAM", "Clinical-BERT"}


def test_filters_combine_and_results_are_sorted():
    assert names(list_models(category="visually-prompted", modality="CT", prompt="box")) == {
        "MedSAM", "LiteMedSAM", "medfm-litemedsam-ft", "medfm-litemedsam-clicks", "SAM-Med2D", "Medical SAM Adapter",
        "SAM zero-shot study",
    }
    cards = list_models()
    assert cards == sorted(cards, key=lambda card: (card.category, card.name.lower()))
    assert cards[0].category == "textually-prompted" and cards[-1].category == "visually-prompted"


@pytest.mark.parametrize(
    ("filters", "suggestion"),
    [({"modality": "CTT"}, "CT"), ({"prompt": "boxes"}, "box"), ({"category": "adaptations"}, "adaptation")],
)
def test_unknown_filter_value_is_a_clear_error(filters, suggestion):
    with pytest.raises(MedfmError, match=f"did you mean: {suggestion}"):
        list_models(**filters)


@pytest.mark.parametrize(
    ("query", "expected_id"),
    [
        ("medsam", "medsam"),  # id
        ("sam-med2d", "sam-med2d"),
        ("MedSAM", "medsam"),  # display name, any case
        ("medical sam adapter", "msa"),
        ("Med-PaLM 2", "med-palm-2"),
        ("litemedsam", "litemedsam"),  # medfm name
        ("sam-vit-l", "sam"),
        ("sam-vit-h", "sam"),
        ("msa", "msa"),
    ],
)
def test_get_card_by_id_name_or_medfm_name(query, expected_id):
    assert get_card(query).id == expected_id


def test_unknown_name_suggests_close_matches():
    with pytest.raises(MedfmError, match="did you mean: .*medsam"):
        get_card("medsan")
    with pytest.raises(MedfmError, match="medfm models"):
        get_card("resnet-50-imagenet")


def test_cards_table_rows():
    [row] = cards_table_rows([get_card("sam-med2d")])
    assert len(row) == len(CARD_TABLE_COLUMNS) and CARD_TABLE_COLUMNS[1] == "--model"
    assert row[:6] == ["SAM-Med2D", "sam-med2d", "segment", "no", "2023", "visually-prompted/adaptation"]
    assert row[7:] == ["box, point, mask", "runs-published-weights"]
    assert [row[1:4] for row in cards_table_rows([get_card("sam")])] == [[f"sam-vit-{s}", "segment", "no"] for s in "blh"]
    assert cards_table_rows([get_card("medfm-litemedsam-ft")])[0][1:4] == ["medfm-litemedsam-ft", "segment", "yes"]
    assert cards_table_rows([get_card("gmai")])[0][1:4] == ["-", "-", "-"]
    assert cards_table_rows([get_card("gmai")])[0][6:8] == ["-", "-"]
    assert table_title(list_models()) == (f"{len(list_models())} model cards, {len(registry.ENTRIES)} loadable by "
                                          f"--model name, {sum(e.offline for e in registry.ENTRIES)} of them offline")


# -- malformed cards: the loader names the file and the problem ------------------------------------


DROP = object()  # a change that removes the field


def write_card(directory: Path, filename: str, **changes: object) -> None:
    """Write a copy of MedSAM's card with ``changes`` applied."""
    data = json.loads((CARDS_DIR / "medsam.json").read_text(encoding="utf-8"))
    data.update(changes)
    data = {key: value for key, value in data.items() if value is not DROP}
    (directory / filename).write_text(json.dumps(data), encoding="utf-8")


def test_a_valid_card_loads_from_any_directory(tmp_path):
    write_card(tmp_path, "medsam.json")
    (tmp_path / "README.txt").write_text("not a card")
    [card] = _load_cards(tmp_path)
    assert card == get_card("medsam")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"homepage": "https://example.org"}, "unknown field.*homepage"),
        ({"license": DROP}, "missing field.*license"),
        ({"modalities": ["CT", "sonar"]}, "modalities 'sonar' is not one of"),
        ({"prompt_types": ["lasso"]}, "prompt_types 'lasso'"),
        ({"support": "works"}, "support 'works'"),
        ({"category": "audio-prompted"}, "category 'audio-prompted'"),
        ({"subcategory": "contrastive"}, "subcategory of visually-prompted 'contrastive'"),
        ({"year": "2023"}, "'year' must be an integer"),
        ({"arxiv": "arXiv:2304.12306"}, "'arxiv' must be an arXiv id"),
        ({"id": "MedSAM"}, "'id' must be a lowercase slug"),
        ({"code": "github.com/bowang-lab/MedSAM"}, "'code' must be an http"),
        ({"modalities": "CT"}, "'modalities' must be a list of strings"),
        ({"tasks": ["segmentation", "segmentation"]}, "'tasks' lists a value twice"),
        ({"category": ["visually-prompted"]}, "'category' must be a non-empty string"),
    ],
)
def test_malformed_card_is_a_clear_error_naming_the_file(tmp_path, changes, problem):
    write_card(tmp_path, "broken.json", **changes)
    with pytest.raises(MedfmError, match=f"model card broken.json: {problem}"):
        _load_cards(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('{"id": "x",', encoding="utf-8")
    with pytest.raises(MedfmError, match="model card broken.json: not valid JSON"):
        _load_cards(tmp_path)


def test_duplicate_id_names_both_files(tmp_path):
    write_card(tmp_path, "a.json")
    write_card(tmp_path, "b.json", name="MedSAM copy")
    with pytest.raises(MedfmError, match="model card b.json: 'medsam'.*already used by a.json"):
        _load_cards(tmp_path)


def test_medfm_names_in_a_card_file_point_to_the_registry(tmp_path):
    write_card(tmp_path, "a.json", medfm_names=["medsam"])
    with pytest.raises(MedfmError, match="a.json: 'medfm_names' is not written in a card: register each name once"):
        _load_cards(tmp_path)


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(MedfmError, match="no model cards"):
        _load_cards(tmp_path)


def test_the_catalog_imports_no_model_family():
    # builders and preprocessing are dotted paths, imported only when a model is built
    code = ("import sys, medfm.catalog as c; c.cards_table_rows(c.list_models()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.split('.')[:2] in "
            "(['medfm', 'segment'], ['medfm', 'clip'], ['medfm', 'lm'], ['medfm', 'vlm'])))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
