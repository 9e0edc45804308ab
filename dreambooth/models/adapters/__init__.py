"""What a run trains: the whole model (``full``) or an adapter beside the frozen model (``lora``,
``locon``, ``loha``, ``lokr``). The loop stays one loop: it asks ``place`` for the modules that
train (their parameters go to the optimizer, their state into resume points), and calls the
UNet and the text encoders as always — an adapter patches their layers in place.

Module per kind: ``lycoris.py`` (the LyCORIS kinds), ``targets.py`` (which layers, kohya names),
``file.py`` (the LoRA file), ``output.py`` (a run's LoRA export).
"""
from __future__ import annotations

import torch

from dreambooth.common.config import TrainingConfig


def unavailable(config: TrainingConfig) -> str | None:
    """Why this run's method cannot train in this installation (None: it can)."""
    if not config.trains_adapter:
        return None
    from dreambooth.models.adapters import lycoris

    return lycoris.unavailable()


def place(config: TrainingConfig, unet: torch.nn.Module,
          encoders: list[tuple[str, torch.nn.Module]], trained_encoders: set[str], device,
          weight_dtype: torch.dtype, base_8bit: str = "int8",
          host_blocks: list[torch.nn.Module] = ()) -> dict[str, torch.nn.Module]:
    """Put the models on ``device`` and return what trains, by component name ("unet", then the
    trained text encoders). Full: the models themselves in fp32 (the optimizer's master copy).
    Adapter: the base models frozen in ``weight_dtype``, one fp32 network per trained component.
    Trained parts are in train mode (gradient checkpointing only runs there). With
    ``trained_precision`` bf16 what trains is in bf16 instead of fp32 (see :mod:`dreambooth.engine.fused`).
    With ``base_weights_8bit`` the frozen linears of the UNet and of the trained text encoders
    are int8 (``base_8bit`` "int8", see :mod:`.quantize`) or fp8 ("fp8", the family's choice,
    see :mod:`.fp8`); with ``base_weights_4bit`` in NF4 (:mod:`.nf4`); a frozen text encoder
    is cached, so it stays as it is. ``host_blocks``
    (block swap): the denoiser's blocks stay on the host, where :mod:`..block_swap` takes them."""
    adapter = config.trains_adapter
    trained_dtype = torch.bfloat16 if config.trained_precision == "bf16" else torch.float32
    base_dtype = weight_dtype if adapter else trained_dtype
    if host_blocks:  # cast where it is, then all but the blocks to the device
        from dreambooth.models.block_swap import to_device_but

        unet.to(base_dtype)
        to_device_but(unet, host_blocks, device)
    else:
        unet.to(device, base_dtype)
    unet.train().requires_grad_(not adapter)
    trained = {"unet": unet}
    for name, encoder in encoders:
        encoder.requires_grad_(False)
        if name in trained_encoders:
            encoder.to(device, base_dtype).train().requires_grad_(not adapter)
            trained[name] = encoder
        else:
            encoder.to(device, weight_dtype).eval()
    if not adapter:
        return trained
    from dreambooth.models.adapters import lycoris, targets

    if config.base_weights_8bit or config.base_weights_4bit:  # first: LyCORIS wraps them
        from dreambooth.models.adapters.fp8 import fp8_linears  # (in bypass mode)
        from dreambooth.models.adapters.nf4 import nf4_linears
        from dreambooth.models.adapters.quantize import quantize_linears

        store = (nf4_linears if config.base_weights_4bit else
                 fp8_linears if base_8bit == "fp8" else quantize_linears)
        for module in trained.values():
            store(module)
    lycoris.quiet()
    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights follow the run's seed
        torch.manual_seed(config.seed)
        networks = lycoris.attach(trained, targets.prefixes([name for name, _ in encoders]),
                                  config, device)
    for network in networks.values():
        network.to(dtype=trained_dtype)
    return networks


def rank_warning(config: TrainingConfig, models: dict[str, torch.nn.Module]) -> str | None:
    """A warning when ``lora_rank`` is above every layer the adapter wraps (nothing more to
    learn, matrices larger than the layer); None otherwise or for full runs."""
    if not config.trains_adapter or config.training_method == "lokr":  # LoKr: factors, not rank
        return None
    from dreambooth.models.adapters import lycoris, targets

    useful = max(targets.largest_useful_rank(model, targets.target_modules(
        model, name, config.lora_layers, convs=lycoris.trains_convolutions(config)))
        for name, model in models.items())
    if not useful or config.lora_rank <= useful:
        return None
    return (f"lora_rank {config.lora_rank} is above the size of every layer it adapts (at most "
            f"{useful} on this model): it cannot learn more than rank {useful} and its file is "
            f"about {config.lora_rank / useful:.1f}× larger; use a rank of {useful} or less")


def release(config: TrainingConfig, trained: dict[str, torch.nn.Module]) -> None:
    """After the run: the base modules get their own layers back."""
    if config.trains_adapter:
        from dreambooth.models.adapters import lycoris

        lycoris.detach(trained)


def average_gradients(config: TrainingConfig, trained: dict[str, torch.nn.Module], accelerator) -> None:
    """Several processes: the adapter's gradients averaged over them (once per optimizer step).

    The adapter networks are not called themselves (the base models are), so DDP's own
    gradient hooks never arm; the networks are kept out of DDP and averaged here instead."""
    if not config.trains_adapter or accelerator.num_processes == 1:
        return
    grads = [p.grad for m in trained.values() for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_processes_agree(config: TrainingConfig, trained: dict[str, torch.nn.Module],
                          accelerator) -> None:
    """Several processes: every process must end with the same adapter (else RuntimeError)."""
    if not config.trains_adapter or accelerator.num_processes == 1:
        return
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for m in trained.values()
                             for p in m.parameters()]).sum().reshape(1)
    every = accelerator.gather(total)
    if not torch.allclose(every, every[0].expand_as(every), rtol=1e-9, atol=0):
        raise RuntimeError(f"the {accelerator.num_processes} processes ended with different "
                           "adapters (their gradients were not averaged)")
