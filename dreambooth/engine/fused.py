"""The fused backward pass: each trained weight is stepped by the optimizer the moment its
gradient is complete, and that gradient is freed at once, so a full set of gradients never
exists (for a full SD1.5 UNet that is 3.4 GB of fp32 gradients not held at the same time).

How: one optimizer of the chosen kind per parameter, stepped from the parameter's
``register_post_accumulate_grad_hook`` (PyTorch's own mechanism for this, torch >= 2.1). The
wrapper is a ``torch.optim.Optimizer`` whose parameter groups are the run's groups, so the
learning-rate schedule sets their lr as usual and each step reads it. Per-parameter stepping is
the same arithmetic as one optimizer over all parameters for AdamW, 8-bit AdamW, Lion, Adafactor
and SGD (each updates a tensor from its own gradient and state). What needs every gradient at
once cannot be fused: clipping by the global norm, accumulating several micro-batches, fp16 loss
scaling (its unscale and overflow check), Prodigy (one step size from all parameters), and DDP
(it averages gradients after they are complete) — ``problems`` names them.

The same per-weight optimizer carries ``trained_precision`` bf16: the trained weights are kept
in bf16 (half the memory of fp32 master weights) and each step is taken on an fp32 copy of one
weight and its gradient, then rounded back to bf16 stochastically — up or down with the
probabilities that make the rounding exact on average, so the many updates smaller than half a
bf16 step (lr 1e-6 against weights near 0.1: 2^-10 relative, bf16 keeps 2^-8) add up instead of
being rounded away. Only one weight's fp32 copy exists at a time. Without ``fused_backward`` the
weights are stepped one after another after the backward pass (clipping and accumulation then
work as usual, on bf16 gradients).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from dreambooth.common.config import FieldError, TrainingConfig


def runtime_problem(precision: str, processes: int) -> FieldError | None:
    """What the fused pass cannot do on this machine, known once the device is."""
    if precision == "fp16":
        return FieldError("fused_backward", "fp16's loss scaling checks every gradient for "
                          "overflow before a step: use bf16 (or no mixed precision), or turn it off")
    if processes > 1:
        return FieldError("fused_backward", "several processes average the gradients after they "
                          "are complete: train on one process, or turn it off")
    return None


def use_per_weight(config: TrainingConfig) -> bool:
    """Whether the run steps its weights one by one (:class:`PerWeightOptimizer`)."""
    return config.fused_backward or config.trained_precision == "bf16"


def saved_settings(optimizer_state: dict) -> tuple[bool, bool]:
    """(fused_backward, bf16 weights) a resume point's optimizer state was written with (a plain
    optimizer's: neither; the first fused resume points carry only "fused_backward")."""
    per_weight = optimizer_state.get("per_weight") or optimizer_state.get("fused_backward")
    if not per_weight:
        return False, False
    return bool(optimizer_state.get("in_backward", True)), bool(optimizer_state.get("bf16"))


def resume_problem(config: TrainingConfig, optimizer_state: dict) -> FieldError | None:
    """Why a resume point's optimizer state cannot continue under ``config``: it was written
    with another fused_backward or trained_precision (different state per weight)."""
    fused, bf16 = saved_settings(optimizer_state)
    if fused != config.fused_backward:
        return FieldError("fused_backward", f"the resume point was written with it "
                          f"{'on' if fused else 'off'}: resume with it as it was")
    if bf16 != (config.trained_precision == "bf16"):
        return FieldError("trained_precision", f"the resume point was written with "
                          f"{'bf16' if bf16 else 'fp32'} weights: resume with them as they were")
    return None


def round_to_bf16_(target: torch.Tensor, value: torch.Tensor,
                   generator: torch.Generator | None = None) -> None:
    """Write fp32 ``value`` into bf16 ``target`` with stochastic rounding: random low 16 bits are
    added to the fp32 bit pattern before they are cut off, so ``value`` lands on the bf16 number
    above with probability (value - below) / (above - below). Hand-written (five lines) because
    no kept library fits the hosts' torch: torchao's optimizers need torch >= 2.3 (A1111 ships
    2.1), compile every step and offer Adam only."""
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device,
                          generator=generator)
    bits = value.contiguous().view(torch.int32) + noise
    bits.bitwise_and_(-65536)  # 0xFFFF0000: what bf16 keeps of an fp32
    target.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero


