"""One measured run of the bench: the real engine on a model built in code, timed by phase, its
memory sampled by phase (RSS, CUDA allocated and reserved) and, with ``--memory``, one step under
the profiler; the figures every run carries (:data:`FIGURE_KEYS`). The command line, matrices and
repeats are :mod:`dreambooth.app.bench`'s."""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
PHASES = ("build", "write_base", "load", "class_pictures", "caching", "first_step", "training",
          "samples", "export", "total")
FIGURE_KEYS = ("ok", "error", "device", "dtype", "warmup_steps", "measured_steps",
               "pictures_per_step", "steps_per_s", "pictures_per_s", "step_s", "phases_s",
               "memory_mb", "export_bytes", "final_loss", "compile", "repeats",
               # --memory (null without it): the profiled step's peak tensor memory, its
               # categories at that moment, and the details (see memory_profile_figures).
               "memory_peak_gb", "memory_by_category_gb", "memory_profile",
               # the tab's estimate for the run's settings (real-size models only)
               "estimate_gb")
# Options a run is defined by (argparse dests), in the order tables and JSON show them.
SIZES = ("tiny", "sd15", "sdxl-tiny", "sdxl", "flux-tiny", "flux")
OPTION_KEYS = ("size", "sdxl_depth", "flux_depth", "resolution", "batch_size", "steps", "warmup",
               "precision",
               "optimizer", "method", "rank",
               "gradient_checkpointing", "attention", "cache", "train_text_encoder", "prior",
               "compile", "export", "class_pictures", "sample_steps", "threads", "seed",
               "memory", "fused_backward", "trained_precision", "base_8bit", "base_4bit",
               "blocks_to_swap", "preset")
# The family a --size stands for (what the memory estimate and the card presets use).
SIZE_FAMILY = {"tiny": "sd1", "sd15": "sd1", "sdxl-tiny": "sdxl", "sdxl": "sdxl",
               "flux-tiny": "flux", "flux": "flux"}
# Bench options a card preset sets, by the config field they stand for.
PRESET_OPTIONS = {"mixed_precision": "precision", "optimizer": "optimizer",
                  "gradient_checkpointing": "gradient_checkpointing",
                  "fused_backward": "fused_backward", "trained_precision": "trained_precision",
                  "base_weights_8bit": "base_8bit", "cache_latents": "cache",
                  "blocks_to_swap": "blocks_to_swap", "base_weights_4bit": "base_4bit"}


# --- Measuring -------------------------------------------------------------------------------

