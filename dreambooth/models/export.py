"""Writing trained models as single-file checkpoints (the WebUI's LDM layout).

There is no library function for this in diffusers, so the export inverts diffusers' own
LDM -> diffusers conversion exactly: the conversion is run on a stand-in of the *base* checkpoint's
state dict (uninitialised tensors of the right shapes: no RAM is touched for them) and every
converted tensor is traced back to the base tensor it came from (a strided view of it, or, where
diffusers copies - OpenCLIP's q/k/v split, the transposed ``text_projection`` - by running the
conversion once more on index-tagged tensors). The output is then written tensor by tensor: each
base tensor is read lazily, the trained elements are written into it, and it goes to the file
(see :mod:`dreambooth.safetensors_stream`), so the export needs about one tensor of extra RAM, not
a copy of the whole model. A self-check reloads the written file through diffusers' conversion
before it is renamed into place.

Also here: new single files from components (a diffusers folder as the base), diffusers folders,
and ``python -m dreambooth convert``.
"""
from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Mapping

import torch

from dreambooth.common.memory import TrimEvery
from dreambooth.models.checkpoint import (ARCHITECTURES, DTYPES, IMPLEMENTATIONS, KINDS,
                                          RESOLUTIONS, SINGLE_FILE_SUFFIXES, TEXT_PREFIXES,
                                          UNET_PREFIX, V2_V_YAML, VAE_PREFIX, WEIGHT_PREFIXES,
                                          CheckpointError, ModelKind, _require_file, _with_kind,
                                          derive_configs, file_hash, kind_from_shapes,
                                          load_components, normalize_text_keys, read_shapes,
                                          read_state_dict, read_subset)
from dreambooth.models.components import Components
from dreambooth.models.detect import read_metadata, read_safetensors_header
from dreambooth.models.ldm_keys import components_to_ldm, schedule_buffers
from dreambooth.models.schedules import prediction_of

# --------------------------------------------------------------------------------------------
# Tracing diffusers' conversion back to the LDM keys


