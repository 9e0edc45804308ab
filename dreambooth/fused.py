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
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .config import FieldError, TrainingConfig

FUSABLE = ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "sgd")


def problems(config: TrainingConfig) -> list[FieldError]:
    """What in ``config`` the fused backward pass cannot honour (empty: it can run)."""
    if not config.fused_backward:
        return []
    errors = []
    if config.optimizer not in FUSABLE:
        errors.append(FieldError("fused_backward", f"{config.optimizer} computes one step from "
                                 f"all weights together; fusable: {', '.join(FUSABLE)}"))
    if config.max_grad_norm:
        errors.append(FieldError("max_grad_norm", "the fused backward pass steps each weight as "
                                 "its gradient arrives, before a global norm exists: set 0"))
    if config.gradient_accumulation_steps > 1:
        errors.append(FieldError("gradient_accumulation_steps", "the fused backward pass steps "
                                 "at every backward pass: set 1 (use a larger batch instead)"))
    return errors


def runtime_problem(precision: str, processes: int) -> FieldError | None:
    """What the fused pass cannot do on this machine, known once the device is."""
    if precision == "fp16":
        return FieldError("fused_backward", "fp16's loss scaling checks every gradient for "
                          "overflow before a step: use bf16 (or no mixed precision), or turn it off")
    if processes > 1:
        return FieldError("fused_backward", "several processes average the gradients after they "
                          "are complete: train on one process, or turn it off")
    return None


class _InnerStates(dict):
    """``optimizer.state`` as the loop uses it (values, clear, pop): the inner optimizers'."""

    def __init__(self, owner: "FusedBackward"):
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


class FusedBackward(torch.optim.Optimizer):
    """The run's optimizer for the fused backward pass (see the module's docstring)."""

    def __init__(self, param_groups: list[dict],
                 make: Callable[[list[dict]], torch.optim.Optimizer]):
        super().__init__(param_groups, defaults={})
        self.inner: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._handles: dict[torch.nn.Parameter, object] = {}
        for group in self.param_groups:
            for param in group["params"]:
                inner = make([{"params": [param], "lr": group["lr"]}])
                self.inner[param] = inner
                self._handles[param] = param.register_post_accumulate_grad_hook(
                    self._stepper(group, inner))
        self.state = _InnerStates(self)

    @staticmethod
    def _stepper(group: dict, inner: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            inner.param_groups[0]["lr"] = group["lr"]  # the schedule's lr of this step
            inner.step()
            param.grad = None  # freed now: the point of fusing
        return step

    def step(self, closure=None):  # the steps were taken in the backward pass
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

    def state_dict(self) -> dict:
        order = [p for group in self.param_groups for p in group["params"]]
        return {"fused_backward": True, "lrs": [group["lr"] for group in self.param_groups],
                "inner": [self.inner[p].state_dict() for p in order if p in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict.get("fused_backward"):
            raise ValueError("this resume point was written without the fused backward pass: "
                             "resume with fused_backward as it was")
        for group, lr in zip(self.param_groups, state_dict["lrs"]):
            group["lr"] = lr
        order = [p for group in self.param_groups for p in group["params"] if p in self.inner]
        if len(order) != len(state_dict["inner"]):
            raise ValueError("the resume point's optimizer holds other weights than this run")
        for param, inner_state in zip(order, state_dict["inner"]):
            self.inner[param].load_state_dict(inner_state)
