"""Every malformed-file reproducer of issue 14, built by code, each with its own test.

Files that once crashed or hung a process (SimpleITK on ``NDims = 100``, a FIFO) are read through
the fuzz harness's limited worker process, so a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import medfm
from medfm.errors import InputFileError, OptionError
from tests.conftest import EXAMPLES, write_dicom_series
from tests.fuzz_harness import ReaderWorker


@pytest.fixture(scope="module")
def worker():
    with ReaderWorker(timeout=20) as reader:
        yield reader


@contextmanager
def lenient_pydicom():
    """Let pydicom write the invalid values a broken writer would."""
    from pydicom import config

    previous = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = previous


def ct_dicom(tmp_path: Path, name: str = "ct.dcm", **changes) -> Path:
    """pydicom's CT_small.dcm with some attributes replaced (None deletes one; text that pydicom
    refuses to store, such as "abc" for a number, is written over a placeholder in the file)."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    replacements = []
    with lenient_pydicom():
        for keyword, value in changes.items():
            if value is None:
                delattr(dataset, keyword)
            elif isinstance(value, str) and value.strip() and not value.replace(".", "").isdigit():
                placeholder = f"7{len(replacements)}77"
                setattr(dataset, keyword, placeholder)
                replacements.append((placeholder.encode(), value.encode().ljust(4)))
            else:
                setattr(dataset, keyword, value)
        path = tmp_path / name
        dataset.save_as(path)
    data = path.read_bytes()
    for placeholder, value in replacements:
        assert data.count(placeholder) == 1
        data = data.replace(placeholder, value)
    path.write_bytes(data)
    return path


def mha(tmp_path: Path, **fields: str) -> Path:
    """A tiny valid MetaImage volume with header fields replaced."""
    header = {"ObjectType": "Image", "NDims": "3", "DimSize": "4 3 2", "ElementType": "MET_UCHAR",
              "ElementSpacing": "1 1 2", "ElementDataFile": "LOCAL", **fields}
    path = tmp_path / "volume.mha"
    data_file = header.pop("ElementDataFile")
    text = "".join(f"{key} = {value}\n" for key, value in header.items()) + f"ElementDataFile = {data_file}\n"
    path.write_bytes(text.encode() + bytes(range(24)))
    return path


# --- processes that crashed or hung ---------------------------------------------------------


@pytest.mark.parametrize("ndims", ["100", "1000", "-1"])
def test_metaimage_ndims_that_crashed_simpleitk_are_one_error(tmp_path, worker, ndims) -> None:
    outcome = worker.read(mha(tmp_path, NDims=ndims))
    assert (outcome.outcome, outcome.type) == ("medfm", "InputFileError") and "NDims" in outcome.message


def test_fifo_named_png_is_refused_without_blocking(tmp_path, worker) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = worker.read(fifo)
    assert outcome.outcome == "medfm" and "not a regular file" in outcome.message


@pytest.mark.parametrize("data_file", ["/etc/passwd", "/dev/zero", "../outside.raw"])
def test_metaimage_data_file_stays_in_the_header_folder(tmp_path, data_file) -> None:
    (tmp_path / "outside.raw").write_bytes(bytes(24))
    folder = tmp_path / "case"
    folder.mkdir()
    with pytest.raises(InputFileError, match="ElementDataFile .* outside the header's folder"):
        medfm.read_image(mha(folder, ElementDataFile=data_file).with_suffix(".mha"))


def test_metaimage_header_fields_are_checked(tmp_path) -> None:
    for fields, field in [({"DimSize": "4 3"}, "DimSize"), ({"ElementSpacing": "1 nan 2"}, "ElementSpacing"),
                          ({"ElementType": "MET_STRING"}, "ElementType"), ({"DimSize": "4000 3000 2000"}, "read limit"),
                          ({"TransformMatrix": "1 0 0 0 1 0 0 0 0"}, "TransformMatrix")]:
        with pytest.raises(InputFileError, match=field):
            medfm.read_image(mha(tmp_path, **fields))
    truncated = mha(tmp_path)
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(InputFileError, match="truncated"):
        medfm.read_image(truncated)
    assert medfm.read_image(mha(tmp_path)).array.shape == (2, 3, 4)


# --- raw exceptions that escaped ------------------------------------------------------------


def test_png_over_the_decompression_bomb_limit(tmp_path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 10000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="more pixels than Pillow opens"):
        medfm.read_image(path)


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept", "PixelSpacing"])
@pytest.mark.parametrize("value", ["", "abc"])
def test_dicom_rescale_and_spacing_that_are_empty_or_not_numbers(tmp_path, keyword, value) -> None:
    with pytest.raises(InputFileError, match=keyword):
        medfm.read_image(ct_dicom(tmp_path, **{keyword: value}))


