"""A LoRA extracted from a full fine-tune: the trained model minus its base, layer by layer, cut
to a low rank by SVD (what kohya's ``extract_lora_from_models.py`` does).

For every layer an adapter would train (``targets.target_modules``: attention, optionally the
feed-forward and projections, and with a conv rank the ResNet blocks) whose weight differs, the
difference ``ΔW = W_trained - W_base`` (fp32; a convolution flattened to ``(out, in*k*k)``) is
decomposed as ``U S Vh`` and the top ``r`` kept: ``lora_up = U[:, :r] * S[:r]``,
``lora_down = Vh[:r]`` and ``alpha = r``, so the WebUI's scale ``alpha / dim`` is 1 and
``up @ down`` is the best rank-``r`` approximation of ``ΔW`` (Eckart–Young). 3x3 convolutions get
the conv rank; linears and 1x1 convolutions the rank. How much of the difference the rank keeps is
reported per component as the share of its squared Frobenius norm (``ΣS[:r]² / ΣS²``), overall
and for the worst layer; what a LoRA cannot carry (biases, norms, embeddings, layers outside the
chosen set) is counted, not extracted. Layers that do not differ get no keys, with one exception:
the WebUI runs an OpenCLIP text encoder's attention (SD2's, SDXL's second) as one fused module
and applies a LoRA there only when q, k, v and out are all in the file, so an unchanged member of
an attention whose other projections changed is written as a zero layer.

When either file stores its weights in half precision, both weights are rounded to the coarser of
the two precisions before they are compared and subtracted: a fine-tune exported in fp16 from an
fp32 base differs from it everywhere by rounding alone, and that noise is not the training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from dreambooth.models.adapters import targets
from dreambooth.models.checkpoint import CheckpointError

if TYPE_CHECKING:
    from dreambooth.models.detect import ModelKind

LAYER_CHOICES = ("attention", "attention_mlp")


class ModelMismatchError(CheckpointError):
    """The two models are not one architecture (family or layer shapes differ)."""


@dataclasses.dataclass(frozen=True)
class ComponentReport:
    """How well the rank fits one component's difference."""

    component: str  # "unet", "text_encoder", "text_encoder_2"
    prefix: str  # its kohya prefix
    layers: int  # target layers written: those that differ, and ``completed``
    unchanged: int  # target layers equal in both models (skipped, no keys)
    kept: float  # share of the component's squared difference the kept ranks hold (0..1)
    worst_layer: str  # kohya name of the layer the rank fits worst ("" when none differs)
    worst_kept: float
    other_changed: int  # tensors outside the target layers that differ: not in the LoRA
    completed: int = 0  # unchanged q/k/v/out written as zero layers (fused attention, see below)

    def line(self) -> str:
        if not self.layers:
            text = f"{self.component}: no target layer differs ({self.unchanged} unchanged)"
        else:
            differ = self.layers - self.completed
            text = (f"{self.component}: {differ} layer{'s differ' if differ != 1 else ' differs'}"
                    f", the rank keeps {_percent(self.kept)} of the difference (worst: {self.worst_layer} "
                    f"{_percent(self.worst_kept)})")
            if self.unchanged:
                text += f"; {self.unchanged} unchanged layers skipped"
            if self.completed:
                text += (f"; {self.completed} unchanged attention projections written as zero "
                         "layers (the WebUI applies a fused attention's q/k/v/out only together)")
        if self.other_changed:
            text += (f"; {self.other_changed} other changed tensors (biases, norms, embeddings "
                     "or layers outside the chosen set) are not in the LoRA")
        return text


