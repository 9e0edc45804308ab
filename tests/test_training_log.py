"""The training log: train.jsonl always, TensorBoard event files when tensorboard is importable,
each step once across a resume."""
from __future__ import annotations

import json

import pytest

from dreambooth.engine import training_log
from dreambooth.engine.training_log import TrainingLog, read_log
from dreambooth.engine.trainer import train

from trainer_fixtures import RecordingReporter, base_config, run_paths, tiny_components


def run(tmp_path, reporter=None, resume=False, **overrides):
    config = base_config(tmp_path, **overrides)
    reporter = reporter or RecordingReporter()
    result = train(config, run_paths(tmp_path), reporter=reporter, components=tiny_components(),
                   export_model=False, resume=resume)
    return result, reporter


def steps_of(tmp_path) -> list[dict]:
    return [r for r in read_log(run_paths(tmp_path).logs_dir / "train.jsonl") if "loss" in r]


def test_every_step_is_logged_with_its_figures(tmp_path):
    result, reporter = run(tmp_path, max_train_steps=4, max_grad_norm=1.0, sample_steps=2,
                           sample_every_n_steps=2)
    records = steps_of(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == pytest.approx(result.losses)
    for r in records:
        assert r["lr"] == pytest.approx(1e-3) and r["grad_norm"] > 0 and r["step_seconds"] >= 0
        # With prior preservation: loss = instance loss + prior weight x prior loss.
        assert r["loss"] == pytest.approx(r["loss_instance"] + r["loss_prior"], rel=1e-5)
    events = [r for r in read_log(run_paths(tmp_path).logs_dir / "train.jsonl")
              if r.get("event") == "samples"]
    assert [e["step"] for e in events] == [2, 4] and all(e["paths"] for e in events)
    assert any("training log:" in line for line in reporter.lines)


def test_no_clipping_no_grad_norm_and_native_has_no_prior_loss(tmp_path):
    run(tmp_path, max_grad_norm=0.0, with_prior_preservation=False)
    for r in steps_of(tmp_path):
        assert "grad_norm" not in r and "loss_prior" not in r


def test_tensorboard_files_hold_the_same_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, reporter = run(tmp_path, max_train_steps=3, sample_steps=2)
    folder = run_paths(tmp_path).logs_dir / "tensorboard"
    events = EventAccumulator(str(folder))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(result.losses, rel=1e-6)
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert events.Tags()["images"] == ["samples/0"]
    assert any("tensorboard --logdir" in line for line in reporter.lines)


def test_without_tensorboard_only_the_jsonl_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(training_log, "tensorboard_problem",
                        lambda: "the tensorboard package is not installed (pip install tensorboard)")
    _, reporter = run(tmp_path)
    assert len(steps_of(tmp_path)) == 3
    assert not (run_paths(tmp_path).logs_dir / "tensorboard").exists()
    assert any("no TensorBoard files: the tensorboard package is not installed" in line
               for line in reporter.lines)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    class Crash(BaseException):
        pass

    def crash_at(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        run(tmp_path, reporter=RecordingReporter(on_step=crash_at), max_train_steps=6,
            checkpoint_every_n_steps=3)
    assert [r["step"] for r in steps_of(tmp_path)] == [1, 2, 3, 4, 5]  # 4, 5 after the point
    run(tmp_path, resume=True, max_train_steps=6, checkpoint_every_n_steps=3)
    assert [r["step"] for r in steps_of(tmp_path)] == [1, 2, 3, 4, 5, 6]
    # A new run in the same folder (overwrite) starts a new log.
    run(tmp_path, overwrite=True, max_train_steps=2)
    assert [r["step"] for r in steps_of(tmp_path)] == [1, 2]


def test_a_torn_last_line_is_skipped(tmp_path):
    log = TrainingLog(tmp_path / "logs", tensorboard=False)
    log.step(1, {"loss": 0.5, "lr": 1e-6})
    log.close()
    with open(tmp_path / "logs" / "train.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 2, "loss": 0.')  # a run killed mid-line
    assert [r["step"] for r in read_log(tmp_path / "logs" / "train.jsonl")] == [1]
    first = (tmp_path / "logs" / "train.jsonl").read_text().splitlines()[0]
    assert json.loads(first)["loss"] == 0.5
