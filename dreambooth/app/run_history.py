"""What a finished (or running) run left in its work folder, read back for comparing runs: its
loss and validation curves from ``logs/train.jsonl`` and its sample pictures from ``samples/``.

Only files are read (no model, no gradio): a run still being written is read as far as its last
complete line. Samples are made with fixed seeds (``sample_seed + prompt index``), so the same
step and prompt index in two runs of the same sample settings are the same seed and prompt.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from dreambooth.engine.training_log import LOG_NAME, read_log

LOG_FILE = Path("logs") / LOG_NAME
SAMPLES_FOLDER = "samples"
# step-000040-0.png: step 40, sample prompt 0 (the engine's sampling names them so)
SAMPLE_NAME = re.compile(r"step-(\d+)-(\d+)\.png")

SampleMap = dict[int, dict[int, Path]]  # step -> {prompt index -> picture}


@dataclass(frozen=True)
class RunCurves:
    """A run's training loss and validation loss as (step, loss), in step order, and the step of
    its lowest validation loss (None without validation)."""

    name: str
    loss: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None

    @property
    def empty(self) -> bool:
        return not self.loss and not self.validation


def _number(value: Any) -> float | None:
    """A finite float, or None (NaN or inf would flatten a plot's scale; bools are not losses)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _step(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return int(value)


def best_validation_step(validation: list[tuple[int, float]]) -> int | None:
    """The step of the lowest validation loss; the earliest on a tie, as the trainer keeps it."""
    if not validation:
        return None
    return min(validation, key=lambda point: (point[1], point[0]))[0]


def read_curves(work_dir: Path, name: str | None = None) -> RunCurves:
    """The curves of the run in ``work_dir`` (named after the folder unless ``name`` is given);
    empty curves when it has no log yet."""
    loss: dict[int, float] = {}
    validation: dict[int, float] = {}
    for record in (r for r in read_log(Path(work_dir) / LOG_FILE) if isinstance(r, dict)):
        step = _step(record.get("step"))
        if step is None:
            continue
        event = record.get("event")
        # a later line of the same step wins (a resumed run rewrites its log, but be lenient)
        if event is None and (value := _number(record.get("loss"))) is not None:
            loss[step] = value
        elif event == "validation" and (value := _number(record.get("validation_loss"))) is not None:
            validation[step] = value
    scored = sorted(validation.items())
    return RunCurves(name=name or Path(work_dir).name, loss=sorted(loss.items()),
                     validation=scored, best_step=best_validation_step(scored))


def sample_steps(work_dir: Path) -> SampleMap:
    """The run's sample pictures: step -> {prompt index -> path}; empty without a samples folder."""
    folder = Path(work_dir) / SAMPLES_FOLDER
    found: SampleMap = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        match = SAMPLE_NAME.fullmatch(path.name)  # leaves out hidden half-written temporaries
        if match and path.is_file():
            found.setdefault(int(match[1]), {})[int(match[2])] = path
    return found


def common_sample_steps(runs: Iterable[Mapping[int, Mapping[int, Path]]]) -> list[int]:
    """The steps every run has samples at, in order (none for no runs)."""
    steps: set[int] | None = None
    for samples in runs:
        steps = set(samples) if steps is None else steps & set(samples)
    return sorted(steps or ())


def common_prompt_indices(runs: Iterable[Mapping[int, Mapping[int, Path]]], step: int) -> list[int]:
    """The sample prompt indices every run has a picture of at ``step`` (runs may have been given
    a different number of sample prompts)."""
    indices: set[int] | None = None
    for samples in runs:
        have = set(samples.get(step, {}))
        indices = have if indices is None else indices & have
    return sorted(indices or ())
