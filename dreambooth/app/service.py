"""Glue between the front ends (the tab, the HTTP API) and the engine (config, job runner, host).

Both ``ui.py`` and ``api.py`` start, check and describe jobs through these functions, so a run
started from the API looks the same in the tab and the other way round. Nothing here imports
gradio or ``modules.*``: the host adapter (``webui.py``) stands between us and the WebUI.

What a start does (``start_training``):

1. checks everything that can be checked before a thread exists — the config's own validation,
   the base model (a WebUI checkpoint title, name or hash is resolved to its file: titles change
   once the WebUI hashes a file), the VAE, the model name (sanitised; nothing may leave the
   models folder), the instance folders, an existing output file, an 8-bit optimizer the
   machine cannot run — and raises one ``ConfigError`` naming every field at fault;
2. starts the job in the process's runner with ``RunPaths(host.work_dir(name), host.output_dir())``;
3. inside the job thread: ``host.hold_generation()`` (txt2img waits, as with the WebUI's own
   Train tab, when the setting says so), ``host.unload_webui_model()`` (when the setting says
   so), progress mirrored into the WebUI's own progress bar; at the end, still holding the lock,
   the written checkpoints are added to the WebUI's list and its model is loaded again, so a
   generation that waited finds both; then the process gives its freed memory back.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

# The front ends reach the checks and the estimates through this module too.
from dreambooth.app.estimates import (apply_card, card_preset, count_pictures,  # noqa: F401
                                      identifier_check, memory_estimate, memory_figure_gb,
                                      start_tokenizer_build, step_estimate, tokenizer)
from dreambooth.app.job import JobRunner
from dreambooth.app.job import runner as default_runner
from dreambooth.app.preflight import _device as preflight_device
from dreambooth.app.preflight import (base_model_problem, output_file, preflight,  # noqa: F401
                                      prepare, resolve_base_model, resolve_vae)
from dreambooth.common.config import Concept, ConfigError, TrainingConfig
from dreambooth.engine.model_files import planned_outputs
from dreambooth.engine.resume import list_resume_points
from dreambooth.engine.trainer import Reporter, RunPaths, TrainResult, train
from dreambooth.host import CheckpointEntry, Host
from dreambooth.models.families import for_kind


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
class MirrorReporter(Reporter):
    """Passes everything to the job's reporter and mirrors it into the WebUI's own progress bar.

    It runs on the job's thread, which is the thread holding the WebUI's generation lock: the
    host only touches ``shared.state`` from there (otherwise the bar belongs to a generation)."""

    def __init__(self, inner: Reporter, host: Host, title: str = "DreamBooth"):
        self.inner, self.host, self.title = inner, host, title
        self.current = "loading"
        self._at = (0, 0)  # the last step / total: sampling and saving keep the bar where it is

    def phase(self, name: str) -> None:
        self.current = name
        self.inner.phase(name)
        if name not in ("sampling", "saving"):
            self._at = (0, 0)
        self._mirror(*self._at, f"{self.title}: {name}")

    def log(self, line: str) -> None:
        self.inner.log(line)

    def progress(self, step: int, total: int, loss: float | None, lr: float | None) -> None:
        self.inner.progress(step, total, loss, lr)
        self._at = (step, total)
        text = f"{self.title}: {self.current} {step}/{total}"
        if loss is not None:
            text += f", loss {loss:.4f}"
        self._mirror(step, total, text)

    def samples(self, paths: list[Path]) -> None:
        self.inner.samples(paths)
        if paths:
            try:
                from PIL import Image

                with Image.open(paths[-1]) as image:
                    self.host.show_webui_preview(image.copy())
            except Exception:  # a preview is a nicety; never fail the run for it
                pass

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def holding(self, held: bool) -> None:
        self.inner.holding(held)

    def detail(self, text: str) -> None:
        self.inner.detail(text)
        if text:
            self._mirror(*self._at, f"{self.title}: {text}")

    def extra_time(self, seconds: float) -> None:
        self.inner.extra_time(seconds)

    def validation(self, step: int, loss: float, best_step: int, best_file: Path | None) -> None:
        self.inner.validation(step, loss, best_step, best_file)

    def _mirror(self, step: int, total: int, text: str) -> None:
        try:
            self.host.set_webui_progress(self.title, step, total, text)
        except Exception:
            pass


def _written_checkpoints(config: TrainingConfig, paths: RunPaths, result: TrainResult) -> list[Path]:
    """The model files this run left in the checkpoints folder (intermediate saves included)."""
    if config.trains_adapter:  # LoRA files are not checkpoints
        return []
    found = [paths.checkpoints_dir / name for name in planned_outputs(config, result.total_steps)]
    if result.output_path:
        found.append(Path(result.output_path))
    return [p for p in dict.fromkeys(found) if p.is_file()]


def _hosted(host: Host, work: Callable[..., TrainResult], notes: list[str] | None = None
            ) -> Callable[..., TrainResult]:
    """``work`` wrapped the WebUI way: generation held, the WebUI's model unloaded, progress
    mirrored; and before the lock is handed back, whatever touches the WebUI's model lists: the
    new checkpoints registered, its model loaded again. Both host calls decide from the WebUI
    settings whether to do anything. ``notes`` are logged first."""

    def run(config: TrainingConfig, paths: RunPaths, *, reporter: Reporter, **kwargs) -> TrainResult:
        for note in notes or []:
            reporter.log(note)

        def waiting() -> None:
            reporter.log("waiting for the WebUI's running generation to finish before training")

        try:
            with host.hold_generation(on_wait=waiting) as held:
                reporter.holding(held)
                if held:
                    reporter.log("txt2img/img2img wait until this job ends (setting 'Hold "
                                 "generation while training')")
                unloaded = host.unload_webui_model()
                if unloaded is not None:
                    reporter.log(f"unloaded the WebUI's model ({unloaded.title}) to free memory "
                                 "for training; it comes back when training ends")
                try:
                    result = work(config, paths, reporter=MirrorReporter(reporter, host), **kwargs)
                    host.add_checkpoints(_written_checkpoints(config, paths, result))
                    if config.trains_adapter:  # the new LoRA in the WebUI's Lora list at once
                        host.refresh_loras()
                finally:
                    message = host.restore_webui_model(unloaded)
                    if message:
                        reporter.log(message)
        finally:
            reporter.holding(False)
        return result

    return run


def start_training(config: TrainingConfig, host: Host, runner: JobRunner | None = None, *,
                   resume: bool = False, notes: list[str] | None = None,
                   **train_kwargs: Any) -> int:
    """Check, then start training in the background; returns the job id.

    Raises ConfigError (every field at fault) or JobBusy (a job already runs). ``notes`` go to
    the run's log first (what a card preset changed); ``train_kwargs`` go to
    :func:`dreambooth.engine.trainer.train` (tests pass ``components``)."""
    runner = runner or default_runner()
    resolved, paths = prepare(config, host, resume=resume)
    return runner.start(resolved, paths, work=_hosted(host, train, notes or []), resume=resume,
                        **train_kwargs)


def make_class_pictures(config: TrainingConfig, paths: RunPaths, *, reporter: Reporter,
                        **_: Any) -> TrainResult:
    """A job that only makes the missing class pictures (the tab's "Generate class pictures")."""
    import torch

    from dreambooth.engine import prior
    from dreambooth.models import checkpoint

    started = time.time()
    reporter.phase("loading")
    components, kind = checkpoint.load_components(Path(config.base_model),
                                                  use_ema=config.base_use_ema,
                                                  vae_path=config.vae_path or None)
    config = config.with_resolution(for_kind(kind.kind).default_resolution(kind.prediction_type))
    device = preflight_device()
    dtype = torch.float16 if device.type == "cuda" and config.mixed_precision != "no" else torch.float32
    for model in components.modules():
        model.to(device, dtype)
    pipe = components.pipeline()
    reporter.phase("class_images")
    needed = sum(missing for _, missing in prior.class_pictures_needed(config))
    done = [0]

    def progress(count: int, total: int) -> None:
        done[0] = count
        reporter.progress(count, total, None, None)

    try:
        counts = prior.generate_class_pictures(config, pipe, progress=progress,
                                               should_stop=reporter.should_stop, log=reporter.log)
    finally:
        for model in components.modules():
            model.to("cpu")
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for index, count in counts.items():
        reporter.log(f"concept {index}: {count} class pictures made")
    return TrainResult(None, done[0], needed, time.time() - started,
                       cancelled=reporter.should_stop())


def start_class_pictures(config: TrainingConfig, host: Host, runner: JobRunner | None = None) -> int:
    """Make the missing class pictures in the background, in the same one-job slot as training
    (both need the GPU); cancellable like training, and what was made stays."""
    runner = runner or default_runner()
    checked = replace(config, with_prior_preservation=True)
    resolved, errors = preflight(checked, host, check_output=False)
    if errors:
        raise ConfigError(errors)
    paths = RunPaths(work_dir=host.work_dir(resolved.model_name), checkpoints_dir=host.output_dir(),
                     lora_dir=host.lora_dir())
    return runner.start(resolved, paths, work=_hosted(host, make_class_pictures))


def start_captions(config: TrainingConfig, host: Host, runner: JobRunner | None = None, *,
                   captioner: str | None = None, interrogator: str | None = None,
                   prefix: str = "", overwrite: bool = False, tagger: Any = None) -> int:
    """Caption the pictures of ``config``'s instance folders that have no caption file (all of
    them with ``overwrite``) in the background, with ``captioner``: one of ours (downloaded into
    ``<models>/captioners`` on first use; ``tagger``: a WD tagger's TaggerOptions) or the WebUI's
    interrogator (``interrogator`` is its older name; default: the WebUI's BLIP where there is
    one, else ours). In the same one-job slot as training (both use the GPU), polled and
    cancelled like it. Raises CaptionError (an interrogator this host lacks, bad options, our
    model missing while offline, no folder, nothing to do) or JobBusy."""
    from dreambooth.data import captions

    runner = runner or default_runner()
    webui = host.interrogators()
    name = captioner or interrogator or captions.default_captioner(webui)
    request = captions.request_from_config(config, captioner=name, prefix=prefix,
                                           overwrite=overwrite, tagger=tagger,
                                           models_dir=captions.models_root(host))
    tasks = captions.check(request, webui)
    if not any(overwrite or not t.exists for t in tasks):
        raise captions.CaptionError(
            f"nothing to caption: {len(tasks)} picture(s), all with a caption file "
            "(turn on overwrite to replace them)" if tasks else
            "nothing to caption: the instance folders hold no pictures")

    def work(_config: TrainingConfig, _paths: RunPaths, *, reporter: Reporter, **_: Any) -> TrainResult:
        # the plan is made again in the thread: files may have changed since the check; the
        # captioner is opened once here and closed (its memory given back) when the run ends
        summary = captions.caption_pictures(request, captions.plan(request), host, reporter)
        return TrainResult(None, len(summary.written), summary.total, summary.seconds,
                           cancelled=summary.cancelled)

    # no model name: the job has no work folder, and a page opened meanwhile keeps its form
    job_config = replace(config, model_name="")
    paths = RunPaths(work_dir=host.work_root(), checkpoints_dir=host.output_dir(),
                     lora_dir=host.lora_dir())
    return runner.start(job_config, paths, work=work, task="captioning", validate=False)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """A previous run in the work folder."""

    name: str
    work_dir: Path
    resume_points: list[Path]
    has_config: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "work_dir": str(self.work_dir), "has_config": self.has_config,
                "resume_steps": [int(p.name.split("-")[1]) for p in self.resume_points]}


