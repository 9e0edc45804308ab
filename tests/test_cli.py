"""The headless commands: train from a JSON config, on one process and on two (DDP, gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth.models import checkpoint, tiny
from dreambooth.engine.training_log import read_log
from dreambooth.__main__ import main as cli_main

from trainer_fixtures import picture_folders

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **overrides) -> Path:
    inst, cls = picture_folders(tmp_path)
    base = tmp_path / "models" / "Stable-diffusion" / "base.safetensors"
    if not base.exists():
        base.parent.mkdir(parents=True)
        tiny.save_checkpoint(base, size="tiny", seed=0)
    config = {
        "base_model": str(base), "model_name": "cli-model", "models_dir": str(tmp_path / "models"),
        "concepts": [{"instance_data_dir": str(inst), "instance_prompt": "photo of zwx toy",
                      "class_data_dir": str(cls), "class_prompt": "photo of a toy"}],
        "num_class_images": 4, "resolution": 64, "max_train_steps": 2, "optimizer": "adamw",
        "mixed_precision": "no", "learning_rate": 1e-4, "gradient_checkpointing": False,
        "checkpoint_every_n_steps": 0,
    }
    config.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def test_train_writes_a_checkpoint_that_loads(tmp_path):
    config = write_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "dreambooth", "train", str(config)], cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "models" / "Stable-diffusion" / "cli-model.safetensors"
    assert f"trained 2/2 steps" in proc.stdout and str(out) in proc.stdout
    components, kind = checkpoint.load_components(out)
    assert kind.kind == "sd1"
    assert (tmp_path / "models" / "dreambooth" / "cli-model" / "config.json").is_file()


def test_bad_config_exits_non_zero_with_the_field(tmp_path, capsys):
    config = write_config(tmp_path, learning_rate=0, resolution=100)
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: must be in (0, 10], not 0" in err and "resolution" in err


def test_unknown_command_is_refused(capsys):
    assert cli_main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``train`` on two CPU processes (torchrun, gloo); asserts that it ran as two."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "dreambooth", "train", str(config), "--quiet"],
        cwd=cwd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "with 2 processes" in proc.stdout
    return proc


def test_two_processes_train_together_and_only_rank_0_writes(tmp_path):
    config = write_config(tmp_path, max_train_steps=2, save_every_n_steps=0)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    proc = train_two_processes(config, tmp_path)
    # rank 1 prints nothing: every line of the summary appears once
    assert proc.stdout.count("trained 2/2 steps") == 1
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                     if p.is_file() and p not in before)
    tensorboard = [w for w in written if "/logs/tensorboard/" in w]
    assert tensorboard and all("events.out.tfevents" in w or w.endswith("hparams.yml")
                               for w in tensorboard)
    assert [w for w in written if w not in tensorboard] == [
        "models/Stable-diffusion/cli-model.safetensors",
        "models/dreambooth/cli-model/config.json",
        "models/dreambooth/cli-model/logs/train.jsonl",
        "models/dreambooth/cli-model/run.json",  # the run's id (its own files on --resume)
        "models/dreambooth/cli-model/samples/step-000002-0.png"]  # the final sample
    assert len(read_log(tmp_path / "models/dreambooth/cli-model/logs/train.jsonl")) == 3
    checkpoint.load_components(tmp_path / "models" / "Stable-diffusion" / "cli-model.safetensors")
