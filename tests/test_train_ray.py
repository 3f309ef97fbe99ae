"""``medfm train --engine ray``: two Ray Train workers on a local Ray (2 CPUs, 127.0.0.1), one of
them killed mid-run, against the same training in one process."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medfm.errors import InputFileError, MedfmError, MissingDependencyError, OptionError
from medfm.train import Recipe, TrainConfig
from medfm.train.ray_engine import train_on_ray
from medfm.train.trainer import Trainer
from tests.test_cli import run_medfm
from tests.test_train_recipes import write_tiny_base, write_tiny_dataset

ray = pytest.importorskip("ray", reason="the Ray engine's tests need pip install 'medfm[ray]'")
from tests.test_batch_ray import local_ray  # noqa: E402, F401 - the module's local Ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny base, and 6 pictures that split into 4 for training and 2 for validation."""
    root = tmp_path_factory.mktemp("ray-train")
    return write_tiny_base(root / "base"), write_tiny_dataset(root / "data", images=6, volume=False)


def _config(setup: tuple[Path, Path], out: Path, batch_size: int, **extra) -> TrainConfig:
    base, data = setup
    return TrainConfig(base=str(base), data=data, out=out, recipe=Recipe("decoder"), epochs=2, batch_size=batch_size, lr=1e-3,
                       validation_fraction=0.3, device="cpu", **extra)


def _log_and_die_once(lines: Path, marker: Path, text: str) -> None:
    """Rank 0's log: kept in ``lines``; the process dies as the second epoch ends (after the first
    epoch's state.pt, before the second's), once (``marker`` remembers)."""
    with open(lines, "a") as handle:
        handle.write(text + "\n")
    if text.startswith("epoch 2:") and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)


def test_a_killed_worker_restarts_from_the_last_epoch_and_trains_what_one_process_does(setup, tmp_path) -> None:
    out, lines, marker = tmp_path / "ray", tmp_path / "log.txt", tmp_path / "killed"
    result = train_on_ray(_config(setup, out, batch_size=1), workers=2, max_failures=1,
                          log=functools.partial(_log_and_die_once, lines, marker))
    assert marker.exists(), "no worker was killed: the test proved nothing"
    log = lines.read_text()
    assert "2 process(es) on cpu" in log and f"resuming {out} after epoch 1" in log
    assert [h["epoch"] for h in result.history] == [1, 2] and result.last == out / "last"
    for name in ("best/model.safetensors", "last/config.json", "last/model.safetensors", "state.pt", "metrics.json", "run.json"):
        assert (out / name).is_file(), name
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2

    # two ranks of one sample each average their gradients: one process with batches of two does the same
    reference = Trainer(_config(setup, tmp_path / "local", batch_size=2), lambda text: None).fit()
    assert [h["val_dice"] for h in result.history] == pytest.approx([h["val_dice"] for h in reference.history], abs=1e-4)
    ours, theirs = load_file(out / "last" / "model.safetensors"), load_file(reference.last / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=2e-4, rtol=0, msg=key)  # training moves them 3e-3
    assert json.loads((out / "metrics.json").read_text())["history"] == result.history


def test_mistakes_are_said_before_ray_train_starts(setup, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(b"")
    with pytest.raises(MedfmError, match="already holds a run: pass --resume"):
        train_on_ray(_config(setup, out, batch_size=1))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(InputFileError, match="holds no images"):
        train_on_ray(dataclasses.replace(_config(setup, tmp_path / "other", batch_size=1), data=empty))
    with pytest.raises(OptionError, match="device follows --gpus-per-worker"):
        train_on_ray(dataclasses.replace(_config(setup, tmp_path / "other", batch_size=1), device="cuda"))


def test_without_ray_train_says_how_to_install(setup, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)
    with pytest.raises(MissingDependencyError, match=r"medfm train --engine ray .*pip install 'medfm\[ray\]'"):
        train_on_ray(_config(setup, tmp_path / "run", batch_size=1))


def test_the_cli_refuses_ray_options_without_ray_in_one_line(setup, tmp_path, monkeypatch) -> None:
    base, data = setup
    command = ["train", "--recipe", "decoder", "--base", str(base), "--data", str(data), "-o", str(tmp_path / "run")]
    local = run_medfm(*command, "--workers", "2")
    assert local.returncode == 2 and "--engine ray" in local.stderr and len(local.stderr.splitlines()) == 1, local.stderr
    monkeypatch.setitem(sys.modules, "ray.train.torch", None)
    missing = run_medfm(*command, "--engine", "ray", "--workers", "2")
    assert missing.returncode == 2 and "pip install 'medfm[ray]'" in missing.stderr, missing.stderr
    assert not (tmp_path / "run").exists()