def list_runs(host: Host) -> list[RunInfo]:
    """Work folders that hold a config (and so can be reloaded or resumed), newest first."""
    root = host.work_root()
    if not root.is_dir():
        return []
    runs = []
    for folder in root.iterdir():
        if folder.is_dir() and (folder / "config.json").is_file():
            runs.append(RunInfo(folder.name, folder, list_resume_points(folder / "checkpoints"), True))
    return sorted(runs, key=lambda r: (r.work_dir / "config.json").stat().st_mtime, reverse=True)


def sweep_leftovers(host: Host) -> list[Path]:
    """What killed processes left behind (hidden temporaries of half-written checkpoints, resume
    points cut short) in the checkpoints folder and the work folders; run when the extension
    loads. Never touches anything a running process is writing, nor any file not of ours."""
    from dreambooth.common.files import sweep
    from dreambooth.engine.resume import sweep_resume_dir

    removed = sweep(host.output_dir())
    if host.checkpoints_dir() != host.output_dir():
        removed += sweep(host.checkpoints_dir())
    removed += sweep(host.lora_dir())
    root = host.work_root()
    removed += sweep(root, recursive=True)
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir():
                removed += sweep_resume_dir(folder / "checkpoints")
    return removed


def on_app_started(demo: Any, app: Any) -> None:
    """``on_app_started`` callback: the start-up sweep (a failure here must not stop the WebUI)."""
    from dreambooth.host import get_host

    try:
        removed = sweep_leftovers(get_host())
    except Exception as exc:
        print(f"DreamBooth: could not clean up leftovers of interrupted runs ({exc})")
        return
    if removed:
        print(f"DreamBooth: removed {len(removed)} leftovers of interrupted runs: "
              + ", ".join(p.name for p in removed[:5]))


