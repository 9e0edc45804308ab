"""LoRA, LoCon, LoHa, LoKr (and DoRA) through LyCORIS (``lycoris-lora``), the library whose
modules write exactly the keys the WebUI's built-in Lora extension applies.

Each trained component (the UNet, each trained text encoder) gets one ``LycorisNetwork`` over the
layers ``targets.target_modules`` picks, named with its kohya prefix, so the network's own
``state_dict()`` is the file's content. The base weights stay frozen in the frozen dtype; the
adapter weights train in fp32. DoRA normalises per input column (``wd_on_output=False``), which is
the rule the WebUI applies (``network.py``'s ``apply_weight_decompose``).
"""
from __future__ import annotations

import torch

from dreambooth.common.config import TrainingConfig
from dreambooth.models.adapters import targets

# training_method -> LyCORIS algorithm ("locon" is LyCORIS' LoRA with the convolutions added)
ALGORITHMS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}


def unavailable() -> str | None:
    """Why the adapters cannot train here (None: they can)."""
    try:
        import lycoris  # noqa: F401
    except Exception as exc:  # missing, or it does not import with this host's packages
        return (f"LoRA training needs lycoris-lora ({type(exc).__name__}: {exc}); the WebUI installs "
                "it at its next start (install.py), or: pip install \"lycoris-lora>=4.1,<4.2\"")
    return None


def quiet() -> None:
    """LyCORIS logs every module it creates at INFO: keep its warnings only."""
    import logging

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)


def trains_convolutions(config: TrainingConfig) -> bool:
    return config.training_method == "locon" or (
        config.training_method in ("loha", "lokr") and config.lora_conv_rank > 0)


def build_network(model: torch.nn.Module, component: str, prefix: str,
                  config: TrainingConfig) -> torch.nn.Module:
    """A LyCORIS network over ``model``'s target layers, applied (the layers' forward now adds
    the adapter) and registered as submodules, so ``state_dict()`` gives the kohya keys."""
    from lycoris import LycorisNetwork

    names = targets.target_modules(model, component, config.lora_layers,
                                   convs=trains_convolutions(config))
    # LyCORIS takes its targets as class-level presets: set for this network, read in __init__.
    LycorisNetwork.apply_preset({"target_module": [], "target_name": names,
                                 "lora_prefix": prefix, "use_fnmatch": False,
                                 "module_algo_map": {}, "name_algo_map": {}, "exclude_name": [],
                                 "enable_conv": True})
    conv_rank = config.lora_conv_rank if trains_convolutions(config) else 0
    network = LycorisNetwork(
        model, multiplier=1.0, lora_dim=config.lora_rank, alpha=config.lora_alpha or config.lora_rank,
        conv_lora_dim=conv_rank, conv_alpha=config.lora_conv_alpha or conv_rank or 1,
        dropout=config.lora_dropout, network_module=ALGORITHMS[config.training_method],
        weight_decompose=config.dora, wd_on_out=False, factor=config.lokr_factor,
        decompose_both=False, warn_on_unmatched=False,
        # bypass: y = W x + B(A x) * scale, the adapter's dropout acts on that term and no
        # full-size delta weight is built per step; DoRA needs the merged weight (no bypass)
        bypass_mode=not config.dora)
    network.apply_to()
    return network


def attach(models: dict[str, torch.nn.Module], prefixes: dict[str, str], config: TrainingConfig,
           device) -> dict[str, torch.nn.Module]:
    """One network per component to train (``models``: the component's module by name), its
    weights in fp32 on ``device``; the base modules are frozen (their dtype is the caller's)."""
    networks = {}
    for name, model in models.items():
        model.requires_grad_(False)
        network = build_network(model, name, prefixes[name], config)
        networks[name] = network.to(device, torch.float32).requires_grad_(True).train()
    return networks


def detach(networks: dict[str, torch.nn.Module]) -> None:
    """Give the base modules their own forward back (the run is over)."""
    for network in networks.values():
        network.restore()


def adapter_state(networks: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every network's tensors under their kohya keys (``lora_unet_…``, ``lora_te…``)."""
    state = {}
    for network in networks.values():
        state.update(network.state_dict())
    return state
