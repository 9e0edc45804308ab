"""Tiny single-file checkpoints of every supported kind, built once per test session."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


from dreambooth.models import export as ex  # noqa: E402
from dreambooth.models import tiny  # noqa: E402

torch.set_num_threads(1)  # the suite shares two cores; one thread each wastes least

KINDS = ("sd1", "sd2", "sd2-v", "sdxl")


@functools.lru_cache(maxsize=None)
def _components(kind: str) -> tiny.Components:
    if kind == "sd1":
        return tiny.build_components("tiny", seed=0)
    return tiny.build_variant(kind, seed=0)


def components(kind: str) -> tiny.Components:
    """Fresh copies of the models (tests change weights in place); tokenizers are shared, as
    deep-copying a 49,408-token vocabulary is slow and no test changes them."""
    built = _components(kind)
    models = {name: copy.deepcopy(getattr(built, name))
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return dataclasses.replace(built, **models)


def make_base(folder: Path, kind: str, name: str | None = None, dtype: str = "fp32") -> Path:
    """The "user's base checkpoint": a tiny model saved in the WebUI's single-file layout."""
    path = Path(folder) / (name or f"{kind}-base.safetensors")
    return ex.save_single_file(_components(kind), path, kind=kind, dtype=dtype)


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.01) -> None:
    """Stand-in for training: change every floating-point weight a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())