def resumable_runs(host: Host) -> list[RunInfo]:
    return [r for r in list_runs(host) if r.resume_points]


def run_config(host: Host, name: str) -> TrainingConfig:
    """The config a previous run saved (its work folder's config.json)."""
    return TrainingConfig.load(host.work_dir(name) / "config.json")


def checkpoint_for_file(host: Host, path: str | os.PathLike) -> CheckpointEntry | None:
    """The host's entry for a written checkpoint (rescanning once when it is not listed yet)."""
    if not path:
        return None
    target = Path(path).resolve()

    def find() -> CheckpointEntry | None:
        for entry in host.list_checkpoints():
            if Path(entry.filename).resolve() == target:
                return entry
        return None

    found = find()
    if found is None:
        host.refresh_checkpoints()
        found = find()
    return found


def load_in_txt2img(host: Host, output_path: str, wait_s: float = 3.0,
                    runner: JobRunner | None = None) -> tuple[str | None, str]:
    """Make the trained checkpoint the WebUI's active one: (its title, a message for the user).

    The switch runs in its own thread (webui.WebUIHost.load_checkpoint): when it takes longer
    than ``wait_s`` (a first load hashes the file; a generation or training may hold the
    WebUI's lock) this returns "loading…" with the reason, and the runner's ``switch`` record —
    which every tab's poll shows — says "active" or why it failed once the thread is done."""
    runner = runner or default_runner()
    entry = checkpoint_for_file(host, output_path)
    if entry is None:
        return None, f"{output_path or 'no output yet'}: not in the checkpoint list"
    if not host.is_webui:
        return entry.title, (f"{entry.title} is ready; load it in the WebUI's txt2img "
                             "(this standalone app has no txt2img)")
    title = entry.title
    active = (f"{title} is selected in txt2img; Forge loads it at the next generation"
              if host.loads_lazily() else f"{title} is active in txt2img")

    def done(error: BaseException | None) -> None:
        if error is None:
            runner.note_switch(title, "active", active)
        else:
            runner.note_switch(title, "failed", f"switching to {title} failed: {error}")

    busy = host.generation_busy()
    runner.note_switch(title, "loading", f"loading {title} in txt2img…")
    try:
        finished = host.load_checkpoint(title, wait_s=wait_s, on_done=done)
    except Exception as exc:  # shown in the tab, never a traceback
        done(exc)
        return title, f"switching to {title} failed: {exc}"
    if finished:
        # A1111 hashed the file on loading it: its title (what the page selects) gained the hash
        current = host.resolve_checkpoint(title)
        return (current.title if current is not None else title), active
    why = ("it waits for the WebUI's running job (a generation or training) to end"
           if busy else "the WebUI is still loading it")
    return title, f"loading {title} in txt2img… ({why}); this message changes when it is done"


