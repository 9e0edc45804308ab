"""One training job at a time, in a background thread, with a progress snapshot any thread reads.

The tab, the API and the CLI all read :meth:`JobRunner.snapshot`. This module holds the only
mutable global of the package: the process's runner (:func:`runner`), because a WebUI process has
one GPU to train on and every tab and API call must see the same job.
"""
from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

from dreambooth.app.estimates import wait_for_tokenizer_build
from dreambooth.common.config import TrainingConfig
from dreambooth.common.files import WriteError
from dreambooth.common.memory import give_memory_back
from dreambooth.engine.trainer import Reporter, RunPaths, TrainResult, train

PHASES = ("idle", "loading", "class_images", "caching", "training", "sampling", "saving",
          "downloading", "captioning", "extracting", "done", "cancelled", "failed")
FINISHED = ("idle", "done", "cancelled", "failed")
LOG_LINES = 300
HISTORY = 2000


class JobBusy(RuntimeError):
    """A job is already running in this process."""


@dataclass
class Progress:
    """What the outside world sees of a job. Copied whole by :meth:`JobRunner.snapshot`."""

    job_id: int = 0
    model_name: str = ""
    # what the job does: "training" (class pictures too), "captioning", "extracting" (a LoRA)
    task: str = "training"
    phase: str = "idle"
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    lr_history: list[tuple[int, float]] = field(default_factory=list)
    validation_history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None  # the best validation step so far
    best_path: str | None = None  # its file (keep_best)
    it_per_s: float | None = None
    eta_seconds: float | None = None  # counted down from eta_at in every snapshot
    eta_at: float | None = None  # when eta_seconds was measured
    peak_gpu_mb: float | None = None
    holds_generation: bool = False  # txt2img/img2img wait for this job (the WebUI's lock)
    detail: str = ""  # what the phase is doing now ("sampling step 500: 2 / 4 pictures")
    # the last "Load in txt2img": {"title", "state" (loading | active | failed), "message"}
    switch: dict | None = None
    samples: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    output_path: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self.phase not in FINISHED

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["running"] = self.running
        return d


class _JobReporter(Reporter):
    """Speed and ETA for every counted phase (class pictures, caching, training steps); the
    training ETA adds what the trainer says the rest of the run costs besides steps."""

    def __init__(self, runner: "JobRunner", job_id: int):
        self.runner, self.job_id = runner, job_id
        self._last: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}
        self._extra = 0.0
        self.current = "loading"

    def phase(self, name: str) -> None:
        changes: dict[str, Any] = {"phase": name, "detail": ""}
        if name in ("sampling", "saving"):  # between steps: what is left is the extras
            changes["eta_seconds"] = self._extra or None
        else:
            changes["it_per_s"] = self._rate.get(name)
            changes["eta_seconds"] = None
            # The phase's clock starts now, from the count it starts at (training: the step the
            # trainer reported just before; any other phase counts from 0), so its first
            # progress already gives a speed and an ETA, and a phase entered again measures
            # from its new start rather than across the samples or saves in between.
            step = self.runner.snapshot().step if name == "training" else 0
            if name != "training":
                changes.update(step=0, total=0)  # not the previous phase's "n / N"
            self._last[name] = (time.time(), step)
        self.runner._update(**changes)
        self.log(f"phase: {name}")
        self.current = name

    def log(self, line: str) -> None:
        self.runner._log(line)

    def detail(self, text: str) -> None:
        self.runner._update(detail=text)
        if text:
            self.log(text)

    def extra_time(self, seconds: float) -> None:
        self._extra = max(0.0, float(seconds))

    def progress(self, step: int, total: int, loss: float | None, lr: float | None) -> None:
        now = time.time()
        name = self.current
        changes: dict[str, Any] = {"step": step, "total": total}
        last = self._last.get(name)
        if last is not None and step > last[1]:
            rate = (step - last[1]) / max(now - last[0], 1e-9)
            # Smoothed, so the ETA does not jump with every slow step.
            old = self._rate.get(name)
            self._rate[name] = rate if old is None else 0.8 * old + 0.2 * rate
            changes["it_per_s"] = self._rate[name]
            left = (total - step) / self._rate[name]
            changes["eta_seconds"] = left + (self._extra if name == "training" else 0.0)
        self._last[name] = (now, step)
        changes["peak_gpu_mb"] = peak_gpu_mb()
        if loss is not None:
            changes["loss"] = loss
        if lr is not None:
            changes["lr"] = lr
        self.runner._update(**changes, _history=(step, loss, lr))

    def samples(self, paths: list[Path]) -> None:
        self.runner._add_samples([str(p) for p in paths])

    def validation(self, step: int, loss: float, best_step: int, best_file: Path | None) -> None:
        self.runner._update(best_step=best_step,
                            best_path=str(best_file) if best_file is not None else None,
                            _validation=(step, loss))

    def holding(self, held: bool) -> None:
        self.runner._update(holds_generation=bool(held))

    def should_stop(self) -> bool:
        return self.runner._cancel.is_set()


def peak_gpu_mb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 20


