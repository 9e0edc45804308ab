"""The background job: one at a time, cancellable in every phase, a snapshot any thread reads."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dreambooth.app import job as job_module
from dreambooth.common.config import ConfigError
from dreambooth.app.job import JobBusy, JobRunner
from dreambooth.engine.resume import list_resume_points

from trainer_fixtures import base_config, run_paths, tiny_components

ROOT = Path(__file__).resolve().parents[1]


def start(runner, tmp_path, **overrides):
    config = base_config(tmp_path, **overrides)
    return runner.start(config, run_paths(tmp_path), components=tiny_components(),
                        export_model=False)


@pytest.mark.parametrize("phase", ["loading", "class_images", "caching", "training"])
def test_cancel_in_each_phase_ends_the_job_cleanly(tmp_path, monkeypatch, phase):
    runner = JobRunner()
    real_phase = job_module._JobReporter.phase

    def cancelling(self, name):
        real_phase(self, name)
        if name == phase:
            self.runner.cancel()

    monkeypatch.setattr(job_module._JobReporter, "phase", cancelling)
    empty_class = tmp_path / "fresh-class"  # forces the class-pictures phase
    config = base_config(tmp_path, max_train_steps=50, num_class_images=2, class_sample_steps=1)
    config.concepts[0].class_data_dir = str(empty_class)
    runner.start(config, run_paths(tmp_path), components=tiny_components(), export_model=False)
    snap = runner.wait(120)
    assert snap.phase == "cancelled", snap.log
    assert snap.step < 50 and not runner.running
    assert any("cancel requested" in line for line in snap.log)


def test_a_second_start_is_refused_while_one_runs(tmp_path):
    runner = JobRunner()
    start(runner, tmp_path, max_train_steps=500)
    try:
        with pytest.raises(JobBusy, match="already running"):
            start(runner, tmp_path)
    finally:
        runner.cancel()
        runner.wait(60)
    assert runner.snapshot().phase == "cancelled"


def test_snapshot_reports_progress_while_training(tmp_path):
    runner = JobRunner()
    start(runner, tmp_path, max_train_steps=400, sample_every_n_steps=0)
    seen = None
    deadline = time.time() + 120
    while time.time() < deadline:
        snap = runner.snapshot()  # read from this (another) thread while the job runs
        if snap.phase == "training" and snap.step >= 4:
            seen = snap
            break
        time.sleep(0.05)
    runner.cancel()
    final = runner.wait(60)
    assert seen is not None, final.log
    assert seen.total == 400 and seen.running
    assert len(seen.loss_history) >= 3 and seen.loss is not None and seen.lr == pytest.approx(1e-3)
    assert seen.it_per_s and seen.it_per_s > 0 and seen.eta_seconds and seen.eta_seconds > 0
    assert any("phase: training" in line for line in seen.log)
    assert final.phase == "cancelled" and final.finished_at is not None


def test_bad_config_fails_before_a_thread_starts(tmp_path):
    runner = JobRunner()
    config = base_config(tmp_path, learning_rate=-1.0)
    with pytest.raises(ConfigError, match="learning_rate"):
        runner.start(config, run_paths(tmp_path))
    assert runner.snapshot().phase == "idle" and not runner.running


def test_an_error_in_training_fails_the_job_and_keeps_the_resume_point(tmp_path, monkeypatch):
    from dreambooth.engine import trainer

    runner = JobRunner()
    real = trainer.dreambooth_loss
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "dreambooth_loss", exploding)
    start(runner, tmp_path, max_train_steps=10, checkpoint_every_n_steps=2)
    snap = runner.wait(120)
    assert snap.phase == "failed"
    assert "CUDA out of memory (simulated)" in snap.error
    points = list_resume_points(run_paths(tmp_path).resume_dir)
    assert [p.name for p in points] == ["step-000002"]
    # the work folder keeps the config and the log of the failed run
    assert (run_paths(tmp_path).work_dir / "config.json").is_file()
    assert "failed" in (run_paths(tmp_path).work_dir / "train.log").read_text()


def test_job_context_wraps_the_run(tmp_path):
    runner = JobRunner()
    events = []

    class Context:
        def __enter__(self):
            events.append(("enter", threading.current_thread().name))

        def __exit__(self, *exc):
            events.append(("exit", threading.current_thread().name))

    config = base_config(tmp_path, max_train_steps=2)
    (tmp_path / "fake-output.safetensors").write_bytes(b"")
    runner.start(config, run_paths(tmp_path), context=Context, components=tiny_components(),
                 export_model=False)
    snap = runner.wait(120)
    assert snap.phase == "done"
    assert [e[0] for e in events] == ["enter", "exit"]
    assert events[0][1].startswith("dreambooth-job-")


def test_process_runner_is_shared():
    assert job_module.runner() is job_module.runner()


def test_a_finished_job_leaves_no_model_tensors_behind(tmp_path):
    """The job loads the model itself (as in the WebUI) and must let go of all of it: on a GPU
    that is the memory the WebUI needs back. Counted here as live tensors after the run."""
    import gc

    import torch

    from dreambooth.models import tiny

    def live_tensor_bytes() -> int:
        gc.collect()
        return sum(o.numel() * o.element_size() for o in gc.get_objects()
                   if isinstance(o, torch.Tensor))

    base = tmp_path / "base.safetensors"
    tiny.save_checkpoint(base, size="tiny", seed=0)
    runner = JobRunner()
    before = live_tensor_bytes()
    config = base_config(tmp_path, base_model=str(base), max_train_steps=2)
    runner.start(config, run_paths(tmp_path))
    snap = runner.wait(180)
    assert snap.phase == "done", snap.log
    assert runner.result is not None and runner.result.ema is None  # paths and numbers only
    leaked = live_tensor_bytes() - before
    model_bytes = base.stat().st_size
    assert leaked < model_bytes * 0.05, f"{leaked} bytes of tensors still alive after the job"



RUN_BESIDE_THE_TOKENIZER_BUILD = """
import sys
from dreambooth.app import estimates
from dreambooth.app.job import JobRunner
from pathlib import Path
from dreambooth.common.config import TrainingConfig
from dreambooth.engine.trainer import RunPaths

def work(config, paths, reporter, **kwargs):
    import diffusers.loaders.single_file_model  # what loading a base model file imports first
    from transformers import AutoImageProcessor, CLIPImageProcessor  # noqa: F401
    raise ValueError("imported")

estimates.start_tokenizer_build()  # as the tab does when it is built
runner = JobRunner()
paths = RunPaths(work_dir=Path(sys.argv[1]) / "work", checkpoints_dir=Path(sys.argv[1]) / "models")
runner.start(TrainingConfig(), paths, work=work, validate=False)
print(runner.wait(120).error)
"""


def test_a_run_started_while_the_tab_builds_its_tokenizer_loads_its_libraries(tmp_path):
    """transformers' lazy imports are not thread-safe: a run importing diffusers' model loaders
    while the tab built the CLIP tokenizer failed in CI with "cannot import name
    'CLIPImageProcessor' from 'transformers'" (it does every time in the Neo lane when the two
    overlap). A run started during that build waits for it."""
    done = subprocess.run([sys.executable, "-c", RUN_BESIDE_THE_TOKENIZER_BUILD, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1:] == ["imported"], done.stdout + done.stderr
