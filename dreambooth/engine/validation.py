"""The validation loss (issue 28): which step is the good one, without guessing from samples.

A held-out set — a fraction of each concept's instance pictures (``validation_split``), chosen
by the seed so a rerun holds out the same ones; class pictures never count — is scored every
``validate_every_n_steps`` and at the end with the training's own loss (the family's objective
and min-SNR weights, masks honoured, prior terms excluded) at ``validation_timesteps`` fixed
noise levels spread over the schedule, with fixed noise from generators of its own: two runs
with the same seed give identical figures, and the training's random stream is untouched (a run
trains the same weights with validation on or off, and resumes bit for bit). Adapters count at
multiplier 1; with EMA on the EMA weights are scored (the weights that are saved).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from dreambooth import data
from dreambooth.common.config import ConfigError, FieldError, TrainingConfig
from dreambooth.models.objective import dreambooth_loss


def folder_pictures(config: TrainingConfig, index: int) -> list[data.Picture]:
    """The pictures of ``concepts[index].validation_data_dir`` with their captions and buckets,
    as its instance pictures would have them. ConfigError naming the field when the folder is
    missing or holds no pictures."""
    import dataclasses
    from pathlib import Path

    concept = config.concepts[index]
    where = f"concepts[{index}].validation_data_dir"
    folder = Path(concept.validation_data_dir.strip()).expanduser()
    if not folder.is_dir():
        raise ConfigError([FieldError(where, f"{folder} is not a folder")])
    if not data.list_pictures(folder):
        raise ConfigError([FieldError(where, f"{folder} holds no pictures (PNG, JPEG, WebP ...)")])
    alone = dataclasses.replace(config, concepts=[dataclasses.replace(
        concept, instance_data_dir=str(folder))], recursive=False)
    return [dataclasses.replace(p, concept_index=index)
            for p in data.collect_pictures(alone, include_class=False)]


def split_validation(instances: list[data.Picture], config: TrainingConfig
                     ) -> tuple[list[data.Picture], list[data.Picture]]:
    """(training, held-out) pictures: a concept's validation folder when it has one (its
    instance pictures all train), else ``validation_split`` of its instance pictures, at least
    one, drawn by the seed from the pictures in name order. ConfigError naming
    ``validation_split`` when a concept would keep no picture to train on."""
    folders = [i for i, c in enumerate(config.concepts) if c.validation_data_dir.strip()]
    from_folders = [p for index in folders for p in folder_pictures(config, index)]
    if not config.validation_split:
        return instances, from_folders
    held: set = set()
    for index in sorted({p.concept_index for p in instances} - set(folders)):
        mine = sorted((p for p in instances if p.concept_index == index), key=lambda p: str(p.path))
        count = max(1, round(len(mine) * config.validation_split))
        if count >= len(mine):
            raise ConfigError([FieldError(
                "validation_split", f"holds out {count} of the {len(mine)} pictures of "
                f"concepts[{index}], leaving none to train on: lower it or add pictures")])
        rng = random.Random(f"{config.seed}-validation-{index}")
        held.update(str(p.path) for p in rng.sample(mine, count))
    return ([p for p in instances if str(p.path) not in held],
            [p for p in instances if str(p.path) in held] + from_folders)


def validation_levels(objective: Any, count: int) -> torch.Tensor:
    """``count`` noise levels spread evenly over the schedule (the middles of equal parts), in
    the objective's own units (:meth:`fixed_levels`)."""
    return objective.fixed_levels([(k + 0.5) / count for k in range(count)])


@dataclass
class Validation:
    """One scoring: the mean over pictures and levels, and the mean at each level."""

    step: int
    loss: float
    per_level: list[float]
    ema: bool

    def record(self) -> dict[str, Any]:
        return {"validation_loss": self.loss, "validation_per_timestep": self.per_level,
                "validation_weights": "ema" if self.ema else "trained"}


@dataclass
class Validator:
    """The held-out pictures' latents (encoded once, unaugmented) and prompts, and the best
    scoring so far (kept in resume points)."""

    pictures: list[data.Picture]
    encoded: list[Any]
    levels: torch.Tensor
    best: dict[str, float] = field(default_factory=dict)  # {"step", "loss"}

    @classmethod
    def prepare(cls, pictures: list[data.Picture], latents, objective, config: TrainingConfig
                ) -> "Validator":
        encoded = [latents.encode(p, False, p.bucket, None) for p in pictures]
        return cls(pictures, encoded, validation_levels(objective, config.validation_timesteps))

    def noise(self, seed: int, index: int, level: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Fixed noise of picture ``index`` at level ``level``: its own generator."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 7919 + level + 17)
        return torch.randn(shape, generator=generator)

    @torch.no_grad()
    def score(self, run, step: int) -> Validation:
        """The validation loss of the weights as they are now (EMA when on)."""
        config, family, objective = run.config, run.model.family, run.model.objective
        device = run.start.device
        total = torch.zeros(len(self.levels))
        for index, (picture, encoded) in enumerate(zip(self.pictures, self.encoded)):
            latents, pixel_weights, picture_conditioning = data_inputs(encoded, config, device)
            conditioning = run.text([picture.caption], training_encoders=False)
            for k, level in enumerate(self.levels):
                noise = self.noise(config.seed, index, k, tuple(latents.shape)).to(device)
                levels = level.reshape(1).to(device)
                noisy, target = objective.noisy_and_target(latents, noise, levels)
                with run.accelerator.autocast():
                    pred = family.predict(run.denoiser, noisy, objective.model_timesteps(levels),
                                          conditioning, picture_conditioning)
                loss, _, _ = dreambooth_loss(pred, target, n_instance=1, prior_loss_weight=0.0,
                                             weights=objective.row_weights(levels, 1),
                                             pixel_weights=pixel_weights)
                total[k] += loss.float().cpu()
        per_level = (total / len(self.pictures)).tolist()
        result = Validation(step, sum(per_level) / len(per_level), per_level, run.ema is not None)
        if not self.best or result.loss < self.best["loss"]:
            self.best = {"step": step, "loss": result.loss}
        return result


def data_inputs(encoded, config: TrainingConfig, device):
    """One picture's latents (the posterior's mean), mask weights and extra conditioning."""
    from dreambooth.engine.run_data import batch_inputs

    return batch_inputs([encoded], torch.Generator().manual_seed(config.seed),
                        config.mask_background_weight, device)


@contextlib.contextmanager
def eval_mode(modules: list[torch.nn.Module]):
    """The modules in eval mode (an adapter's dropout off), each put back as it was."""
    was = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was):
            module.train(training)
