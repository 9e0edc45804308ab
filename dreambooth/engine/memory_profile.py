"""Tensor memory of one training step, by category, from PyTorch's own profiler.

``python -m dreambooth bench --memory`` wraps one optimizer step in :class:`StepMemoryProfiler`
(``torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)``) and
splits the step's peak tensor memory into the categories of the profiler's memory timeline
(:class:`torch.profiler._memory_profiler.Category`): parameters, gradients, optimizer state,
activations, temporaries, inputs, autograd detail, and what the profiler could not place.

Why the profiler rather than a tracker of our own: it sees every allocation of every op (the
UNet's, the optimizer's, autograd's) and classifies them from the data flow of the step (what
``AccumulateGrad`` writes is a gradient, what the optimizer's state dict holds is optimizer
state, what the forward pass produces from the inputs is an activation, ...), which a tracker
written here would only approximate. The API is private (``_memory_profiler``), so everything
that touches it stays in this module; :func:`peak_by_category` is a pure function of the
timeline, so its arithmetic is tested without a profiler.

What the figures are, and are not:

* The timeline holds the tensors the profiled step touches or creates. A tensor allocated
  before the step and not used by it (the VAE and the text encoder when latents and text
  embeddings are cached, the optimizer state of a frozen text encoder, an EMA copy) is not in
  it. So the peak is the step's working set, not the process's memory: on CUDA compare it with
  ``torch.cuda.max_memory_allocated`` (which counts everything), on the CPU with the RSS.
* Module buffers have no category of their own: they come out as inputs or as "unknown".
* "unknown" is memory the profiler saw but could not classify: allocations it cannot tie to a
  tensor, and tensors outside its rules -- chiefly the optimizer's working tensors (AdamW's
  denominators sqrt(v) + eps: with foreach, one parameter-sized set at the moment of the
  step, which is often the peak).
* "temporaries" are tensors created and freed inside one op (its intermediates), e.g. inside
  bitsandbytes' 8-bit optimizer step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

# The profiler's categories (torch.profiler._memory_profiler.Category names) as the bench's
# JSON names them, in the order the text output lists them; None (uncategorised) is "unknown".
CATEGORY_NAMES: dict[str, str] = {
    "PARAMETER": "parameters",
    "GRADIENT": "gradients",
    "OPTIMIZER_STATE": "optimizer_state",
    "ACTIVATION": "activations",
    "TEMPORARY": "temporaries",
    "INPUT": "inputs",
    "AUTOGRAD_DETAIL": "autograd_detail",
}
UNKNOWN = "unknown"
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_NAMES.values()) + (UNKNOWN,)


def category_name(category: Any) -> str:
    """The JSON name of a profiler category (an enum member, or None for uncategorised)."""
    if category is None:
        return UNKNOWN
    return CATEGORY_NAMES.get(getattr(category, "name", str(category)), UNKNOWN)


@dataclass
class MemoryPeak:
    """The step's peak tensor memory and what it was made of, in bytes."""

    peak_bytes: int = 0
    at_peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    # Each category's own highest value during the step (not at the same moment: their sum can
    # exceed the peak, e.g. activations are highest before the backward pass frees them and
    # gradients highest after it).
    max_by_category: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    events: int = 0  # timeline events on the device (0: the profiler saw nothing there)


# One event of MemoryProfile.timeline: (time_ns or -1 for "before the profile", action,
# (key, version), bytes). The action is an _memory_profiler.Action; only its name is used.
TimelineEvent = tuple[int, Any, tuple[Any, int], int]


