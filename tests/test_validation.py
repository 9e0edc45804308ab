"""The validation loss (issue 28): held-out pictures scored at fixed noise levels with fixed
noise, the same figures for the same seed, the same trained weights with it on or off, a resume
that ends where an uninterrupted run does, the best step kept, and bad values refused by field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train
from dreambooth.models import tiny
from dreambooth.models.adapters.file import read_lora
from trainer_fixtures import (Crash, RecordingReporter, base_config, crash_at, picture_folders,
                              run_paths, tiny_components)

FAST = dict(training_method="lora", model_name="zwx-val", with_prior_preservation=False,
            learning_rate=1e-2, lora_rank=4, lora_alpha=2.0, max_train_steps=6, sample_steps=0)
VALIDATE = dict(validation_split=0.25, validate_every_n_steps=2)


def run(root: Path, reporter=None, **overrides):
    base = root / "base.safetensors"
    if not base.exists():
        root.mkdir(parents=True, exist_ok=True)
        tiny.save_checkpoint(base, size="tiny", seed=0)
    config = base_config(root, **{**FAST, **overrides})
    reporter = reporter or RecordingReporter()
    result = train(config, run_paths(root), reporter=reporter, components=tiny_components())
    return result, reporter


def validations(root: Path) -> list[dict]:
    lines = (json.loads(line) for line in (root / "work" / "logs" / "train.jsonl").open())
    return [r for r in lines if r.get("event") == "validation"]


def figures(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["validation_loss"], tuple(r["validation_per_timestep"]))
            for r in records]


def test_the_same_seed_gives_the_same_validation_figures(tmp_path):
    _, reporter = run(tmp_path / "a", **VALIDATE)
    run(tmp_path / "b", **VALIDATE)
    first, second = validations(tmp_path / "a"), validations(tmp_path / "b")
    assert [r["step"] for r in first] == [2, 4, 6]  # every 2 steps, and the end
    assert figures(first) == figures(second)
    assert len(first[0]["validation_per_timestep"]) == 4 and first[0]["validation_weights"] == \
        "trained"
    assert any("1 picture held out (zwx_02.png)" in line for line in reporter.lines)
    assert any(line.startswith("best validation loss") for line in reporter.lines)
    # another seed holds out another picture and draws other noise: other figures
    run(tmp_path / "c", seed=8, **VALIDATE)
    assert figures(validations(tmp_path / "c")) != figures(first)


def test_validation_leaves_the_trained_weights_as_they_would_be(tmp_path):
    plain, _ = run(tmp_path / "plain", validation_split=0.25)
    checked, _ = run(tmp_path / "checked", validation_split=0.25, validate_every_n_steps=1,
                     validation_timesteps=7, lora_dropout=0.1)
    dropout, _ = run(tmp_path / "dropout", validation_split=0.25, lora_dropout=0.1)
    a, b = read_lora(dropout.output_path)[0], read_lora(checked.output_path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scored = validations(tmp_path / "checked")  # every step, at 7 levels
    assert [r["step"] for r in scored] == list(range(1, 7))
    assert {len(r["validation_per_timestep"]) for r in scored} == {7}
    # holding pictures out changes what is trained on: the split itself has an effect
    everything, _ = run(tmp_path / "all")
    c, d = read_lora(plain.output_path)[0], read_lora(everything.output_path)[0]
    assert any(not torch.equal(c[k], d[k]) for k in c)


def test_keep_best_saves_the_best_scoring_step(tmp_path):
    result, reporter = run(tmp_path, keep_best=True, max_train_steps=8, **VALIDATE)
    records = validations(tmp_path)
    best = min(records, key=lambda r: r["validation_loss"])
    kept = result.output_path.with_name("zwx-val_best.safetensors")
    assert kept.is_file()
    metadata = read_lora(kept)[1]
    assert int(metadata["ss_steps"]) == best["step"], (metadata["ss_steps"], records)
    assert any(f"at step {best['step']}: saved as zwx-val_best.safetensors" in line
               for line in reporter.lines)


def test_a_resumed_run_with_validation_ends_as_an_uninterrupted_one(tmp_path):
    options = dict(VALIDATE, max_train_steps=6, checkpoint_every_n_steps=2, keep_best=True)
    straight, _ = run(tmp_path / "a", **options)
    with pytest.raises(Crash):
        run(tmp_path / "b", reporter=crash_at(5), **options)
    config = base_config(tmp_path / "b", **{**FAST, **options})
    resumed = train(config, run_paths(tmp_path / "b"), reporter=RecordingReporter(),
                    components=tiny_components(), resume=True)
    a, b = read_lora(straight.output_path)[0], read_lora(resumed.output_path)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert figures(validations(tmp_path / "a")) == figures(validations(tmp_path / "b"))
    best_a = read_lora(straight.output_path.with_name("zwx-val_best.safetensors"))[0]
    best_b = read_lora(resumed.output_path.with_name("zwx-val_best.safetensors"))[0]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


@pytest.mark.parametrize("overrides,field", [
    (dict(validation_split=1.0), "validation_split"),
    (dict(validate_every_n_steps=5), "validate_every_n_steps"),
    (dict(keep_best=True), "keep_best"),
    (dict(validation_timesteps=0, validation_split=0.25), "validation_timesteps")])
def test_bad_values_are_refused_by_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        run(tmp_path, **overrides)
    assert not (tmp_path / "work").exists()


def test_a_split_that_leaves_no_picture_to_train_on_is_refused_before_any_write(tmp_path):
    picture_folders(tmp_path, instances=1)
    with pytest.raises(ConfigError, match="validation_split: holds out 1 of the 1 pictures"):
        run(tmp_path, validation_split=0.1)
    assert not (tmp_path / "work").exists() and not (tmp_path / "Lora").exists()


def test_a_concepts_validation_folder_is_scored_and_all_its_pictures_train(tmp_path):
    from dreambooth.app.demo import draw_pictures

    folder = tmp_path / "held"
    draw_pictures(folder, count=2, size=72, seed=5)
    (folder / "zwx_00.txt").write_text("zwx toy on a table")
    config = base_config(tmp_path, **FAST)
    config.concepts[0].validation_data_dir = str(folder)
    config.concepts[0].instance_prompt = "photo of [filewords]"
    (tmp_path / "base.safetensors").parent.mkdir(parents=True, exist_ok=True)
    tiny.save_checkpoint(tmp_path / "base.safetensors", size="tiny", seed=0)
    reporter = RecordingReporter()
    train(config, run_paths(tmp_path), reporter=reporter, components=tiny_components())
    assert any("2 pictures held out (zwx_00.png, zwx_01.png)" in line for line in reporter.lines)
    assert [r["step"] for r in validations(tmp_path)] == [6]  # only at the end
    assert "cached 4 latents" in reporter.lines  # all 4 instance pictures train
    empty = tmp_path / "empty"
    empty.mkdir()
    config.concepts[0].validation_data_dir = str(empty)
    with pytest.raises(ConfigError, match=r"concepts\[0\]\.validation_data_dir: .* holds no pictures"):
        train(config, run_paths(tmp_path / "again"), reporter=RecordingReporter(),
              components=tiny_components())
    assert not (tmp_path / "again").exists()


def overfit_pictures(folder: Path, count: int) -> None:
    """The same red square (the subject) on a background of its own per picture, in 8 px blocks
    (what the latents see): the shared subject is learned first, the backgrounds are what a
    model that trains too long memorises."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        blocks = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        picture = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
        picture[20:44, 20:44] = (220, 30, 30)
        Image.fromarray(picture).save(folder / f"zwx_{index:02d}.png")


