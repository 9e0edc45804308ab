"""A captioner's files: used from its folder when they are there (no network at all), else
downloaded there from the Hugging Face hub with ``huggingface_hub`` (only the files it needs),
file by file with the progress told to the reporter. When they cannot be downloaded — offline
(``HF_HUB_OFFLINE``), no network, a repo without the files — one message says which model,
which folder, and which files to put there by hand."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from dreambooth.data.captioners.base import CaptionerUnavailable, Spec

DOWNLOADING = "downloading"  # the job's phase while a captioner's files come down
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, read now (not at import)."""
    return any(os.environ.get(key, "").strip().upper() in _TRUE
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing(spec: Spec, folder: Path) -> list[str]:
    """The files ``folder`` lacks for ``spec`` ("vocab.txt or tokenizer.json" for a choice)."""
    lacking = [name for name in spec.files if not (folder / name).is_file()]
    if spec.any_of and not any((folder / name).is_file() for name in spec.any_of):
        lacking.append(" or ".join(spec.any_of))
    return lacking


def unavailable(spec: Spec, folder: Path, why: str) -> CaptionerUnavailable:
    needed = list(spec.files) + ([" or ".join(spec.any_of)] if spec.any_of else [])
    return CaptionerUnavailable(
        f"the captioner {spec.name} has no model in {folder} yet, and it cannot be downloaded "
        f"now: {why}. Download {', '.join(needed)} from {spec.url} and put them in {folder} "
        "(it then runs without the network)")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "Timeout",
                "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NewConnectionError"}:
        return f"no connection to the Hugging Face hub ({type(exc).__name__}{': ' + text if text else ''})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ensure_files(spec: Spec, folder: Path, *, reporter=None,
                 should_stop: Callable[[], bool] | None = None) -> bool:
    """True when ``folder`` holds every file ``spec`` needs, downloading the missing ones first;
    False when ``should_stop`` said so between two files (what came down stays). Raises
    CaptionerUnavailable when they are missing and cannot be downloaded."""
    folder = Path(folder)
    if not missing(spec, folder):
        return True
    if offline():
        raise unavailable(spec, folder, "HF_HUB_OFFLINE is set (offline mode)")
    try:
        import huggingface_hub
    except ImportError as exc:
        raise unavailable(spec, folder, "huggingface_hub is not installed") from exc
    try:
        listed = set(huggingface_hub.list_repo_files(spec.repo))
    except (OSError, ValueError) as exc:  # the hub's errors are requests' (OSError) or ValueError
        raise unavailable(spec, folder, _reason(exc)) from exc
    absent = [name for name in spec.files if name not in listed]
    if spec.any_of and not listed & set(spec.any_of):
        absent.append(" or ".join(spec.any_of))
    if absent:
        weights = " (weights are loaded from safetensors only, never from pickled files)" \
            if "model.safetensors" in absent else ""
        raise unavailable(spec, folder, f"{spec.repo} has no {', '.join(absent)}{weights}")
    wanted = [name for name in spec.files + spec.any_of + spec.optional
              if name in listed and not (folder / name).is_file()]
    say = reporter if reporter is not None else _Silent()
    say.phase(DOWNLOADING)
    say.log(f"downloading the captioner {spec.name} ({spec.repo}) into {folder}: "
            f"{', '.join(wanted)}")
    folder.mkdir(parents=True, exist_ok=True)
    for done, name in enumerate(wanted):
        if should_stop is not None and should_stop():
            say.log(f"download of {spec.name} stopped; {done} of {len(wanted)} file(s) are there")
            return False
        say.detail(f"downloading captioner {spec.name}: {name} ({done + 1} / {len(wanted)} files)")
        try:
            huggingface_hub.hf_hub_download(spec.repo, name, local_dir=str(folder))
        except (OSError, ValueError) as exc:
            raise unavailable(spec, folder, _reason(exc)) from exc
    lacking = missing(spec, folder)
    if lacking:  # the hub said it had them; a download that ended without them
        raise unavailable(spec, folder, f"the download left out {', '.join(lacking)}")
    say.detail(f"downloaded captioner {spec.name}: {len(wanted)} / {len(wanted)} files")
    return True


class _Silent:
    def phase(self, name: str) -> None: ...

    def log(self, line: str) -> None: ...

    def detail(self, text: str) -> None: ...