@dataclasses.dataclass(frozen=True)
class ExtractReport:
    rank: int  # as asked
    conv_rank: int
    layers: str
    components: dict[str, ComponentReport]
    rank_used: int = 0  # the largest rank stored: each layer's is the rank cut to its size
    conv_rank_used: int = 0  # the same for the 3x3 convolutions (0: none written)

    def capped(self) -> list[str]:
        """A line for a rank larger than every layer it applies to: the file holds less."""
        asked = (("rank", self.rank, self.rank_used, "layer"),
                 ("conv rank", self.conv_rank, self.conv_rank_used, "3x3 convolution"))
        return [f"{name} {want} is more than any {what} holds: capped to {used}, the file's "
                f"{'conv ' if name != 'rank' else ''}dim and alpha (each layer keeps all of its "
                "difference)" for name, want, used, what in asked if 0 < used < want]

    @property
    def kept(self) -> float:
        """The smallest per-component share (the figure to look at first)."""
        fitted = [c.kept for c in self.components.values() if c.layers]
        return min(fitted) if fitted else 1.0

    def lines(self) -> list[str]:
        return self.capped() + [c.line() for c in self.components.values()]

    def as_dict(self) -> dict:
        return {"rank": self.rank, "conv_rank": self.conv_rank, "layers": self.layers,
                "rank_used": self.rank_used, "conv_rank_used": self.conv_rank_used,
                "components": {k: dataclasses.asdict(v) for k, v in self.components.items()}}


def _percent(share: float) -> str:
    return f"{100 * share:.2f}%" if share < 0.9999 else f"{100 * share:.4g}%"


def check_options(rank: int, conv_rank: int, layers: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"rank must be a whole number of at least 1, not {rank!r}")
    if isinstance(conv_rank, bool) or not isinstance(conv_rank, int) or conv_rank < 0:
        raise CheckpointError(f"conv rank must be a whole number of at least 0, not {conv_rank!r}")
    if layers not in LAYER_CHOICES:
        raise CheckpointError(f"layers must be one of {LAYER_CHOICES}, not {layers!r}")


