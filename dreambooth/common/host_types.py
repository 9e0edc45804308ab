"""What every host gives the engine and the tab (the ``Host`` protocol), the checkpoint entries
it lists and the settings it keeps: pure types, re-exported by ``dreambooth.host``, which
implements them inside the WebUI and without it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

SETTINGS_SECTION = ("dreambooth", "DreamBooth")
SETTINGS_CATEGORY = "training"  # the WebUI's "Training" category in the settings page

WORK_DIR_KEY = "dreambooth_work_dir"
OUTPUT_SUBDIR_KEY = "dreambooth_output_subdir"
UNLOAD_MODEL_KEY = "dreambooth_unload_model"
HOLD_GENERATION_KEY = "dreambooth_hold_generation"

# key -> (default, label, info)
SETTINGS: dict[str, tuple[Any, str, str]] = {
    WORK_DIR_KEY: ("", "DreamBooth work folder",
                   "configs, logs, samples, resume points and caches; empty: models/dreambooth"),
    OUTPUT_SUBDIR_KEY: ("", "Subfolder of the checkpoints folder for trained models",
                        "empty: the checkpoints folder itself"),
    UNLOAD_MODEL_KEY: (True, "Unload the WebUI's model while training",
                       "frees its GPU memory and RAM for training; it is loaded again when "
                       "training ends (Forge: at the next generation)"),
    HOLD_GENERATION_KEY: (True, "Hold generation while training",
                          "txt2img/img2img wait until training ends, as with the Train tab; "
                          "off: they run alongside and may run out of GPU memory"),
}


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as the WebUI lists it. ``title`` changes to ``"name [hash]"`` once hashed."""

    title: str
    filename: str
    name: str
    hash: str | None = None
    label: str = ""  # what the WebUI's own checkpoint selector shows (Forge: the name, no hash)

    @property
    def shown(self) -> str:
        return self.label or self.title


class Host(Protocol):
    """What the engine and the tab need from wherever they run."""

    is_webui: bool

    def list_checkpoints(self) -> list[CheckpointEntry]: ...
    def resolve_checkpoint(self, title_or_name: str) -> CheckpointEntry | None: ...
    def models_dir(self) -> Path: ...
    def checkpoints_dir(self) -> Path: ...
    def output_dir(self) -> Path: ...
    def lora_dir(self) -> Path: ...
    def vae_dir(self) -> Path: ...
    def list_vaes(self) -> list[Path]: ...
    def text_encoder_dir(self) -> Path: ...
    def list_text_encoders(self) -> list[Path]: ...
    def work_root(self) -> Path: ...
    def work_dir(self, name: str) -> Path: ...
    def refresh_checkpoints(self) -> None: ...
    def add_checkpoints(self, paths: list[Path]) -> None: ...
    def refresh_loras(self) -> bool: ...
    def unload_webui_model(self) -> Any: ...
    def restore_webui_model(self, unloaded: Any) -> str | None: ...
    def load_checkpoint(self, title: str, wait_s: float = 30.0,
                        on_done: Callable[[BaseException | None], None] | None = None) -> bool: ...
    def loads_lazily(self) -> bool: ...
    def generation_busy(self) -> bool: ...
    def register_settings(self) -> None: ...
    def setting(self, key: str, default: Any = None) -> Any: ...
    def set_webui_progress(self, job: str, step: int, total: int, text: str = "") -> None: ...
    def show_webui_preview(self, image: Any) -> None: ...
    def hold_generation(self, on_wait: Callable[[], None] | None = None) -> Any: ...
    def interrogators(self) -> list[str]: ...
    def interrogate(self, kind: str, image: Any) -> str: ...
    def webui_name(self) -> str: ...
    def families(self) -> frozenset[str]: ...


# The model families each WebUI generates with (what a model trained here can be used in). Forge
# Neo and Forge Classic removed SD2 (Neo also SD3): their loaders refuse those checkpoints.
# A1111 and reForge never ran Flux; Forge and Neo do. Standalone, every family trains.
ALL_FAMILIES = frozenset({"sd1", "sd2", "sdxl", "flux"})
FAMILIES_BY_WEBUI = {"AUTOMATIC1111": frozenset({"sd1", "sd2", "sdxl"}),
                     "reForge": frozenset({"sd1", "sd2", "sdxl"}),
                     "Forge": ALL_FAMILIES,
                     "Forge Neo": frozenset({"sd1", "sdxl", "flux"}),
                     "Forge Classic": frozenset({"sd1", "sdxl"})}
FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux.1"}


def unusable_family_problem(family: str, webui: str, families: frozenset[str]) -> str | None:
    """Why a model of ``family`` trained here could not be used in this WebUI (None: it can)."""
    if family in families:
        return None
    offered = ", ".join(FAMILY_NAMES.get(f, f) for f in sorted(families))
    article = "a" if family == "flux" else "an"  # "an SD1", "a Flux.1"
    return (f"{article} {FAMILY_NAMES.get(family, family)} model: {webui} cannot generate with "
            f"{FAMILY_NAMES.get(family, family)} models, so what this trains "
            f"could not be used here; pick a base model of a family it runs ({offered})")


class InterrogatorError(ValueError):
    """The WebUI's interrogator could not caption a picture (its console has the details).

    A ValueError, so that the job runner shows the message as it is, without a traceback."""
