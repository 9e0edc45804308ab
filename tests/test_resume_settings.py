"""Resume compares settings, not damage: a resume point records the settings that shape its
tensors and optimizer; resuming with another value names the field (old and new), deletes
nothing and leaves config.json as it was; "damaged" is said only of a point that fails to read.
And a run killed between its first intermediate save and its first resume point resumes (the
file carries this run's id)."""
from __future__ import annotations

import json

import pytest

from dreambooth.engine import resume
from dreambooth.common.config import ConfigError

from test_resume_points import run
from trainer_fixtures import run_paths

LORA = dict(training_method="lora", lora_rank=4, lora_alpha=2.0, learning_rate=1e-3,
            max_train_steps=3, checkpoint_every_n_steps=2)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("changed", [
    {"training_method": "locon"}, {"lora_rank": 8}, {"lora_alpha": 4.0}, {"dora": True},
    {"lora_layers": "attention"}, {"train_text_encoder": True}, {"optimizer": "adafactor"},
    {"use_ema": True}])
def test_a_changed_shaping_setting_is_named_and_nothing_is_touched(tmp_path, changed):
    run(tmp_path, **LORA)
    work = run_paths(tmp_path).work_dir
    before = snapshot(work)
    with pytest.raises(ConfigError) as refused:
        run(tmp_path, resume_run=True, **{**LORA, **changed})
    (field, value), = changed.items()
    assert [e.field for e in refused.value.errors] == [field]
    message = str(refused.value).replace(str(tmp_path), "")
    assert repr(value) in message and "start a new run" in message and "damaged" not in message
    assert snapshot(work) == before  # no point deleted, config.json not rewritten


def test_the_same_settings_resume_and_a_longer_run_is_fine(tmp_path):
    run(tmp_path, **LORA)
    result, _ = run(tmp_path, resume_run=True, **{**LORA, "max_train_steps": 4})
    assert result.steps == 4
    saved = json.loads((run_paths(tmp_path).work_dir / "config.json").read_text())
    assert saved["max_train_steps"] == 4  # the settings it went on with


def test_damaged_is_said_only_of_a_point_that_fails_to_read(tmp_path):
    run(tmp_path, **LORA)
    (point,) = resume.list_resume_points(run_paths(tmp_path).resume_dir)
    # a point of an earlier version (no settings recorded) under another rank: not damage
    state = json.loads((point / "state.json").read_text())
    (point / "state.json").write_text(json.dumps({k: v for k, v in state.items()
                                                  if k != "settings"}))
    with pytest.raises(resume.ResumeError) as other:
        run(tmp_path, resume_run=True, **{**LORA, "lora_rank": 8})
    said = str(other.value).replace(str(point), "<point>")  # the test's folder is named "damaged"
    assert "other settings" in said and "damaged" not in said
    # a point whose tensors cannot be read is damaged
    (point / "unet.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(resume.ResumeError, match="damaged"):
        run(tmp_path, resume_run=True, **LORA)


def test_overwrite_keeps_the_earlier_runs_points_until_its_own_exist(tmp_path):
    run(tmp_path, **LORA)
    resume_dir = run_paths(tmp_path).resume_dir
    (earlier,) = resume.list_resume_points(resume_dir)
    earlier_id = resume.read_state(earlier)["run_id"]
    from trainer_fixtures import Crash, crash_at

    with pytest.raises(Crash):  # the new run dies before its first resume point
        run(tmp_path, reporter=crash_at(1), overwrite=True, **LORA)
    assert resume.list_resume_points(resume_dir) == [earlier]  # still there
    # its --resume does not take the earlier run's point: it is not this run's
    work = run_paths(tmp_path).work_dir
    assert resume.read_run_id(work) != earlier_id and resume.run_points(work, resume_dir) == []
    run(tmp_path, overwrite=True, **LORA)  # a new run writes its point: the old one goes
    (point,) = resume.list_resume_points(resume_dir)
    assert resume.read_state(point)["run_id"] == resume.read_run_id(work) != earlier_id


def test_a_kill_between_the_first_save_and_the_first_resume_point_resumes(tmp_path, monkeypatch):
    from dreambooth.engine import run_output
    from dreambooth.__main__ import main as cli_main

    from test_cli import write_config

    class Killed(BaseException):
        pass

    def killed(self, step):
        raise Killed

    config = write_config(tmp_path, with_prior_preservation=False, max_train_steps=3,
                          save_every_n_steps=1, checkpoint_every_n_steps=2)
    with monkeypatch.context() as patch:
        patch.setattr(run_output.RunWriter, "resume_point", killed)
        with pytest.raises(Killed):
            cli_main(["train", str(config), "--quiet"])
    out = tmp_path / "models" / "Stable-diffusion"
    assert (out / "cli-model_1.safetensors").is_file() and (out / "cli-model_2.safetensors").is_file()
    assert cli_main(["train", str(config), "--resume", "--quiet"]) == 0
    assert (out / "cli-model.safetensors").is_file()