# ---------------------------------------------------------------------------------------------
# LoRA files: using one in txt2img, extracting one from a full run
# ---------------------------------------------------------------------------------------------
EXTRACT_SUFFIX = "-lora"  # <lora dir>/<trained file's name>-lora.safetensors
EXTRACT_RANK = 32
EXTRACT_CONV_RANK = 0


def _inside_folder(path: str | os.PathLike, folder: Path) -> Path | None:
    """``path`` resolved when it is a file somewhere under ``folder``; else None."""
    if not path:
        return None
    try:
        target, root = Path(path).expanduser().resolve(), folder.resolve()
    except (OSError, ValueError):
        return None
    return target if target.is_file() and root in target.parents else None


def is_lora_file(host: Host, path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file in the host's Lora folder (what a LoRA run or an extraction
    writes), not a checkpoint."""
    return _inside_folder(path, host.lora_dir()) is not None


def lora_tag(path: str | os.PathLike, weight: float = 1) -> str:
    """The prompt text that applies a LoRA file in the WebUI: ``<lora:NAME:1>``, NAME being the
    file's name without extension (the Lora extension lists every file by it)."""
    return f"<lora:{Path(path).stem}:{weight:g}>"


def use_lora_in_txt2img(host: Host, output_path: str) -> tuple[str | None, str]:
    """"Use in txt2img" for a LoRA file: (the tag for the page to add to the txt2img prompt,
    a message). The WebUI's Lora list is rescanned first (``host.refresh_loras``), so the new
    file's card is there and its tag is known at the next generation. None for the tag where
    there is no txt2img (standalone) or the file is no LoRA of the Lora folder."""
    if not is_lora_file(host, output_path):
        return None, f"{output_path or 'no output yet'}: not a LoRA file in {host.lora_dir()}"
    tag = lora_tag(output_path)
    if not host.is_webui:
        return None, (f"{Path(output_path).name} is ready in {host.lora_dir()}: put {tag} into a "
                      "prompt in the WebUI's txt2img (this standalone app has no txt2img)")
    if host.refresh_loras():
        return tag, f"{tag} is in the txt2img prompt; the Lora list knows {Path(output_path).name}"
    return tag, (f"{tag} is in the txt2img prompt, but the WebUI's Lora list could not be "
                 "refreshed: is its built-in Lora extension enabled? (Settings → Extensions)")


