"""Every phase reports its progress the way training does: class pictures and caching with a
count, speed and ETA, samples picture by picture, the export by name; the ETA covers the rest of
the run (samples and export included); speed in it/s or s/it as the WebUI writes it."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from dreambooth.engine.eta import RunExtras, speed_text
from dreambooth.app.job import JobRunner, _JobReporter
from dreambooth.engine.trainer import Reporter, train
from dreambooth.tab.ui_render import progress_html

from trainer_fixtures import base_config, run_paths, tiny_components


class Calls(Reporter):
    """Every call the trainer makes, in order, as (what, args)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.current = ""

    def phase(self, name):
        self.current = name
        self.calls.append(("phase", name))

    def log(self, line):
        self.calls.append(("log", line))

    def progress(self, step, total, loss, lr):
        self.calls.append(("progress", self.current, step, total))

    def detail(self, text):
        self.calls.append(("detail", self.current, text))

    def extra_time(self, seconds):
        self.calls.append(("extra", seconds))

    def samples(self, paths):
        self.calls.append(("samples", len(paths)))


def test_class_pictures_samples_and_export_each_report_their_progress(tmp_path):
    import shutil

    config = base_config(tmp_path, num_class_images=6, class_batch_size=1, class_sample_steps=1,
                         max_train_steps=4, sample_every_n_steps=2, sample_steps=1,
                         sample_prompts=["photo of zwx toy", "a zwx toy on a table"])
    cls = Path(config.concepts[0].class_data_dir)
    shutil.rmtree(cls)  # the class pictures are made by the model: 6 to make
    reporter = Calls()
    from dreambooth.models import tiny

    tiny.save_checkpoint(Path(config.base_model), size="tiny", seed=0)
    result = train(config, run_paths(tmp_path), reporter=reporter, components=tiny_components())
    assert result.output_path is not None
    calls = reporter.calls
    made = [c[2:] for c in calls if c[0] == "progress" and c[1] == "class_images"]
    assert made == [(n, 6) for n in range(0, 7)]  # "0 / 6" before the first picture
    sampling = [c[2] for c in calls if c[0] == "detail" and c[1] == "sampling"]
    assert sampling == ["sampling step 2: 0 / 2 pictures", "sampling step 2: 1 / 2 pictures",
                        "sampling step 2: 2 / 2 pictures", "sampling step 4: 0 / 2 pictures",
                        "sampling step 4: 1 / 2 pictures", "sampling step 4: 2 / 2 pictures"]
    phases = [c[1] for c in calls if c[0] == "phase"]
    assert phases[-4:] == ["sampling", "training", "sampling", "saving"]  # step 2, then the end
    assert ("detail", "saving", "writing test-model.safetensors") in calls
    # Once the step-2 samples were measured, the ETA's extras include them and the export.
    extras = [c[1] for c in calls if c[0] == "extra"]
    assert len(extras) == 4 and extras[2] > 0


def test_with_sample_every_zero_the_concepts_prompt_is_sampled_at_the_end(tmp_path):
    config = base_config(tmp_path, with_prior_preservation=False, max_train_steps=2,
                         sample_every_n_steps=0, sample_steps=1)
    train(config, run_paths(tmp_path), components=tiny_components(), export_model=False)
    assert [p.name for p in run_paths(tmp_path).samples_dir.iterdir()] == ["step-000002-0.png"]


def test_sample_steps_zero_makes_no_sample_pictures(tmp_path):
    config = base_config(tmp_path, with_prior_preservation=False, max_train_steps=2,
                         sample_every_n_steps=1, sample_steps=0)
    reporter = Calls()
    train(config, run_paths(tmp_path), reporter=reporter, components=tiny_components(),
          export_model=False)
    assert not run_paths(tmp_path).samples_dir.exists()
    assert all(c[1] == 0 for c in reporter.calls if c[0] == "samples")


def test_the_eta_of_every_counted_phase_and_the_extras_of_training(monkeypatch):
    runner = JobRunner()
    reporter = _JobReporter(runner, 1)
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    reporter.progress(5, 5, None, None)  # what the phase before counted
    reporter.phase("class_images")
    assert (runner.snapshot().step, runner.snapshot().total) == (0, 0)  # not "5 / 5"
    for done in range(3):
        reporter.progress(done, 10, None, None)
        clock[0] += 4.0  # 4 s per class picture
    snap = runner.snapshot()  # 4 s after the last count: the ETA counts down meanwhile
    assert snap.it_per_s == pytest.approx(0.25) and snap.eta_seconds == pytest.approx(32.0 - 4.0)
    reporter.phase("training")
    assert runner.snapshot().eta_seconds is None
    reporter.extra_time(100.0)  # samples and export still to come
    for step in range(3):
        reporter.progress(step, 20, 0.1, 1e-4)
        clock[0] += 2.0
    snap = runner.snapshot()
    assert snap.it_per_s == pytest.approx(0.5)
    assert snap.eta_seconds == pytest.approx(18 / 0.5 + 100.0 - 2.0)
    reporter.phase("sampling")
    reporter.detail("sampling step 2: 1 / 4 pictures")
    snap = runner.snapshot()
    assert snap.phase == "sampling" and snap.eta_seconds == pytest.approx(100.0)
    clock[0] += 30.0  # the samples report no steps: their ETA still counts down
    assert runner.snapshot().eta_seconds == pytest.approx(70.0)
    assert "sampling step 2: 1 / 4 pictures" in progress_html(snap)
    assert "2.00 s/it" in progress_html(snap)


def test_the_rest_of_the_run_counts_each_extra_at_its_measured_cost(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"x" * 43_000_000)  # 1 s at the assumed export speed
    extras = RunExtras(total_steps=100, sample_every=25, save_every=50, resume_every=0,
                       export=True, base_file=base)
    assert extras.remaining(0) == pytest.approx(1.0 + 1.0)  # a save (step 50) and the export
    extras.measured("samples", 3.0)
    # samples at 25, 50, 75 and at the end; the save at 50; the export
    assert extras.remaining(0) == pytest.approx(3 * 3.0 + 3.0 + 1.0 + 1.0)
    extras.measured("export", 5.0)
    assert extras.remaining(60) == pytest.approx(1 * 3.0 + 3.0 + 5.0)
    assert extras.spent == pytest.approx(8.0)


@pytest.mark.parametrize("rate, text", [(12.345, "12.35 it/s"), (1.0, "1.00 it/s"),
                                         (0.25, "4.00 s/it"), (None, "")])
def test_speed_is_written_like_the_webui(rate, text):
    assert speed_text(rate) == text


def test_each_phase_shows_its_count_at_once_and_its_eta_after_its_first_item(monkeypatch):
    """A1111 showed the class-picture phase as its bare name and the training ETA only after
    the second step: the class pictures count from "0 / N", and the trainer's order (the step
    count, then the phase) gives an ETA after the first step."""
    runner = JobRunner()
    reporter = _JobReporter(runner, 1)
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    reporter.phase("class_images")
    reporter.progress(0, 4, None, None)
    assert "0 / 4" in progress_html(runner.snapshot())
    clock[0] += 10.0
    reporter.progress(1, 4, None, None)
    assert runner.snapshot().eta_seconds == pytest.approx(30.0)  # after the first picture
    reporter.progress(0, 50, None, 1e-4)  # loop(): the step count first, then the phase
    reporter.phase("training")
    clock[0] += 3.0
    reporter.progress(1, 50, 0.2, 1e-4)
    snap = runner.snapshot()
    assert snap.eta_seconds == pytest.approx(49 * 3.0) and "ETA" in progress_html(snap)
