"""Resume points: everything a run needs to continue exactly where it stopped, as safetensors and
JSON only — no pickle, so a planted or downloaded run folder can never run code on ``--resume``.

A resume point is a folder ``<work>/checkpoints/step-NNNNNN/``:

- ``<component>.safetensors`` for each trained model (``unet``, ``text_encoder``...);
- ``training_state.safetensors`` + ``training_state.json``: the optimizer, the learning-rate
  schedule and the EMA, their nested structure in JSON with every tensor replaced by a reference
  into the safetensors file (tuples, integer keys and non-finite floats are tagged so that the
  round trip is exact);
- ``state.json``: the step and the run's id, written last.

The folder is written through :func:`dreambooth.common.files.atomic_path`: it appears complete or not at
all; a failed write removes its temporary folder and raises WriteError.
"""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from dreambooth.common import files

FORMAT = 2
STATE_FILE = "state.json"
RUN_FILE = "run.json"  # in the work folder: the id of the run the folder's config.json belongs to
TENSORS_FILE = "training_state.safetensors"
STRUCTURE_FILE = "training_state.json"


class ResumeError(ValueError):
    """A resume point cannot be used; the message names it and what to do."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------------------
# Nested state <-> JSON + tensors
# ---------------------------------------------------------------------------------------------
def flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-ready copy of ``value``; its tensors are moved into ``tensors`` by reference."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"$tensor": key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [flatten(v, tensors) for v in value]}
    if isinstance(value, list):
        return [flatten(v, tensors) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: flatten(v, tensors) for k, v in value.items()}
        return {"$items": [[flatten(k, tensors), flatten(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a resume point")


def unflatten(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"$tensor"}:
        return tensors[value["$tensor"]]
    if set(value) == {"$float"}:
        return float(value["$float"])
    if set(value) == {"$tuple"}:
        return tuple(unflatten(v, tensors) for v in value["$tuple"])
    if set(value) == {"$items"}:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value["$items"]}
    return {k: unflatten(v, tensors) for k, v in value.items()}


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def estimate_bytes(models: Mapping[str, torch.nn.Module], optimizer) -> int:
    """About what a resume point takes on disk: the trained weights and the optimizer state."""
    total = sum(t.numel() * t.element_size() for m in models.values() for t in m.state_dict().values())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


# ---------------------------------------------------------------------------------------------
# Listing, writing, reading
# ---------------------------------------------------------------------------------------------
def point_step(point: Path) -> int:
    return int(point.name.split("-")[1])


def is_complete(point: Path) -> bool:
    """A resume point is usable when its state.json (written last) says so."""
    try:
        state = json.loads((point / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("step"), int)


def list_resume_points(resume_dir: Path) -> list[Path]:
    """The complete resume points, oldest first."""
    resume_dir = Path(resume_dir)
    if not resume_dir.is_dir():
        return []
    points = [p for p in resume_dir.iterdir() if p.is_dir() and p.name.startswith("step-")
              and p.name.split("-")[1].isdigit() and is_complete(p)]
    return sorted(points, key=point_step)


def sweep_resume_dir(resume_dir: Path) -> list[Path]:
    """Leftovers of interrupted writes: temporaries of dead processes and step folders without
    their state.json (a deletion cut short)."""
    resume_dir = Path(resume_dir)
    removed = files.sweep(resume_dir)
    if resume_dir.is_dir():
        for point in resume_dir.iterdir():
            legacy = point.name.startswith(".tmp-step-")  # the first version's temporaries
            if point.is_dir() and (legacy or point.name.startswith("step-") and not is_complete(point)):
                files.remove_tree(point)
                removed.append(point)
    return removed


def save_resume_point(resume_dir: Path, step: int, models: Mapping[str, torch.nn.Module],
                      training_state: Mapping[str, Any], *, run_id: str, limit: int,
                      needed_bytes: int | None = None, settings: Mapping[str, Any] | None = None
                      ) -> Path:
    """Write ``step-NNNNNN`` (models, optimizer/scheduler/EMA state, step, the ``settings`` that
    shape them) and keep the newest ``limit`` points (0: all). The older points — and those of
    an earlier run under the same name (overwrite) — are removed only once the new one is
    complete."""
    from safetensors.torch import save_file

    final = Path(resume_dir) / f"step-{step:06d}"
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(dict(training_state), tensors)
    with files.atomic_path(final, overwrite=True, needed_bytes=needed_bytes) as tmp:
        tmp.mkdir()
        for name, model in models.items():
            save_file(_model_tensors(model), str(tmp / f"{name}.safetensors"))
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, allow_nan=False), encoding="utf-8")
        (tmp / STATE_FILE).write_text(json.dumps({
            "format": FORMAT, "step": step, "run_id": run_id, "models": sorted(models),
            "settings": dict(settings or {})}), encoding="utf-8")
    remove_other_runs(resume_dir, run_id)
    if limit > 0:
        for old in list_resume_points(resume_dir)[:-limit]:
            files.remove_tree(old)
    return final


# ---------------------------------------------------------------------------------------------
# Which run a point belongs to, and the settings it was written with
# ---------------------------------------------------------------------------------------------
def _point_run(point: Path) -> str | None:
    try:
        return str(read_state(point).get("run_id") or "") or None
    except ResumeError:
        return None


def write_run_id(work_dir: Path, run_id: str) -> None:
    """Record the run the work folder now belongs to (a new run starts; with overwrite the
    earlier run's points stay until this one has written its own)."""
    files.write_json(Path(work_dir) / RUN_FILE, {"run_id": run_id}, overwrite=True)


def read_run_id(work_dir: Path) -> str | None:
    """The id of the work folder's current run; None for folders of earlier versions."""
    try:
        value = json.loads((Path(work_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(value.get("run_id") or "") or None if isinstance(value, dict) else None


def run_points(work_dir: Path, resume_dir: Path) -> list[Path]:
    """The complete resume points of the work folder's current run, oldest first: every point
    when the folder does not say which run it holds, and those that do not say whose they are
    (earlier versions: loading them says what is wrong with them)."""
    points = list_resume_points(resume_dir)
    own = read_run_id(work_dir)
    return points if own is None else [p for p in points if _point_run(p) in (own, None)]


def remove_other_runs(resume_dir: Path, run_id: str) -> int:
    """Remove the points of other runs (an earlier run replaced with overwrite)."""
    others = [p for p in list_resume_points(resume_dir) if _point_run(p) != run_id]
    for point in others:
        files.remove_tree(point)
    return len(others)


def settings_of(config) -> dict[str, Any]:
    """The settings that shape a run's trained tensors and optimizer state: a point written
    with others cannot be continued (it is not damaged: it is another run's)."""
    names = ["training_method", "train_text_encoder", "optimizer", "use_ema", "fused_backward",
             "trained_precision"]
    method = config.training_method
    if method != "full":
        names += ["lora_rank", "lora_alpha", "lora_layers", "base_weights_8bit",
                  "base_weights_4bit"]
        names += ["dora"] if method in ("lora", "locon") else []
        names += ["lora_conv_rank", "lora_conv_alpha"] if method != "lora" else []
        names += ["lokr_factor"] if method == "lokr" else []
    return {name: json.loads(json.dumps(getattr(config, name))) for name in names}


def changed_settings(point: Path, config) -> list[tuple[str, Any, Any]]:
    """``(field, saved, now)`` for each shaping setting ``config`` changes against the point
    (nothing for points written before the settings were recorded)."""
    saved = read_state(point).get("settings") or {}
    now = settings_of(config)
    return [(name, saved[name], now[name]) for name in now
            if name in saved and saved[name] != now[name]]


def setting_errors(point: Path, config) -> list:
    """A FieldError for each setting :func:`changed_settings` finds: old and new value, and how
    to start a new run instead."""
    from dreambooth.common.config import FieldError

    return [FieldError(name, f"the run's resume point {Path(point).name} was trained with {name} "
                             f"= {old!r}, not {new!r}: resume with it as it was ({old!r}), or start a new run "
                             "with this setting under another name (or turn on overwrite and "
                             "start it without resuming)")
            for name, old, new in changed_settings(point, config)]


def read_state(point: Path) -> dict[str, Any]:
    """The point's state.json: step, run id, the models it holds."""
    try:
        return json.loads((Path(point) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{point} is not a complete resume point ({exc})") from exc


def load_resume_point(point: Path, models: Mapping[str, torch.nn.Module]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the saved weights into ``models`` (those the point holds) and return
    (state.json, training state with tensors). Refuses points of the old pickle format."""
    from safetensors.torch import load_file

    point = Path(point)
    state = read_state(point)
    if state.get("format") != FORMAT or not (point / STRUCTURE_FILE).is_file():
        raise ResumeError(
            f"{point} was written by an earlier version of this extension in a format that is no "
            "longer read (it held a pickle, which could run code). Start the run again, or "
            "delete that folder to resume from an older point.")
    try:
        for name, model in models.items():
            file = point / f"{name}.safetensors"
            if file.is_file():
                model.load_state_dict(load_file(str(file)))
        tensors = load_file(str(point / TENSORS_FILE))
        structure = json.loads((point / STRUCTURE_FILE).read_text(encoding="utf-8"))
    except ResumeError:
        raise
    except RuntimeError as exc:  # load_state_dict: other keys or shapes, not damage
        if "state_dict" not in str(exc):
            raise _damaged(point, exc) from exc
        raise ResumeError(f"{point} holds other tensors than this run trains: it was written with "
                          "other settings (method, rank, layers or text encoder). Resume with the "
                          "settings in the run's config.json, or start a new run under another "
                          "name") from exc
    except Exception as exc:  # safetensors and json errors: the files themselves
        raise _damaged(point, exc) from exc
    return state, unflatten(structure, tensors)


def _damaged(point: Path, exc: Exception) -> ResumeError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ResumeError(f"{point} is damaged and cannot be resumed from ({type(exc).__name__}: "
                       f"{first}); delete that folder to resume from an older point")


def remove_all(resume_dir: Path) -> int:
    """Remove every resume point (a new run under the same name, with overwrite on)."""
    points = [p for p in Path(resume_dir).iterdir() if p.is_dir()] if Path(resume_dir).is_dir() else []
    for point in points:
        files.remove_tree(point)
    return len(points)


__all__ = ["list_resume_points", "save_resume_point", "load_resume_point", "sweep_resume_dir",
           "ResumeError", "new_run_id", "remove_all", "read_state", "estimate_bytes",
           "write_run_id", "read_run_id", "run_points", "remove_other_runs", "settings_of",
           "changed_settings", "setting_errors"]