def extraction_target(host: Host, trained_path: str | os.PathLike) -> Path:
    """Where "Extract LoRA" writes: ``<lora dir>/<trained file's name>-lora.safetensors``."""
    return host.lora_dir() / f"{Path(trained_path).stem}{EXTRACT_SUFFIX}.safetensors"


def _run_of_file(host: Host, trained: Path) -> TrainingConfig | None:
    """The config of the run that wrote ``trained``: the work folder of the file's name, or of
    the name before an intermediate save's ``_<step>``."""
    stem = trained.stem
    for name in [stem] + ([m.group(1)] if (m := re.fullmatch(r"(.+)_\d+", stem)) else []):
        try:
            return run_config(host, name)
        except (ConfigError, ValueError, OSError):
            continue
    return None


def extraction_base(host: Host, trained_path: str | os.PathLike) -> Path | None:
    """The base model a full run's file was trained from: its run's (config.json), else the
    one its metadata names (``dreambooth.base_model``), looked up in the checkpoint list."""
    trained = Path(trained_path).resolve()
    run = _run_of_file(host, trained)
    found = resolve_base_model(run.base_model, host) if run is not None else None
    if found is None or found.resolve() == trained:
        try:
            from dreambooth.models.detect import read_metadata

            named = read_metadata(trained).get("dreambooth.base_model", "")
        except Exception:  # unreadable metadata: no base known
            named = ""
        found = resolve_base_model(named, host) if named else None
    return found if found is not None and found.resolve() != trained else None


