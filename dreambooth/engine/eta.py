"""How long the rest of a run takes: its steps at the measured speed, plus what runs between and
after them (sample pictures, intermediate saves, resume points, the final samples and export),
each at the cost it had the last time it ran. And the speed written the way the WebUI's console
writes it (it/s, or s/it when a step takes longer than a second)."""
from __future__ import annotations

from pathlib import Path

# Export speed before one was measured here: SD1.5 (2.13 GB fp16) exported and self-checked in
# 49 s on the 2-core test machine (the issue-3 note), about 43 MB/s.
EXPORT_BYTES_PER_S = 43e6


def speed_text(it_per_s: float | None) -> str:
    """"2.31 it/s", or "4.20 s/it" for slow steps (what the WebUI's progress bars show)."""
    if not it_per_s:
        return ""
    if it_per_s >= 1:
        return f"{it_per_s:.2f} it/s"
    return f"{1 / it_per_s:.2f} s/it"


class RunExtras:
    """The costs of the non-step work of a run, measured as it happens.

    ``kinds``: "samples" (every ``sample_every_n_steps`` and once at the end), "save" (every
    ``save_every_n_steps``), "resume" (every ``checkpoint_every_n_steps``), "validation" (every
    ``validate_every_n_steps`` and once at the end, when it runs) and "export" (once at the end).
    A save costs what an export costs."""

    def __init__(self, *, total_steps: int, sample_every: int, save_every: int,
                 resume_every: int, export: bool, base_file: Path | None = None,
                 validate_every: int | None = None):
        self.total_steps = total_steps
        self.every = {"samples": sample_every, "save": save_every if export else 0,
                      "resume": resume_every, "validation": validate_every or 0}
        self.validates = validate_every is not None
        self.export = export
        guess = None
        if export and base_file is not None and base_file.is_file():
            guess = base_file.stat().st_size / EXPORT_BYTES_PER_S
        self.cost: dict[str, float | None] = {"samples": None, "save": guess, "resume": None,
                                              "export": guess, "validation": None}
        self.spent = 0.0  # seconds of extras so far (not steps)

    def measured(self, kind: str, seconds: float) -> None:
        self.cost[kind] = seconds
        if kind in ("save", "export"):  # one is the other's best estimate
            self.cost["save" if kind == "export" else "export"] = seconds
        self.spent += seconds

    def remaining(self, step: int) -> float:
        """Seconds of extras still to come after ``step`` (the unmeasured ones count 0)."""
        seconds = 0.0
        for kind, every in self.every.items():
            cost = self.cost[kind]
            if every and cost is not None:
                # events at multiples of ``every`` after ``step`` and before the last step
                seconds += cost * max(0, (self.total_steps - 1) // every - step // every)
        seconds += self.cost["samples"] or 0.0  # the samples at the end
        if self.validates:  # the validation at the end
            seconds += self.cost["validation"] or 0.0
        if self.export:
            seconds += self.cost["export"] or 0.0
        return seconds
