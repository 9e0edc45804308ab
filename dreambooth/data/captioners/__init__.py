"""Our own captioners: they need no WebUI (Forge Neo has no interrogators, the standalone app and
the CLI have none), and sit beside the WebUI's interrogators in the caption run.

* **WD tagger v3** (SmilingWolf's ``wd-vit-tagger-v3`` / ``wd-swinv2-tagger-v3`` /
  ``wd-eva02-large-tagger-v3``): Danbooru tags from an ONNX model run with onnxruntime
  (``wd_tagger.py``); its options are :class:`TaggerOptions`.
* **BLIP** (``Salesforce/blip-image-captioning-base`` / ``-large``): one plain sentence, through
  transformers' own ``BlipForConditionalGeneration`` loaded from safetensors only (``blip.py``).

Each model lives in ``<models>/captioners/<repo name>`` (the WebUI's models folder, or the
standalone app's); ``hub.py`` downloads the files it needs there on first use, and says once,
clearly, what to put where by hand when it cannot. A model already there is used without any
network. A captioner is opened once per run and closed after it (its memory given back).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dreambooth.data.captioners.base import (CAPTIONERS, DEFAULT_CAPTIONER, FOLDER, CaptionError,
                                             Captioner, CaptionerError, CaptionerUnavailable,
                                             Spec, TaggerOptions)


def is_ours(name: str) -> bool:
    return name in CAPTIONERS


def is_tagger(name: str | None) -> bool:
    spec = CAPTIONERS.get(str(name or ""))
    return spec is not None and spec.kind == "tagger"


def model_folder(root: Path, name: str) -> Path:
    """Where captioner ``name`` keeps its files: ``<root>/<repo name>`` (root is
    ``<models>/captioners``)."""
    return Path(root) / CAPTIONERS[name].repo.split("/")[-1]


def open_captioner(name: str, root: Path, *, tagger: TaggerOptions | None = None,
                   reporter=None, should_stop: Callable[[], bool] | None = None) -> Captioner | None:
    """Captioner ``name`` with its model from ``root`` (downloaded there first when missing;
    ``reporter`` hears the download's progress). None when ``should_stop`` said so during the
    download. Raises CaptionerUnavailable (no model and no way to get it) or CaptionerError
    (a model that does not load)."""
    from dreambooth.data.captioners import hub

    spec = CAPTIONERS[name]
    folder = model_folder(root, name)
    if not hub.ensure_files(spec, folder, reporter=reporter, should_stop=should_stop):
        return None
    if spec.kind == "tagger":
        from dreambooth.data.captioners.wd_tagger import WDTagger

        return WDTagger(name, folder, tagger or TaggerOptions())
    from dreambooth.data.captioners.blip import BlipCaptioner

    return BlipCaptioner(name, folder)


__all__ = ["CAPTIONERS", "CaptionError", "Captioner", "CaptionerError", "CaptionerUnavailable",
           "DEFAULT_CAPTIONER", "FOLDER", "Spec", "TaggerOptions", "is_ours", "is_tagger",
           "model_folder", "open_captioner"]
