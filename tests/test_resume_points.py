"""Resume points: safetensors + JSON only, exact round trip, planted pickles never run, leftovers
of interrupted writes cleaned, and the saves a crash skipped are redone after resume."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from dreambooth.common import files
from dreambooth.engine import resume
from dreambooth.models import tiny
from dreambooth.engine.trainer import train

from trainer_fixtures import RecordingReporter, base_config, flat, run_paths, tiny_components


def run(root, reporter=None, components=None, resume_run=False, export=False, **overrides):
    config = base_config(root, **overrides)
    if export and not (root / "base.safetensors").exists():
        tiny.save_checkpoint(root / "base.safetensors", size="tiny", seed=0)
    components = components or tiny_components()
    result = train(config, run_paths(root), reporter=reporter or RecordingReporter(),
                   components=components, export_model=export, resume=resume_run)
    return result, components


def test_nested_state_round_trips_exactly():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)},
                       7: {"qmap": torch.arange(5, dtype=torch.uint8)}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 7],
                               "eps": float("inf"), "nan": float("nan"), "name": None,
                               "fused": False}],
             "$odd": [1, (2, 3)]}
    tensors: dict = {}
    text = json.dumps(resume.flatten(state, tensors), allow_nan=False)
    back = resume.unflatten(json.loads(text), tensors)
    assert set(back["state"]) == {0, 7} and isinstance(back["param_groups"][0]["betas"], tuple)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][7]["qmap"].dtype == torch.uint8
    assert back["param_groups"][0]["eps"] == float("inf") and back["$odd"] == [1, (2, 3)]
    group = back["param_groups"][0]
    assert group["nan"] != group["nan"] and group["fused"] is False and group["name"] is None
    with pytest.raises(TypeError, match="cannot store a object"):
        resume.flatten({"x": object()}, {})


@pytest.mark.parametrize("optimizer", [pytest.param("adamw8bit", marks=pytest.mark.bitsandbytes),
                                       "adamw"])
def test_a_resume_point_holds_no_pickle(tmp_path, optimizer):
    run(tmp_path / "b", max_train_steps=3, checkpoint_every_n_steps=2, train_text_encoder=True,
        use_ema=True, optimizer=optimizer, lr_scheduler="cosine", lr_warmup_steps=1)
    (point,) = resume.list_resume_points(run_paths(tmp_path / "b").resume_dir)
    names = sorted(p.name for p in point.iterdir())
    assert names == ["state.json", "text_encoder.safetensors", "training_state.json",
                     "training_state.safetensors", "unet.safetensors"]
    for file in point.iterdir():
        data = file.read_bytes()
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4], file.name
    state = json.loads((point / "state.json").read_text())
    assert state["step"] == 2 and state["format"] == resume.FORMAT and len(state["run_id"]) == 16


def test_a_planted_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run(tmp_path, max_train_steps=3, checkpoint_every_n_steps=2)
    (point,) = resume.list_resume_points(run_paths(tmp_path).resume_dir)
    # a run folder from an older version or a stranger: the pickle the old format used
    (point / resume.STRUCTURE_FILE).unlink()
    (point / "training_state.pt").write_bytes(pickle.dumps(Payload()))
    state = json.loads((point / "state.json").read_text())
    (point / "state.json").write_text(json.dumps({"step": state["step"]}))
    with pytest.raises(resume.ResumeError, match="no longer read"):
        run(tmp_path, max_train_steps=4, checkpoint_every_n_steps=2, resume_run=True)
    assert not marker.exists()


def test_a_damaged_resume_point_is_named(tmp_path):
    run(tmp_path, max_train_steps=3, checkpoint_every_n_steps=2)
    (point,) = resume.list_resume_points(run_paths(tmp_path).resume_dir)
    (point / "unet.safetensors").write_bytes(b"garbage")
    with pytest.raises(resume.ResumeError, match="step-000002 is damaged"):
        run(tmp_path, max_train_steps=4, checkpoint_every_n_steps=2, resume_run=True)


def test_leftovers_of_interrupted_resume_points_are_swept(tmp_path):
    run(tmp_path, max_train_steps=3, checkpoint_every_n_steps=2)
    resume_dir = run_paths(tmp_path).resume_dir
    dead = 2 ** 22 + 12345  # beyond Linux's default pid_max: no such process
    (resume_dir / f".step-000004.{dead}.tmp").mkdir()
    (resume_dir / f".step-000004.{dead}.tmp" / "unet.safetensors").write_bytes(b"half")
    (resume_dir / "step-000006").mkdir()  # a deletion cut short: no state.json
    (resume_dir / ".tmp-step-000008").mkdir()  # the first version's temporary name
    reporter = RecordingReporter()
    run(tmp_path, reporter=reporter, max_train_steps=5, checkpoint_every_n_steps=2,
        resume_run=True)
    assert sorted(p.name for p in resume_dir.iterdir()) == ["step-000002", "step-000004"]
    assert any("incomplete resume point step-000006" in line for line in reporter.lines)


def test_a_failed_resume_point_write_cleans_up_and_keeps_the_older_point(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    calls = {"n": 0}

    def failing_save(tensors, path, metadata=None):
        calls["n"] += 1
        with open(path, "wb") as handle:  # half a file, then the disk is full
            handle.write(b"x" * 100)
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    run(tmp_path, max_train_steps=3, checkpoint_every_n_steps=2)
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(files.WriteError) as info:
        run(tmp_path, max_train_steps=5, checkpoint_every_n_steps=2, resume_run=True)
    message = str(info.value)
    assert "the disk is full" in message and "step-000004" in message
    assert "the newest complete resume point is step-000002" in message
    resume_dir = run_paths(tmp_path).resume_dir
    assert sorted(p.name for p in resume_dir.iterdir()) == ["step-000002"]


def test_a_new_run_under_a_used_name_keeps_the_earlier_runs_points(tmp_path):
    run(tmp_path, max_train_steps=3, checkpoint_every_n_steps=2)
    from dreambooth.common.config import ConfigError

    with pytest.raises(ConfigError, match="holds resume points of an earlier run"):
        run(tmp_path, max_train_steps=3, checkpoint_every_n_steps=2)
    assert [p.name for p in resume.list_resume_points(run_paths(tmp_path).resume_dir)] == [
        "step-000002"]
    reporter = RecordingReporter()
    run(tmp_path, reporter=reporter, max_train_steps=1, checkpoint_every_n_steps=2, overwrite=True)
    assert resume.list_resume_points(run_paths(tmp_path).resume_dir) == []
    assert any("are removed once this run has written its own" in line for line in reporter.lines)


def test_saves_a_crash_skipped_are_redone_after_resume(tmp_path, monkeypatch):
    """The intermediate save of a step comes before its resume point: a crash while saving the
    model at step 4 resumes from step 2 and writes the step-4 model after all."""
    from dreambooth.engine import run_output

    real_export = run_output.export
    crashed = {"done": False}

    class Killed(BaseException):
        pass

    def export_that_dies(*args, **kwargs):
        if kwargs.get("suffix") == "_4" and not crashed["done"]:
            crashed["done"] = True
            raise Killed
        return real_export(*args, **kwargs)

    monkeypatch.setattr(run_output, "export", export_that_dies)
    options = dict(max_train_steps=5, checkpoint_every_n_steps=2, save_every_n_steps=2)
    with pytest.raises(Killed):
        run(tmp_path, export=True, **options)
    out = run_paths(tmp_path).checkpoints_dir
    assert sorted(p.name for p in out.iterdir()) == ["test-model_2.safetensors"]
    assert [p.name for p in resume.list_resume_points(run_paths(tmp_path).resume_dir)] == [
        "step-000002"]
    first = (out / "test-model_2.safetensors").read_bytes()
    result, resumed = run(tmp_path, export=True, resume_run=True, **options)
    assert sorted(p.name for p in out.iterdir()) == ["test-model.safetensors",
                                                     "test-model_2.safetensors",
                                                     "test-model_4.safetensors"]
    assert (out / "test-model_2.safetensors").read_bytes() == first
    _, straight = run(tmp_path / "straight", **options)
    assert torch.equal(flat(resumed.unet), flat(straight.unet))


def test_resuming_from_the_last_step_only_exports(tmp_path, monkeypatch):
    from dreambooth.engine import run_output

    real_export = run_output.export
    monkeypatch.setattr(run_output, "export", lambda *a, **k: (_ for _ in ()).throw(
        files.WriteError(run_paths(tmp_path).checkpoints_dir / "test-model.safetensors",
                         "the disk is full", needed=10, free=1)))
    with pytest.raises(files.WriteError) as info:
        run(tmp_path, export=True, max_train_steps=3)
    assert "kept as the resume point" in str(info.value) and "step-000003" in str(info.value)
    monkeypatch.setattr(run_output, "export", real_export)
    reporter = RecordingReporter()
    result, _ = run(tmp_path, reporter=reporter, export=True, resume_run=True, max_train_steps=3)
    assert reporter.steps == [] and result.steps == 3  # no step trained twice
    assert result.output_path.name == "test-model.safetensors" and result.output_path.is_file()