def _structure(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_same_architecture(trained: list[tuple[str, torch.nn.Module]],
                            base: list[tuple[str, torch.nn.Module]]) -> None:
    """ModelMismatchError naming the first component and tensor that differ in shape."""
    if [n for n, _ in trained] != [n for n, _ in base]:
        raise ModelMismatchError(f"the models have other components ({', '.join(n for n, _ in trained)}"
                                 f" / {', '.join(n for n, _ in base)})")
    for (name, a), (_, b) in zip(trained, base):
        left, right = _structure(a), _structure(b)
        for key in sorted(set(left) | set(right)):
            if left.get(key) != right.get(key):
                shown = lambda s: "missing" if s is None else str(tuple(s))  # noqa: E731
                raise ModelMismatchError(
                    f"{name} {key} is {shown(left.get(key))} in the trained model and "
                    f"{shown(right.get(key))} in the base")


def _rounded(weight: torch.Tensor, precision: torch.dtype | None) -> torch.Tensor:
    if precision is not None and precision != torch.float32:
        weight = weight.detach().to(precision)
    return weight.detach().float()


def _svd(diff: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of a 2-D fp32 matrix (on ``device``; the results on the CPU)."""
    matrix = diff.to(device) if device is not None else diff
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u.cpu(), s.cpu(), vh.cpu()


def extract_layer(diff: torch.Tensor, rank: int, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """(lora_up, lora_down, r, kept energy, total energy) of one weight difference (fp32): a
    Linear's (out, in) or a Conv2d's (out, in, k, k); ``r`` is ``rank`` cut to the layer's size."""
    out_features = diff.shape[0]
    matrix = diff.reshape(out_features, -1)
    r = min(rank, *matrix.shape)
    u, s, vh = _svd(matrix, device)
    energy = s.double().square()
    total = float(energy.sum())
    kept = float(energy[:r].sum())
    up = (u[:, :r] * s[:r]).contiguous()
    down = vh[:r].clone()  # a copy: the slice would keep all of Vh alive
    if diff.dim() == 4:
        up = up.reshape(out_features, r, 1, 1)
        down = down.reshape(r, *diff.shape[1:])
    return up, down, r, kept, total


def stored_ranks(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(largest rank of the linears and 1x1 convolutions, of the 3x3 convolutions) in a LoRA's
    tensors: what kohya's tools read as the file's dim and conv dim."""
    linear = conv = 0
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
                conv = max(conv, down.shape[0])
            else:
                linear = max(linear, down.shape[0])
    return linear, conv


_FUSED = re.compile(r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj|out_proj)$")


def _complete_fused_attention(model: torch.nn.Module, differs: dict[str, bool]) -> set[str]:
    """OpenCLIP text encoders (SD2's, SDXL's second) run attention as one fused
    ``MultiheadAttention`` in the WebUI, which applies a LoRA there only when the file has all
    four of ``q/k/v/out_proj``: where one of an attention's projections differs, the unchanged
    others are written too (as zero layers). The paths so added."""
    if getattr(getattr(model, "config", None), "hidden_act", "quick_gelu") != "gelu":
        return set()
    groups: dict[str, list[str]] = {}
    for path in differs:
        match = _FUSED.match(path)
        if match:
            groups.setdefault(match.group(1), []).append(path)
    return {path for members in groups.values() if any(differs[p] for p in members)
            for path in members if not differs[path]}


def extract_lora(trained_components, base_components, family, rank: int, conv_rank: int = 0,
                 layers: str = "attention_mlp", *, precision: torch.dtype | None = None,
                 device=None, log: Callable[[str], None] | None = None
                 ) -> tuple[dict[str, torch.Tensor], ExtractReport]:
    """The LoRA tensors (kohya keys) of ``trained - base`` and how well the ranks fit.

    ``family``: the models' family (``dreambooth.models.families``); ``conv_rank`` > 0 adds the ResNet
    convolutions (3x3 at ``conv_rank``, 1x1 and linears at ``rank``); ``precision``: compare and
    subtract the weights rounded to this dtype (None: as they are); ``device``: where the SVDs
    run (None: the CPU). Raises ModelMismatchError when the models are not one architecture."""
    from dreambooth.models.families import of_components

    check_options(rank, conv_rank, layers)
    if of_components(trained_components).name != of_components(base_components).name:
        raise ModelMismatchError(f"the trained model is {of_components(trained_components).title} "
                                 f"and the base {of_components(base_components).title}")
    trained = [("unet", trained_components.unet)] + family.encoder_modules(trained_components)
    base = [("unet", base_components.unet)] + family.encoder_modules(base_components)
    check_same_architecture(trained, base)
    names = targets.prefixes([name for name, _ in trained[1:]])
    tensors: dict[str, torch.Tensor] = {}
    reports: dict[str, ComponentReport] = {}
    for (component, model), (_, base_model) in zip(trained, base):
        started = time.time()
        prefix = names[component]
        paths = targets.target_modules(model, component, layers, convs=conv_rank > 0)
        if log is not None:
            log(f"{component}: comparing {len(paths)} target layers")
        differs = {path: not torch.equal(
            _rounded(model.get_submodule(path).weight, precision),
            _rounded(base_model.get_submodule(path).weight, precision)) for path in paths}
        completed = _complete_fused_attention(model, differs) if component != "unet" else set()
        kept_sum = total_sum = 0.0
        worst, worst_kept, written, unchanged = "", 1.0, 0, 0
        for path in paths:
            if not differs[path] and path not in completed:
                unchanged += 1
                continue
            layer, base_layer = model.get_submodule(path), base_model.get_submodule(path)
            new, old = _rounded(layer.weight, precision), _rounded(base_layer.weight, precision)
            is_3x3 = layer.weight.dim() == 4 and tuple(layer.weight.shape[2:]) != (1, 1)
            up, down, r, kept, total = extract_layer(new - old, conv_rank if is_3x3 else rank,
                                                     device)
            key = targets.kohya_name(prefix, path)
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.alpha"] = torch.tensor(float(r))
            written += 1
            if total <= 0:  # a zero layer that completes a fused attention
                continue
            share = kept / total
            if share < worst_kept or not worst:
                worst, worst_kept = key, share
            kept_sum, total_sum = kept_sum + kept, total_sum + total
        carried = {f"{path}.weight" for path in paths}
        new_state, old_state = model.state_dict(), base_model.state_dict()
        other = sum(1 for key, value in new_state.items()
                    if key not in carried and value.is_floating_point()
                    and not torch.equal(_rounded(value, precision),
                                        _rounded(old_state[key], precision)))
        reports[component] = ComponentReport(
            component=component, prefix=prefix, layers=written, unchanged=unchanged,
            kept=min(1.0, kept_sum / total_sum) if total_sum > 0 else 1.0,
            worst_layer=worst, worst_kept=min(1.0, worst_kept), other_changed=other,
            completed=len(completed))
        if log is not None:
            log(f"{component}: {written} layers extracted in {time.time() - started:.1f} s")
    used, conv_used = stored_ranks(tensors)
    return tensors, ExtractReport(rank=rank, conv_rank=conv_rank, layers=layers,
                                  components=reports, rank_used=used, conv_rank_used=conv_used)


# --------------------------------------------------------------------------------------------
# Files

_PRECISION = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float32}
# how many mantissa bits each keeps: the coarser of two is the one both are compared at
_MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _header_dtype(path: Path, prefixes: tuple[str, ...] = ()) -> torch.dtype | None:
    """The dtype most of a .safetensors file's weights (under ``prefixes``) are stored in."""
    try:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    except (OSError, ValueError):
        return None
    sizes: dict[str, int] = {}
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict) or not key.startswith(prefixes):
            continue
        offsets = entry.get("data_offsets") or (0, 0)
        sizes[entry.get("dtype", "")] = sizes.get(entry.get("dtype", ""), 0) + offsets[1] - offsets[0]
    stored = max(sizes, key=sizes.get) if sizes else None
    return _PRECISION.get(stored)


def stored_precision(path: str | os.PathLike) -> torch.dtype | None:
    """The precision a model's UNet weights are stored in: from a .safetensors header or a
    diffusers folder's ``unet/*.safetensors``; None when it cannot be told (a .ckpt)."""
    path = Path(path)
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors"))
        return _header_dtype(files[0]) if files else None
    if path.suffix.lower() != ".safetensors":
        return None
    return _header_dtype(path, ("model.diffusion_model.",)) or _header_dtype(path)


def comparison_precision(*paths: str | os.PathLike) -> torch.dtype | None:
    """The coarsest precision among the files (None: all fp32 or unknown, compare exactly)."""
    found = [p for p in (stored_precision(path) for path in paths) if p is not None]
    coarsest = min(found, key=_MANTISSA.get) if found else None
    return None if coarsest in (None, torch.float32) else coarsest


def _load(path: Path, what: str, log: Callable[[str], None]):
    from dreambooth.models import checkpoint
    from dreambooth.models.families import for_kind

    log(f"loading the {what} model {path.name}")
    components, kind = checkpoint.load_components(path)
    components.vae = None  # not part of a LoRA; frees its memory early
    return components, kind, for_kind(kind.kind)


def _default_device():
    return "cuda" if torch.cuda.is_available() else None


def extract_lora_file(trained_path: str | os.PathLike, base_path: str | os.PathLike,
                      out: str | os.PathLike, *, rank: int, conv_rank: int = 0,
                      layers: str = "attention_mlp", dtype: str = "fp16", overwrite: bool = False,
                      log: Callable[[str], None] = print, device: str | None = "auto"
                      ) -> tuple[Path, ExtractReport]:
    """Extract ``trained - base`` into the LoRA file ``out`` (single files or diffusers folders).

    CheckpointError (a ValueError) for what the caller can fix: unreadable models, models of
    other families or shapes (one line naming both files), no layer that differs, a bad option;
    OutputExistsError when ``out`` exists and ``overwrite`` is off; WriteError when the file
    cannot be written. ``device``: where the SVDs run ("auto": the GPU when there is one)."""
    from dreambooth.common.files import write_error
    from dreambooth.models.adapters import file as lora_file

    trained_path, base_path, out = Path(trained_path), Path(base_path), Path(out)
    check_options(rank, conv_rank, layers)
    if dtype not in lora_file.EXPORT_DTYPES:
        raise CheckpointError(f"dtype must be one of {tuple(lora_file.EXPORT_DTYPES)}, not {dtype!r}")
    if out.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{out}: a LoRA file must end in .safetensors")
    check_target(out, overwrite)  # before minutes of work; the writer checks again
    device = _default_device() if device == "auto" else device
    started = time.time()
    trained, trained_kind, family = _load(trained_path, "trained", log)
    base, _, base_family = _load(base_path, "base", log)
    pair = f"{trained_path.name} minus {base_path.name}"
    if family.name != base_family.name:
        raise ModelMismatchError(
            f"cannot extract a LoRA from {pair}: {trained_path.name} is {family.title} and "
            f"{base_path.name} is {base_family.title} (both must be one family)")
    precision = comparison_precision(trained_path, base_path)
    log(f"extracting rank {rank}" + (f", conv rank {conv_rank}" if conv_rank else "") +
        f" ({layers}) on {device or 'cpu'}" +
        (f", weights compared at {str(precision).replace('torch.', '')}" if precision else ""))
    try:
        tensors, report = extract_lora(trained, base, family, rank, conv_rank, layers,
                                       precision=precision, device=device, log=log)
    except ModelMismatchError as exc:
        raise ModelMismatchError(f"cannot extract a LoRA from {pair}: they are not the same "
                                 f"architecture ({exc})") from exc
    del trained, base
    if not tensors:
        raise CheckpointError(f"{trained_path.name} and {base_path.name} have the same weights in "
                              f"every {layers} layer" + (" and convolution" if conv_rank else "") +
                              ": there is nothing to extract")
    metadata = _metadata(trained_path, base_path, out, trained_kind, report, dtype)
    try:
        result = lora_file.write_lora(out, tensors, metadata, dtype=dtype, overwrite=overwrite)
    except OSError as exc:  # raised before the writer's own guard (e.g. a disk gone read-only)
        raise write_error(out, exc) from exc
    log(f"extracted {sum(c.layers for c in report.components.values())} layers in "
        f"{time.time() - started:.1f} s")
    return result, report


def check_target(out: Path, overwrite: bool) -> None:
    """OutputExistsError when ``out`` exists (without ``overwrite``); WriteError, naming the file,
    when its folder cannot take a file: a read-only disk or folder, a file where a folder should
    be, a name too long. An existing folder is tried with an empty file (removed at once, and
    named like the writer's temporaries, which files.sweep clears); a missing one is made by
    the writer."""
    from dreambooth.common.files import OutputExistsError, WriteError, temp_path, write_error

    try:
        if out.exists() and not overwrite:
            raise OutputExistsError(out)
        folder = out.parent
        while not folder.exists() and folder != folder.parent:  # up to one that exists
            folder = folder.parent
        if not folder.is_dir():
            raise WriteError(out, f"{folder} is a file, not a folder")
        if folder == out.parent:
            probe = temp_path(out)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
            os.unlink(probe)
    except OSError as exc:  # stat too fails on a name too long, or a folder not searchable
        raise write_error(out, exc) from exc


def _metadata(trained_path: Path, base_path: Path, out: Path, kind: "ModelKind",
              report: ExtractReport, dtype: str) -> dict[str, str]:
    """The file's metadata: the ranks it really holds as dim and alpha (alpha = dim: each layer's
    own .alpha is its rank, so every layer applies at scale 1)."""
    from dreambooth.models.adapters import file as lora_file
    from dreambooth.models.checkpoint import RESOLUTIONS
    from dreambooth.models.export import build_metadata

    rank, conv_rank = report.rank_used or report.rank, report.conv_rank_used or report.conv_rank
    source = {"trained": trained_path.name, "base": base_path.name, "rank": report.rank,
              "conv_rank": report.conv_rank, "layers": report.layers,
              "kept": {name: round(c.kept, 6) for name, c in report.components.items() if c.layers}}
    metadata = build_metadata(kind, out, base=base_path if base_path.is_file() else None,
                              dtype=dtype, trained=tuple(c.component for c in
                                                         report.components.values() if c.layers))
    metadata.update(lora_file.lora_metadata(
        kind=kind.kind, method="locon" if report.conv_rank else "lora", rank=rank, alpha=rank,
        conv_rank=conv_rank, conv_alpha=conv_rank, dora=False, title=out.stem,
        resolution=RESOLUTIONS[kind.kind],
        extra={"ss_training_comment": f"extracted from {trained_path.name} minus {base_path.name}",
               "dreambooth.extracted_from": source}))
    return metadata
