"""The frozen base's linear layers in fp8 (``base_weights_8bit`` on Flux), so a LoRA trains beside
a base of one byte per weight: Flux.1's 11.9 B-weight transformer in 11 GB instead of 22.

Why fp8 and not bitsandbytes' int8 (the UNet families' 8-bit base, :mod:`.quantize`): it is what
Flux trainers use (kohya's ``--fp8_base``, ai-toolkit, OneTrainer), what Forge's own fp8 Flux files
hold, it needs no package (torch has ``float8_e4m3fn`` on every device), and it keeps working on
Forge Neo, which leaves bitsandbytes out.

How: each ``torch.nn.Linear`` (not a subclass) keeps its weight as ``float8_e4m3fn`` with one fp32
scale per output row (the row's largest magnitude maps to fp8's largest finite value, 448: a plain
cast, as kohya does, loses Flux's many weights below fp8's smallest normal number, 2^-6), and
computes with the weight upcast for the moment of the matmul. The backward is ours
(:class:`_FrozenFp8Matmul`): ``grad_x = grad_y · W`` from the fp8 weight itself, so nothing
larger than the fp8 weight is kept for the backward. The layer's ``forward`` is replaced on the
instance before LyCORIS wraps it, so LyCORIS (bypass mode) adds the adapter to this forward and
gives it back on ``restore``.
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Stored:
    """What :func:`fp8_linears` converted: layers, and their weights' bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int


class _FrozenFp8Matmul(torch.autograd.Function):
    """``x · (scale ⊙ W8)ᵀ + b`` with the weight frozen: the backward needs only the input's
    gradient, computed from the fp8 weight (saved as it is: no upcast copy is kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, upcast(weight, scale, x.dtype), None if bias is None
                        else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale = ctx.saved_tensors
        return grad_output @ upcast(weight, scale, grad_output.dtype), None, None, None


def upcast(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 weight in ``dtype``, each row times its scale."""
    return weight.to(dtype) * scale.to(dtype)[:, None]


def to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale per output row): each row scaled so its largest magnitude is
    fp8's largest finite value (a row of zeros keeps scale 1)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale[:, None]).to(FP8), scale


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenFp8Matmul.apply(x, self.weight, self.fp8_scale, self.bias)


def fp8_linears(module: torch.nn.Module) -> Stored:
    """Every ``torch.nn.Linear`` inside ``module`` (not subclasses) stored in fp8, in place and
    frozen; call it once the module is on its device and dtype and before an adapter wraps it."""
    layers = before = after = 0
    for child in module.modules():
        if type(child) is not torch.nn.Linear or child.weight.dtype == FP8:
            continue
        weight, scale = to_fp8(child.weight)
        before += child.weight.numel() * child.weight.element_size()
        child.weight = torch.nn.Parameter(weight, requires_grad=False)
        child.register_buffer("fp8_scale", scale.to(weight.device), persistent=False)
        if child.bias is not None:
            child.bias.requires_grad_(False)
        child.forward = types.MethodType(_forward, child)
        layers += 1
        after += weight.numel() + scale.numel() * 4
    return Stored(layers, before, after)


def fp8_layers(module: torch.nn.Module) -> int:
    """How many of ``module``'s linear layers hold fp8 weights."""
    return sum(isinstance(m, torch.nn.Linear) and m.weight.dtype == FP8 for m in module.modules())
