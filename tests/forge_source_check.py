"""Forge's own LoRA code applied to our Flux LoRA files — a check to run by hand against a real
Forge checkout (lllyasviel/stable-diffusion-webui-forge; not a test: CI has no Forge):

    .venv/forge/bin/python tests/forge_source_check.py /path/to/stable-diffusion-webui-forge

It copies Forge's ``backend/patcher/lora.py`` and ``packages_3rdparty/{comfyui,webui}_lora_collection``
into a temporary folder (with a three-line stand-in of the two ``memory_management`` names
``merge_lora_to_weight`` uses, since the real module starts Forge's whole backend), then does
what ``extensions-builtin/sd_forge_lora/networks.py`` does: ``model_lora_keys_unet`` /
``model_lora_keys_clip`` on the Flux model's keys, ``load_lora``, and each patch merged by
``merge_lora_to_weight`` as ``ModelPatcher.add_patches`` lists it. Printed: keys unmatched and
skipped (Forge prints those), the difference from LyCORIS' own merge, and for a file written by
a real training run, the flow loss on its pictures with the LoRA as Forge applies it.
"""
import copy
import shutil
import sys
import tempfile
from pathlib import Path

FORGE_FILES = ("backend/patcher/lora.py", "packages_3rdparty/comfyui_lora_collection/lora.py",
               "packages_3rdparty/comfyui_lora_collection/utils.py",
               "packages_3rdparty/webui_lora_collection/lora.py")
MEMORY_MANAGEMENT = """import torch
signal_empty_cache = False
def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device, dtype, copy=copy)
"""
ROOT = Path(__file__).resolve().parents[1]


def forge_sources(checkout: Path) -> Path:
    """Forge's LoRA files in a folder of their own, importable without the rest of Forge."""
    folder = Path(tempfile.mkdtemp())
    for name in FORGE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkout / name, folder / name)
    for package in ("backend", "backend/patcher", "packages_3rdparty",
                    "packages_3rdparty/comfyui_lora_collection",
                    "packages_3rdparty/webui_lora_collection"):
        (folder / package / "__init__.py").touch()
    (folder / "backend/memory_management.py").write_text(MEMORY_MANAGEMENT)
    (folder / "backend/utils.py").write_text("")
    (folder / "backend/operations.py").write_text("bnb_avaliable = False\n")
    return folder


class Model:
    """What model_lora_keys_unet / _clip read of Forge's model: its keys, its config."""

    def __init__(self, state):
        self.state = state
        self.diffusion_model = type("D", (), {"config": {}})()
        self.config = type("C", (), {"huggingface_repo": "black-forest-labs/FLUX.1-dev"})()

    def state_dict(self):
        return self.state


def forge_apply(forge_lora, state, lora, strength=1.0):
    """networks.load_lora_for_models, ModelPatcher.add_patches and merge_lora_to_weight, in
    Forge's order; returns (weights, unmatched file keys, skipped patches, unet / clip patches)."""
    unet = {k: v for k, v in state.items() if k.startswith("diffusion_model.")}
    clip = {k: v for k, v in state.items() if k.startswith("clip_l.")}
    lora_unet, unmatched = forge_lora.load_lora(dict(lora),
                                                forge_lora.model_lora_keys_unet(Model(unet), {}))
    lora_clip, unmatched = forge_lora.load_lora(unmatched,
                                                forge_lora.model_lora_keys_clip(Model(clip), {}))
    out, skipped = dict(state), []
    for patches in (lora_unet, lora_clip):
        for k, v in patches.items():
            key, offset, function = ((k, None, None) if isinstance(k, str)
                                     else (k[0], k[1], k[2] if len(k) > 2 else None))
            if key not in state:
                skipped.append(k)
                continue
            out[key] = forge_lora.merge_lora_to_weight([[strength, v, 1.0, offset, function]],
                                                       out[key], key)
    return out, unmatched, skipped, len(lora_unet), len(lora_clip)


def against_lycoris(forge_lora) -> None:
    """Seeded LoRAs of both layer sets (as training builds them) against LyCORIS' own merge."""
    from fake_webui import comfy_lora
    from test_flux_lora_keys import LAYERS, seeded_lora

    for i, layers in enumerate(LAYERS):
        base, merged, kohya, base_clip, merged_clip = seeded_lora(layers, i)
        reference = comfy_lora.loaded_flux_model(merged, {"clip_l": merged_clip})
        state = comfy_lora.loaded_flux_model(base, {"clip_l": base_clip})
        applied, unmatched, skipped, n_unet, n_clip = forge_apply(forge_lora, state, kohya)
        worst = max((applied[k] - reference[k]).abs().max().item() / (w.abs().max().item() or 1)
                    for k, w in state.items())
        changed = sum(not torch.equal(applied[k], w) for k, w in state.items())
        zero = forge_apply(forge_lora, state, kohya, 0.0)[0]
        print(f"{layers}: file keys {len(kohya)}, unet patches {n_unet}, clip patches {n_clip}, "
              f"unmatched {len(unmatched)}, skipped {len(skipped)}, weights changed {changed}, "
              f"max |Forge - LyCORIS merge| / max|W| = {worst:.2e}, weight 0 gives the base: "
              f"{all(torch.equal(zero[k], state[k]) for k in state)}")


def a_trained_file(forge_lora) -> None:
    """A file written by a real run (30 steps, attention and MLP, CLIP-L trained too), applied by
    Forge's code and read back: has the transformer learned the pictures?"""
    from dreambooth.models import flux_layout as fl
    from dreambooth.models.families import for_kind
    from fake_webui import comfy_lora
    from test_flux_training import (adapter, flow_loss, flux_components, flux_run,
                                    picture_latents)

    components = flux_components()
    result, config = flux_run(Path(tempfile.mkdtemp()), max_train_steps=30, learning_rate=2e-2,
                              lora_layers="attention_mlp", train_text_encoder=True)
    lora = adapter(result)
    state = comfy_lora.loaded_flux_model(
        fl.diffusers_to_bfl(copy.deepcopy(components.unet.state_dict())),
        {"clip_l": components.text_encoder.state_dict()})
    applied, unmatched, skipped, n_unet, n_clip = forge_apply(forge_lora, state, lora)
    prefix = "diffusion_model."
    trained = copy.deepcopy(components)
    trained.unet.load_state_dict(fl.bfl_to_diffusers(
        {k[len(prefix):]: v for k, v in applied.items() if k.startswith(prefix)}))
    family = for_kind("flux-dev").configured(config)
    latents = picture_latents(components, Path(config.concepts[0].instance_data_dir))
    print(f"{result.output_path.name} from a run: {len(lora)} tensors, unet patches {n_unet}, "
          f"clip patches {n_clip}, unmatched {len(unmatched)}, skipped {len(skipped)}; flow loss "
          f"on its pictures {flow_loss(components, latents, family):.4f} without, "
          f"{flow_loss(trained, latents, family):.4f} with the LoRA as Forge applies it")


if __name__ == "__main__":
    sys.path[:0] = [str(forge_sources(Path(sys.argv[1]))), str(ROOT), str(ROOT / "tests")]
    import torch

    from backend.patcher import lora as forge_lora

    against_lycoris(forge_lora)
    a_trained_file(forge_lora)