def test_an_overfitting_run_shows_the_turn_and_keeps_the_step_before_it(tmp_path):
    """Trained too long on 8 pictures, the model learns the subject, then memorises the
    backgrounds: the validation loss (2 held-out pictures) turns up while the training loss
    keeps falling, and the best step kept is the one before the turn."""
    from dreambooth.common.config import Concept, TrainingConfig

    tiny.save_checkpoint(tmp_path / "base.safetensors", size="tiny", seed=0)
    overfit_pictures(tmp_path / "pictures", 10)
    config = TrainingConfig(
        base_model=str(tmp_path / "base.safetensors"), model_name="zwx-overfit",
        concepts=[Concept(instance_data_dir=str(tmp_path / "pictures"),
                          instance_prompt="photo of zwx toy")],
        with_prior_preservation=False, resolution=64, max_train_steps=800, learning_rate=1e-3,
        optimizer="adamw", mixed_precision="no", gradient_checkpointing=False, seed=7,
        checkpoint_every_n_steps=0, sample_steps=0, validation_split=0.2,
        validate_every_n_steps=50, keep_best=True)
    components = tiny_components()
    # The tiny VAE's latents spread 0.18; scaled by SD's 0.18215 they would be lost in the
    # noise (0.03 against 1) and no picture could be told from another. SD's own latents are
    # scaled to a spread of about 1, as here.
    components.vae.register_to_config(scaling_factor=5.6)
    reporter = RecordingReporter()
    train(config, run_paths(tmp_path), reporter=reporter, components=components)
    records = [json.loads(line) for line in (tmp_path / "work" / "logs" / "train.jsonl").open()]
    scores = {r["step"]: r["validation_loss"] for r in records if r.get("event") == "validation"}
    losses = [r["loss"] for r in records if "loss" in r and r.get("event") is None]
    steps = sorted(scores)
    best = min(steps, key=scores.get)
    print("validation:", [(s, round(scores[s], 4)) for s in steps])  # the note's figures
    assert len(steps) == 16 and 0 < steps.index(best) < len(steps) // 2  # falls, then turns
    late = [scores[s] for s in steps[-4:]]
    assert min(late) > scores[best] * 1.04  # turned up, and stays up
    assert sum(losses[-200:]) / 200 < 0.8 * sum(losses[best - 100:best + 100]) / 200  # falling on
    assert any(f"best validation loss {scores[best]:.5f} at step {best}" in line
               for line in reporter.lines)
    from safetensors import safe_open

    with safe_open(str(run_paths(tmp_path).checkpoints_dir / "zwx-overfit_best.safetensors"),
                   "pt") as best_file:
        assert int(best_file.metadata()["ss_steps"]) == best