class _InnerStates(dict):
    """``optimizer.state`` as the loop uses it (values, clear, pop): the inner optimizers'."""

    def __init__(self, owner: "PerWeightOptimizer"):
        super().__init__()
        self.owner = owner

    def values(self):
        return [s for inner in self.owner.inner.values() for s in inner.state.values()]

    def clear(self) -> None:
        for inner in self.owner.inner.values():
            inner.state.clear()

    def pop(self, param, default=None):
        self.owner.forget([param])
        return default


class PerWeightOptimizer(torch.optim.Optimizer):
    """One optimizer of the run's kind per weight (see the module's docstring): stepped from the
    backward pass (``in_backward``, the fused pass) or one after another at :meth:`step`; with a
    ``generator`` the weights are bf16 and stepped through an fp32 copy, rounded stochastically."""

    def __init__(self, param_groups: list[dict],
                 make: Callable[[list[dict]], torch.optim.Optimizer], *, in_backward: bool,
                 generator: torch.Generator | None = None):
        super().__init__(param_groups, defaults={})
        self.in_backward, self.generator = in_backward, generator
        self.inner: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._steppers: dict[torch.nn.Parameter, Callable[[torch.Tensor], None]] = {}
        self._handles: dict[torch.nn.Parameter, object] = {}
        for group in self.param_groups:
            for param in group["params"]:
                # bf16: the inner optimizer sees an fp32 stand-in, filled only while it steps
                target = (torch.nn.Parameter(torch.empty(0, device=param.device))
                          if generator is not None else param)
                inner = make([{"params": [target], "lr": group["lr"]}])
                self.inner[param] = inner
                self._steppers[param] = self._stepper(group, inner, generator)
                if in_backward:
                    self._handles[param] = param.register_post_accumulate_grad_hook(
                        self._steppers[param])
        self.state = _InnerStates(self)

    @staticmethod
    def _stepper(group: dict, inner: torch.optim.Optimizer,
                 generator: torch.Generator | None) -> Callable[[torch.Tensor], None]:
        def step(param: torch.Tensor) -> None:
            inner.param_groups[0]["lr"] = group["lr"]  # the schedule's lr of this step
            if generator is None:
                inner.step()
            else:
                stand_in = inner.param_groups[0]["params"][0]
                stand_in.data = param.detach().float()
                stand_in.grad = param.grad.float()
                inner.step()
                round_to_bf16_(param.data, stand_in.data, generator)
                stand_in.grad = None
                stand_in.data = torch.empty(0, device=param.device)
            param.grad = None  # freed now: the point of fusing
        return step

    @torch.no_grad()
    def step(self, closure=None):
        """Fused: nothing left (the steps were taken in the backward pass). Else each weight
        that has a gradient, in turn."""
        if not self.in_backward:
            for param, stepper in self._steppers.items():
                if param.grad is not None:
                    stepper(param)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    def forget(self, params: Iterable[torch.Tensor]) -> None:
        """Stop stepping ``params`` and free their state (a text encoder frozen mid-run)."""
        for param in list(params):
            handle = self._handles.pop(param, None)
            if handle is not None:
                handle.remove()
            self.inner.pop(param, None)
            self._steppers.pop(param, None)

    def state_dict(self) -> dict:
        order = [p for group in self.param_groups for p in group["params"]]
        return {"per_weight": True, "in_backward": self.in_backward,
                "bf16": self.generator is not None,
                "generator": self.generator.get_state() if self.generator is not None else None,
                "lrs": [group["lr"] for group in self.param_groups],
                "inner": [self.inner[p].state_dict() for p in order if p in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        if saved_settings(state_dict) != (self.in_backward, self.generator is not None):
            raise ValueError("this resume point was written with other fused_backward / "
                             "trained_precision settings: resume with them as they were")
        for group, lr in zip(self.param_groups, state_dict["lrs"]):
            group["lr"] = lr
        order = [p for group in self.param_groups for p in group["params"] if p in self.inner]
        if len(order) != len(state_dict["inner"]):
            raise ValueError("the resume point's optimizer holds other weights than this run")
        for param, inner_state in zip(order, state_dict["inner"]):
            self.inner[param].load_state_dict(inner_state)
        if self.generator is not None:
            self.generator.set_state(state_dict["generator"])