def start_lora_extraction(host: Host, trained_path: str, *, rank: int = EXTRACT_RANK,
                          conv_rank: int = EXTRACT_CONV_RANK, overwrite: bool = False,
                          layers: str = "attention_mlp", runner: JobRunner | None = None) -> int:
    """"Extract LoRA" on a finished full run: in the background, in the one-job slot (it loads
    two models and runs an SVD per layer), the difference between the run's file and its base
    cut to ``rank`` (``conv_rank`` > 0: the ResNet convolutions too) written to
    :func:`extraction_target`; polled like training, its report in the log, the new file the
    job's output (so "Use in txt2img" then adds its tag). Cancel stops it between two model
    parts, before anything is written.

    Raises ValueError with a message for people (not a checkpoint of the checkpoints folder, no
    base found, the target exists and ``overwrite`` is off, a bad rank) or JobBusy."""
    from dreambooth.common.run_types import Cancelled

    runner = runner or default_runner()
    trained = None
    for folder in dict.fromkeys((host.output_dir(), host.checkpoints_dir())):
        trained = trained or _inside_folder(trained_path, folder)
    if trained is None:
        raise ValueError(f"{trained_path or 'no output yet'}: Extract LoRA needs a full run's "
                         f"checkpoint in {host.output_dir()}")
    for name, value, low in (("rank", rank, 1), ("conv rank", conv_rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1024:
            raise ValueError(f"{name} must be a whole number from {low} to 1024, not {value!r}")
    base = extraction_base(host, trained)
    if base is None:
        raise ValueError(f"the base model of {trained.name} is not found (its run's config.json "
                         "names none that exists, nor does the file's metadata): put it back in "
                         "the checkpoints folder")
    target = extraction_target(host, trained)
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists: tick Overwrite, or rename that file first")
    run = _run_of_file(host, trained)
    name = (run.model_name if run is not None else "") or trained.stem
    dtype = run.export_dtype if run is not None else "fp16"  # as the run saved its model

    def work(_config: TrainingConfig, _paths: RunPaths, *, reporter: Reporter, **_: Any
             ) -> TrainResult:
        from dreambooth.models.adapters.extract import extract_lora_file

        started = time.time()
        reporter.phase("extracting")
        reporter.log(f"extracting a LoRA from {trained.name} minus {base.name} (rank {rank}"
                     + (f", conv rank {conv_rank}" if conv_rank else "") + ")")

        def log(line: str) -> None:
            reporter.log(line)
            if reporter.should_stop():
                raise Cancelled()

        try:
            out, report = extract_lora_file(trained, base, target, rank=rank,
                                            conv_rank=conv_rank, layers=layers, dtype=dtype,
                                            overwrite=overwrite, log=log)
        except Cancelled:
            reporter.log("extraction cancelled: nothing was written")
            return TrainResult(None, 0, 0, time.time() - started, cancelled=True)
        for line in report.lines():
            reporter.log(line)
        reporter.log(f"saved {out}: the rank keeps {100 * report.kept:.1f}% of the difference "
                     "(of the part it fits worst)")
        host.refresh_loras()
        return TrainResult(out, 0, 0, time.time() - started)

    job_config = TrainingConfig(model_name=name)
    paths = RunPaths(work_dir=host.work_root(), checkpoints_dir=host.output_dir(),
                     lora_dir=host.lora_dir())
    return runner.start(job_config, paths, work=work, task="extracting", validate=False)


def open_folder(path: str | os.PathLike) -> str:
    """Opens a folder in the file manager of the machine running the server (as the WebUI's own
    📂 buttons do); returns what happened."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} does not exist yet"
    try:
        if sys.platform == "win32":
            os.startfile(str(folder))  # type: ignore[attr-defined]
        elif sys.platform == "darwin":
            subprocess.Popen(["open", str(folder)])
        elif shutil.which("xdg-open"):
            subprocess.Popen(["xdg-open", str(folder)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        else:
            return f"no file manager here; the folder is {folder}"
    except OSError as exc:
        return f"cannot open {folder}: {exc}"
    return f"opened {folder}"


def describe_model(host: Host, base: str) -> str:
    """One line about the chosen base model: kind, prediction type, EMA, VAE."""
    path = resolve_base_model(base, host)
    if path is None:
        return "" if not (base or "").strip() else f"{base}: not found"
    try:
        from dreambooth.models.detect import describe, detect_kind_cached

        kind = detect_kind_cached(path)
    except Exception as exc:  # CheckpointError and unreadable files: say why, do not raise
        return f"{path.name}: cannot be trained ({exc})"
    from dreambooth.app.preflight import host_family_problem

    problem = host_family_problem(path, TrainingConfig(base_model=str(path)), host)
    if problem:  # said on the model line at once, not only when Train is pressed
        return f"{path.name}: {describe(kind)}; cannot be trained here: {problem}"
    size = for_kind(kind.kind).default_resolution(kind.prediction_type)
    return f"{path.name}: {describe(kind)}; trains at {size} px unless you set a resolution"


def flow_base(host: Host, base: str) -> str:
    """"flux" for a Flux.1 file (the tab then offers its text encoder files and options),
    "rectified" for a rectified-flow SDXL file (its flow options), else ""."""
    path = resolve_base_model(base, host)
    if path is None:
        return ""
    try:
        from dreambooth.models.detect import detect_kind_cached

        kind = detect_kind_cached(path)
    except Exception:  # not a checkpoint: the model line says why
        return ""
    if kind.family == "flux":
        return "flux"
    return "rectified" if kind.prediction_type == "flow" else ""


def is_flux_base(host: Host, base: str) -> bool:
    """Whether ``base`` is a Flux.1 file."""
    return flow_base(host, base) == "flux"


def status() -> dict[str, Any]:
    """The runner's snapshot as JSON-ready data (what GET /dreambooth/v1/status returns)."""
    data = default_runner().snapshot().to_dict()
    data["loss_history"] = [list(p) for p in data["loss_history"]]
    data["lr_history"] = [list(p) for p in data["lr_history"]]
    data["validation_history"] = [list(p) for p in data["validation_history"]]
    return data


def concepts_from_rows(rows: list[dict[str, Any]]) -> list[Concept]:
    """Concepts from the tab's rows; a row with neither folder nor prompt is unused."""
    concepts = []
    for row in rows:
        if not str(row.get("instance_data_dir") or "").strip() and not str(
                row.get("instance_prompt") or "").strip():
            continue
        number = row.get("num_class_images")
        concepts.append(Concept(
            instance_data_dir=str(row.get("instance_data_dir") or "").strip(),
            instance_prompt=str(row.get("instance_prompt") or "").strip(),
            class_data_dir=str(row.get("class_data_dir") or "").strip(),
            class_prompt=str(row.get("class_prompt") or "").strip(),
            class_negative_prompt=str(row.get("class_negative_prompt") or "").strip(),
            num_class_images=int(number) if number not in (None, "", 0) else None,
            sample_prompt=str(row.get("sample_prompt") or "").strip()))
    return concepts
