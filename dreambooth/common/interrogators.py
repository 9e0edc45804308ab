"""What the WebUI's own interrogators (BLIP, CLIP, DeepBooru) download on first use, and what
to tell the user when one fails for want of it. Pure text: ``host.py`` calls them."""
from __future__ import annotations

import re
from pathlib import Path

# The files the WebUI's interrogators download on first use (A1111 1.10 modules/interrogate.py
# and modules/deepbooru.py, through modelloader.load_models): offline, load_models returns no
# file and the WebUI indexes the empty list, so the user saw only "IndexError: list index out of
# range".
INTERROGATOR_FILES = {
    "blip": ("BLIP", "model_base_caption_capfilt_large.pth",
             "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
             "model_base_caption_capfilt_large.pth"),
    "deepbooru": ("torch_deepdanbooru", "model-resnet_custom_v3.pt",
                  "https://github.com/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/"
                  "model-resnet_custom_v3.pt"),
}
INTERROGATOR_FILES["clip"] = INTERROGATOR_FILES["blip"]  # then CLIP ViT-L/14 (the clip package)
_OFFLINE_WORDS = re.compile(r"urlopen|connection|resolve|network|offline|timed out|getaddrinfo",
                            re.IGNORECASE)


def interrogator_download_hint(kind: str, models_dir: Path) -> str:
    """Where the WebUI's ``kind`` interrogator keeps the file it downloads, and from where."""
    folder, name, url = INTERROGATOR_FILES[kind]
    return (f"it fetches {name} into {Path(models_dir) / folder} on first use (no internet?): "
            f"connect once and caption again, or put the file there by hand from {url}"
            + (" (CLIP also downloads ViT-L/14 into ~/.cache/clip)" if kind == "clip" else "")
            + "; or choose one of the extension's own captioners")


def interrogator_failure(kind: str, exc: BaseException, models_dir: Path) -> str:
    """What to tell the user when the WebUI's interrogator raised ``exc``: a missing download
    named with its folder and address, anything else as it came."""
    why = f"{type(exc).__name__}: {exc}"
    if kind in INTERROGATOR_FILES and (isinstance(exc, IndexError) or _OFFLINE_WORDS.search(why)):
        return (f"the WebUI's {kind} interrogator has no model file and could not download it: "
                f"{interrogator_download_hint(kind, models_dir)} ({why})")
    return f"the WebUI's {kind} interrogator failed: {why}"