def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def rss_peak_mb() -> float:
    """The process's peak resident memory since the last :func:`reset_rss_peak` (Linux VmHWM),
    else since it started (getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb(field: str = "VmRSS") -> float | None:
    """The process's resident memory now (Linux /proc; None elsewhere). RssAnon is its own
    memory, without the pages of mapped files (safetensors reads through mmap)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Restart the peak-RSS counter (Linux >= 4.0: "5" to clear_refs), so each phase gets its
    own peak; False where that is not possible (the peak is then the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class LoadSampler:
    """Samples, every ``interval`` seconds in a thread, the machine's CPU use and this process's:
    the difference is what other processes took from the run (FACTS: "Shared machines")."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.others: list[float] = []  # other processes' share of the whole machine, percent
        self.loadavg_start = _loadavg()
        self.loadavg_end: list[float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LoadSampler":
        try:
            import psutil
        except ImportError:  # the figures stay, with the load average only
            return self
        self._thread = threading.Thread(target=self._run, args=(psutil,), daemon=True)
        self._thread.start()
        return self

    def _run(self, psutil) -> None:
        me = psutil.Process()
        cpus = psutil.cpu_count() or 1
        psutil.cpu_percent(None)
        mine = me.cpu_percent(None)
        while not self._stop.wait(self.interval):
            total = psutil.cpu_percent(None)  # whole machine, 0-100
            mine = me.cpu_percent(None) / cpus  # this process (all threads), same scale
            self.others.append(max(0.0, total - mine))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.loadavg_end = _loadavg()

    def figures(self) -> dict[str, Any]:
        others = self.others
        return {"loadavg_start": self.loadavg_start, "loadavg_end": self.loadavg_end,
                "other_cpu_percent_median": round(statistics.median(others), 1) if others else None,
                "other_cpu_percent_max": round(max(others), 1) if others else None,
                "samples": len(others)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


@dataclass
class Timeline:
    """What the trainer reported, stamped with time.perf_counter()."""

    phases: list[tuple[str, float]] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)  # after each optimizer step
    losses: list[float] = field(default_factory=list)
    samples_at: list[float] = field(default_factory=list)
    saved_at: float | None = None
    lines: list[str] = field(default_factory=list)
    phase_peaks: dict[str, dict[str, float]] = field(default_factory=dict)
    # --memory: the profiler of the extra step, and when it had finished collecting (what
    # follows the step is timed from there, not from the step's stamp).
    profiler: Any = None
    profile_done_at: float | None = None


PROFILED_STEP = "profiled_step"  # its memory peaks in memory_mb.by_phase, out of the totals


def _trainer_reporter(timeline: Timeline, cuda: bool, quiet: bool,
                      profile_after: int | None = None):
    """``profile_after``: with --memory, the step after which the profiler starts (it stops at
    the next step's progress, so it wraps exactly one optimizer step; the loop calls progress
    right after each one)."""
    from dreambooth.engine.trainer import Reporter

    class BenchReporter(Reporter):
        """Stamps each phase and step. On CUDA it synchronises before reading the clock, so a
        step's time is its GPU work, not the time to queue it (the loop already syncs once per
        step to read the loss, so this adds nothing there)."""

        current: str | None = None
        peak_name: str | None = None  # where the current peak goes, if not the phase's name

        def _now(self) -> float:
            if cuda:
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def _close_peak(self) -> None:
            name = self.peak_name or self.current
            if name is not None:
                timeline.phase_peaks[name] = memory_peaks(cuda)
            self.peak_name = None
            reset_peaks(cuda)

        def phase(self, name: str) -> None:
            now = self._now()
            self._close_peak()
            self.current = name
            timeline.phases.append((name, now))
            if not quiet:
                print(f"[{name}]", file=sys.stderr, flush=True)

        def log(self, line: str) -> None:
            timeline.lines.append(line)
            if line.startswith("saved "):
                timeline.saved_at = self._now()
            if not quiet:
                print(f"  {line}", file=sys.stderr, flush=True)

        def progress(self, step: int, total: int, loss: float | None, lr: float | None) -> None:
            if self.current != "training":
                return
            if loss is None:  # the step count announced before the first step
                return
            timeline.steps.append(self._now())
            timeline.losses.append(loss)
            if not quiet:
                print(f"  step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)
            profiler = timeline.profiler
            if profiler is None:
                return
            if profiler.running:
                profiler.stop()
                timeline.profile_done_at = self._now()
            elif step == profile_after and profiler.step_s is None:
                # The training phase's peaks end here: the profiled step's (the profiler keeps
                # its events in memory) go under their own name.
                self._close_peak()
                self.peak_name = PROFILED_STEP
                if not quiet:
                    print(f"  profiling the memory of step {step + 1}", file=sys.stderr,
                          flush=True)
                profiler.start()

        def samples(self, paths: list[Path]) -> None:
            timeline.samples_at.append(self._now())

        def finish(self) -> None:
            self._close_peak()

    return BenchReporter()


def reset_peaks(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        reset_rss_peak()


def memory_peaks(cuda: bool) -> dict[str, float]:
    peaks = {"rss": round(rss_peak_mb(), 1)}
    if cuda:
        import torch

        peaks["allocated"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        peaks["reserved"] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)
    return peaks


def spread(values: list[float]) -> dict[str, Any] | None:
    """Median and spread of a list: min, max, and the interquartile range relative to the median."""
    if not values:
        return None
    values = sorted(values)
    median = statistics.median(values)
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = values[-1] - values[0]
    return {"median": _r(median), "min": _r(values[0]), "max": _r(values[-1]),
            "iqr_pct": _r(100 * iqr / median) if median else None, "n": len(values)}


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


# --- One run ---------------------------------------------------------------------------------

def environment(cuda: bool, threads: int) -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes",
                    "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions, "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "cuda": torch.version.cuda if cuda else None,
        "gpu_memory_mb": (round(torch.cuda.get_device_properties(0).total_memory / 2 ** 20)
                          if cuda else None),
        "cpu_count": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
    }
    return env


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def prepare_folders(root: Path, options: dict[str, Any]) -> tuple[Path, Path]:
    """Instance pictures (enough for the batch) and, unless the model makes them, class pictures."""
    from dreambooth.app.demo import draw_pictures

    count = max(4, options["batch_size"])
    inst, cls = root / "instance", root / "class"
    draw_pictures(inst, count=count, size=options["resolution"], seed=1)
    if options["prior"] and options["class_pictures"] <= 0:
        draw_pictures(cls, count=count, size=options["resolution"], seed=2)
        for p in cls.iterdir():  # the class prompt's noun, not the identifier
            p.rename(p.with_name(p.name.replace("zwx", "toy")))
    return inst, cls


def make_config(root: Path, options: dict[str, Any], inst: Path, cls: Path):
    from dreambooth.common.config import Concept, TrainingConfig

    sample = options["sample_steps"] > 0
    generated = options["class_pictures"] > 0
    return TrainingConfig(
        base_model=str(root / "base.safetensors"), model_name="bench", models_dir=str(root),
        concepts=[Concept(instance_data_dir=str(inst), instance_prompt="photo of zwx toy",
                          class_data_dir=str(cls), class_prompt="photo of a toy")],
        with_prior_preservation=options["prior"],
        num_class_images=(options["class_pictures"] if generated
                          else max(4, options["batch_size"])),
        class_batch_size=4, class_sample_steps=max(1, options["sample_steps"]),
        resolution=options["resolution"], train_batch_size=options["batch_size"],
        max_train_steps=options["warmup"] + options["steps"] + profiled_steps(options),
        learning_rate=1e-6 if options["method"] == "full" else 1e-4,
        training_method=options["method"], lora_rank=options["rank"],
        lora_alpha=options["rank"] / 2, lora_conv_rank=max(1, options["rank"] // 2),
        optimizer=options["optimizer"], mixed_precision=options["precision"],
        gradient_checkpointing=options["gradient_checkpointing"],
        attention=options["attention"], cache_latents=options["cache"],
        cache_text_embeddings=options["cache"], train_text_encoder=options["train_text_encoder"],
        checkpoint_every_n_steps=0, sample_prompts=["photo of zwx toy"] if sample else [],
        sample_steps=options["sample_steps"], overwrite=True, seed=options["seed"],
        fused_backward=options.get("fused_backward", False),
        max_grad_norm=0.0 if options.get("fused_backward") else 1.0,
        trained_precision=options.get("trained_precision", "fp32"),
        base_weights_8bit=options.get("base_8bit", False), compile_unet=options["compile"],
        blocks_to_swap=options.get("blocks_to_swap", 0),
        base_weights_4bit=options.get("base_4bit", False))


def profiled_steps(options: dict[str, Any]) -> int:
    """Steps run under the memory profiler: one, after the measured ones (--memory), so the
    profiler's overhead (about 2x on the tiny model, +13 % at SD1.5 size on the CPU) and its
    collection stay out of every timed figure."""
    return 1 if options.get("memory") else 0


def empty_figures() -> dict[str, Any]:
    """Every figure key, unmeasured: a failed run has the same shape as a good one."""
    figures: dict[str, Any] = {key: None for key in FIGURE_KEYS}
    figures.update(ok=False, phases_s={p: None for p in PHASES},
                   memory_mb={"peak_rss": None, "peak_allocated": None, "peak_reserved": None,
                              "training_peak_rss": None, "training_peak_allocated": None,
                              "training_peak_reserved": None, "rss_before": None,
                              "rss_after": None, "anon_before": None, "anon_after": None,
                              "by_phase": {}})
    return figures


def build_model(options: dict[str, Any]):
    """The benchmark's model: built in code, random weights, the size asked for."""
    from dreambooth.models import tiny

    if options["size"] == "sdxl-tiny":
        return tiny.build_variant("sdxl", seed=options["seed"])
    if options["size"] == "sdxl":
        return tiny.build_variant("sdxl", seed=options["seed"], full_size=True,
                                  deep_layers=options.get("sdxl_depth", 10))
    if options["size"].startswith("flux"):
        from dreambooth.models.tiny_flux import build_flux

        depth = options.get("flux_depth", 1)  # Flux.1's 19 double to 38 single blocks
        return build_flux("dev", seed=options["seed"], full_size=options["size"] == "flux",
                          depth=depth, single_depth=2 * depth)
    return tiny.build_components(options["size"], seed=options["seed"])


