"""The frozen base's linear layers in NF4 (``base_weights_4bit``), 4 bits a weight: Flux.1's
11.9 B-weight transformer in 6.7 GB (fp8: 11.1, bf16: 22.2), the QLoRA recipe (Dettmers et al.
2023) that SimpleTuner and ai-toolkit offer for Flux.

How: each ``torch.nn.Linear`` (not a subclass) keeps its weight as bitsandbytes' NF4 (two 4-bit
codes a byte, the normal-float code book) with one fp32 scale per block of 64 weights
(``bitsandbytes.functional.quantize_4bit``), and computes with the weight dequantized for the
moment of the matmul. Kept as plain tensors on the layer (the packed weight in place of
``weight``, the scales as the buffer ``nf4_absmax``), so moving the layer, or block swap
swapping it, moves all of it; the shape and the block size are the layer's own attributes. The
backward is ours (:class:`_FrozenNf4Matmul`): the input's gradient from the weight dequantized
again, so nothing larger than the packed weight is kept for it. The layer's ``forward`` is
replaced on the instance before LyCORIS wraps it (bypass mode), as for fp8 (:mod:`.fp8`).

Needs bitsandbytes (not on Forge Neo unless started with ``--bnb``): refused by field where it is
missing or cannot quantize on the device.
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F

FIELD = "base_weights_4bit"
BLOCK = 64  # weights per scale: bitsandbytes' default for NF4, QLoRA's choice


@dataclasses.dataclass(frozen=True)
class Stored:
    """What :func:`nf4_linears` converted: layers, and their weights' bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
               dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weight back in ``dtype`` (fp16, bf16 or fp32), of ``shape``."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    state = QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=BLOCK,
                       quant_type="nf4")
    return dequantize_4bit(packed, state)


class _FrozenNf4Matmul(torch.autograd.Function):
    """``x · Wᵀ + b`` with W dequantized from NF4 and frozen: the backward needs only the
    input's gradient, from the packed weight dequantized again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                bias: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        compute = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        weight = dequantize(packed, absmax, shape, compute)
        return F.linear(x.to(compute), weight, None if bias is None else bias.to(compute)
                        ).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        packed, absmax = ctx.saved_tensors
        compute = grad_output.dtype if grad_output.dtype in (torch.float16, torch.bfloat16) \
            else torch.float32
        weight = dequantize(packed, absmax, ctx.shape, compute)
        return (grad_output.to(compute) @ weight).to(grad_output.dtype), None, None, None, None


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenNf4Matmul.apply(x, self.weight, self.nf4_absmax, self.bias, self.nf4_shape)


def nf4_linears(module: torch.nn.Module) -> Stored:
    """Every ``torch.nn.Linear`` inside ``module`` (not subclasses) stored in NF4, in place and
    frozen; call it once the module is on its device and dtype and before an adapter wraps it."""
    from bitsandbytes.functional import quantize_4bit

    layers = before = after = 0
    for child in module.modules():
        if type(child) is not torch.nn.Linear or hasattr(child, "nf4_absmax"):
            continue
        weight = child.weight.detach()
        packed, state = quantize_4bit(weight if weight.dtype in (torch.float16, torch.bfloat16)
                                      else weight.float(), blocksize=BLOCK, quant_type="nf4")
        before += weight.numel() * weight.element_size()
        child.nf4_shape = weight.shape
        child.weight = torch.nn.Parameter(packed, requires_grad=False)
        child.register_buffer("nf4_absmax", state.absmax.float(), persistent=False)
        if child.bias is not None:
            child.bias.requires_grad_(False)
        child.forward = types.MethodType(_forward, child)
        layers += 1
        after += packed.numel() + state.absmax.numel() * 4
    return Stored(layers, before, after)


def nf4_layers(module: torch.nn.Module) -> int:
    """How many of ``module``'s linear layers hold NF4 weights."""
    return sum(hasattr(m, "nf4_absmax") for m in module.modules())


def problem(device, dtype: torch.dtype) -> str | None:
    """Why the base cannot be held in NF4 on ``device`` (None: it can): bitsandbytes missing or
    broken, or its 4-bit quantization failing there (a probe layer runs forward and backward)."""
    from dreambooth.models.adapters.quantize import bitsandbytes_problem

    missing = bitsandbytes_problem()
    if missing:
        return missing
    try:
        with torch.enable_grad():
            layer = torch.nn.Linear(128, 64).to(device, dtype).requires_grad_(False)
            nf4_linears(layer)
            x = torch.randn(2, 128, device=device, dtype=dtype, requires_grad=True)
            layer(x).float().sum().backward()
    except Exception as exc:
        return (f"bitsandbytes cannot hold NF4 weights on {device} ({type(exc).__name__}: "
                f"{exc}); turn this off")
    return None