@pytest.mark.parametrize("name", ["image_dfl.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_truncated_deflate_jpeg2000_and_jpegls_dicom(tmp_path, name) -> None:
    data = Path(get_testdata_file(name)).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(InputFileError, match=name):
        medfm.read_image(path)


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("series") / "ct"
    volume = np.arange(3 * 8 * 8, dtype=np.float64).reshape(3, 8, 8)
    write_dicom_series(volume, (2.0, 0.5, 0.5), (0.0, 0.0, 0.0), np.eye(3), folder, file_names=["a.dcm", "b.dcm", "c.dcm"])
    return folder


@pytest.mark.parametrize("keyword,value", [("ImageOrientationPatient", [1, 0, 0, 0]), ("ImagePositionPatient", [0, 0]),
                                           ("ImageOrientationPatient", ["nan", 0, 0, 0, 1, 0]),
                                           ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), ("PixelSpacing", None),
                                           ("PixelSpacing", [0, 0.5])])
def test_series_with_short_or_bad_geometry(small_series, tmp_path, keyword, value) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for file in small_series.iterdir():
        dataset = pydicom.dcmread(file)
        with lenient_pydicom():
            if value is None:
                delattr(dataset, keyword)
            else:
                setattr(dataset, keyword, value)
            dataset.save_as(folder / file.name)
    with pytest.raises(InputFileError, match=keyword):
        medfm.read_image(folder)


def _zip_of(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, file.name)
    return path


def _set_zip_header(path: Path, local_offset: int, central_offset: int, fmt: str, value: int) -> None:
    """Write ``value`` into every member's local and central header at the given field offsets."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        at = data.find(signature)
        while at >= 0:
            struct.pack_into(fmt, data, at + offset, value)
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))


def test_encrypted_method_99_and_corrupt_zips(small_series, tmp_path) -> None:
    encrypted = _zip_of(small_series, tmp_path / "encrypted.zip")
    _set_zip_header(encrypted, 6, 8, "<H", 0x1)
    with pytest.raises(InputFileError, match="encrypted"):
        medfm.read_image(encrypted)
    method_99 = _zip_of(small_series, tmp_path / "aes.zip")
    _set_zip_header(method_99, 8, 10, "<H", 99)
    with pytest.raises(InputFileError, match="compression method 99"):
        medfm.read_image(method_99)
    corrupt = _zip_of(small_series, tmp_path / "corrupt.zip")
    data = bytearray(corrupt.read_bytes())
    data[100:140] = bytes(40)
    corrupt.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="corrupt.zip"):
        medfm.read_image(corrupt)


@pytest.mark.parametrize("spacing,problem", [(np.array(2.5), r"shape \(\)"), (np.array("1 1 1"), "not a real number"),
                                             (np.ones((3, 3)), r"shape \(3, 3\)"), (np.array([1.0, 0.0, 1.0]), "positive"),
                                             (np.array([1.0, -2.0, 1.0]), "positive"), (np.array([1.0, np.inf, 1.0]), "finite"),
                                             (np.array([np.nan, 1.0, 1.0]), "finite")])
def test_npz_spacing_of_the_wrong_shape_type_or_value(tmp_path, spacing, problem) -> None:
    path = tmp_path / "case.npz"
    np.savez(path, imgs=np.ones((3, 8, 8), np.uint8), spacing=spacing)
    with pytest.raises(InputFileError, match=f"spacing.*{problem}|{problem}.*spacing|pixel type"):
        medfm.read_image(path)


def test_one_by_4000_png_is_refused_before_a_model_resize_breaks(tmp_path) -> None:
    path = tmp_path / "line.png"
    Image.fromarray(np.arange(4000, dtype=np.uint16).reshape(1, 4000) % 256).convert("L").save(path)
    with pytest.raises(InputFileError, match="1 x 4000 pixels"):
        medfm.read_image(path)


def test_float_tiff_reads_as_float32(tmp_path) -> None:
    values = np.linspace(-3.5, 1000.25, 24 * 32, dtype=np.float32).reshape(24, 32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    image = medfm.read_image(path)
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, values)
    assert image.summary()["intensity"]["max"] == pytest.approx(1000.25)


@pytest.mark.parametrize("dtype,scale", [(np.int8, 1), (np.uint32, 1 << 30), (np.int16, 1)])
def test_tiff_sample_formats_pillow_misreads_keep_their_values(tmp_path, dtype, scale) -> None:
    tifffile = pytest.importorskip("tifffile")
    values = ((np.arange(24 * 32).reshape(24, 32) % 7 - 3) * scale).astype(dtype)
    path = tmp_path / "samples.tif"
    tifffile.imwrite(path, values)
    np.testing.assert_array_equal(medfm.read_image(path).array, values)


def test_float64_tiff_pillow_cannot_decode_is_one_error(tmp_path) -> None:
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "double.tif"
    tifffile.imwrite(path, np.ones((24, 32)))
    with pytest.raises(InputFileError, match="a variant Pillow does not decode"):
        medfm.read_image(path)


# --- silently wrong reads -------------------------------------------------------------------


def nifti_with_srow(tmp_path: Path, row: int, column: int, value: float) -> Path:
    """A NIfTI whose sform (the affine nibabel uses) has one entry patched in the file, as nibabel
    itself refuses to write a degenerate affine."""
    path = tmp_path / "volume.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 280 + 16 * row + 4 * column, value)  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_nifti_zero_nan_or_infinite_spacing(tmp_path, value) -> None:
    with pytest.raises(InputFileError, match="spacing"):
        medfm.read_image(nifti_with_srow(tmp_path, 1, 1, value))


@pytest.mark.parametrize("value,problem", [(float("nan"), "spacing is not finite"), (0.5, "direction is not orthonormal")])
def test_nifti_nan_or_sheared_direction(tmp_path, value, problem) -> None:
    with pytest.raises(InputFileError, match=problem):
        medfm.read_image(nifti_with_srow(tmp_path, 0, 1, value))


def test_negative_spacing_in_metaimage(tmp_path) -> None:
    with pytest.raises(InputFileError, match="ElementSpacing must be positive"):
        medfm.read_image(mha(tmp_path, ElementSpacing="1 -1 2"))


@pytest.mark.parametrize("dtype", [np.complex64, "RGB24"])
def test_nifti_complex_and_rgb24_are_refused(tmp_path, dtype) -> None:
    if dtype == "RGB24":
        data = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    else:
        data = np.ones((4, 5, 6), dtype)
    path = tmp_path / "volume.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputFileError, match="not a real number"):
        medfm.read_image(path)


@pytest.mark.parametrize("imgs", [np.ones((8, 8, 3), bool), np.full((8, 8), "a"), np.ones((3, 8, 8), np.complex128)])
def test_npz_boolean_string_and_complex_images_are_refused(tmp_path, imgs) -> None:
    path = tmp_path / "case.npz"
    np.savez(path, imgs=imgs)
    with pytest.raises(InputFileError, match="not a real number"):
        medfm.read_image(path)


@pytest.mark.parametrize("changes", [{"Rows": 64}, {"Rows": 1}, {"Rows": 2, "Columns": 2}])
def test_dicom_pixel_data_longer_than_rows_x_columns(tmp_path, changes) -> None:
    with pytest.raises(InputFileError, match="declares"):
        medfm.read_image(ct_dicom(tmp_path, **changes))


def test_palette_color_dicom_is_mapped_through_its_table() -> None:
    from pydicom.pixels import apply_color_lut

    path = get_testdata_file("examples_palette.dcm")
    image = medfm.read_image(path)
    dataset = pydicom.dcmread(path)
    assert image.array.shape == (*dataset.pixel_array.shape, 3)
    np.testing.assert_array_equal(image.array, apply_color_lut(dataset.pixel_array, dataset))


def test_one_frame_of_a_multiframe_dicom() -> None:
    path = get_testdata_file("rtdose.dcm")
    frame = medfm.read_image(path, frame=3)
    np.testing.assert_array_equal(frame.array, pydicom.dcmread(path).pixel_array[3])
    assert not frame.is_volume and frame.metadata["frame"] == 3
    with pytest.raises(InputFileError, match="frame 15 is outside the file's 15 frame"):
        medfm.read_image(path, frame=15)
    with pytest.raises(OptionError, match="multi-frame DICOM"):
        medfm.read_image(EXAMPLES / "busi_benign_001.png", frame=0)


# --- resources ------------------------------------------------------------------------------


def test_tiny_nifti_declaring_a_huge_volume_fails_fast(tmp_path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 300))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4 + b"\x00" * 33)  # 352 + 37 bytes, no pixel data
    started = time.perf_counter()
    with pytest.raises(InputFileError, match="over the read limit"):
        medfm.read_image(path)
    with pytest.raises(InputFileError, match="truncated"):
        medfm.read_image(path, max_bytes=8 << 30)
    assert time.perf_counter() - started < 2.0


def test_zip_bomb_and_size_limit(tmp_path) -> None:
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", bytes(64 << 20))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(InputFileError, match="expands .* times"):
        medfm.read_image(bomb)
    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("slice.dcm", bytes(2 << 20))
    with pytest.raises(InputFileError, match="unpacks to"):
        medfm.read_image(stored, max_bytes=1 << 20)


def test_deflated_dicom_that_inflates_past_the_limit(tmp_path) -> None:
    dataset = pydicom.dcmread(get_testdata_file("image_dfl.dcm"))
    dataset.add_new(0x00291010, "OB", bytes(16 << 20))  # 16 MiB of zeros deflate to a few KB
    path = tmp_path / "bomb.dcm"
    dataset.save_as(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(InputFileError, match="inflates past the read limit"):
        medfm.read_image(path, max_bytes=4 << 20)
    assert medfm.read_image(path).array.shape == (512, 512)


def test_info_summary_does_not_copy_the_array_to_float64() -> None:
    image = medfm.MedicalImage(array=np.arange(2000 * 2000, dtype=np.int16).reshape(2000, 2000),
                               spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=np.eye(2))
    tracemalloc.start()
    image.summary()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5 * image.array.nbytes


def test_cli_frame_and_read_limit_options() -> None:
    from tests.test_cli import run_medfm

    result = run_medfm("info", "--json", "--frame", "3", get_testdata_file("rtdose.dcm"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shape"] == [10, 10]
    result = run_medfm("info", "--max-bytes", "1000", str(EXAMPLES / "busi_benign_001.png"))
    assert result.returncode == 2 and "over the read limit" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
