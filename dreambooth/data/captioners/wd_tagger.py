"""SmilingWolf's WD tagger v3 through onnxruntime: ``model.onnx`` and ``selected_tags.csv``
(columns ``tag_id,name,category,count``; category 9 rating, 4 character, 0 general).

The picture is prepared as SmilingWolf's own demo (the ``SmilingWolf/wd-tagger`` space) does:
transparency on white, padded to a square on white (centred), resized with bicubic to the side
the model's input says (``[batch, side, side, 3]``, 448 for the v3 models), float32 0..255 in
BGR order, NHWC. The model's output is already a probability per tag (its last layer is a
sigmoid).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dreambooth.data.captioners.base import (Captioner, CaptionerError, CaptionerUnavailable,
                                             TaggerOptions)

RATING, GENERAL, CHARACTER = 9, 0, 4  # selected_tags.csv's categories
# Danbooru's kaomoji tags keep their underscore ("^_^" is not "^ ^")
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<",
                     "3_3", "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_tags(path: Path) -> list[Tag]:
    """The tags of ``selected_tags.csv``, in the model's output order."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CaptionerError(f"cannot read {path}: {exc}") from exc
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise CaptionerError(f"{path} is not a tagger's tag list: it needs the columns "
                             "tag_id,name,category,count")
    try:
        return [Tag(row["name"], int(row["category"])) for row in rows]
    except (TypeError, ValueError) as exc:
        raise CaptionerError(f"{path}: a tag's category is not a number ({exc})") from exc


def prepare(image, side: int):
    """``image`` (PIL) as the tagger's input: a float32 array of shape (1, side, side, 3), BGR."""
    import numpy as np
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        canvas.alpha_composite(rgba)
        image = canvas
    image = image.convert("RGB")
    longest = max(image.size)
    square = Image.new("RGB", (longest, longest), WHITE)
    square.paste(image, ((longest - image.size[0]) // 2, (longest - image.size[1]) // 2))
    if longest != side:
        square = square.resize((side, side), Image.BICUBIC)
    array = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR
    return np.ascontiguousarray(array)[None]


def display_name(name: str, underscores_to_spaces: bool) -> str:
    return name.replace("_", " ") if underscores_to_spaces and name not in KAOMOJI else name


def _key(name: str) -> str:
    """A tag as compared for exclusion: case and underscores ignored ("Long_Hair" = "long hair")."""
    return name.strip().lower() if name.strip() in KAOMOJI else name.strip().lower().replace("_", " ")


def select(scores, tags: list[Tag], options: TaggerOptions) -> list[str]:
    """The tags to write, the most confident first, after the options' thresholds and filters."""
    chosen: list[tuple[float, int, str]] = []
    ratings = [(float(scores[i]), i) for i, tag in enumerate(tags) if tag.category == RATING]
    if options.include_rating and ratings:
        score, index = max(ratings)
        chosen.append((score, index, tags[index].name))
    for index, tag in enumerate(tags):
        score = float(scores[index])
        if tag.category == GENERAL and score > options.general_threshold:
            chosen.append((score, index, tag.name))
        elif (tag.category == CHARACTER and options.include_characters
              and score > options.character_threshold):
            chosen.append((score, index, tag.name))
    chosen.sort(key=lambda item: (-item[0], item[1]))
    excluded = {_key(name) for name in options.exclude}
    names = [display_name(name, options.underscores_to_spaces) for _, _, name in chosen
             if _key(name) not in excluded]
    return names[:options.max_tags] if options.max_tags else names


def providers() -> list[str]:
    """onnxruntime's CUDA provider when this onnxruntime has it (onnxruntime-gpu), else the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) \
        + ["CPUExecutionProvider"]


class WDTagger(Captioner):
    """An open WD tagger: the onnxruntime session and its tag list, loaded once."""

    def __init__(self, name: str, folder: Path, options: TaggerOptions):
        try:
            import onnxruntime
        except ImportError as exc:
            raise CaptionerUnavailable(
                f"the captioner {name} runs with onnxruntime, which is not installed here: "
                "pip install onnxruntime (the extension's installer adds it)") from exc
        self.name, self.options = name, options
        model = Path(folder) / "model.onnx"
        self.tags = read_tags(Path(folder) / "selected_tags.csv")
        try:
            self.session = onnxruntime.InferenceSession(str(model), providers=providers())
        except Exception as exc:  # onnxruntime raises its own kinds for a broken file
            raise CaptionerError(f"cannot load {model}: {type(exc).__name__}: {exc} (delete "
                                 "the file to download it again)") from exc
        first = self.session.get_inputs()[0]
        shape = list(first.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] \
                or shape[3] != 3:
            raise CaptionerError(f"{model} is not a WD tagger: its input is {shape}, not "
                                 "[batch, side, side, 3]")
        self.input_name, self.side = first.name, int(shape[1])
        self.output_name = self.session.get_outputs()[0].name

    def scores(self, image):
        """The model's probability for every tag of ``selected_tags.csv``."""
        try:
            out = self.session.run([self.output_name], {self.input_name: prepare(image, self.side)})
        except Exception as exc:
            raise CaptionerError(f"the captioner {self.name} failed: {type(exc).__name__}: "
                                 f"{exc}") from exc
        scores = out[0][0]
        if len(scores) != len(self.tags):
            raise CaptionerError(f"the captioner {self.name}'s model gives {len(scores)} scores "
                                 f"but selected_tags.csv has {len(self.tags)} tags: the two files "
                                 "are from different models")
        return scores

    def caption(self, image) -> str:
        return ", ".join(select(self.scores(image), self.tags, self.options))
