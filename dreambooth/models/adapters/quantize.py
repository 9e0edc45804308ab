"""The frozen base's linear layers in int8 (``base_weights_8bit``), so an adapter trains beside a
smaller base.

Why: an adapter run never updates the base, so its weights need not stay in half precision. Each
``torch.nn.Linear`` of the modules a run trains through (the UNet; a text encoder only while its
adapter trains — a frozen one is cached and leaves the device) becomes a bitsandbytes
``Linear8bitLt`` with ``has_fp16_weights=False``: an int8 weight (``Int8Params``) and one fp32
scale per output row, 1 byte a weight instead of 2 (fp16/bf16) or 4 (fp32). The adapters are
attached afterwards; LyCORIS sees a quantized linear and runs in bypass mode
(``y = W8 x + ΔW x``), its own weights float as usual, so the LoRA file has the same keys as one
trained over a half-precision base (the WebUI applies it to its own full-precision model).

What stays: convolutions (bitsandbytes has no int8 convolution) and everything else — norms,
embeddings, biases — keep the base's dtype; a ``Linear`` subclass is left alone (its forward may do
more than a matmul). So the saving is on the linear weights only: in SD1.5's UNet 270 M of its
860 M parameters.

How it computes: on CUDA, LLM.int8 (activations quantized per row, int8 matmul, the activation
columns above ``THRESHOLD`` done in fp16). On the CPU bitsandbytes (0.50) dequantizes the weight
and runs a float matmul while training (weight-only int8, the threshold unused) and the int8
emulation in eval mode (samples). The backward is ours (:class:`_FrozenInt8Matmul`): the
input's gradient through the dequantized weight, keeping no activation, so gradient
checkpointing works through the int8 layers. Nothing is logged here: the caller reports the
figures.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from dreambooth.common.config import ConfigError, FieldError

FIELD = "base_weights_8bit"

# LLM.int8's outlier threshold (Dettmers et al. 2022; transformers' llm_int8_threshold default;
# bitsandbytes' own layer defaults to 0, no decomposition): on CUDA, activation columns with a
# value above it run in fp16, the rest in int8. CLIP's hidden states, which the UNet's
# cross-attention projects, can carry such large features; 0 would quantize them with the rest.
# On the CPU bitsandbytes ignores it while training (weight-only int8).
THRESHOLD = 6.0


@dataclasses.dataclass(frozen=True)
class Quantized:
    """What :func:`quantize_linears` converted."""

    layers: int  # Linear layers now int8
    bytes_before: int  # their weights as they were
    bytes_after: int  # their int8 weights and per-row scales

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __add__(self, other: "Quantized") -> "Quantized":
        return Quantized(self.layers + other.layers, self.bytes_before + other.bytes_before,
                         self.bytes_after + other.bytes_after)


# Forge Neo leaves bitsandbytes out unless started with --bnb (and the extension then leaves it
# to Neo); elsewhere the extension's installer adds it at the WebUI's next start.
BITSANDBYTES_MISSING = ("bitsandbytes is not installed (Forge Neo installs it when started with "
                        "--bnb; elsewhere the WebUI's next start installs it, or pip install "
                        "bitsandbytes)")


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be imported here, as a field's message (None: it can)."""
    try:
        import bitsandbytes  # noqa: F401
    except ModuleNotFoundError:
        return f"{BITSANDBYTES_MISSING}: turn this off, or install it"
    except Exception as exc:  # a broken install raises all sorts of errors at import
        return (f"bitsandbytes is not usable ({type(exc).__name__}: {exc}); install it (the "
                "WebUI does at its next start) or turn this off")
    return None


def problem(device: torch.device, dtype: torch.dtype = torch.float16) -> str | None:
    """Why the base's linear layers cannot be held in int8 on ``device`` (None: they can):
    bitsandbytes missing or broken, or its int8 layer failing there. A probe layer runs a
    training step (forward, backward to its input) and an eval forward in ``dtype``."""
    missing = bitsandbytes_problem()
    if missing:
        return missing
    import bitsandbytes as bnb

    key = (torch.device(device), dtype)
    if key in _WORKS:
        return None
    reason = _probe(*key, bnb.__version__)
    if reason is None:  # a failure is probed again next time (it may have been the memory)
        _WORKS.add(key)
    return reason


_WORKS: set[tuple[torch.device, torch.dtype]] = set()


def _probe(device: torch.device, dtype: torch.dtype, version: str) -> str | None:
    try:
        with torch.enable_grad():  # the caller may be under no_grad
            layer = torch.nn.Linear(64, 32).to(device, dtype).requires_grad_(False)
            probe = _int8(layer, THRESHOLD)
            x = torch.randn(4, 64, device=device, dtype=dtype, requires_grad=True)
            probe.train()(x).float().sum().backward()
        with torch.no_grad():
            probe.eval()(x)
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient reached the input")
    except Exception as exc:
        old = tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 50)
        upgrade = " (0.50 is the first that runs them on the CPU)" if device.type == "cpu" and old else ""
        return (f"bitsandbytes {version} cannot run int8 linear layers on {device.type}{upgrade}: "
                f"{type(exc).__name__}: {exc}; turn this off")
    return None


