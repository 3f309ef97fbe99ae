"""Evaluation datasets: the project's real collection, nnU-Net raw folders written here, layout errors, splits."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfm.errors import InputFileError
from medfm.data.datasets import (
    Case,
    discover_cases,
    normalise_modality,
    split_cases,
)

# --------------------------------------------------------------------------------------------------
# the real collection (../shared/data/seg)


@pytest.fixture(scope="module")
def collection(seg_data: Path) -> list[Case]:
    return discover_cases(seg_data)


@pytest.fixture(scope="module")
def manifest(seg_data: Path) -> dict:
    return {entry["name"]: entry for entry in json.loads((seg_data / "manifest.json").read_text())["datasets"]}


def by_dataset(cases: list[Case]) -> dict[str, list[Case]]:
    grouped: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        grouped[case.dataset].append(case)
    return grouped


def test_collection_has_every_dataset_and_case(collection, manifest):
    grouped = by_dataset(collection)
    assert len(grouped) == 23
    assert set(grouped) == set(manifest)
    for name, cases in grouped.items():
        assert len(cases) == manifest[name]["num_cases"], name
        for case in cases:
            assert case.image_path.is_file() and case.mask_path.is_file()
            assert case.image_path.parent.name == "images" and case.mask_path.parent.name == "masks"


def test_order_is_sorted_by_dataset_then_case(collection, seg_data):
    keys = [(case.dataset, case.case_id) for case in collection]
    assert keys == sorted(keys)
    assert discover_cases(seg_data) == collection  # deterministic


def test_modalities_are_normalised(collection):
    modality = {name: {case.modality for case in cases} for name, cases in by_dataset(collection).items()}
    expected = {
        "busi_breast_ultrasound": "ultrasound",
        "covid19_ct_lung_infection": "CT",
        "drive_retina_vessels": "fundus",
        "fives_vessel_samples": "fundus",
        "brain_mri_tumor_slices": "MR",
        "brain_mri_t1_aseg_slices": "MR",
        "isbi2012_em_membranes": "microscopy",
        "miccai2015_nuclei_he": "histopathology",
        "monuseg_nuclei_he": "histopathology",
        "glas_gland_samples": "histopathology",
        "ph2_dermoscopy": "dermoscopy",
        "kvasir_seg_polyp_sample": "endoscopy",
        "polyp_endoscopy_samples": "endoscopy",
        "covid_cxr_lungs_v7": "X-ray",
        "xray_angiography_stenosis_samples": "X-ray",
        "hc18_fetal_head_us": "ultrasound",
        "ct_samples_mixed": "CT",
        "mri_samples_mixed": "MR",
        "ultrasound_samples_mixed": "ultrasound",
    }
    for name, value in expected.items():
        assert modality[name] == {value}, name
    assert all(case.modality is not None for case in collection)


def test_label_names_come_from_the_manifest(collection):
    grouped = by_dataset(collection)
    assert grouped["covid19_ct_lung_infection"][0].label_names == {1: "ground-glass opacity (GGO)", 2: "consolidation"}
    assert grouped["drive_retina_vessels"][0].label_names == {1: "retinal blood vessels"}
    assert set(grouped["brain_mri_t1_aseg_slices"][0].label_names) == set(range(1, 15))
    # mixed sets annotate one class per image (cases.csv 'label'); the others may be present unlabelled
    for name in ("ct_samples_mixed", "mri_samples_mixed", "ultrasound_samples_mixed"):
        assert all(len(case.label_names) == 1 for case in grouped[name]), name
    assert len({next(iter(case.label_names)) for case in grouped["mri_samples_mixed"]}) == 7


def test_label_names_match_the_mask_values(collection):
    for cases in by_dataset(collection).values():
        case = cases[0]
        if case.is_volume:
            values = np.unique(np.asarray(nib.load(case.mask_path).dataobj))
        else:
            values = np.unique(np.asarray(Image.open(case.mask_path)))
        assert set(values.tolist()) - {0} <= set(case.label_names), (case.dataset, case.case_id)


def test_volumes_are_flagged_with_modality_and_labels_per_case(collection):
    volumes = [case for case in collection if case.is_volume]
    assert {case.dataset for case in volumes} == {"volumes3d_ct_mri"}
    by_id = {case.case_id: case for case in volumes}
    assert set(by_id) == {"totalseg_example_ct", "pyradiomics_brain1_mri", "pyradiomics_breast1_mri"}
    assert by_id["totalseg_example_ct"].modality == "CT"
    assert by_id["pyradiomics_brain1_mri"].modality == "MR"
    assert by_id["totalseg_example_ct"].label_names[5] == "liver"
    assert by_id["pyradiomics_breast1_mri"].label_names == {1: "lesion ROI"}
    assert all(case.image_path.name.endswith(".nii.gz") and case.mask_path.name.endswith(".nii.gz") for case in volumes)


def test_patient_keys_from_cases_csv(collection):
    grouped = by_dataset(collection)
    cxr = {case.case_id: case.patient for case in grouped["covid_cxr_lungs_v7"]}
    assert cxr["v7_6434"] == "263"  # metadata_patientid
    assert len(set(cxr.values())) < len(cxr)  # several images per patient
    assert {case.patient for case in grouped["ct_lesion_slices_flare25"]} >= {"000001"}
    assert all(case.patient for case in grouped["monuseg_nuclei_he"])  # the slide a tile was cut from
    assert all(case.patient is None for case in grouped["ph2_dermoscopy"])  # no cases.csv
    assert all(case.patient is None for case in grouped["polyp_endoscopy_samples"])  # empty group column


def test_filter_and_limit(seg_data):
    cases = discover_cases(seg_data, datasets=["ph2_dermoscopy", "busi_breast_ultrasound"], limit_per_dataset=3)
    assert [(case.dataset, len(case.case_id) > 0) for case in cases] == [("busi_breast_ultrasound", True)] * 3 + [
        ("ph2_dermoscopy", True)
    ] * 3
    full = discover_cases(seg_data, datasets=["ph2_dermoscopy"])
    assert cases[3:] == full[:3]
    with pytest.raises(InputFileError, match="no dataset named 'nope'"):
        discover_cases(seg_data, datasets=["nope"])


def test_one_dataset_folder_of_the_collection(seg_data, collection):
    cases = discover_cases(seg_data / "drive_retina_vessels")
    assert cases == [case for case in collection if case.dataset == "drive_retina_vessels"]
    assert cases[0].modality == "fundus"  # read from the parent's manifest.json


def test_split_by_patient_never_leaks(collection):
    names = ("covid_cxr_lungs_v7", "ct_lesion_slices_flare25", "monuseg_nuclei_he")
    cases = [case for case in collection if case.dataset in names]
    train, valid = split_cases(cases, validation_fraction=0.2, seed=0)
    assert sorted(train + valid, key=lambda c: (c.dataset, c.case_id)) == cases
    for name in names:
        train_patients = {c.patient for c in train if c.dataset == name}
        valid_patients = {c.patient for c in valid if c.dataset == name}
        assert valid_patients and train_patients, name
        assert not train_patients & valid_patients, name
    cxr_valid = sum(c.dataset == "covid_cxr_lungs_v7" for c in valid)
    assert 0.15 * 330 <= cxr_valid <= 0.25 * 330
    assert split_cases(cases, 0.2, seed=0) == (train, valid)
    assert split_cases(cases, 0.2, seed=1) != (train, valid)
    assert split_cases(list(reversed(cases)), 0.2, seed=0)[1] == list(reversed(valid))  # order-independent


# --------------------------------------------------------------------------------------------------
# split on cases written here


def make_case(dataset: str, case_id: str, patient: str | None) -> Case:
    return Case(dataset, case_id, Path(f"{case_id}.png"), Path(f"{case_id}.png"), None, {}, False, patient)


def test_split_by_case_when_no_patient_and_per_dataset():
    cases = [make_case("a", f"a{i:03d}", None) for i in range(100)] + [make_case("b", f"b{i}", None) for i in range(10)]
    train, valid = split_cases(cases, validation_fraction=0.2, seed=3)
    counts = Counter(case.dataset for case in valid)
    assert counts == {"a": 20, "b": 2}
    assert len(train) == 88
    assert split_cases(cases, 0.0)[1] == [] and split_cases(cases, 1.0)[0] == []
    with pytest.raises(ValueError):
        split_cases(cases, 1.5)


def test_split_raises_small_datasets_to_a_minimum_but_never_past_half():
    cases = ([make_case("big", f"g{i:03d}", None) for i in range(100)] + [make_case("small", f"s{i}", None) for i in range(10)]
             + [make_case("tiny", f"t{i}", None) for i in range(3)])
    counts = Counter(case.dataset for case in split_cases(cases, 0.2, seed=3, min_validation=4)[1])
    assert counts == {"big": 20, "small": 4, "tiny": 1}
    assert Counter(case.dataset for case in split_cases(cases, 0.2, seed=3)[1]) == {"big": 20, "small": 2, "tiny": 1}
    with pytest.raises(ValueError):
        split_cases(cases, 0.2, min_validation=-1)


def test_split_keeps_a_single_subject_together():
    cases = [make_case("one", f"slice{i}", "subject") for i in range(10)]
    train, valid = split_cases(cases, 0.2)
    assert len(train) == 10 and valid == []


# --------------------------------------------------------------------------------------------------
# nnU-Net raw folders written here


def write_nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def nnunet_v1(root: Path) -> Path:
    folder = root / "Task004_Hippocampus"
    volume = np.zeros((6, 7, 8), dtype=np.int16)
    for case in ("hippo_002", "hippo_001"):
        write_nifti(folder / "imagesTr" / f"{case}_0000.nii.gz", volume)
        write_nifti(folder / "labelsTr" / f"{case}.nii.gz", volume.astype(np.uint8))
    (folder / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 2,
        "tensorImageSize": "3D",
        "training": [{"image": "./imagesTr/hippo_001.nii.gz", "label": "./labelsTr/hippo_001.nii.gz"}],
    }))
    return folder


def nnunet_v2(root: Path) -> Path:
    folder = root / "Dataset120_Prostate2D"
    image = np.zeros((16, 20), dtype=np.uint8)
    for case in ("prostate_00", "prostate_01", "prostate_02"):
        write_png(folder / "imagesTr" / f"{case}_0000.png", image)
        write_png(folder / "imagesTr" / f"{case}_0001.png", image)  # a second channel (ADC)
        write_png(folder / "labelsTr" / f"{case}.png", image)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1, "TZ": 2, "whole gland": [1, 2]},
        "numTraining": 3,
        "file_ending": ".png",
    }))
    return folder


def test_nnunet_v1(tmp_path):
    folder = nnunet_v1(tmp_path)
    cases = discover_cases(folder)
    assert [case.case_id for case in cases] == ["hippo_001", "hippo_002"]
    case = cases[0]
    assert case.dataset == "Hippocampus"
    assert case.modality == "MR"
    assert case.label_names == {1: "Anterior", 2: "Posterior"}
    assert case.is_volume and case.patient is None
    assert case.image_path == folder / "imagesTr" / "hippo_001_0000.nii.gz"
    assert case.mask_path == folder / "labelsTr" / "hippo_001.nii.gz"


def test_nnunet_v2_multichannel_uses_channel_0(tmp_path):
    folder = nnunet_v2(tmp_path)
    cases = discover_cases(folder)
    assert [case.case_id for case in cases] == ["prostate_00", "prostate_01", "prostate_02"]
    assert all(case.image_path.name.endswith("_0000.png") for case in cases)
    assert cases[0].dataset == "Dataset120_Prostate2D"
    assert cases[0].modality == "MR"
    assert cases[0].label_names == {1: "PZ", 2: "TZ"}  # the region 'whole gland' has no single value
    assert not cases[0].is_volume


def test_collection_without_manifest_mixes_layouts(tmp_path):
    nnunet_v1(tmp_path)
    nnunet_v2(tmp_path)
    own = tmp_path / "my_set"
    write_png(own / "images" / "b.png", np.zeros((8, 8), np.uint8))
    write_png(own / "images" / "a.png", np.zeros((8, 8), np.uint8))
    write_png(own / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    write_png(own / "masks" / "b.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "notes").mkdir()  # not a dataset: ignored
    cases = discover_cases(tmp_path)
    assert [(case.dataset, case.case_id) for case in cases] == [
        ("Dataset120_Prostate2D", "prostate_00"), ("Dataset120_Prostate2D", "prostate_01"),
        ("Dataset120_Prostate2D", "prostate_02"), ("Hippocampus", "hippo_001"), ("Hippocampus", "hippo_002"),
        ("my_set", "a"), ("my_set", "b"),
    ]
    assert cases[-1].modality is None and cases[-1].label_names == {}


def test_nnunet_case_without_label_is_named(tmp_path):
    folder = nnunet_v1(tmp_path)
    (folder / "labelsTr" / "hippo_002.nii.gz").unlink()
    with pytest.raises(InputFileError, match="hippo_002_0000.nii.gz: image has no mask"):
        discover_cases(folder)


# --------------------------------------------------------------------------------------------------
# layout errors


def own_layout(root: Path, images: list[str], masks: list[str]) -> Path:
    for name in images:
        write_png(root / "images" / name, np.zeros((4, 4), np.uint8))
    for name in masks:
        write_png(root / "masks" / name, np.zeros((4, 4), np.uint8))
    return root


def test_image_without_mask_names_the_file(tmp_path):
    own_layout(tmp_path / "set", ["a.png", "b.jpg"], ["a.png"])
    with pytest.raises(InputFileError, match=r"b\.jpg: image has no mask") as error:
        discover_cases(tmp_path / "set")
    assert error.value.path == str(tmp_path / "set" / "images" / "b.jpg")


def test_mask_without_image_names_the_file(tmp_path):
    own_layout(tmp_path / "set", ["a.png"], ["a.png", "c.png"])
    with pytest.raises(InputFileError, match=r"c\.png: mask has no image"):
        discover_cases(tmp_path / "set")


def test_two_images_with_one_id(tmp_path):
    own_layout(tmp_path / "set", ["a.png", "a.jpg"], ["a.png"])
    with pytest.raises(InputFileError, match="two images have the id 'a'"):
        discover_cases(tmp_path / "set")


def test_jpeg_mask_is_refused(tmp_path):
    own_layout(tmp_path / "set", ["a.png"], ["a.jpg"])
    with pytest.raises(InputFileError, match="lossy"):
        discover_cases(tmp_path / "set")


def test_folder_in_no_layout_is_named(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "scan.png").write_bytes(b"")
    with pytest.raises(InputFileError, match="holds no evaluation data medfm recognises") as error:
        discover_cases(tmp_path / "stuff")
    assert error.value.path == str(tmp_path / "stuff")
    with pytest.raises(InputFileError, match="no such folder"):
        discover_cases(tmp_path / "absent")


def test_images_without_masks_folder(tmp_path):
    write_png(tmp_path / "set" / "images" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputFileError, match="has no masks/ folder"):
        discover_cases(tmp_path / "set")


def test_manifest_listing_an_absent_folder(tmp_path):
    own_layout(tmp_path / "one", ["a.png"], ["a.png"])
    (tmp_path / "manifest.json").write_text(json.dumps({"datasets": [
        {"name": "one", "modality": "CT (axial)", "target_structures": {"1": "liver"}},
        {"name": "two", "modality": "MRI"},
    ]}))
    with pytest.raises(InputFileError, match="absent: two"):
        discover_cases(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"datasets": [
        {"name": "one", "modality": "CT (axial)", "target_structures": {"1": "liver"}},
    ]}))
    [case] = discover_cases(tmp_path)
    assert (case.modality, case.label_names) == ("CT", {1: "liver"})


# --------------------------------------------------------------------------------------------------
# modality names


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ultrasound (breast)", "ultrasound"),
        ("CT (axial chest slices, COVID-19)", "CT"),
        ("fundus photography (colour retina)", "fundus"),
        ("MRI (brain, post-contrast T1-like axial slices)", "MR"),
        ("X-ray coronary angiography (invasive, grey)", "X-ray"),
        ("X-ray (chest radiographs, frontal PA/AP, COVID-19 patients, many sources)", "X-ray"),
        ("microscopy (serial-section transmission electron microscopy, Drosophila ventral nerve cord)", "microscopy"),
        ("histopathology (H&E, 40x TCGA tiles from several organs)", "histopathology"),
        ("dermoscopy (skin lesions)", "dermoscopy"),
        ("endoscopy (colonoscopy polyps)", "endoscopy"),
        ("MRI brain (256x256x25, 0.78x0.78x6.5 mm)", "MR"),
        ("CT and MRI 3D volumes (NIfTI)", None),
        ("T2", "MR"),
        ("ADC", "MR"),
        ("CT", "CT"),
        ("noNorm", None),
        ("", None),
        (None, None),
    ],
)
def test_normalise_modality(text, expected):
    assert normalise_modality(text) == expected
