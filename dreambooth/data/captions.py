"""Captions for the user's pictures, written by our own captioners (``captioners/``: WD tagger
v3, BLIP) or by the WebUI's interrogators where the host has them.

A caption run looks at the instance folders, and for each picture without a caption file (the
config's ``caption_extension`` beside it: ``dog1.jpg`` -> ``dog1.txt``) asks the captioner for a
caption and writes it. The rules it keeps:

* **A user's caption is never replaced** unless ``overwrite`` is on: pictures that have a caption
  file are left out of the run, and a caption file that appears while the run goes (the user
  wrote one meanwhile) is kept too — the atomic writer refuses to replace it.
* **Whole files only.** Every caption goes through ``files.write_text`` (a temporary, renamed
  when complete); a cancel stops before the next picture, so the files written so far are
  complete and no half-written one is left.
* **A bad picture is skipped with a warning that names it**, and the run goes on; a failing
  captioner (a model it cannot download or load...) stops the run, since every picture would fail.
* **One model per run**: our captioner is opened (downloaded first when its folder lacks it)
  once, before the first picture, and closed after the last, its memory given back.
* The interrogators (``blip``, ``clip``, ``deepbooru``) belong to the WebUI (``host.py`` reaches
  them): without a WebUI, or in Forge Neo, there are none, and ours remain.

Nothing here imports gradio or ``modules.*``; the WebUI's interrogators come through the host.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dreambooth.common.config import TrainingConfig
from dreambooth.common.files import OutputExistsError, write_text
from dreambooth.data import captioners
from dreambooth.data.captioners import (CAPTIONERS, CaptionError, CaptionerError,
                                        CaptionerUnavailable, TaggerOptions)
from dreambooth.host import InterrogatorError

# The WebUI's interrogators: name -> what it writes (the tab's and the CLI's help)
INTERROGATORS: dict[str, str] = {
    "blip": "the WebUI's BLIP: one plain sentence (\"a dog sitting on a couch\")",
    "clip": "the WebUI's CLIP: the BLIP sentence and CLIP's style words (artists, mediums), as "
            "its Interrogate CLIP",
    "deepbooru": "the WebUI's DeepBooru: comma-separated tags (\"1girl, solo, smile\"), for "
                 "anime-style models",
}
# BLIP by default (the WebUI's where it has it, else ours): CLIP's added artist and medium words
# become part of what the model learns about the subject, and tags suit only anime models.
DEFAULT_INTERROGATOR = "blip"
DEFAULT_CAPTIONER = captioners.DEFAULT_CAPTIONER
INSTANCE = "[instance]"  # in a prefix: each concept's instance prompt (without [filewords])


def describe(name: str) -> str:
    """What captioner ``name`` writes (ours or the WebUI's)."""
    return CAPTIONERS[name].text if name in CAPTIONERS else INTERROGATORS.get(name, name)


def choices(webui_interrogators: Iterable[str]) -> list[str]:
    """Ours always, then the WebUI's interrogators this host has (BLIP first)."""
    have = set(webui_interrogators)
    return list(CAPTIONERS) + [name for name in INTERROGATORS if name in have]


def default_captioner(webui_interrogators: Iterable[str]) -> str:
    """The WebUI's BLIP where the host has it (as before), else our BLIP."""
    return DEFAULT_INTERROGATOR if DEFAULT_INTERROGATOR in set(webui_interrogators) \
        else DEFAULT_CAPTIONER


def models_root(host) -> Path:
    """Where our captioners keep their models: ``<the host's models folder>/captioners``."""
    return Path(host.models_dir()) / captioners.FOLDER


@dataclass(frozen=True)
class CaptionFolder:
    """A folder of pictures and the text every caption in it starts with."""

    path: Path
    prefix: str = ""


@dataclass(frozen=True)
class CaptionRequest:
    folders: tuple[CaptionFolder, ...]
    captioner: str = DEFAULT_INTERROGATOR  # one of ours (CAPTIONERS) or the WebUI's (INTERROGATORS)
    overwrite: bool = False  # replace existing caption files
    caption_extension: str = ".txt"
    recursive: bool = False
    background: str = "white"  # transparent pixels are shown to the captioner on this
    tagger: TaggerOptions = field(default_factory=TaggerOptions)  # a WD tagger's options
    models_dir: Path | None = None  # our captioners' folder (<models>/captioners)


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


def request_from_config(config: TrainingConfig, *, captioner: str = DEFAULT_INTERROGATOR,
                        prefix: str = "", overwrite: bool = False,
                        tagger: TaggerOptions | None = None,
                        models_dir: Path | None = None) -> CaptionRequest:
    """The instance folders of ``config``'s concepts (each once), with its caption extension,
    subfolder and background settings; ``[instance]`` in the prefix becomes each concept's
    instance words."""
    folders: dict[Path, CaptionFolder] = {}
    for concept in config.concepts:
        text = concept.instance_data_dir.strip()
        if text:
            path = Path(text).expanduser()
            folders.setdefault(path, CaptionFolder(path, resolve_prefix(prefix, concept.instance_prompt)))
    return CaptionRequest(tuple(folders.values()), captioner=captioner, overwrite=overwrite,
                          caption_extension=config.caption_extension or ".txt",
                          recursive=config.recursive, background=config.alpha_background,
                          tagger=tagger or TaggerOptions(),
                          models_dir=Path(models_dir) if models_dir is not None else None)


def plan(request: CaptionRequest) -> list[CaptionTask]:
    """Every picture of the request's folders, with its caption file and whether it has one."""
    from dreambooth.data import caption_path, list_pictures

    tasks = []
    for folder in request.folders:
        for picture in list_pictures(folder.path, recursive=request.recursive):
            target = caption_path(picture, request.caption_extension)
            tasks.append(CaptionTask(picture, target, folder.prefix, target.exists()))
    return tasks


def check(request: CaptionRequest, webui_interrogators: Iterable[str]) -> list[CaptionTask]:
    """The pictures to caption; CaptionError when the run cannot start (a WebUI interrogator
    this host lacks, an unknown captioner, bad tagger options, our model missing while offline,
    a missing folder)."""
    have = list(webui_interrogators)
    name = request.captioner
    ours = ", ".join(CAPTIONERS)
    if name in INTERROGATORS and name not in have:
        if not have:
            raise CaptionError(f"{name!r} is one of the WebUI's interrogators, and there is no "
                               f"WebUI interrogator here (no WebUI, or Forge Neo, which removed "
                               f"them): choose one of ours instead: {ours}")
        raise CaptionError(f"this WebUI has no {name!r} interrogator (it has: {', '.join(have)});"
                           f" ours: {ours}")
    if name not in CAPTIONERS and name not in INTERROGATORS:
        raise CaptionError(f"unknown captioner {name!r}; choose one of: "
                           + ", ".join(choices(have)))
    if captioners.is_tagger(name) and request.tagger.problems():
        raise CaptionError("tagger options: " + "; ".join(request.tagger.problems()))
    if not request.folders:
        raise CaptionError("no instance folder: fill in a concept's instance pictures folder")
    missing = [str(f.path) for f in request.folders if not f.path.is_dir()]
    if missing:
        raise CaptionError(f"not a folder: {', '.join(missing)}")
    if name in CAPTIONERS and request.models_dir is not None:
        from dreambooth.data.captioners import hub

        spec, folder = CAPTIONERS[name], captioners.model_folder(request.models_dir, name)
        if hub.offline() and hub.missing(spec, folder):  # said now, not after a job starts
            raise hub.unavailable(spec, folder, "HF_HUB_OFFLINE is set (offline mode)")
    return plan(request)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@contextmanager
def opened(request: CaptionRequest, host, reporter) -> Iterator[Callable[[object], str] | None]:
    """The run's captioner as ``caption(image) -> str``: ours opened once (downloaded first when
    missing) and closed after the run; the WebUI's through the host. None when the run was
    cancelled while the model came down."""
    name = request.captioner
    if name not in CAPTIONERS:
        yield lambda image: host.interrogate(name, image)
        return
    root = request.models_dir if request.models_dir is not None else models_root(host)
    reporter.detail(f"loading the captioner {name}")
    captioner = captioners.open_captioner(name, root, tagger=request.tagger, reporter=reporter,
                                          should_stop=reporter.should_stop)
    if captioner is None:
        yield None
        return
    try:
        yield captioner.caption
    finally:
        captioner.close()


def caption_pictures(request: CaptionRequest, tasks: list[CaptionTask], host,
                     reporter) -> CaptionSummary:
    """Caption the ``tasks`` that need it (all of them with ``overwrite``); ``host`` gives the
    WebUI's interrogators, ``reporter`` is a trainer Reporter (phase, progress, detail, log,
    should_stop). Raises InterrogatorError (CaptionerError for ours) when the captioner fails,
    CaptionerUnavailable when our model is missing and cannot be downloaded, WriteError when a
    caption cannot be written; what was written stays."""
    from dreambooth.data import open_picture

    started = time.time()
    todo = [t for t in tasks if request.overwrite or not t.exists]
    summary = CaptionSummary(kept=len(tasks) - len(todo), total=len(todo))
    reporter.phase("captioning")
    reporter.log(f"captioning {len(todo)} picture(s) with {request.captioner}"
                 + (f"; {summary.kept} already have a caption and are kept" if summary.kept else ""))
    if todo:
        with opened(request, host, reporter) as caption:
            if caption is None:
                summary.cancelled, summary.left = True, len(todo)
            else:
                if getattr(reporter, "current", "captioning") != "captioning":
                    reporter.phase("captioning")  # back from downloading the model
                _caption_all(request, todo, caption, summary, reporter, open_picture)
    summary.seconds = time.time() - started
    reporter.log(summary.text())
    return summary


def _caption_all(request: CaptionRequest, todo: list[CaptionTask], caption, summary, reporter,
                 open_picture) -> None:
    reporter.progress(0, len(todo), None, None)
    for done, task in enumerate(todo, start=1):
        if reporter.should_stop():
            summary.cancelled, summary.left = True, len(todo) - done + 1
            break
        try:
            # the captioners resize to 384-512 px themselves: a smaller decode is enough
            image = open_picture(task.picture, background=request.background, max_side=1024)
        except Exception as exc:  # Pillow raises many kinds; each means "cannot be read"
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            summary.bad.append(f"{task.picture.name} ({why})")
            reporter.log(f"warning: skipped {task.picture.name}: cannot be read ({why})")
        else:
            _write(task, compose(task.prefix, caption(image)), request.overwrite, summary,
                   reporter)
        reporter.progress(done, len(todo), None, None)


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


__all__ = ["CAPTIONERS", "CaptionError", "CaptionFolder", "CaptionRequest", "CaptionSummary",
           "CaptionTask", "CaptionerError", "CaptionerUnavailable", "DEFAULT_CAPTIONER",
           "DEFAULT_INTERROGATOR", "INSTANCE", "INTERROGATORS", "InterrogatorError",
           "TaggerOptions", "caption_pictures", "check", "choices", "compose", "default_captioner",
           "describe", "instance_words", "models_root", "opened", "plan", "request_from_config",
           "resolve_prefix"]
