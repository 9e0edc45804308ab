"""The training log of a run: ``train.jsonl`` (always) and TensorBoard event files (when the
``tensorboard`` package is importable), both in the run's ``logs`` folder.

``train.jsonl`` holds one JSON object per line: per optimizer step ``{"step", "loss", "lr", ...}``,
and events such as ``{"step", "event": "samples", "paths": [...]}``. It is the one file of ours
that grows while it is read (TensorBoard, ``tail -f``, a plotting script): every line is written
whole and flushed, so a killed run leaves complete lines (``read_log`` skips a torn last one).
A resumed run first rewrites the log without the steps after its resume point (through the
atomic writer), so each step appears once; TensorBoard is told the same with ``purge_step``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any, Iterable

LOG_NAME = "train.jsonl"
TENSORBOARD_RUN = "tensorboard"  # the event files' folder inside logs/


def tensorboard_problem() -> str | None:
    """Why TensorBoard files cannot be written here, or None when they can."""
    try:
        from accelerate.utils import is_tensorboard_available
    except ImportError:  # accelerate too old to say
        return "accelerate cannot tell whether TensorBoard is installed"
    if not is_tensorboard_available():
        return "the tensorboard package is not installed (pip install tensorboard)"
    return None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a training log (a torn last line of a killed run is skipped)."""
    records = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _scalar_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings TensorBoard's hyperparameter view can show: numbers, text and booleans."""
    return {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))}


class TrainingLog:
    """Writes a run's log; open it on the main process only."""

    def __init__(self, folder: Path, *, resume_step: int | None = None,
                 settings: dict[str, Any] | None = None, tensorboard: bool = True):
        from dreambooth.common.files import ensure_folder, remove_tree, write_text

        self.folder = ensure_folder(folder)
        self.path = self.folder / LOG_NAME
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_log(self.path) if int(r.get("step", 0)) <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept), overwrite=True)
        elif resume_step is None:  # a new run in this folder: the earlier run's log goes
            if self.path.exists():
                write_text(self.path, "", overwrite=True)
            if (self.folder / TENSORBOARD_RUN).exists():
                remove_tree(self.folder / TENSORBOARD_RUN)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")
        self.tracker = None
        self.tensorboard_note = tensorboard_problem() if tensorboard else "turned off"
        if self.tensorboard_note is None:
            from accelerate.tracking import TensorBoardTracker

            extra = {"purge_step": resume_step + 1} if resume_step is not None else {}
            self.tracker = TensorBoardTracker(TENSORBOARD_RUN, str(self.folder), **extra)
            if not hasattr(self.tracker, "writer"):  # accelerate >= 1.8 opens it in start()
                self.tracker.start()
            if settings and resume_step is None:
                self.tracker.writer.add_text("config", "```\n" + json.dumps(settings, indent=2)
                                             + "\n```", 0)
                self.tracker.store_init_configuration(_scalar_settings(settings))

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def step(self, step: int, values: dict[str, float]) -> None:
        """One optimizer step's figures (loss, lr, grad_norm, step_seconds ...)."""
        self._write({"step": step, "time": round(time.time(), 3), **values})
        if self.tracker is not None:
            self.tracker.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def validation(self, step: int, values: dict[str, Any]) -> None:
        """A validation scoring: ``validation_loss`` and the loss at each fixed noise level."""
        self._write({"step": step, "time": round(time.time(), 3), "event": "validation",
                     **values})
        if self.tracker is not None:
            scalars = {"validation/loss": values["validation_loss"]}
            scalars.update({f"validation/level_{i}": v
                            for i, v in enumerate(values["validation_per_timestep"])})
            self.tracker.log(scalars, step=step)

    def samples(self, step: int, paths: Iterable[Path]) -> None:
        paths = list(paths)
        self._write({"step": step, "time": round(time.time(), 3), "event": "samples",
                     "paths": [str(p) for p in paths]})
        if self.tracker is not None and paths:
            import numpy as np
            from PIL import Image

            for index, path in enumerate(paths):
                with Image.open(path) as picture:
                    array = np.asarray(picture.convert("RGB"))
                self.tracker.writer.add_image(f"samples/{index}", array, step, dataformats="HWC")

    def event(self, step: int, name: str, **values: Any) -> None:
        """Something that happened at a step: a save, a resume point, the text encoder frozen."""
        self._write({"step": step, "time": round(time.time(), 3), "event": name, **values})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