@dataclass(frozen=True)
class Slot:
    """Where one diffusers tensor lives in the LDM state dict: a strided view, or flat indices."""

    key: str
    size: tuple[int, ...]
    stride: tuple[int, ...] = ()
    offset: int = 0
    index: torch.Tensor | None = None

    def write(self, state: dict[str, torch.Tensor], value: torch.Tensor) -> None:
        target = state[self.key]
        if self.index is None:
            target.as_strided(self.size, self.stride, self.offset).copy_(value)
        else:
            target.view(-1)[self.index] = value.reshape(-1).to(target.dtype)

    def read(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        target = state[self.key]
        if self.index is None:
            return target.as_strided(self.size, self.stride, self.offset)
        return target.reshape(-1)[self.index].reshape(self.size)


def _converter(name: str, kind: ModelKind, configs: dict[str, dict]
               ) -> tuple[Callable[[Mapping], dict], tuple[str, ...]]:
    """diffusers' LDM -> diffusers conversion of one component, and the LDM prefixes it reads."""
    from diffusers.loaders import single_file_utils as sfu

    family = kind.family
    if name == "unet":
        return (lambda sd: sfu.convert_ldm_unet_checkpoint(sd, configs["unet"])), (UNET_PREFIX,)
    if name == "vae":
        return (lambda sd: sfu.convert_ldm_vae_checkpoint(sd, configs["vae"])), (VAE_PREFIX,)
    prefix = TEXT_PREFIXES[(family, name)]
    if prefix.endswith(".transformer."):
        return (lambda sd: sfu.convert_ldm_clip_checkpoint(sd)), (prefix,)
    stub = SimpleNamespace(config=SimpleNamespace(projection_dim=configs[name]["hidden_size"]))
    return (lambda sd: sfu.convert_open_clip_checkpoint(stub, sd, prefix=prefix)), (prefix,)


def trace_slots(state: dict[str, torch.Tensor], convert: Callable[[Mapping], dict],
                prefixes: tuple[str, ...]) -> dict[str, Slot]:
    """For each tensor diffusers' conversion makes from `state`, the LDM elements it holds."""
    converted = convert(state)
    owners = {t.untyped_storage().data_ptr(): k for k, t in state.items()}
    slots: dict[str, Slot] = {}
    copied = []
    for dkey, tensor in converted.items():
        owner = owners.get(tensor.untyped_storage().data_ptr())
        if owner is not None and tensor.dtype == state[owner].dtype:
            slots[dkey] = Slot(owner, tuple(tensor.shape), tuple(tensor.stride()),
                               tensor.storage_offset())
        else:
            copied.append(dkey)
    if copied:  # diffusers copied these: find their elements with index-tagged inputs
        used = {s.key for s in slots.values()}
        candidates = [k for k in state if k.startswith(prefixes) and k not in used
                      and state[k].is_floating_point()]
        starts, tagged, start = [], dict(state), 0
        for key in candidates:
            starts.append(start)
            tagged[key] = torch.arange(start, start + state[key].numel(),
                                       dtype=torch.float64).reshape(state[key].shape)
            start += state[key].numel()
        retagged = convert(tagged)
        for dkey in copied:
            values = retagged[dkey].to(torch.float64).reshape(-1)
            pos = bisect.bisect_right(starts, float(values.min())) - 1 if values.numel() else -1
            key = candidates[pos] if pos >= 0 else None
            index = values.long() - starts[pos] if key is not None else None
            if key is None or index.max() >= state[key].numel() or index.min() < 0 \
                    or not torch.equal(values, values.round()):
                raise CheckpointError(f"cannot trace {dkey} back to the checkpoint layout")
            slots[dkey] = Slot(key, tuple(retagged[dkey].shape), index=index)
    return slots


def _trained_state(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return normalize_text_keys(state) if name.startswith("text_encoder") else state


def check_mapping(slots: Mapping[str, Slot], trained: Mapping[str, torch.Tensor], name: str) -> None:
    """Every trained tensor has its place in the base layout, and every place a trained tensor."""
    unmapped = [k for k in trained if k not in slots and not k.endswith("position_ids")]
    missing = [k for k in slots if k not in trained and not k.endswith("position_ids")]
    wrong = [k for k in trained if k in slots and tuple(trained[k].shape) != slots[k].size]
    if unmapped or missing or wrong:
        raise CheckpointError(
            f"the trained {name} does not match the base checkpoint: unmapped {unmapped[:5]}, "
            f"missing {missing[:5]}, wrong shapes {wrong[:5]}")


def slots_by_file_key(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      kind: ModelKind, configs: dict[str, dict], components: Components,
                      names: Iterable[str]) -> dict[str, list[tuple[str, Slot, torch.Tensor]]]:
    """For each key of the file, the trained tensors that go into it (named ``component.key``)
    and where.

    diffusers' conversion runs on uninitialised stand-ins of the file's tensors (``torch.empty``
    pages are never touched, so they cost address space, not RAM)."""
    stand_in = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in layout.items()}
    placed: dict[str, list[tuple[str, Slot, torch.Tensor]]] = {}
    for name in names:
        convert, prefixes = _converter(name, kind, configs)
        slots = trace_slots(stand_in, convert, prefixes)
        trained = _trained_state(name, getattr(components, name))
        check_mapping(slots, trained, name)
        for dkey, slot in slots.items():
            if dkey in trained:
                placed.setdefault(slot.key, []).append((f"{name}.{dkey}", slot, trained[dkey]))
    return placed


# --------------------------------------------------------------------------------------------
# Writing


def _check_output(out: Path, base: Path | None, overwrite: bool) -> str:
    fmt = out.suffix.lower()
    if fmt not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{out}: the output must end in .safetensors or .ckpt")
    if base is not None and out.resolve() == base.resolve():
        raise CheckpointError(f"{out} is the base checkpoint itself; the base is never overwritten")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another name or allow overwriting")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder")
    parent = out.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {out.name}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out.name}: the folder {parent} is not writable")
    return fmt


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # key -> (shape, dtype), in file order