def peak_by_category(timeline: Iterable[TimelineEvent],
                     category_of: Callable[[Any, int], Any],
                     on_device: Callable[[Any], bool]) -> MemoryPeak:
    """Replay the profiler's timeline and return the moment of highest total tensor memory.

    The same bookkeeping as torch's ``MemoryProfileTimeline._coalesce_timeline`` (which the
    deprecated ``export_memory_timeline`` writes to a file): PREEXISTING and CREATE add a
    tensor's bytes to its category, DESTROY removes them, INCREMENT_VERSION (an in-place write)
    moves them from the old version's category to the new one's (a parameter stays a
    parameter; a buffer written in place may change category). Events with the same time stamp
    are applied together before the total is compared, so a free and an allocation in the same
    op do not count twice. ``category_of(key, version)`` is the profiler's classification
    (``CategoryDict.get``); ``on_device(key)`` keeps the watched device's events only.
    """
    current = dict.fromkeys(CATEGORIES, 0)
    result = MemoryPeak()
    last_time: int | None = None

    def settle() -> None:
        total = sum(current.values())
        if total > result.peak_bytes:
            result.peak_bytes = total
            result.at_peak = dict(current)
        for name, value in current.items():
            result.max_by_category[name] = max(result.max_by_category[name], value)

    for when, action, (key, version), size in timeline:
        if not on_device(key):
            continue
        if last_time is not None and when != last_time:
            settle()
        last_time = when
        result.events += 1
        kind = getattr(action, "name", str(action))
        if kind in ("PREEXISTING", "CREATE"):
            current[category_name(category_of(key, version))] += int(size)
        elif kind == "INCREMENT_VERSION":
            current[category_name(category_of(key, version))] -= int(size)
            current[category_name(category_of(key, version + 1))] += int(size)
        elif kind == "DESTROY":
            current[category_name(category_of(key, version))] -= int(size)
        else:
            raise ValueError(f"unknown memory timeline action {action!r}")
    if last_time is not None:
        settle()
    return result


def analyse(prof, device: str) -> MemoryPeak:
    """The peak by category of a finished ``torch.profiler.profile`` on ``device`` ("cpu",
    "cuda:0"). Builds the profiler's MemoryProfile (the data-flow analysis: seconds to minutes
    for a large model, all in Python) and replays its timeline."""
    import torch
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    # prof._memory_profile() checks the three options it needs and builds MemoryProfile from
    # the kineto results; export_memory_timeline does the same before writing a file.
    timeline = MemoryProfileTimeline(prof._memory_profile())
    watched = torch.device(device)
    if watched.type == "cuda" and watched.index is None:
        watched = torch.device("cuda", torch.cuda.current_device())
    return peak_by_category(timeline.timeline, timeline.categories.get,
                            lambda key: key.device == watched)


class StepMemoryProfiler:
    """Starts and stops the profiler around one step from two callbacks (the trainer's loop
    calls the reporter's ``progress`` after every optimizer step; the window between two calls
    is exactly one step), then analyses it once training is over and memory is back.

    ``start()`` / ``stop()`` rather than a ``with`` block because the loop is the trainer's:
    the bench cannot wrap its body, only hook the calls it already makes."""

    def __init__(self, device: str):
        self.device = device
        self._prof = None
        self.step_s: float | None = None  # the profiled step, profiler overhead included
        self.stop_s: float | None = None  # collecting the events after the step
        self._started_at: float | None = None

    @property
    def running(self) -> bool:
        return self._prof is not None and self._started_at is not None and self.step_s is None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.startswith("cuda"):
            activities.append(ProfilerActivity.CUDA)
        # All three are required by the memory timeline: profile_memory for the allocations,
        # record_shapes for the sizes and identities of op inputs (its data flow graph), and
        # with_stack for the Python tracer that sees nn.Module parameters and the optimizer's
        # parameters, gradients and state (its most reliable categories).
        self._prof = profile(activities=activities, profile_memory=True, record_shapes=True,
                             with_stack=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self._prof.__enter__()
        self._started_at = time.perf_counter()

    def stop(self) -> None:
        import torch

        if self._prof is None or self._started_at is None:
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.step_s = time.perf_counter() - self._started_at
        began = time.perf_counter()
        self._prof.__exit__(None, None, None)
        self.stop_s = time.perf_counter() - began

    def result(self) -> tuple[MemoryPeak, float]:
        """The analysed step and the seconds the analysis took; drops the profiler's events."""
        if self._prof is None or self.step_s is None:
            raise RuntimeError("no step was profiled")
        began = time.perf_counter()
        try:
            peak = analyse(self._prof, self.device)
        finally:
            self._prof = None
        return peak, time.perf_counter() - began


@contextlib.contextmanager
def profile_memory(device: str) -> Iterator[StepMemoryProfiler]:
    """``with profile_memory("cpu") as p: <one step>`` then ``p.result()``: the same profiler
    around a block of code (tests, and callers that own their loop)."""
    profiler = StepMemoryProfiler(device)
    profiler.start()
    try:
        yield profiler
    finally:
        profiler.stop()


def gb(n_bytes: int | float) -> float:
    """Bytes as GB (2**30, like the bench's other GB figures), to 4 significant digits."""
    return float(f"{n_bytes / 2 ** 30:.4g}")
