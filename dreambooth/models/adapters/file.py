"""LoRA files as the WebUI's built-in Lora extension, kohya's sd-scripts and diffusers read them.

One ``.safetensors`` file: per wrapped layer ``<kohya name>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` (``.dora_scale`` with DoRA; ``hada_w1_a…`` for LoHa,
``lokr_w1…`` for LoKr), and string metadata: kohya's ``ss_*`` keys (network module, dim, alpha,
base model version, tag frequency…) and ``modelspec.*``. Written through the one atomic-write
helper, read back before it is moved into place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from dreambooth.models.checkpoint import ARCHITECTURES, CheckpointError

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# modelspec.architecture of a LoRA is the base's (checkpoint.ARCHITECTURES) with "/lora"


def write_lora(out: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str], *, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Write the adapter file; ``alpha`` scalars stay fp32 (their value is the scale)."""
    from safetensors.torch import save_file

    from dreambooth.common.files import atomic_path

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{out}: a LoRA file must end in .safetensors")
    target = EXPORT_DTYPES[dtype]
    state = {key: (value.detach().float() if key.endswith(".alpha") else
                   value.detach().to(target)).contiguous().cpu()
             for key, value in tensors.items()}
    if not state:
        raise CheckpointError(f"{out.name}: the adapter has no layers (nothing to write)")
    needed = sum(t.numel() * t.element_size() for t in state.values()) + (1 << 20)
    text = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(out, overwrite=overwrite, needed_bytes=needed) as tmp:
        save_file(state, str(tmp), metadata=text)
        _check(tmp, state)
    return out


def _check(path: Path, written: Mapping[str, torch.Tensor]) -> None:
    """The file reads back with every tensor's key, shape and dtype (else CheckpointError)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(written):
            raise CheckpointError(f"{path.name}: the written file lost tensors")
        for key, value in written.items():
            back = handle.get_slice(key)
            if tuple(back.get_shape()) != tuple(value.shape):
                raise CheckpointError(f"{path.name}: {key} reads back with another shape")


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a LoRA file (safetensors only: nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors LoRA files are read")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def network_module(method: str, dora: bool, kind: str = "sd1") -> str:
    """``ss_network_module`` as the trainers that write these files say it (kohya's Flux LoRA:
    networks.lora_flux, whose fused names Flux files carry whatever the method)."""
    if kind.startswith("flux"):
        return "networks.lora_flux"
    return "networks.lora" if method == "lora" and not dora else "lycoris.kohya"


def lora_metadata(*, kind: str, method: str, rank: int, alpha: float, conv_rank: int,
                  conv_alpha: float, dora: bool, title: str, resolution: int,
                  tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
                  extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The keys the WebUI's Lora cards, Civitai and model managers read."""
    import datetime as _dt

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    args = {"algo": method, "conv_dim": conv_rank, "conv_alpha": conv_alpha}
    if dora:
        args["dora_wd"] = True
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[kind] + "/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.date": now,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "ss_output_name": title,
        "ss_network_module": network_module(method, dora, kind),
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha or rank),
        "ss_network_args": json.dumps(args),
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        "dreambooth.training_method": method,
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