def run_once(options: dict[str, Any], work_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """One benchmark run in this process; returns {"options", "figures", "environment"}."""
    import torch

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    if options["warmup"] < 1 or options["steps"] < 1:
        raise SystemExit("--steps and --warmup must be at least 1 (the first step is never "
                         "measured: it pays for lazy initialisation)")
    cuda = torch.cuda.is_available()
    env = environment(cuda, options["threads"])
    figures = empty_figures()
    figures["device"] = env["device"]
    precision = options["precision"]
    if precision == "fp16" and not cuda:
        precision = "no"  # what the trainer does on the CPU
    figures["dtype"] = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[precision]
    figures["warmup_steps"] = options["warmup"]
    figures["pictures_per_step"] = options["batch_size"] * (2 if options["prior"] else 1)
    timeline = Timeline()
    phases = figures["phases_s"]
    started = time.perf_counter()
    sampler = LoadSampler()
    with sampler:
        try:
            _measure(options, work_dir, cuda, quiet, figures, timeline, phases)
            figures["ok"] = True
        except BaseException as exc:  # a failed line must not stop the matrix: it is a result
            if isinstance(exc, KeyboardInterrupt):
                raise
            figures["error"] = f"{type(exc).__name__}: {exc}"
            if not quiet:
                traceback.print_exc()
    phases["total"] = _r(time.perf_counter() - started)
    env["load"] = sampler.figures()
    return {"options": options, "figures": figures, "environment": env}


def _measure(options: dict[str, Any], work_dir: Path, cuda: bool, quiet: bool,
             figures: dict[str, Any], timeline: Timeline, phases: dict[str, Any]) -> None:
    from dreambooth.common.memory import give_memory_back
    from dreambooth.engine.trainer import RunPaths, train

    inst, cls = prepare_folders(work_dir, options)
    config = make_config(work_dir, options, inst, cls)
    if options["size"] in ("sd15", "sdxl", "flux"):  # flux: the whole model's, at 57 blocks
        from dreambooth.models.memory_estimate import for_config

        figures["estimate_gb"] = _r(for_config(config, SIZE_FAMILY[options["size"]],
                                               options["resolution"])["total"])
    paths = RunPaths(work_dir=work_dir / "work", checkpoints_dir=work_dir / "Stable-diffusion")
    paths.work_dir.mkdir(parents=True, exist_ok=True)
    paths.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    memory = figures["memory_mb"]
    memory["rss_before"], memory["anon_before"] = rss_mb(), rss_mb("RssAnon")
    reset_peaks(cuda)
    components, prediction_type = _model_for(options, config, phases)
    memory["by_phase"]["model"] = memory_peaks(cuda)
    if options["compile"]:  # the trainer compiles the UNet (compile_unet)
        import torch

        figures["compile"] = f"Module.compile (torch {torch.__version__})"

    measured_end = options["warmup"] + options["steps"]  # steps after warm-up and measuring
    if profiled_steps(options):
        from dreambooth.engine.memory_profile import StepMemoryProfiler

        timeline.profiler = StepMemoryProfiler("cuda" if cuda else "cpu")
    reporter = _trainer_reporter(timeline, cuda, quiet, profile_after=measured_end)
    reset_peaks(cuda)
    try:
        result = train(config, paths, reporter=reporter, components=components,
                       prediction_type=prediction_type, export_model=options["export"])
    finally:
        if timeline.profiler is not None and timeline.profiler.running:
            timeline.profiler.stop()  # a failed step must not leave the profiler on
    end = reporter._now()
    reporter.finish()
    if result.cancelled or result.steps < config.max_train_steps:
        raise RuntimeError(f"the run stopped at step {result.steps}/{config.max_train_steps}: "
                           + (timeline.lines[-1] if timeline.lines else "no log"))
    _phase_figures(timeline, end, options, figures, phases)
    if result.output_path is not None and Path(result.output_path).is_file():
        figures["export_bytes"] = Path(result.output_path).stat().st_size
    # What the process keeps once the run is over (as the job runner leaves it in the WebUI).
    del components, result, reporter
    give_memory_back()
    memory["rss_after"], memory["anon_after"] = rss_mb(), rss_mb("RssAnon")
    _memory_figures(timeline, cuda, figures, measured_end)


def _model_for(options: dict[str, Any], config, phases: dict[str, Any]):
    """The model built in code; with --export written as the base file and loaded back from it
    (the export starts from the base file, as in the product, and the load/convert path is the
    real one). Returns (components, prediction type)."""
    import gc

    from dreambooth.engine.trainer import load_model

    t = time.perf_counter()
    components = build_model(options)
    phases["build"] = _r(time.perf_counter() - t)
    if not options["export"]:
        return components, "epsilon"
    from dreambooth.models.export import save_single_file
    from dreambooth.models.flux_files import save_flux_file

    t = time.perf_counter()
    if options["size"].startswith("flux"):  # an all-in-one file, as Forge keeps them
        save_flux_file(components, Path(config.base_model), layout="all-in-one", dtype="bf16")
    else:
        save_single_file(components, Path(config.base_model), dtype="fp16", overwrite=True,
                         kind="sdxl" if options["size"].startswith("sdxl") else "sd1")
    phases["write_base"] = _r(time.perf_counter() - t)
    del components
    gc.collect()
    t = time.perf_counter()
    components, kind = load_model(config)
    phases["load"] = _r(time.perf_counter() - t)
    return components, kind.prediction_type


def _phase_figures(timeline: Timeline, end: float, options: dict[str, Any],
                   figures: dict[str, Any], phases: dict[str, Any]) -> None:
    """Phases from the trainer's own phase changes, and the measured steps' speed."""
    marks = dict(timeline.phases)  # the last stamp of each (a phase is entered once here)
    order = [name for name, _ in timeline.phases]

    def span(name: str) -> float | None:
        if name not in marks:
            return None
        following = [s for n, s in timeline.phases if s > marks[name]]
        return _r((following[0] if following else end) - marks[name])

    measured_end = options["warmup"] + options["steps"]
    phases["class_pictures"] = span("class_images")
    phases["caching"] = span("caching")
    steps = timeline.steps
    start = marks.get("training")  # the training phase opens just before the first step
    durations = [b - a for a, b in zip([start] + steps[:-1], steps)]
    phases["first_step"] = _r(durations[0]) if durations else None
    # The training phase ends with the last measured step (--memory: the profiled one after it
    # is reported on its own), the samples start once the profiler is done.
    trained = steps[:measured_end]
    phases["training"] = _r(trained[-1] - start) if trained else None
    if timeline.samples_at and steps:
        phases["samples"] = _r(timeline.samples_at[-1] - (timeline.profile_done_at or steps[-1]))
    if "saving" in order:
        phases["export"] = _r((timeline.saved_at or end) - marks["saving"])
    measured = durations[options["warmup"]:measured_end]
    figures["measured_steps"] = len(measured)
    figures["step_s"] = spread(measured)
    figures["steps_per_s"] = spread([1 / d for d in measured if d > 0])
    figures["pictures_per_s"] = spread([figures["pictures_per_step"] / d for d in measured
                                        if d > 0])
    figures["final_loss"] = _r(timeline.losses[-1]) if timeline.losses else None


def _memory_figures(timeline: Timeline, cuda: bool, figures: dict[str, Any],
                    measured_end: int) -> None:
    """Peaks by phase into the totals; --memory's profiled step analysed last."""
    memory = figures["memory_mb"]
    by_phase = memory["by_phase"]
    by_phase.update(timeline.phase_peaks)
    # The profiled step's peaks stay in by_phase but out of the totals: the profiler's own
    # events take host memory, which is not the training's.
    totals = [p for name, p in by_phase.items() if name != PROFILED_STEP]
    rss = [p["rss"] for p in totals if "rss" in p]
    memory["peak_rss"] = max(rss) if rss else round(rss_peak_mb(), 1)
    train_peak = by_phase.get("training", {})
    memory["training_peak_rss"] = train_peak.get("rss")
    if cuda:
        memory["peak_allocated"] = max(p.get("allocated", 0) for p in totals)
        memory["peak_reserved"] = max(p.get("reserved", 0) for p in totals)
        memory["training_peak_allocated"] = train_peak.get("allocated")
        memory["training_peak_reserved"] = train_peak.get("reserved")
    if timeline.profiler is not None:
        # After the run, with the model's memory given back: the analysis is Python objects
        # over every event of the step, and must not add to the training's peak.
        peak, analysis_s = timeline.profiler.result()
        figures.update(memory_profile_figures(peak, timeline.profiler, analysis_s,
                                              step=measured_end + 1,
                                              step_peaks=by_phase.get(PROFILED_STEP, {})))


def memory_profile_figures(peak, profiler, analysis_s: float, step: int,
                           step_peaks: dict[str, float]) -> dict[str, Any]:
    """The --memory figures of one profiled step (GB = 2**30 bytes, 4 significant digits).

    ``memory_by_category_gb`` is the moment of the peak (the categories add up to
    ``memory_peak_gb``); ``memory_profile.max_by_category_gb`` is each category's own highest
    value during the step. Only tensors the step touches or creates are counted (see
    :mod:`dreambooth.engine.memory_profile`); on CUDA ``cuda_max_allocated_gb`` is the allocator's
    peak over the same step, everything included."""
    from dreambooth.engine.memory_profile import gb

    if peak.events == 0:
        raise RuntimeError(f"--memory: the profiler saw no tensor memory on {profiler.device}")
    details: dict[str, Any] = {
        "device": profiler.device, "step": step, "source": "torch.profiler memory timeline",
        "max_by_category_gb": {k: gb(v) for k, v in peak.max_by_category.items()},
        "peak_bytes": peak.peak_bytes, "events": peak.events,
        "step_s": _r(profiler.step_s), "collect_s": _r(profiler.stop_s),
        "analysis_s": _r(analysis_s),
        "cuda_max_allocated_gb": (None if "allocated" not in step_peaks
                                  else _r(step_peaks["allocated"] / 1024)),
        "cuda_max_reserved_gb": (None if "reserved" not in step_peaks
                                 else _r(step_peaks["reserved"] / 1024)),
    }
    return {"memory_peak_gb": gb(peak.peak_bytes),
            "memory_by_category_gb": {k: gb(v) for k, v in peak.at_peak.items()},
            "memory_profile": details}