class _FrozenInt8Matmul(torch.autograd.Function):
    """``layer(x)`` through bitsandbytes' own forward, with a backward that keeps nothing of ``x``.

    Why: bitsandbytes' matmuls (``MatMul8bitLt``, and ``MatMul8bitFp`` on the CPU) keep their
    input on the autograd context as a plain attribute (``ctx.tensors`` / ``ctx.A``) for the
    weight's gradient — also when the weight is frozen — and outside ``save_for_backward``,
    where gradient checkpointing cannot see it. So every int8 layer held its input from the
    forward pass to the backward one, as if checkpointing were off for the linear layers
    (measured on the CPU, SDXL LoRA at 512 px: activations 0.22 GB over a bf16 base, 1.12 GB over
    the int8 one). A frozen weight needs only ``grad_x = grad_y · W``: the weight dequantized
    (bitsandbytes' op) for the moment of the backward, as bitsandbytes' own backward does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        ctx.layer, ctx.x_dtype = layer, x.dtype  # the module (held anyway), no activation
        return bnb.nn.Linear8bitLt.forward(layer, x)  # grad mode is off in here: no graph

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        import bitsandbytes as bnb

        weight = ctx.layer.weight
        scales = weight.SCB if weight.SCB is not None else ctx.layer.state.SCB
        dense = bnb.functional.int8_vectorwise_dequant(weight.data, scales)
        return (grad_output @ dense.to(grad_output.dtype)).to(ctx.x_dtype), None


@functools.cache
def _frozen_int8_class() -> type:
    """``Linear8bitLt`` (what LyCORIS recognises as quantized) with the backward above; made on
    first use, so importing this module does not import bitsandbytes. Its weight and bias are
    frozen (an adapter run never trains the base): no gradient reaches them."""
    import bitsandbytes as bnb

    class FrozenLinear8bit(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad:
                return _FrozenInt8Matmul.apply(x, self)
            return super().forward(x)

    return FrozenLinear8bit


def _int8(layer: torch.nn.Linear, threshold: float) -> torch.nn.Module:
    """An int8 ``Linear8bitLt`` with ``layer``'s weight (quantized per output row, as
    bitsandbytes' own ``Int8Params`` does) and its bias (the same tensor), frozen."""
    import bitsandbytes as bnb

    weight = layer.weight.detach()
    # bitsandbytes quantizes from fp16 (Int8Params._quantize); the public op, not that method,
    # so a weight already on the GPU is quantized there without a trip to the CPU
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    new = _frozen_int8_class()(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               has_fp16_weights=False, threshold=threshold, device="meta")
    new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if layer.bias is not None:
        new.bias = layer.bias
    return new.train(layer.training)


def quantize_linears(module: torch.nn.Module, *, threshold: float = THRESHOLD) -> Quantized:
    """Replace every ``torch.nn.Linear`` inside ``module`` (not itself, not subclasses) by an int8
    ``Linear8bitLt``, in place, on the device and with the bias dtype the layer has. Call it once
    the module is on its device and dtype (a later ``.to(dtype)`` leaves int8 weights as they
    are) and before an adapter wraps the layers. ConfigError naming ``base_weights_8bit`` when
    bitsandbytes cannot do it on that device."""
    found = [(name, child) for name, child in module.named_modules()
             if name and type(child) is torch.nn.Linear and child.weight.device.type != "meta"]
    if not found:
        return Quantized(0, 0, 0)
    _quiet()
    first = found[0][1].weight
    reason = problem(first.device, first.dtype if first.is_floating_point() else torch.float16)
    if reason:
        raise ConfigError([FieldError(FIELD, reason)])
    total = Quantized(0, 0, 0)
    for name, layer in found:
        new = _int8(layer, threshold)
        parent_name, _, child_name = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child_name, new)
        total += Quantized(1, layer.weight.numel() * layer.weight.element_size(),
                           new.weight.numel() * new.weight.element_size()
                           + new.weight.SCB.numel() * new.weight.SCB.element_size())
    return total


def int8_layers(module: torch.nn.Module) -> int:
    """How many of ``module``'s layers hold int8 weights (bitsandbytes' ``Linear8bitLt``)."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules())


class _CastNotice(logging.Filter):
    """bitsandbytes warns at every int8 matmul whose input is not fp16 (it quantizes from fp16):
    in a bf16 or fp32 run on CUDA every linear layer of every step, on the CPU every one of every
    sampling step. Expected here, and to stderr without a logging setup: dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNotice) for f in log.filters):
        log.addFilter(_CastNotice())