class JobRunner:
    """Starts training in a thread, refuses a second one, cancels within one step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress = Progress()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self.result: TrainResult | None = None

    # -- reading ---------------------------------------------------------------------------------
    def snapshot(self) -> Progress:
        """A copy of the progress, its ETA counted down to now (a save or the final samples
        report no steps, and their ETA must not stand still while they run)."""
        with self._lock:
            p = self._progress
            eta = p.eta_seconds
            if eta is not None and p.eta_at is not None:
                eta = max(0.0, eta - max(0.0, time.time() - p.eta_at))
            return Progress(**{**p.__dict__, "loss_history": list(p.loss_history),
                               "switch": dict(p.switch) if p.switch else None,
                               "lr_history": list(p.lr_history), "samples": list(p.samples),
                               "validation_history": list(p.validation_history),
                               "log": list(self._log_lines), "eta_seconds": eta})

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- control ---------------------------------------------------------------------------------
    def start(self, config: TrainingConfig, paths: RunPaths, *,
              context: Callable[[], ContextManager] | None = None,
              work: Callable[..., TrainResult] | None = None,
              task: str = "training", validate: bool = True,
              **train_kwargs) -> int:
        """Start ``train(config, paths, **train_kwargs)`` in a thread; returns the job id.

        ``context`` wraps the whole run; ``work`` replaces ``train`` with the same signature
        (the tab's "Generate class pictures" and captions, and a reporter that mirrors progress
        into the WebUI, run through the same one-job slot: they all use the GPU). ``task`` names
        the job for people; ``validate=False`` skips the training checks of the config (a
        caption run needs no base model), its own checks being the caller's."""
        if validate:
            config.check()  # field errors reach the caller before a thread exists
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._progress.running:
                running = self._progress
                name = f" ({running.model_name})" if running.model_name else ""
                raise JobBusy(f"a {running.task} job{name} is already running; "
                              "cancel it or wait for it to finish")
            job_id = self._progress.job_id + 1
            self._cancel.clear()
            self._log_lines.clear()
            self._progress = Progress(job_id=job_id, model_name=config.model_name, task=task,
                                      phase="loading", started_at=time.time())
            self.result = None
            thread = threading.Thread(target=self._run, name=f"dreambooth-job-{job_id}",
                                      args=(job_id, config, paths, context, work or train,
                                            train_kwargs),
                                      daemon=True)
            self._thread = thread
        thread.start()
        return job_id

    def note_switch(self, title: str, state: str, message: str) -> None:
        """Record how the last "Load in txt2img" stands (every tab shows it)."""
        self._update(switch={"title": title, "state": state, "message": message,
                             "at": time.time()})

    def cancel(self) -> bool:
        """Ask the running job to stop at the next step; False when nothing runs."""
        if not self.running or not self.snapshot().running:
            return False
        self._cancel.set()
        self._log("cancel requested")
        return True

    def wait(self, timeout: float | None = None) -> Progress:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()

    # -- the thread --------------------------------------------------------------------------------
    def _run(self, job_id: int, config: TrainingConfig, paths: RunPaths, context,
             work: Callable[..., TrainResult], train_kwargs: dict) -> None:
        reporter = _JobReporter(self, job_id)
        final: dict[str, Any] = {"phase": "failed", "error": "the job stopped unexpectedly"}
        try:
            wait_for_tokenizer_build()  # its imports and the run's must not overlap
            with (context() if context else contextlib.nullcontext()):
                result = work(config, paths, reporter=reporter, **train_kwargs)
            # Only paths and numbers are kept: the EMA copy of the UNet goes with the job.
            self.result = replace(result, ema=None)
            del result
            output = self.result.output_path
            final = {"phase": "cancelled" if self.result.cancelled else "done",
                     "output_path": str(output) if output else None}
        except (ValueError, WriteError) as exc:
            # Bad input (config, pictures, checkpoint, resume point) and failed writes carry a
            # message for people: shown as it is, without a traceback.
            final = self._failure(str(exc))
        except Exception as exc:  # the job must end as "failed", never kill the WebUI
            self._log(traceback.format_exc())
            final = self._failure(f"{type(exc).__name__}: {exc}")
        finally:
            give_memory_back()
            # The log belongs to the work folder only when this job got past its checks (the
            # trainer then wrote config.json): a refused config never touches an earlier run.
            config_file = paths.work_dir / "config.json"
            if self._progress.task == "training" and config_file.is_file() \
                    and config_file.stat().st_mtime >= self._progress.started_at - 1:
                with contextlib.suppress(Exception):
                    _write_log(paths.work_dir / "train.log", self.snapshot().log)
            # Last: whoever sees the job finished may start the next one at once.
            self._update(**final, finished_at=time.time())

    def _failure(self, message: str) -> dict[str, Any]:
        self._log(f"failed: {message}")
        return {"phase": "failed", "error": message}

    def _update(self, _history: tuple | None = None, _validation: tuple | None = None,
                **changes) -> None:
        if "eta_seconds" in changes:
            changes["eta_at"] = time.time()
        with self._lock:
            for key, value in changes.items():
                setattr(self._progress, key, value)
            if _history is not None:
                step, loss, lr = _history
                if loss is not None:
                    _append_capped(self._progress.loss_history, (step, loss))
                if lr is not None and loss is not None:
                    _append_capped(self._progress.lr_history, (step, lr))
            if _validation is not None:
                _append_capped(self._progress.validation_history, _validation)

    def _log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            for part in str(line).rstrip().splitlines() or [""]:
                self._log_lines.append(f"{stamp} {part}")

    def _add_samples(self, paths: list[str]) -> None:
        with self._lock:
            self._progress.samples = (self._progress.samples + paths)[-64:]


def _append_capped(history: list, item: tuple) -> None:
    history.append(item)
    if len(history) > HISTORY:  # keep the curve's shape: drop every other old point
        del history[:HISTORY // 2:2]


def _write_log(path: Path, lines: list[str]) -> None:
    from dreambooth.common.files import write_text

    write_text(path, "\n".join(lines) + "\n", overwrite=True)


_RUNNER: JobRunner | None = None
_RUNNER_LOCK = threading.Lock()


def runner() -> JobRunner:
    """The process's job runner (created on first use; survives the WebUI's "Reload UI")."""
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = JobRunner()
        return _RUNNER
