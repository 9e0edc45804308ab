"""Captions for the user's pictures, written by the WebUI's own interrogators.

A caption run looks at the instance folders, and for each picture without a caption file (the
config's ``caption_extension`` beside it: ``dog1.jpg`` -> ``dog1.txt``) asks the host's
interrogator for a caption and writes it. The rules it keeps:

* **A user's caption is never replaced** unless ``overwrite`` is on: pictures that have a caption
  file are left out of the run, and a caption file that appears while the run goes (the user
  wrote one meanwhile) is kept too — the atomic writer refuses to replace it.
* **Whole files only.** Every caption goes through ``files.write_text`` (a temporary, renamed
  when complete); a cancel stops before the next picture, so the files written so far are
  complete and no half-written one is left.
* **A bad picture is skipped with a warning that names it**, and the run goes on; a failing
  interrogator (a model it cannot download...) stops the run, since every picture would fail.
* The interrogators belong to the WebUI (``webui.py`` reaches them): without a WebUI there are
  none, and the run is refused with a message that says so.

Nothing here imports gradio or ``modules.*``; the interrogator is a function handed in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from dreambooth.common.config import TrainingConfig
from dreambooth.common.files import OutputExistsError, write_text
from dreambooth.host import InterrogatorError

# name -> what it writes (the tab's and the CLI's help)
INTERROGATORS: dict[str, str] = {
    "blip": "BLIP: one plain sentence (\"a dog sitting on a couch\")",
    "clip": "CLIP: the BLIP sentence and CLIP's style words (artists, mediums), as the WebUI's "
            "Interrogate CLIP",
    "deepbooru": "DeepBooru: comma-separated tags (\"1girl, solo, smile\"), for anime-style models",
}
# BLIP by default: CLIP's added artist and medium words become part of what the model learns
# about the subject, and tags suit only the anime family of models.
DEFAULT_INTERROGATOR = "blip"
INSTANCE = "[instance]"  # in a prefix: each concept's instance prompt (without [filewords])


class CaptionError(ValueError):
    """A caption run cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class CaptionFolder:
    """A folder of pictures and the text every caption in it starts with."""

    path: Path
    prefix: str = ""


@dataclass(frozen=True)
class CaptionRequest:
    folders: tuple[CaptionFolder, ...]
    interrogator: str = DEFAULT_INTERROGATOR
    overwrite: bool = False  # replace existing caption files
    caption_extension: str = ".txt"
    recursive: bool = False
    background: str = "white"  # transparent pixels are shown to the interrogator on this


@dataclass(frozen=True)
class CaptionTask:
    picture: Path
    caption_file: Path
    prefix: str
    exists: bool  # a caption file is there already


@dataclass
class CaptionSummary:
    written: list[Path] = field(default_factory=list)  # caption files written
    kept: int = 0  # pictures whose caption file was there (or appeared) and was kept
    bad: list[str] = field(default_factory=list)  # "name.jpg (why)" for skipped pictures
    total: int = 0  # pictures the run set out to caption
    left: int = 0  # of those, not reached (cancelled)
    cancelled: bool = False
    seconds: float = 0.0

    def text(self) -> str:
        parts = [f"{len(self.written)} caption(s) written"]
        if self.kept:
            parts.append(f"{self.kept} existing caption(s) kept")
        if self.bad:
            parts.append(f"{len(self.bad)} unreadable picture(s) skipped")
        if self.cancelled:
            parts.append(f"cancelled with {self.left} picture(s) left")
        return "captions: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------
def instance_words(instance_prompt: str) -> str:
    """An instance prompt as caption words: "photo of ohwx dog, [filewords]" -> "photo of ohwx dog"."""
    from dreambooth.data import fill_template

    return fill_template(instance_prompt or "", "")


def resolve_prefix(prefix: str, instance_prompt: str = "") -> str:
    """The prefix with ``[instance]`` replaced by the concept's instance words."""
    return (prefix or "").replace(INSTANCE, instance_words(instance_prompt))


def compose(prefix: str, caption: str) -> str:
    """``prefix`` then the interrogator's caption on one line, joined with ", " unless the
    prefix already ends with a comma: "ohwx dog" + "a dog" -> "ohwx dog, a dog"."""
    from dreambooth.data import clean_caption

    text = clean_caption(caption).strip(" ,")
    head = clean_caption(prefix).strip()
    if not head:
        return text
    if not text:
        return head.rstrip(" ,")
    return f"{head} {text}" if head.endswith(",") else f"{head}, {text}"


