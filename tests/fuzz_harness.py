"""Fuzzing medfm's readers: small real seeds, seeded mutations, and a reader process with limits.

Shared by ``tests/test_fuzz_readers.py`` (a few hundred files per run) and
``benchmarks/fuzz_readers.py`` (the long campaign). Every mutated file is read by a separate
worker process whose address space is capped (``RLIMIT_AS``) and whose every read has a time
limit; a worker that dies (signal) or hangs is recorded and replaced, so one bad file cannot take
the test run down. The only acceptable outcomes are a `MedicalImage` or a `MedfmError`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: Headroom over the worker's address space after its imports: a read may allocate at most this.
READ_MEMORY_LIMIT = 2 << 30

WORKER = r"""
import json, resource, sys, traceback, warnings
warnings.simplefilter("ignore")
import medfm, nibabel, pydicom, SimpleITK, PIL.Image
from medfm.errors import MedfmError
limit = int(sys.argv[1])
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + limit, vm + limit))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path = json.loads(line)["path"]
    try:
        image = medfm.read_image(path)
        image.summary()
        answer = {"outcome": "ok"}
    except MedfmError as error:
        answer = {"outcome": "medfm", "type": type(error).__name__, "message": str(error)[:300]}
    except MemoryError:
        answer = {"outcome": "over-memory", "type": "MemoryError", "message": ""}
    except BaseException as error:
        answer = {"outcome": "other", "type": type(error).__name__, "message": str(error)[:300],
                  "where": traceback.format_exc()[-1500:]}
    answer["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(answer), flush=True)
"""


@dataclass
class Outcome:
    """What reading one file did: ``ok``, ``medfm`` (with the error type), ``other``, ``crash``,
    ``timeout`` or ``over-memory``."""

    outcome: str
    type: str = ""
    message: str = ""
    where: str = ""
    maxrss_kib: int = 0

    @property
    def acceptable(self) -> bool:
        return self.outcome in {"ok", "medfm"}

    @property
    def label(self) -> str:
        return f"medfm {self.type}" if self.outcome == "medfm" else self.outcome


class ReaderWorker:
    """A process that reads one path at a time with ``medfm.read_image``, under memory and time limits."""

    def __init__(self, memory_limit: int = READ_MEMORY_LIMIT, timeout: float = 20.0) -> None:
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self.peak_rss_kib = 0

    def __enter__(self) -> ReaderWorker:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _start(self) -> None:
        # one thread and few malloc arenas: per-thread arenas reserve address space the limit would count
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(self.memory_limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1,
        )
        if self._answer(120.0) is None:
            raise RuntimeError("the reader worker did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _answer(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else {}

    def read(self, path: Path) -> Outcome:
        """Read ``path`` in the worker; a crash or a hang is an outcome too (and the worker is replaced)."""
        if self.process is None:
            self._start()
        self.process.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.process.stdin.flush()
        answer = self._answer(self.timeout)
        if answer is None:
            self.stop()
            return Outcome("timeout", message=f"no answer within {self.timeout:.0f} s")
        if not answer:
            code = self.process.wait()
            self.process = None
            return Outcome("crash", type=f"exit {code}", message=f"the reader process died (exit code {code})")
        self.peak_rss_kib = max(self.peak_rss_kib, answer.get("maxrss_kib", 0))
        return Outcome(**answer)


# --- seeds -----------------------------------------------------------------------------------


def make_seeds(folder: Path) -> dict[str, Path]:
    """Small valid files of every kind medfm reads, named by kind (a few KB each)."""
    import nibabel as nib
    import SimpleITK as sitk
    from PIL import Image
    from pydicom.data import get_testdata_file

    from tests.conftest import write_dicom_series

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grey = (np.add.outer(np.arange(24), np.arange(32)) * 4 + rng.integers(0, 9, (24, 32))).astype(np.uint8)
    volume = (np.arange(4 * 12 * 10).reshape(4, 12, 10) % 97).astype(np.int16) - 40
    seeds = {
        "png": folder / "grey.png", "png16": folder / "sixteen.png", "png_rgb": folder / "colour.png",
        "jpeg": folder / "photo.jpg", "tiff": folder / "sixteen.tif", "tiff_float": folder / "float.tif",
        "bmp": folder / "colour.bmp", "nifti": folder / "volume.nii", "nifti_gz": folder / "volume.nii.gz",
        "mha": folder / "volume.mha", "mhd": folder / "volume.mhd", "nrrd": folder / "volume.nrrd",
        "npz": folder / "challenge.npz", "dicom": folder / "ct.dcm", "dicom_palette": folder / "palette.dcm",
        "dicom_deflate": folder / "deflate.dcm", "dicom_j2k": folder / "j2k.dcm", "dicom_jpegls": folder / "jpegls.dcm",
        "dicom_multiframe": folder / "dose.dcm", "dicom_zip": folder / "series.zip",
    }
    Image.fromarray(grey).save(seeds["png"])
    Image.fromarray(grey.astype(np.uint16) * 200).save(seeds["png16"])
    Image.fromarray(np.stack([grey, grey[::-1], 255 - grey], axis=-1)).save(seeds["png_rgb"])
    Image.fromarray(grey).save(seeds["jpeg"], quality=80)
    Image.fromarray(grey.astype(np.uint16) * 200).save(seeds["tiff"])
    Image.fromarray(grey.astype(np.float32) / 7).save(seeds["tiff_float"])
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(seeds["bmp"])
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), seeds["nifti"])
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), seeds["nifti_gz"])
    itk = sitk.GetImageFromArray(volume)
    itk.SetSpacing((0.8, 0.9, 2.5))
    itk.SetOrigin((-10.0, 5.0, 2.0))
    for kind in ("mha", "mhd", "nrrd"):
        sitk.WriteImage(itk, str(seeds[kind]), useCompression=False)
    np.savez_compressed(seeds["npz"], imgs=volume.astype(np.uint8), spacing=np.array([0.8, 0.9, 2.5]),
                        boxes=np.array([[1, 2, 0, 8, 9, 3]]))
    series = folder / "series"
    write_dicom_series(volume.astype(np.float64), (2.5, 0.9, 0.8), (-10.0, 5.0, 2.0), np.eye(3), series)
    with zipfile.ZipFile(seeds["dicom_zip"], "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(series.iterdir()):
            archive.write(file, f"study/{file.name}")
    shutil.copy(sorted(series.iterdir())[0], seeds["dicom"])
    for kind, name in (("dicom_palette", "examples_palette.dcm"), ("dicom_deflate", "image_dfl.dcm"),
                       ("dicom_j2k", "MR_small_jp2klossless.dcm"), ("dicom_jpegls", "MR_small_jpeg_ls_lossless.dcm"),
                       ("dicom_multiframe", "rtdose.dcm")):
        shutil.copy(get_testdata_file(name), seeds[kind])
    return seeds


# --- mutations -------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)
INTERESTING_INTS = (0, 1, -1, 2, 3, 100, 255, 1000, 3000, 0x7FFF, 0xFFFF, 0x7FFFFFFF, -0x80000000)
INTERESTING_FLOATS = (0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"))
INTERESTING_TEXT = ("", "-1", "0", "1", "100", "1000", "3000", "nan", "inf", "-inf", "1e309", "abc", "1\\0", "1 2",
                    "/etc/passwd", "/dev/zero", "../x.raw", "LIST", "MET_FLOAT", "True")

#: DICOM keywords whose values decide geometry, layout and rescaling.
DICOM_TARGETS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                 "NumberOfFrames", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "PixelSpacing",
                 "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "PlanarConfiguration",
                 "TransferSyntaxUID", "GridFrameOffsetVector")

#: NIfTI-1 header fields as (offset, struct format).
NIFTI_FIELDS = ((0, "<i"), *((40 + 2 * i, "<h") for i in range(8)), (70, "<h"), (72, "<h"),
                *((76 + 4 * i, "<f") for i in range(8)), (108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"),
                (254, "<h"), *((256 + 4 * i, "<f") for i in range(6)), *((280 + 4 * i, "<f") for i in range(12)))


def mutate(kind: str, data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of ``data``: generic byte edits, or an edit that knows the format's fields."""
    structured = {"nifti": _mutate_nifti, "mha": _mutate_text_header, "mhd": _mutate_text_header,
                  "nrrd": _mutate_text_header, "dicom_zip": _mutate_zip, "npz": _mutate_zip}
    if kind.startswith("dicom") and kind != "dicom_zip":
        structured[kind] = _mutate_dicom
    if kind in structured and rng.random() < 0.6:
        return structured[kind](data, rng)
    return _mutate_bytes(data, rng)


def _mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    buffer = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        choice = int(rng.integers(0, 6))
        if not buffer:
            break
        at = int(rng.integers(0, min(len(buffer), 1024) if rng.random() < 0.7 else len(buffer)))
        if choice == 0:
            buffer[at] ^= 1 << int(rng.integers(0, 8))
        elif choice == 1:
            buffer[at] = int(rng.choice(INTERESTING_BYTES))
        elif choice == 2:
            value = int(rng.choice(INTERESTING_INTS))
            size, order = int(rng.choice([2, 4])), str(rng.choice(["little", "big"]))
            buffer[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, order)
        elif choice == 3:
            del buffer[int(rng.integers(1, len(buffer) + 1)):]
        elif choice == 4:
            end = min(len(buffer), at + int(rng.integers(1, 64)))
            del buffer[at:end]
        else:
            buffer[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    return bytes(buffer)


def _mutate_nifti(data: bytes, rng: np.random.Generator) -> bytes:
    buffer = bytearray(data)
    for _ in range(int(rng.integers(1, 3))):
        offset, fmt = NIFTI_FIELDS[int(rng.integers(0, len(NIFTI_FIELDS)))]
        if fmt == "<f":
            struct.pack_into(fmt, buffer, offset, float(rng.choice(INTERESTING_FLOATS)))
        else:
            limit = 1 << (8 * struct.calcsize(fmt) - 1)
            value = int(rng.choice(INTERESTING_INTS))
            struct.pack_into(fmt, buffer, offset, max(-limit, min(limit - 1, value)))
    return bytes(buffer)


def _mutate_text_header(data: bytes, rng: np.random.Generator) -> bytes:
    end = data.find(b"ElementDataFile")
    end = data.find(b"\n", end) + 1 if end >= 0 else data.find(b"\n\n") + 1
    lines = data[:end].split(b"\n")
    index = int(rng.integers(0, max(len(lines) - 1, 1)))
    line = lines[index].decode("latin-1")
    separator = " = " if " = " in line else ": "
    key, _, value = line.partition(separator)
    tokens = value.split() or [""]
    tokens[int(rng.integers(0, len(tokens)))] = str(rng.choice(INTERESTING_TEXT))
    if rng.random() < 0.3:
        tokens = tokens[: int(rng.integers(0, len(tokens) + 1))]
    lines[index] = f"{key}{separator}{' '.join(tokens)}".encode("latin-1")
    return b"\n".join(lines) + data[end:]


def _mutate_dicom(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite one layout/geometry value in place (same length), as a broken writer would."""
    from pydicom.datadict import tag_for_keyword

    keyword = str(rng.choice(DICOM_TARGETS))
    tag = tag_for_keyword(keyword)
    group, element = tag >> 16, tag & 0xFFFF
    at = data.find(struct.pack("<HH", group, element))
    if at < 0:
        return _mutate_bytes(data, rng)
    vr = data[at + 4:at + 6]
    if vr.isalpha() and vr.isupper():
        length, start = struct.unpack_from("<H", data, at + 6)[0], at + 8
    else:
        length, start = struct.unpack_from("<I", data, at + 4)[0], at + 8
    if vr == b"US":
        value = struct.pack("<H", int(rng.choice(INTERESTING_INTS)) % 0x10000) * (length // 2)
    else:
        value = str(rng.choice(INTERESTING_TEXT)).encode("latin-1")[:length].ljust(length, b" ")
    return data[:start] + value[:length] + data[start + length:]


def _mutate_zip(data: bytes, rng: np.random.Generator) -> bytes:
    """Rewrite a zip's member headers (flags, method, sizes) or one member's bytes."""
    buffer = bytearray(data)
    central = buffer.find(b"PK\x01\x02")
    if central < 0 or rng.random() < 0.5:
        return _rezip_with_mutated_member(data, rng)
    field, fmt = [(8, "<H"), (10, "<H"), (20, "<I"), (24, "<I")][int(rng.integers(0, 4))]  # flags, method, sizes
    value = int(rng.choice([1, 99, 12, 14, 0, 0xFFFFFFFF, 1 << 30]))
    struct.pack_into(fmt, buffer, central + field, value % (1 << (8 * struct.calcsize(fmt))))
    return bytes(buffer)


def _rezip_with_mutated_member(data: bytes, rng: np.random.Generator) -> bytes:
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    index = int(rng.integers(0, len(members)))
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as target:
        for position, (info, content) in enumerate(members):
            if position == index:
                content = _mutate_npy(content, rng) if info.filename.endswith(".npy") else _mutate_dicom_or_bytes(content, rng)
            target.writestr(info.filename, content)
    return output.getvalue()


def _mutate_dicom_or_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    return _mutate_dicom(data, rng) if rng.random() < 0.7 else _mutate_bytes(data, rng)


def _mutate_npy(data: bytes, rng: np.random.Generator) -> bytes:
    """Replace an .npy member by an array of another shape or dtype, or lie in its header."""
    import io

    choice = int(rng.integers(0, 7))
    arrays = [np.array(2.5), np.array("0.8 0.9 2.5"), np.ones((3, 3)), np.array([0.0, np.nan, -1.0]),
              np.ones((4, 12, 10), np.complex64), np.ones((4, 12, 10), bool), np.zeros((4, 12), "V3")]
    if choice < 6 and rng.random() < 0.8:
        buffer = io.BytesIO()
        np.save(buffer, arrays[int(rng.integers(0, len(arrays)))], allow_pickle=False)
        return buffer.getvalue()
    header_end = data.find(b"\n") + 1
    header = data[:header_end].replace(b"(4, 12, 10)", b"(3000, 3000, 300)").replace(b"(3,)", b"(300000000,)")
    return header + data[header_end:] if len(header) == header_end else _mutate_bytes(data, rng)


def mutated_files(seeds: dict[str, Path], folder: Path, count: int, seed: int) -> list[tuple[str, Path]]:
    """``count`` mutated files, spread evenly over the seeds, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    kinds = sorted(seeds)
    files = []
    raw = seeds["mhd"].with_suffix(".raw")
    for number in range(count):
        kind = kinds[number % len(kinds)]
        source = seeds[kind]
        name = f"{number:05d}_{kind}{''.join(source.suffixes)}"
        target = (raw.parent if kind == "mhd" else folder) / name  # an .mhd finds its .raw next to it
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(mutate(kind, source.read_bytes(), rng))
        files.append((kind, target))
    return files


def outcome_table(results: list[tuple[str, Outcome]]) -> Counter:
    """Counts of each outcome label."""
    return Counter(outcome.label for _, outcome in results)

