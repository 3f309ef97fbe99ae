"""The command line: one-line errors with a non-zero exit code, and the info command on real files."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

from medfm.cli import main
from tests.conftest import EXAMPLES


def run_medfm(*args: str) -> subprocess.CompletedProcess:
    """``medfm ARGS`` in this process (a subprocess would re-import torch for nothing): its exit code,
    stdout and stderr, as `subprocess.run` gives them."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return subprocess.CompletedProcess(["medfm", *args], code, stdout.getvalue(), stderr.getvalue())


def test_the_installed_entry_point_prints_one_line_errors(tmp_path) -> None:
    """One real process: ``python -m medfm`` exits 2 with one line and no traceback."""
    result = subprocess.run([sys.executable, "-m", "medfm", "info", str(tmp_path / "missing.png")],
                            capture_output=True, text=True, timeout=120)
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 2 and line.startswith(f"error: {tmp_path / 'missing.png'}: ")


def test_info_json_on_bundled_samples() -> None:
    result = run_medfm("info", "--json", str(EXAMPLES / "totalseg_example_ct.nii.gz"), "--modality", "CT")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["shape"] == [30, 101, 122] and summary["spacing_mm"] == [3.0, 3.0, 3.0]
    assert summary["modality"] == "CT" and summary["intensity"]["min"] == -1100


def test_info_table_mentions_shape() -> None:
    result = run_medfm("info", str(EXAMPLES / "busi_benign_001.png"))
    assert result.returncode == 0 and "416" in result.stdout


def test_bad_input_is_one_line_without_traceback(tmp_path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b broken")
    for path in (bad, tmp_path / "missing.png"):
        result = run_medfm("info", str(path))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and str(path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_group_numeric_options() -> None:
    from medfm.cli import group_numeric_options

    assert group_numeric_options(["segment", "a.png", "--box", "1", "2", "3", "4", "--point", "5", "6", "-o", "m.png"]) == [
        "segment", "a.png", "--box", "1 2 3 4", "--point", "5 6", "-o", "m.png"]
    assert group_numeric_options(["--box", "1,2,3,4"]) == ["--box", "1,2,3,4"]


def test_segment_bad_box_is_one_line(tmp_path) -> None:
    result = run_medfm("segment", str(EXAMPLES / "busi_benign_001.png"), "--box", "1", "2", "3", "-o", str(tmp_path / "m.png"))
    assert result.returncode == 2 and "--box takes 4 numbers" in result.stderr
    assert not (tmp_path / "m.png").exists()


def test_segment_unknown_precision_is_one_line(tmp_path) -> None:
    result = run_medfm("segment", str(EXAMPLES / "busi_benign_001.png"), "--box", "215", "107", "265", "132",
                       "-o", str(tmp_path / "m.png"), "--precision", "fp8")
    assert result.returncode == 2 and "unknown precision 'fp8'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.png").exists()