class LazyBase:
    """A base checkpoint read one tensor at a time: a .safetensors file through ``safe_open``
    (only the tensor asked for is read), a .ckpt loaded whole (a pickle cannot be read in parts)."""

    def __init__(self, path: Path, fmt: str | None = None):
        self.path, self.fmt = path, (fmt or path.suffix).lower()
        self._handle = None
        self._state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> "LazyBase":
        if self.fmt == ".safetensors":
            from safetensors import safe_open

            self._context = safe_open(str(self.path), framework="pt")
            self._handle = self._context.__enter__()
            header = read_safetensors_header(self.path)
            self.layout: Layout = {
                k: (tuple(v["shape"]), TORCH_DTYPES[v["dtype"]])
                for k, v in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                   key=lambda item: item[1]["data_offsets"][0])}
        else:
            self._state = read_state_dict(self.path, self.fmt)
            self.layout = {k: (tuple(v.shape), v.dtype) for k, v in self._state.items()}
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._context.__exit__(*exc)
            self._handle = None
        self._state = None

    def get(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        return self._handle.get_tensor(key)


def write_tensors(tmp: Path, fmt: str, layout: Layout,
                  tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (in ``layout`` order) to ``tmp``.

    safetensors' own ``save_file`` turns every tensor into bytes first (a second copy of the
    whole model in RAM); the format is a little-endian length, a JSON header with each tensor's
    dtype, shape and byte range, then the raw bytes in that order - so it is written here one
    tensor at a time, and read back by the safetensors library in the self-check. A .ckpt needs
    the whole dict in memory (torch.save)."""
    if fmt != ".safetensors":
        torch.save({"state_dict": dict(tensors), "dreambooth_metadata": metadata}, str(tmp))
        return
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (shape, dtype) in layout.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    expected = iter(layout.items())
    trim = TrimEvery()
    with open(tmp, "wb") as file:
        file.write(len(raw).to_bytes(8, "little"))
        file.write(raw)
        for key, tensor in tensors:
            want, (shape, dtype) = next(expected)
            if key != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise CheckpointError(f"internal error writing {tmp.name}: {key} "
                                      f"{tuple(tensor.shape)} {tensor.dtype} where the header "
                                      f"has {want} {shape} {dtype}")
            file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            trim.add(tensor.numel() * tensor.element_size())
            del tensor
        if next(expected, None) is not None:
            raise CheckpointError(f"internal error writing {tmp.name}: tensors missing")


def _atomic_write(out: Path, fmt: str, layout: Layout, tensors: Iterable[tuple[str, torch.Tensor]],
                  metadata: dict[str, str], check: Callable[[Path, str], None],
                  overwrite: bool) -> Path:
    """Write through the atomic-write helper (a hidden temporary beside ``out``), check the
    written file, then rename it into place; a failure removes the temporary (WriteError for a
    full disk or an unwritable folder)."""
    from dreambooth.common.files import atomic_path

    needed = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values()) + (1 << 20)
    with atomic_path(out, overwrite=overwrite, needed_bytes=needed) as tmp:
        write_tensors(tmp, fmt, layout, tensors, metadata)
        check(tmp, fmt)
    return out


def _write_text_atomic(path: Path, text: str) -> None:
    from dreambooth.common.files import write_text

    write_text(path, text, overwrite=True)


def _companion_yaml(base: Path | None, kind: ModelKind, out: Path) -> None:
    """The WebUI picks a model's config from a .yaml of the same name (needed for SD2 v models)."""
    source = base.with_suffix(".yaml") if base is not None else None
    if source is not None and source.is_file():
        _write_text_atomic(out.with_suffix(".yaml"), source.read_text(encoding="utf-8"))
    elif kind.kind == "sd2-v":
        _write_text_atomic(out.with_suffix(".yaml"), V2_V_YAML.read_text(encoding="utf-8"))


# ss_base_model_version as kohya's sd-scripts write it
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2", "sdxl": "sdxl_base_v1-0",
                       "flux-dev": "flux1", "flux-schnell": "flux1"}


