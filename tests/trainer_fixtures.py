"""Shared helpers for the training tests: the tiny model built once, picture folders, configs."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.app.demo import draw_pictures
from dreambooth.models.tiny import Components, build_components
from dreambooth.engine.trainer import Reporter, RunPaths


@functools.lru_cache(maxsize=1)
def _tiny() -> Components:
    return build_components("tiny", seed=0)


def tiny_components() -> Components:
    """A fresh copy of the tiny model (training mutates it in place)."""
    return copy.deepcopy(_tiny())


def picture_folders(root: Path, instances: int = 4, classes: int = 4) -> tuple[Path, Path]:
    inst = root / "instance"
    cls = root / "class"
    if not inst.exists():
        draw_pictures(inst, count=instances, size=72, seed=1)
        draw_pictures(cls, count=classes, size=64, seed=2)
        for p in cls.iterdir():
            p.rename(p.with_name(p.name.replace("zwx", "toy")))
    return inst, cls


def base_config(root: Path, **overrides) -> TrainingConfig:
    inst, cls = picture_folders(root)
    values = dict(
        base_model=str(root / "base.safetensors"), model_name="test-model",
        concepts=[Concept(instance_data_dir=str(inst), instance_prompt="photo of zwx toy",
                          class_data_dir=str(cls), class_prompt="photo of a toy")],
        with_prior_preservation=True, num_class_images=4, resolution=64, max_train_steps=3,
        learning_rate=1e-3, optimizer="adamw", mixed_precision="no",
        gradient_checkpointing=False, checkpoint_every_n_steps=0, seed=7)
    values.update(overrides)
    return TrainingConfig(**values)


def run_paths(root: Path) -> RunPaths:
    return RunPaths(work_dir=root / "work", checkpoints_dir=root / "Stable-diffusion")


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


class RecordingReporter(Reporter):
    def __init__(self, on_step=None):
        self.phases: list[str] = []
        self.lines: list[str] = []
        self.steps: list[tuple[int, float | None, float | None]] = []
        self.on_step = on_step

    def phase(self, name):
        self.phases.append(name)

    def log(self, line):
        self.lines.append(line)

    def progress(self, step, total, loss, lr):
        if loss is not None:
            self.steps.append((step, loss, lr))
            if self.on_step:
                self.on_step(step)


class Crash(RuntimeError):
    """A run killed mid-way (raised from the reporter, as a crash would stop the loop)."""


def crash_at(step: int) -> "RecordingReporter":
    """A reporter that crashes the run when it reports ``step``."""
    def crash(reached):
        if reached == step:
            raise Crash
    return RecordingReporter(on_step=crash)
