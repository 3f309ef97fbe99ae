"""Real training runs: ``medfm train`` killed with SIGKILL after its first epoch and resumed, and two
processes under torch.distributed (gloo, CPU) that end with the same weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from medfm.train import Recipe, TrainConfig
from medfm.train.trainer import Trainer
from tests.test_train_recipes import write_tiny_base, write_tiny_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return write_tiny_base(root / "base"), write_tiny_dataset(root / "data", images=4, volume=False)


def test_a_killed_run_resumes_from_its_last_epoch(setup, tmp_path) -> None:
    base, data = setup
    out = tmp_path / "run"
    command = [sys.executable, "-m", "medfm", "train", "--recipe", "decoder", "--base", str(base), "--data", str(data),
               "-o", str(out), "--epochs", "3", "--batch-size", "2", "--val-fraction", "0.3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while not (out / "state.pt").exists() and process.poll() is None:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    if process.returncode == 0:
        pytest.fail("the run finished before it could be killed")
    saved = torch.load(out / "state.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 3 and (out / "last" / "model.safetensors").is_file()
    resumed = subprocess.run(command + ["--resume"], check=False, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"after epoch {saved}" in " ".join(resumed.stdout.split())  # rich wraps lines
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, 4))


def _rank(rank: int, port: int, base: str, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = TrainConfig(base=base, data=Path(data), out=Path(out), recipe=Recipe("lora"), epochs=1, max_steps=2,
                         batch_size=1, validation_fraction=0.3, device="cpu")
    trainer = Trainer(config, lambda text: None)
    trainer.fit()
    state = trainer.network.state_dict()
    torch.save({k: state[k] for k in trainer.trained}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_train_the_same_weights(setup, tmp_path) -> None:
    base, data = setup
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_rank, args=(port, str(base), str(data), str(out)), nprocs=2, join=True)
    first, second = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (out / "last" / "model.safetensors").is_file()
