"""Optimizers and the EMA of the trained weights."""
from __future__ import annotations

import torch

from dreambooth.common.config import ConfigError, FieldError, TrainingConfig


def build_optimizer(name: str, param_groups: list[dict], config: TrainingConfig, device):
    """AdamW, 8-bit AdamW, Lion (32/8-bit), Prodigy, Adafactor or SGD over the parameter groups."""
    betas = (config.adam_beta1, config.adam_beta2)
    if name == "adamw":
        extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(param_groups, betas=betas, eps=config.adam_epsilon,
                                 weight_decay=config.weight_decay, **extra)
    if name == "adafactor":
        # transformers' Adafactor with a fixed lr: relative_step and scale_parameter off, so the
        # schedule's lr is the one used (warmup_init needs relative_step). Its factored second
        # moments take far less memory than AdamW's two full copies.
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=config.learning_rate, relative_step=False,
                         scale_parameter=False, warmup_init=False,
                         weight_decay=config.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9, weight_decay=config.weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, betas=betas, weight_decay=config.weight_decay)
    problem = eight_bit_problem(device) if name in ("adamw8bit", "lion8bit", "lion") else None
    if problem:
        raise ConfigError([FieldError("optimizer", problem)])
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(param_groups, betas=betas, eps=config.adam_epsilon,
                                   weight_decay=config.weight_decay)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(param_groups, betas=betas, weight_decay=config.weight_decay)
    if name == "lion":
        return bnb.optim.Lion(param_groups, betas=betas, weight_decay=config.weight_decay,
                              optim_bits=32)
    raise ConfigError([FieldError("optimizer", f"unknown optimizer {name!r}")])


def eight_bit_problem(device) -> str | None:
    """Why bitsandbytes' optimizers cannot run on this device, or None when they can."""
    try:
        import bitsandbytes as bnb
    except ModuleNotFoundError:
        from dreambooth.models.adapters.quantize import BITSANDBYTES_MISSING

        return f"{BITSANDBYTES_MISSING}; choose adamw"
    except Exception as exc:  # a broken install raises all sorts of errors at import
        return f"bitsandbytes is not usable ({exc}); choose adamw"
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if device.type == "cpu" and version < (0, 50):
        return (f"bitsandbytes {bnb.__version__} cannot run its optimizers on the CPU (0.50 is the "
                "first that can); choose adamw")
    return None


class EMA:
    """Exponential moving average of the trained weights, with diffusers' EMAModel warm-up: at
    optimizer step t the decay is 0 for t = 1 (the average starts as the weights) and
    min(decay, (1 + s) / (10 + s)) with s = t - 1 after. diffusers' own EMAModel lives in
    diffusers.training_utils, which fails to import with the WebUI's transformers 4.30."""

    def __init__(self, parameters, decay: float):
        self.decay = decay
        self.shadow_params = [p.detach().clone().float() for p in parameters]
        self.optimization_step = 0
        self._stored: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        since = self.optimization_step - 1
        if since <= 0:
            return 0.0
        return min(self.decay, (1 + since) / (10 + since))

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.optimization_step += 1
        weight = 1.0 - self.current_decay()
        for shadow, param in zip(self.shadow_params, parameters):
            if param.requires_grad:
                shadow.lerp_(param.detach().float(), weight)
            else:
                shadow.copy_(param.detach())

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for shadow, param in zip(self.shadow_params, parameters):
            param.copy_(shadow.to(param.device, param.dtype))

    def store(self, parameters) -> None:
        self._stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for stored, param in zip(self._stored or [], parameters):
            param.copy_(stored)
        self._stored = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "optimization_step": self.optimization_step,
                "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.optimization_step = state["optimization_step"]
        self.shadow_params = [t.clone() for t in state["shadow_params"]]


def freeze_text_encoder(text_encoder, optimizer) -> None:
    """Stop training a text encoder and free its optimizer state (its group is left empty, so
    the groups still match a resume point's)."""
    te_params = set(text_encoder.parameters())
    for group in optimizer.param_groups:
        if any(p in te_params for p in group["params"]):
            for p in group["params"]:
                optimizer.state.pop(p, None)
                p.grad = None
            group["params"] = []
    text_encoder.requires_grad_(False).eval()
