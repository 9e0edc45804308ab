"""The types every captioner module shares: the registry of our captioners, the tagger's options,
the errors, the open captioner's interface."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

from dreambooth.host import InterrogatorError

FOLDER = "captioners"  # under the models folder: <models>/captioners/<repo name>


class CaptionError(ValueError):
    """A caption run cannot start or go on; the message says why and what to do."""


class CaptionerUnavailable(CaptionError):
    """The captioner's model is not in its folder and cannot be downloaded now (offline, no
    network, a repo without the files we load); the message says which files to put where."""


class CaptionerError(InterrogatorError):
    """Our captioner could not be loaded or failed on a picture (a broken model file...)."""


@dataclass(frozen=True)
class Spec:
    """One of our captioners: its hub repo, the files it needs, what it writes."""

    name: str
    kind: str  # "tagger" or "blip"
    repo: str
    files: tuple[str, ...]  # every file the model needs, as named in the repo
    text: str  # what it writes (the tab's and the CLI's help)
    optional: tuple[str, ...] = ()  # downloaded when the repo has them
    any_of: tuple[str, ...] = ()  # at least one of these is needed (a tokenizer's two forms)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/tree/main"


TAGGER_FILES = ("model.onnx", "selected_tags.csv")
BLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json",
              "tokenizer_config.json")
BLIP_TOKENIZER = ("vocab.txt", "tokenizer.json")
BLIP_OPTIONAL = ("special_tokens_map.json",)
_TAGS = "comma-separated Danbooru tags (\"1girl, solo, smile\"), for anime-style models"

CAPTIONERS: dict[str, Spec] = {spec.name: spec for spec in (
    Spec("blip-base", "blip", "Salesforce/blip-image-captioning-base", BLIP_FILES,
         "our BLIP (base, ~1 GB download): one plain sentence (\"a dog sitting on a couch\")",
         BLIP_OPTIONAL, BLIP_TOKENIZER),
    Spec("blip-large", "blip", "Salesforce/blip-image-captioning-large", BLIP_FILES,
         "our BLIP (large, ~1.9 GB download): one plain sentence, more detailed", BLIP_OPTIONAL,
         BLIP_TOKENIZER),
    Spec("wd-vit-tagger-v3", "tagger", "SmilingWolf/wd-vit-tagger-v3", TAGGER_FILES,
         f"WD tagger v3 (ViT, ~380 MB download): {_TAGS}"),
    Spec("wd-swinv2-tagger-v3", "tagger", "SmilingWolf/wd-swinv2-tagger-v3", TAGGER_FILES,
         f"WD tagger v3 (SwinV2, ~470 MB download): {_TAGS}"),
    Spec("wd-eva02-large-tagger-v3", "tagger", "SmilingWolf/wd-eva02-large-tagger-v3",
         TAGGER_FILES, f"WD tagger v3 (EVA02 large, ~1.3 GB download, the most accurate): {_TAGS}"),
)}
DEFAULT_CAPTIONER = "blip-base"  # where the host has no interrogators


@dataclass(frozen=True)
class TaggerOptions:
    """What a WD tagger keeps of its scores (the defaults are SmilingWolf's own)."""

    general_threshold: float = 0.35  # a general tag is kept above this confidence
    character_threshold: float = 0.85  # a character tag (a named person) above this one
    include_rating: bool = False  # add the most likely rating tag (general, sensitive, ...)
    include_characters: bool = True
    underscores_to_spaces: bool = True  # "long_hair" -> "long hair"; kaomoji like ^_^ are kept
    exclude: tuple[str, ...] = field(default_factory=tuple)  # tags never written
    max_tags: int = 0  # at most this many tags, the most confident first; 0: no limit

    @staticmethod
    def parse_exclude(text: str | None) -> tuple[str, ...]:
        """"1girl, long hair" -> ("1girl", "long hair"): a comma list, empty items dropped."""
        return tuple(t.strip() for t in str(text or "").split(",") if t.strip())

    def problems(self) -> list[str]:
        """What is wrong with these options, each naming its field; empty when they are fine."""
        found = []
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                found.append(f"{name} must be between 0 and 1 (got {value!r})")
        if not isinstance(self.max_tags, int) or self.max_tags < 0:
            found.append(f"max_tags must be 0 (no limit) or more (got {self.max_tags!r})")
        return found


class Captioner:
    """An open captioner: ``caption(image)`` for an RGB PIL image, ``close()`` when done."""

    name = ""

    def caption(self, image) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Drop the model and give its memory back (RAM, and the CUDA cache when it used it)."""
        for attribute in list(vars(self)):
            if attribute not in ("name",):
                setattr(self, attribute, None)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # no torch here: nothing of it to free
            pass