def request_from_config(config: TrainingConfig, *, interrogator: str = DEFAULT_INTERROGATOR,
                        prefix: str = "", overwrite: bool = False) -> CaptionRequest:
    """The instance folders of ``config``'s concepts (each once), with its caption extension,
    subfolder and background settings; ``[instance]`` in the prefix becomes each concept's
    instance words."""
    folders: dict[Path, CaptionFolder] = {}
    for concept in config.concepts:
        text = concept.instance_data_dir.strip()
        if text:
            path = Path(text).expanduser()
            folders.setdefault(path, CaptionFolder(path, resolve_prefix(prefix, concept.instance_prompt)))
    return CaptionRequest(tuple(folders.values()), interrogator=interrogator, overwrite=overwrite,
                          caption_extension=config.caption_extension or ".txt",
                          recursive=config.recursive, background=config.alpha_background)


def plan(request: CaptionRequest) -> list[CaptionTask]:
    """Every picture of the request's folders, with its caption file and whether it has one."""
    from dreambooth.data import caption_path, list_pictures

    tasks = []
    for folder in request.folders:
        for picture in list_pictures(folder.path, recursive=request.recursive):
            target = caption_path(picture, request.caption_extension)
            tasks.append(CaptionTask(picture, target, folder.prefix, target.exists()))
    return tasks


def check(request: CaptionRequest, available: Iterable[str]) -> list[CaptionTask]:
    """The pictures to caption; CaptionError when the run cannot start (no WebUI, an
    interrogator this WebUI lacks, a missing folder, nothing to caption)."""
    available = list(available)
    if not available:
        raise CaptionError("captioning uses the WebUI's interrogators (BLIP/CLIP, DeepBooru), and "
                           "there is no WebUI here: run it from the DreamBooth tab inside "
                           "AUTOMATIC1111 or Forge (or write the caption files yourself)")
    if request.interrogator not in available:
        raise CaptionError(f"unknown interrogator {request.interrogator!r}; this WebUI has: "
                           + ", ".join(available))
    if not request.folders:
        raise CaptionError("no instance folder: fill in a concept's instance pictures folder")
    missing = [str(f.path) for f in request.folders if not f.path.is_dir()]
    if missing:
        raise CaptionError(f"not a folder: {', '.join(missing)}")
    return plan(request)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def caption_pictures(request: CaptionRequest, tasks: list[CaptionTask],
                     interrogate: Callable[[str, object], str], reporter) -> CaptionSummary:
    """Caption the ``tasks`` that need it (all of them with ``overwrite``); ``reporter`` is a
    trainer Reporter (phase, progress, detail, log, should_stop). Raises InterrogatorError when
    the interrogator fails, WriteError when a caption cannot be written; what was written stays."""
    from dreambooth.data import open_picture

    started = time.time()
    todo = [t for t in tasks if request.overwrite or not t.exists]
    summary = CaptionSummary(kept=len(tasks) - len(todo), total=len(todo))
    reporter.phase("captioning")
    reporter.log(f"captioning {len(todo)} picture(s) with {request.interrogator}"
                 + (f"; {summary.kept} already have a caption and are kept" if summary.kept else ""))
    reporter.progress(0, len(todo), None, None)
    for done, task in enumerate(todo, start=1):
        if reporter.should_stop():
            summary.cancelled, summary.left = True, len(todo) - done + 1
            break
        try:
            # the interrogators resize to 384-512 px themselves: a smaller decode is enough
            image = open_picture(task.picture, background=request.background, max_side=1024)
        except Exception as exc:  # Pillow raises many kinds; each means "cannot be read"
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            summary.bad.append(f"{task.picture.name} ({why})")
            reporter.log(f"warning: skipped {task.picture.name}: cannot be read ({why})")
        else:
            caption = compose(task.prefix, interrogate(request.interrogator, image))
            _write(task, caption, request.overwrite, summary, reporter)
        reporter.progress(done, len(todo), None, None)
    summary.seconds = time.time() - started
    reporter.log(summary.text())
    return summary


def _write(task: CaptionTask, caption: str, overwrite: bool, summary: CaptionSummary,
           reporter) -> None:
    try:
        write_text(task.caption_file, caption, overwrite=overwrite)
    except OutputExistsError:  # the user wrote one while the run went: theirs is kept
        summary.kept += 1
        reporter.log(f"kept {task.caption_file.name}: it appeared during the run")
        return
    summary.written.append(task.caption_file)
    reporter.detail(f"{task.picture.name}: {caption[:80]}")


__all__ = ["CaptionError", "CaptionFolder", "CaptionRequest", "CaptionSummary", "CaptionTask",
           "DEFAULT_INTERROGATOR", "INSTANCE", "INTERROGATORS", "InterrogatorError",
           "caption_pictures", "check", "compose", "instance_words", "plan", "request_from_config",
           "resolve_prefix"]