def build_metadata(kind: ModelKind, out: Path, *, base: Path | None = None, dtype: str = "fp16",
                   trained: Iterable[str] = (), extra: Mapping | None = None,
                   base_hash: Mapping[str, str] | None = None) -> dict[str, str]:
    """safetensors metadata (strings only): modelspec.* for the WebUI, dreambooth.* for us."""
    extra = dict(extra or {})
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    resolution = extra.get("resolution", RESOLUTIONS[kind.kind])
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[kind.kind],
        "modelspec.implementation": IMPLEMENTATIONS[kind.kind],
        "modelspec.title": str(extra.pop("title", out.stem)),
        "modelspec.date": now,
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "flow"}.get(
            kind.prediction_type, "epsilon"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "dreambooth.model_kind": kind.kind,
        "dreambooth.prediction_type": kind.prediction_type,
        "dreambooth.dtype": dtype,
        "dreambooth.date": now,
    }
    if trained:
        meta["dreambooth.trained"] = ",".join(trained)
    if base is not None:
        hashes = base_hash or file_hash(base)
        meta.update({"dreambooth.base_model": base.name, "dreambooth.base_hash": hashes["short"],
                     "dreambooth.base_sha256": hashes["sha256"]})
    concepts = extra.get("concepts")
    if concepts and "modelspec.description" not in extra:
        prompts = [c.get("instance_prompt", "") if isinstance(c, Mapping) else str(c)
                   for c in concepts]
        meta["modelspec.description"] = "DreamBooth: " + "; ".join(p for p in prompts if p)
    if base is not None:
        meta["ss_sd_model_name"] = base.name
        meta["ss_new_sd_model_hash"] = meta["dreambooth.base_sha256"]
    meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[kind.kind]
    meta["ss_v2"] = str(kind.family == "sd2")
    meta["ss_v_parameterization"] = str(kind.prediction_type == "v_prediction")
    if kind.zero_terminal_snr:  # what kohya writes; detect.py reads it back
        meta["ss_zero_terminal_snr"] = "True"
    for key, value in extra.items():
        name = key if "." in key or key.startswith("ss_") else f"dreambooth.{key}"
        meta[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def _compare(converted: Mapping[str, torch.Tensor], model: torch.nn.Module, name: str,
             dtype: torch.dtype) -> list[str]:
    """Keys whose value as diffusers reads it differs from the trained one cast to `dtype`."""
    wrong = []
    for key, value in _trained_state(name, model).items():
        if key.endswith("position_ids"):
            continue
        expected = value.to(dtype) if value.is_floating_point() else value
        got = converted.get(key)
        if got is None or tuple(got.shape) != tuple(expected.shape) or not torch.equal(
                got.to(expected.dtype), expected):
            wrong.append(f"{name}.{key}")
    return wrong


def _check_layout(shapes: Mapping, base_shapes: Mapping | None, kind: ModelKind, name: str) -> None:
    """Same keys and shapes as the base, and the written file reads as the same kind."""
    if base_shapes is not None:
        missing = sorted(set(base_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(base_shapes))
        reshaped = sorted(k for k in set(shapes) & set(base_shapes) if shapes[k] != base_shapes[k])
        if missing or extra or reshaped:
            raise CheckpointError(f"self-check failed: missing keys {missing[:10]}, extra keys "
                                  f"{extra[:10]}, wrong shapes {reshaped[:10]}")
    again = kind_from_shapes(shapes, name, prediction_type=kind.prediction_type)
    if again.kind != kind.kind:
        raise CheckpointError(f"self-check failed: written file reads as {again.kind}, "
                              f"not {kind.kind}")


def _self_check(path: Path, fmt: str, base_shapes: Mapping | None, kind: ModelKind,
                components: Components, names: Iterable[str], dtype: torch.dtype) -> None:
    """For a new file (no base): the layout, and diffusers' own conversion of the written file
    gives back the trained weights (one component at a time)."""
    shapes = read_shapes(path, fmt)
    _check_layout(shapes, base_shapes, kind, path.name)
    configs = derive_configs(shapes, kind)
    wrong = []
    for name in names:
        # diffusers' own conversion, exactly what its from_single_file loader runs on the file
        convert, prefixes = _converter(name, kind, configs)
        converted = convert(read_subset(path, prefixes, fmt))
        wrong += _compare(converted, getattr(components, name), name, dtype)
        del converted
    if wrong:
        raise CheckpointError(f"self-check failed: {len(wrong)} tensors differ after reloading, "
                              f"e.g. {wrong[:10]}")


def _placed_check(path: Path, fmt: str, layout: Layout, kind: ModelKind,
                  placed: Mapping[str, list[tuple[str, Slot, torch.Tensor]]]) -> None:
    """For an export into a base's layout: the layout, and every trained tensor is in the file
    where diffusers' conversion reads it, read back through safetensors one tensor at a time
    (the least memory: no second copy of the model)."""
    _check_layout(read_shapes(path, fmt), {k: shape for k, (shape, _) in layout.items()}, kind,
                  path.name)
    wrong = []
    trim = TrimEvery()
    with LazyBase(path, fmt) as written:
        for key, entries in placed.items():
            tensor = written.get(key)
            trim.add(tensor.numel() * tensor.element_size())
            for label, slot, value in entries:
                got = slot.read({key: tensor})
                expected = value.to(tensor.dtype) if value.is_floating_point() else value
                if tuple(got.shape) != tuple(expected.shape) or not torch.equal(got, expected):
                    wrong.append(label)
            del tensor
    if wrong:
        raise CheckpointError(f"self-check failed: {len(wrong)} tensors differ after reloading, "
                              f"e.g. {wrong[:10]}")


def _export_layout(base_layout: Layout, dtype: torch.dtype) -> Layout:
    """The output's keys in the base's order: model weights at the export dtype, everything
    else (schedule buffers, unknown keys) as it is in the base."""
    return {key: (shape, dtype if key.startswith(WEIGHT_PREFIXES) and tensor_dtype.is_floating_point
                  else tensor_dtype)
            for key, (shape, tensor_dtype) in base_layout.items()}


def _ema_sources(layout: Layout) -> dict[str, str]:
    """EMA key -> the live UNet key whose trained value replaces it (LDM names an EMA copy by the
    live key without "model." and without dots)."""
    sources = {}
    for key in layout:
        if key.startswith(UNET_PREFIX):
            ema = "model_ema." + "".join(key.split(".")[1:])
            if ema in layout and layout[ema][0] == layout[key][0]:
                sources[ema] = key
    return sources


def _names(trained: Iterable[str], kind: ModelKind) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(trained))
    bad = [n for n in names if n not in kind.components]
    if bad:
        raise CheckpointError(f"cannot export {bad}: a {kind.kind} model has {kind.components}")
    return names


def export_checkpoint(base_path: str | os.PathLike, components: Components,
                      out_path: str | os.PathLike, *,
                      trained: Iterable[str] = ("unet", "text_encoder"), dtype: str = "fp16",
                      metadata: Mapping | None = None, overwrite: bool = False,
                      use_ema_base: bool = False, prediction_type: str | None = None,
                      kind: str | None = None) -> Path:
    """Write trained components into the base checkpoint's own layout, as a new file.

    Every key of the base is kept; the tensors of the `trained` components are replaced. Model
    weights are cast to `dtype`, other keys (schedule buffers, unknown keys) are copied as they
    are. With `use_ema_base`, the trained UNet is also written over the base's EMA copy so that no
    stale EMA weights remain. The base is read and the output written one tensor at a time.
    Raises CheckpointError and leaves nothing behind on any failure.
    """
    base, out = Path(base_path), Path(out_path)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {tuple(DTYPES)}, not {dtype!r}")
    _require_file(base)
    fmt = _check_output(out, base, overwrite)
    base_shapes = read_shapes(base)
    found = _with_kind(kind_from_shapes(base_shapes, base.name, prediction_type=prediction_type,
                                        yaml_path=base, metadata=read_metadata(base)), kind)
    names = _names(trained, found)
    base_hash = file_hash(base)
    meta = build_metadata(found, out, base=base, dtype=dtype, trained=names, extra=metadata,
                          base_hash=base_hash)
    with LazyBase(base) as source:
        layout = _export_layout(source.layout, DTYPES[dtype])
        placed = slots_by_file_key(layout, found, derive_configs(base_shapes, found), components,
                                   names)
        ema_sources = _ema_sources(layout) if use_ema_base and "unet" in names else {}

        def assembled(key: str) -> torch.Tensor:
            tensor = source.get(key)
            wanted = layout[key][1]
            if key in placed or tensor.dtype != wanted:
                tensor = tensor.to(wanted, copy=True)  # never write into the base's own tensor
            for _, slot, value in placed.get(key, ()):
                slot.write({key: tensor}, value)
            return tensor

        def tensors():
            for key, (_, wanted) in layout.items():
                live = ema_sources.get(key)
                yield key, (assembled(key) if live is None else assembled(live).to(wanted))

        check = lambda tmp, f: _placed_check(tmp, f, layout, found, placed)
        _atomic_write(out, fmt, layout, tensors(), meta, check, overwrite)
    _companion_yaml(base, found, out)
    return out


# --------------------------------------------------------------------------------------------
# New single files from components (no base file): diffusers -> LDM names (ldm_keys.py)


def save_single_file(components: Components, path: str | os.PathLike, *, kind: str = "sd1",
                     dtype: str = "fp32", metadata: Mapping | None = None,
                     overwrite: bool = False, base_name: str | None = None) -> Path:
    """Write components as a NEW single-file checkpoint in the original (LDM) layout, with the
    DDPM schedule buffers for SD1.x/SD2.x (``base_name``: the diffusers folder it came from, for
    the metadata)."""
    out = Path(path)
    if kind not in KINDS:
        raise CheckpointError(f"kind must be one of {KINDS}, not {kind!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {tuple(DTYPES)}, not {dtype!r}")
    if (kind == "sdxl") != (getattr(components, "text_encoder_2", None) is not None):
        raise CheckpointError(f"these components do not make a {kind} model")
    fmt = _check_output(out, None, overwrite)
    schedule = components.noise_scheduler.config
    found = ModelKind(kind=kind, prediction_type="v_prediction" if kind == "sd2-v" else
                      prediction_of(components.noise_scheduler),
                      zero_terminal_snr=bool(getattr(schedule, "rescale_betas_zero_snr", False)))
    state = components_to_ldm(components, found, DTYPES[dtype])
    if found.family != "sdxl":
        state.update(schedule_buffers(components.noise_scheduler))
    meta = build_metadata(found, out, dtype=dtype, trained=found.components, extra=metadata)
    if base_name:
        meta["dreambooth.base_model"] = base_name
    check = lambda tmp, f: _self_check(tmp, f, None, found, components, found.components,
                                       DTYPES[dtype])
    layout = {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in state.items()}
    # handed over one by one, so each tensor's memory is free once written
    _atomic_write(out, fmt, layout, ((key, state.pop(key)) for key in list(layout)), meta, check,
                  overwrite)
    _companion_yaml(None, found, out)
    return out


def save_diffusers(components: Components, folder: str | os.PathLike, *, half: bool = False,
                   overwrite: bool = False) -> Path:
    """Save as a diffusers folder, written beside the target and renamed when complete."""
    from dreambooth.common.files import atomic_path

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another name or allow overwriting")
    if not folder.parent.is_dir():
        raise CheckpointError(f"cannot write {folder.name}: the folder {folder.parent} does not exist")
    with atomic_path(folder, overwrite=overwrite) as tmp:
        pipe = components.pipeline()
        if half:
            pipe.to(torch.float16)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------
# CLI


def convert_main(argv: list[str] | None = None) -> int:
    """python -m dreambooth convert IN OUT [--half] [--ema] [--kind KIND] [--vae VAE]"""
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth convert",
        description="Convert a single-file checkpoint (.safetensors/.ckpt) to a diffusers folder, "
                    "a diffusers folder to a single file, or a single file to another single file.")
    parser.add_argument("input", help="a .safetensors/.ckpt file or a diffusers folder")
    parser.add_argument("output", help="a .safetensors/.ckpt file or a folder name")
    parser.add_argument("--half", action="store_true", help="write fp16 weights")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of the UNet")
    parser.add_argument("--kind", choices=KINDS, help="override the detected model kind")
    parser.add_argument("--vae", help="a separate VAE file to use instead of the built-in one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from dreambooth.common.files import (EXIT_BAD_INPUT, EXIT_WRITE_FAILED, OutputExistsError,
                                         WriteError)

    source, target = Path(args.input), Path(args.output)
    try:
        components, found = load_components(source, use_ema=args.ema, kind=args.kind,
                                             vae_path=args.vae)
        if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
            dtype = "fp16" if args.half else "fp32"
            if source.is_file():
                export_checkpoint(source, components, target, trained=found.components,
                                  dtype=dtype, overwrite=args.overwrite, use_ema_base=args.ema,
                                  kind=found.kind)
            else:
                save_single_file(components, target, kind=found.kind, dtype=dtype,
                                 overwrite=args.overwrite)
        else:
            save_diffusers(components, target, half=args.half, overwrite=args.overwrite)
    except (CheckpointError, OutputExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(f"wrote {target} ({found.kind}, {found.prediction_type})")
    return 0
