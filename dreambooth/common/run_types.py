"""What a run tells the outside world and where it writes: shared by the loop, its writer,
the job runner and the command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class Cancelled(Exception):
    """Raised inside the loop when the user asked to stop."""


class Reporter:
    """What the loop tells the outside world; the job runner and the CLI subclass it."""

    def phase(self, name: str) -> None: ...

    def log(self, line: str) -> None:
        print(line, flush=True)

    def progress(self, step: int, total: int, loss: float | None, lr: float | None) -> None: ...

    def samples(self, paths: list[Path]) -> None: ...

    def holding(self, held: bool) -> None:
        """Whether the job holds the WebUI's generation lock (txt2img waits for it)."""

    def detail(self, text: str) -> None:
        """What the current phase is doing ("sampling step 500: 2 / 4 pictures")."""

    def extra_time(self, seconds: float) -> None:
        """Seconds the rest of the run needs besides its steps (samples, saves, export)."""

    def validation(self, step: int, loss: float, best_step: int, best_file: Path | None) -> None:
        """A validation loss at ``step``; the best step so far and its file (``keep_best``)."""

    def should_stop(self) -> bool:
        return False


@dataclass
class RunPaths:
    """Where a run writes: its work folder and the folders the WebUI lists checkpoints and
    LoRAs from (``lora_dir`` None: ``Lora`` beside the checkpoints folder)."""

    work_dir: Path
    checkpoints_dir: Path
    lora_dir: Path | None = None

    def output_dir(self, adapter: bool) -> Path:
        """Where the run's model files go: models/Lora for an adapter, else the checkpoints."""
        if not adapter:
            return self.checkpoints_dir
        return self.lora_dir if self.lora_dir is not None else self.checkpoints_dir.parent / "Lora"

    @property
    def resume_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.work_dir / "samples"

    @property
    def logs_dir(self) -> Path:
        """The training log: train.jsonl always, TensorBoard event files when it is installed."""
        return self.work_dir / "logs"


@dataclass
class TrainResult:
    output_path: Path | None
    steps: int
    total_steps: int
    seconds: float
    cancelled: bool = False
    losses: list[float] = field(default_factory=list)
    ema: object | None = None  # the EMAModel when use_ema (its weights are what was exported)
