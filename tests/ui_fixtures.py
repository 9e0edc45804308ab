"""Helpers for the tab, API and browser tests: a models folder with the tiny base checkpoint."""
from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.app.demo import draw_pictures

BASE_NAME = "tiny-base.safetensors"


@functools.lru_cache(maxsize=1)
def _tiny_checkpoint() -> Path:
    """The tiny model written once per test session (building it takes seconds)."""
    from dreambooth.models import tiny

    folder = Path(tempfile.mkdtemp(prefix="dreambooth-tiny-"))
    return tiny.save_checkpoint(folder / BASE_NAME, size="tiny", seed=0)


def put_base_checkpoint(checkpoints_dir: Path, name: str = BASE_NAME) -> Path:
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoints_dir / name
    shutil.copyfile(_tiny_checkpoint(), target)
    return target


def pictures(folder: Path, count: int = 3) -> Path:
    if not folder.exists():
        draw_pictures(folder, count=count, size=64, seed=1)
    return folder


def quick_config(root: Path, base: str, name: str = "my-toy", steps: int = 4, **overrides
                 ) -> TrainingConfig:
    """A run of a few steps at 64 px without class pictures: fast on two CPU cores."""
    values = dict(
        base_model=base, model_name=name,
        concepts=[Concept(instance_data_dir=str(pictures(root / "pics")),
                          instance_prompt="photo of ohwx toy", sample_prompt="ohwx toy")],
        with_prior_preservation=False, resolution=64, max_train_steps=steps, learning_rate=1e-4,
        optimizer="adamw", mixed_precision="no", gradient_checkpointing=False,
        checkpoint_every_n_steps=0, sample_every_n_steps=0, sample_steps=2, seed=3)
    values.update(overrides)
    return TrainingConfig(**values)


SDXL_NAME = "tiny-sdxl.safetensors"


@functools.lru_cache(maxsize=2)
def _tiny_sdxl_checkpoint(v_pred_ztsnr: bool) -> Path:
    """The tiny SDXL-shaped model once per session; with ``v_pred_ztsnr`` re-saved with the
    empty ``v_pred`` and ``ztsnr`` marker keys (NoobAI-style v-prediction, zero terminal SNR)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dreambooth.models import tiny

    folder = Path(tempfile.mkdtemp(prefix="dreambooth-tiny-sdxl-"))
    path = tiny.save_checkpoint(folder / SDXL_NAME, kind="sdxl", seed=0)
    if not v_pred_ztsnr:
        return path
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    tensors = load_file(str(path))
    tensors.update(v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    marked = folder / "marked.safetensors"
    save_file(tensors, str(marked), metadata=metadata)
    return marked


def put_sdxl_checkpoint(checkpoints_dir: Path, name: str = SDXL_NAME,
                        v_pred_ztsnr: bool = False) -> Path:
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoints_dir / name
    shutil.copyfile(_tiny_sdxl_checkpoint(v_pred_ztsnr), target)
    return target


def handlers(blocks, elem_id: str, event: str) -> list[tuple]:
    """(function, output elem_ids) of each event wired to a component, read from the built
    Blocks (gradio 3.41 keeps its functions in a list, 4.x in a dict by dependency id)."""
    config = blocks.get_config_file()
    elem_of = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    target = next(i for i, e in elem_of.items() if e == elem_id)
    found = []
    for index, dep in enumerate(config["dependencies"]):
        for t in dep["targets"]:
            block, trigger = (t[0], t[1]) if isinstance(t, (list, tuple)) else (t, dep.get("trigger"))
            if block == target and trigger == event:
                fn = blocks.fns[dep["id"]] if isinstance(blocks.fns, dict) else blocks.fns[index]
                found.append((fn.fn, [elem_of.get(o) for o in dep["outputs"]]))
    return found
