"""Pictures, captions, identifiers, aspect-ratio buckets and augmentation.

Everything the trainer reads from the user's folders goes through here, so that a bad file is
found before training starts (never a crash an hour in), and so that instance pictures, class
pictures, cached latents and on-the-fly batches are all prepared the same way.

Decisions (documented in docs/pictures.md too):

* **Captions.** A prompt template may hold ``[filewords]``; it is replaced by the text of the
  caption file beside the picture (``photo.jpg`` -> ``photo.txt``), or, without one, by the
  cleaned file name. A template *without* ``[filewords]`` is used as is for DreamBooth (the
  seed's "original paper method": one prompt for all pictures, caption files are ignored); in
  native training (prior preservation off) the caption file replaces it when there is one (the
  seed's per-picture prompts), and the template is the fallback for pictures without a caption.
* **Caption encoding.** UTF-8 (with or without a BOM), UTF-16 with a BOM, and anything else is
  read as Windows-1252 (every byte decodes) and reported by the dataset check, so a caption
  saved by an old Windows editor never stops training.
* **Buckets.** The seed's 19 buckets at 512 px, scaled to the resolution and rounded to multiples
  of 64 (of 8 below 512 px, for the tiny test model). A picture goes to the bucket of nearest
  aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and
  cropped. With buckets off every picture is a square at the resolution, as the seed describes.
* **Random crop** zooms in by up to 10 % and picks a random window: on a square picture in a
  square bucket a pure offset would do nothing.
* **Masks** (``masked_training``): ``photo.mask.png`` beside ``photo.jpg`` (white = subject), or
  the picture's own alpha channel (``mask_source = "alpha"``). A mask goes through exactly the
  resize, crop, rotation and flip of its picture (``picture_and_mask``), so it stays on the
  subject in every bucket and augmentation. Mask files are never listed as pictures. Masks are
  read by their real mode (16-bit greyscale scaled, not clipped; alpha in a mask file makes
  transparent pixels background): see ``masks.py``. With ``mask_background_weight`` 0 an
  all-black mask trains nothing: warned per picture, refused when a concept has nothing else.
* **Flips** are decided by the trainer (``epoch_flips``), never inside ``picture_tensor``, so that
  cached latents can hold a picture and its mirror and the flip still varies during training.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageColor, ImageOps

from dreambooth.common.config import TrainingConfig
from dreambooth.data.masks import has_alpha, is_blank, mask_image

log = logging.getLogger(__name__)

FILEWORDS = "[filewords]"
# The seed's aspect-ratio buckets at 512 px, (width, height).
SEED_BUCKETS_512: tuple[tuple[int, int], ...] = (
    (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768),
    (512, 704), (512, 512), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448),
    (896, 384), (960, 384), (1024, 384), (1024, 320), (1024, 256))
RANDOM_CROP_MAX_ZOOM = 1.10
EXIF_ORIENTATION = 0x0112
# Formats Pillow names but cannot decode without extra software (stubs, Ghostscript, video).
UNDECODABLE_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS", "FITS"})
# JPEG decodes at 1/2, 1/4 or 1/8 size (draft mode); every other format is decoded whole, so its
# pixel count is capped: 40 MP is 160 MB as RGBA, a 108 MP PNG would take about 1 GB.
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
MAX_FULL_DECODE_PIXELS = 40_000_000
MASK_SUFFIX = ".mask"  # photo.jpg -> photo.mask.png


class DatasetError(ValueError):
    """The pictures cannot be used as they are; the message names the folder or files and what
    to do about them."""


@dataclass
class Picture:
    path: Path
    caption: str  # the prompt for this picture (template with [filewords] resolved)
    concept_index: int
    is_class: bool
    size: tuple[int, int]  # original (width, height), after EXIF orientation
    bucket: tuple[int, int]  # target (width, height)
    mask: Path | None = None  # with masked_training: its mask file, or the picture (alpha)


@dataclass
class BadPicture:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name} ({self.reason})"


@dataclass
class CaptionFile:
    path: Path
    text: str | None  # None: no caption file
    encoding: str = "utf-8"  # what it was read as; "cp1252" means it was not UTF-8


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def picture_extensions() -> frozenset[str]:
    """Extensions of the formats Pillow can *open* and decode by itself (not the save-only ones
    such as .pdf, nor stubs such as .mpg): other files in the folder are not pictures."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in UNDECODABLE_FORMATS)


def list_pictures(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The pictures in ``folder`` (sorted; hidden files and folders skipped), by extension."""
    folder = Path(folder)
    extensions = picture_extensions()
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in candidates:
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative):
            continue  # .thumbnails, .DS_Store, our own .tmp files
        if path.suffix.lower() in extensions and not is_mask_file(path) and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix().lower())


def is_mask_file(path: Path) -> bool:
    """``photo.mask.png``: the mask of ``photo.*``, not a picture of its own."""
    return path.stem.lower().endswith(MASK_SUFFIX)


def mask_path(picture: Path) -> Path:
    return picture.with_name(picture.stem + MASK_SUFFIX + ".png")


def mask_for(picture: Path, source: str) -> Path | None:
    """Where the mask of ``picture`` comes from: its mask file, or (``source == "alpha"``) the
    picture itself when it has an alpha channel; None when it has no mask."""
    if source == "alpha":
        with Image.open(picture) as image:
            return picture if has_alpha(image) else None
    found = mask_path(picture)
    return found if found.is_file() else None


def open_mask(path: Path, source: str, size: tuple[int, int]) -> Image.Image:
    """The mask as greyscale ("L", 255 = subject) at ``size`` (the decoded picture's size), read
    by its real mode (:func:`masks.mask_image`): EXIF orientation applied like the picture's, a
    mask file of another size stretched to it."""
    with Image.open(path) as image:
        check_decode_size(image)
        image.load()
        oriented = ImageOps.exif_transpose(image)
    mask = mask_image(oriented, source)
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def background_color(name: str) -> tuple[int, int, int]:
    """The RGB colour transparent pixels are composited on ("white", "black", "#808080" ...)."""
    try:
        rgb = ImageColor.getrgb(name or "white")
    except ValueError as exc:
        raise DatasetError(f"alpha_background: {name!r} is not a colour; use white, black or "
                           "#rrggbb") from exc
    return rgb[0], rgb[1], rgb[2]


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is shown, i.e. after its EXIF orientation."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make the picture unusable
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited on ``background``; 16-bit scaled down."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        # convert("L") clips 16-bit values at 255 (a white picture); scale them instead.
        array = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        elif mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if has_alpha(image):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def open_picture(path: Path, *, background: str = "white",
                 max_side: int | None = None) -> Image.Image:
    """Open a picture as RGB: EXIF orientation applied, alpha composited on ``background``,
    palette / greyscale / 16-bit / CMYK converted. With ``max_side`` the longer side of the result
    is at most ``max_side``: JPEGs are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``), other
    formats are shrunk with ``reduce`` before the final resample, so an 8000x6000 photo never
    costs a full-size decode for a 512 px bucket."""
    with Image.open(path) as probe:
        longest = max(probe.size)
    scale = max_side / longest if max_side and longest > max_side else 1.0
    result = _decode(path, background_color(background), scale)
    if scale < 1.0:
        target = _scaled(result.size, max_side / max(result.size))
        if target != result.size:
            result = result.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return result


def _decode(path: Path, background: tuple[int, int, int], scale: float) -> Image.Image:
    """Decode as RGB, letting JPEG skip detail below ``scale`` x the full size (never smaller:
    draft keeps the decoded size >= the request, so the caller's resize only shrinks)."""
    with Image.open(path) as image:
        check_decode_size(image)
        if scale < 1.0:
            image.draft(image.mode, (max(1, math.ceil(image.width * scale)),
                                     max(1, math.ceil(image.height * scale))))
        image.load()
        oriented = ImageOps.exif_transpose(image)
    return _to_rgb(oriented, background)


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def check_decode_size(image: Image.Image) -> None:
    """Refuse (ValueError) a picture whose whole decode would take too much memory."""
    width, height = image.size
    if image.format not in DRAFT_FORMATS and width * height > MAX_FULL_DECODE_PIXELS:
        raise ValueError(
            f"{width}x{height} ({width * height / 1e6:.0f} MP) is too large to decode as "
            f"{image.format or 'this format'} (the limit is {MAX_FULL_DECODE_PIXELS // 1_000_000} MP;"
            " JPEGs of any size are fine); save it smaller")


def probe_picture(path: Path) -> tuple[int, int]:
    """Open and decode ``path`` to prove it is readable; returns its oriented (width, height).
    Raises OSError/ValueError (and friends) when it is not. JPEGs are decoded at 1/8 scale: the
    whole stream is still read, so truncation shows, at a fraction of the cost."""
    with Image.open(path) as image:
        check_decode_size(image)
        size = oriented_size(image)
        image.draft(image.mode, (1, 1))
        image.load()  # truncated or corrupt data only shows when the pixels are decoded
    return size


def file_hash(path: Path) -> str:
    """SHA-256 of the file's bytes (duplicate detection)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Captions and prompts
# ---------------------------------------------------------------------------------------------
def caption_path(path: Path, caption_extension: str = ".txt") -> Path:
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return path.with_suffix(extension)


def decode_caption(raw: bytes) -> tuple[str, str]:
    """(text, encoding): UTF-8 (BOM or not), UTF-16 with a BOM, else Windows-1252."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), "utf-16"
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), "cp1252"


_INVISIBLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clean_caption(text: str) -> str:
    """One line: lines joined with ", " (taggers write one tag per line), spaces collapsed, and
    invisible control characters (NUL, escape...) dropped."""
    lines = [" ".join(line.split()) for line in _INVISIBLE.sub(" ", text).splitlines()]
    return ", ".join(line for line in lines if line)


def read_caption(path: Path, caption_extension: str = ".txt") -> CaptionFile:
    """The caption file beside picture ``path`` (text None when there is none)."""
    file = caption_path(path, caption_extension)
    try:
        raw = file.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return CaptionFile(file, None)
    text, encoding = decode_caption(raw)
    return CaptionFile(file, clean_caption(text), encoding)


_LEADING_NUMBER = re.compile(r"^[-\d]+\s*")  # "00012-" prefixes, as the WebUI's [filewords]
_COPY_SUFFIX = re.compile(r"\s*(\(\d+\)|copy)$", re.IGNORECASE)


def filename_caption(path: Path) -> str:
    """A caption made from the file name: "00012-red_car (2).jpg" -> "red car"."""
    text = _LEADING_NUMBER.sub("", path.stem)
    text = _COPY_SUFFIX.sub("", text.replace("_", " "))
    return " ".join(text.split())


def fill_template(template: str, words: str) -> str:
    """Replace [filewords] and tidy the commas and spaces an empty caption leaves behind."""
    text = template.replace(FILEWORDS, words)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a, , b" -> "a, b"
    text = re.sub(r"\s+,", ",", text)
    return " ".join(text.split()).strip(" ,")


def caption_for(path: Path, template: str, *, caption_extension: str = ".txt",
                prefer_caption_file: bool = False) -> str:
    """The prompt for picture ``path``.

    ``[filewords]`` in ``template`` -> the caption file's text, or the cleaned file name.
    No ``[filewords]``: the template as is (DreamBooth), unless ``prefer_caption_file`` (native
    training) and a caption file exists, whose text then is the prompt."""
    if FILEWORDS in template:
        caption = read_caption(path, caption_extension).text
        return fill_template(template, caption if caption is not None else filename_caption(path))
    if prefer_caption_file:
        caption = read_caption(path, caption_extension).text
        if caption:
            return caption
    return " ".join(template.split())


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def prompt_variant(caption: str, config: TrainingConfig, rng: random.Random) -> str:
    """Tag shuffle and tag dropout of comma-separated tags; the first ``keep_tokens`` tags (e.g.
    the identifier) stay in place and are never dropped. Unchanged when both are off."""
    if not config.shuffle_tags and config.tag_dropout <= 0:
        return caption
    tags = split_tags(caption)
    fixed, rest = tags[:config.keep_tokens], tags[config.keep_tokens:]
    if config.shuffle_tags:
        rng.shuffle(rest)
    if config.tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= config.tag_dropout]
    return ", ".join(fixed + rest)


def token_length(prompt: str, tokenizer) -> int:
    """Tokens the prompt takes, without the start/end markers (the WebUI's "n/75")."""
    return len(tokenizer.tokenize(prompt))


def prompt_token_limit(tokenizer) -> int:
    """Tokens a prompt may take: the text encoder's window (77) minus the start/end markers."""
    return int(getattr(tokenizer, "model_max_length", 77) or 77) - 2


def prompt_warnings(pictures: Iterable[Picture], tokenizer) -> list[str]:
    """One line per distinct prompt longer than one 75-token chunk (diffusers' pipelines cut
    what the training reads in chunks)."""
    limit = prompt_token_limit(tokenizer)
    by_prompt: dict[str, list[Picture]] = defaultdict(list)
    for picture in pictures:
        by_prompt[picture.caption].append(picture)
    lines = []
    for prompt, group in by_prompt.items():
        length = token_length(prompt, tokenizer)
        if length > limit:
            names = ", ".join(p.path.name for p in group[:3]) + (" ..." if len(group) > 3 else "")
            kind = "class" if group[0].is_class else "instance"
            lines.append(f"concepts[{group[0].concept_index}] {kind} prompt is {length} tokens: "
                         f"trained in chunks of {limit} as the WebUI reads it (preview samples "
                         f"and class pictures read only the first {limit}): {prompt!r} ({names})")
    return lines


# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------
def bucket_step(resolution: int) -> int:
    """Bucket sides are multiples of 64 (the SD UNet's granularity); of 8 below 512 px."""
    return 64 if resolution >= 512 else 8


def bucket_list(resolution: int) -> list[tuple[int, int]]:
    """The seed's 19 buckets, scaled from 512 px to ``resolution`` (duplicates from rounding
    dropped), (width, height), tallest first."""
    step = bucket_step(resolution)
    scale = resolution / 512
    buckets: list[tuple[int, int]] = []
    for width, height in SEED_BUCKETS_512:
        bucket = (max(step, int(round(width * scale / step)) * step),
                  max(step, int(round(height * scale / step)) * step))
        if bucket not in buckets:
            buckets.append(bucket)
    return buckets


def assign_bucket(width: int, height: int,
                  buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to the picture's (compared in log space)."""
    ratio = math.log(max(width, 1) / max(height, 1))
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


# What resolution 0 ("the model's own") means where no model has said yet: SD1.x's size. A run
# resolves it from its model first (families.with_model_resolution, the trainer).
UNRESOLVED_RESOLUTION = 512


def bucket_for(size: tuple[int, int], config: TrainingConfig) -> tuple[int, int]:
    resolution = config.resolution or UNRESOLVED_RESOLUTION
    if not config.aspect_ratio_buckets:
        return resolution, resolution
    return assign_bucket(size[0], size[1], bucket_list(resolution))


def bucket_batches(pictures: list[Picture], batch_size: int,
                   rng: random.Random) -> list[list[int]]:
    """One epoch of batches (indices into ``pictures``): each batch from one bucket, pictures
    shuffled within buckets and batches shuffled; a bucket's last partial batch is kept."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, picture in enumerate(pictures):
        groups[picture.bucket].append(index)
    batches = []
    for bucket in sorted(groups):  # sorted: the same rng state gives the same epoch
        indices = groups[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices), max(1, batch_size))]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# Collecting
# ---------------------------------------------------------------------------------------------
@dataclass
class FolderScan:
    """What a folder holds: readable pictures with their sizes, and the files that are not."""

    folder: Path
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    bad: list[BadPicture] = field(default_factory=list)


def scan_folder(folder: str | Path, *, recursive: bool = False,
                paths: list[Path] | None = None) -> FolderScan:
    """Decode every picture of ``folder`` (at reduced size) and sort the good from the bad."""
    scan = FolderScan(Path(folder))
    for path in list_pictures(folder, recursive=recursive) if paths is None else paths:
        try:
            scan.sizes[path] = probe_picture(path)
        except Image.DecompressionBombError:
            scan.bad.append(BadPicture(path, "too many pixels for Pillow's safety limit"))
        except Exception as exc:  # Pillow raises many kinds; each means "cannot be used"
            scan.bad.append(BadPicture(path, _reason(exc)))
    return scan


def _reason(exc: Exception) -> str:
    text = str(exc).split("\n")[0]
    if "cannot identify image file" in text:
        return "not a picture Pillow can read"
    return text or type(exc).__name__


def collect_pictures(config: TrainingConfig, *, include_class: bool = True,
                     warn: Callable[[str], None] | None = None) -> list[Picture]:
    """Every picture of every concept, with its prompt and bucket.

    Instance folders must exist and hold pictures (DatasetError naming
    ``concepts[i].instance_data_dir``). Class folders are read when prior preservation is on and
    ``include_class``: at most the concept's num_class_images, the first by name. Undecodable
    files raise a DatasetError listing them all, unless ``config.skip_bad_images``: then each is
    reported through ``warn`` (default: the logger) and left out. With masked training and
    ``mask_background_weight`` 0, all-black masks are warned, or refused when no picture of a
    concept has anything else."""
    warn = warn or log.warning
    background_color(config.alpha_background)  # a bad colour fails now, not at the first batch
    native = not config.with_prior_preservation
    pictures: list[Picture] = []
    bad: list[tuple[str, BadPicture]] = []
    blank: dict[int, list[Path]] = defaultdict(list)  # all-black masks with background weight 0
    for index, concept in enumerate(config.concepts):
        where = f"concepts[{index}]"
        folder = _existing_folder(concept.instance_data_dir, f"{where}.instance_data_dir",
                                  "the folder with this concept's pictures")
        paths = list_pictures(folder, recursive=config.recursive)
        if config.recursive:  # a class folder kept inside the instance folder is not instances
            paths = [p for p in paths if not _inside_class_folder(p, config)]
        scan = scan_folder(folder, paths=paths)
        if not scan.sizes and not scan.bad:
            raise DatasetError(f"{where}.instance_data_dir: {folder} holds no pictures "
                               "(PNG, JPEG, WebP ...); put this concept's pictures there")
        bad += [(f"{where}.instance_data_dir", b) for b in scan.bad]
        for path, size in scan.sizes.items():
            caption = caption_for(path, concept.instance_prompt,
                                  caption_extension=config.caption_extension,
                                  prefer_caption_file=native)
            mask = None
            if config.masked_training:
                try:
                    mask = mask_for(path, config.mask_source)
                    # Decoded now: a broken mask must not stop step 900.
                    if (mask is not None and is_blank(open_mask(mask, config.mask_source, size))
                            and config.mask_background_weight <= 0):
                        blank[index].append(path)
                except Exception as exc:
                    source = path if config.mask_source == "alpha" else mask_path(path)
                    bad.append((f"{where}.instance_data_dir",
                                BadPicture(source, f"mask: {_reason(exc)}")))
                    continue
            pictures.append(Picture(path, caption, index, False, size, bucket_for(size, config),
                                    mask))
        if include_class and config.with_prior_preservation:
            pictures += _class_pictures(config, index, bad)
    if bad:
        listing = "\n".join(f"  - {field_}: {b.path}: {b.reason}" for field_, b in bad)
        if not config.skip_bad_images:
            raise DatasetError(f"{len(bad)} file(s) cannot be opened as pictures:\n{listing}\n"
                               "delete or re-save them, or turn on skip_bad_images to leave "
                               "them out")
        for field_, b in bad:
            warn(f"skipped {b.path} ({field_}): {b.reason}")
    for index in range(len(config.concepts)):
        if not any(p.concept_index == index and not p.is_class for p in pictures):
            raise DatasetError(f"concepts[{index}].instance_data_dir: "
                               f"{config.concepts[index].instance_data_dir} holds no readable "
                               "pictures")
    _refuse_blank_masks(config, pictures, blank, warn)
    return pictures


def _refuse_blank_masks(config: TrainingConfig, pictures: list[Picture],
                        blank: dict[int, list[Path]], warn: Callable[[str], None]) -> None:
    """All-black masks with background weight 0 give a zero loss: a concept whose every picture
    has one would train nothing (a zero LoRA, exit 0), so it is refused; fewer are warned."""
    for index, paths in blank.items():
        folder = config.concepts[index].instance_data_dir
        kept = sum(1 for p in pictures if p.concept_index == index and not p.is_class)
        if len(paths) >= kept:
            raise DatasetError(
                f"concepts[{index}].instance_data_dir: every mask in {folder} is all black and "
                "mask_background_weight is 0, so this concept would train nothing; paint the "
                "subject white in the masks (white = subject; in a 16-bit mask white is 65535), "
                "or raise mask_background_weight above 0")
        for path in paths:
            warn(f"{path}: its mask is all black and mask_background_weight is 0: this picture "
                 f"trains nothing (concepts[{index}].instance_data_dir); paint the subject white "
                 "in its mask")


def _inside_class_folder(path: Path, config: TrainingConfig) -> bool:
    parents = {parent.resolve() for parent in path.parents}
    return any(c.class_data_dir.strip() and Path(c.class_data_dir).expanduser().resolve() in parents
               for c in config.concepts)


def _class_pictures(config: TrainingConfig, index: int,
                    bad: list[tuple[str, BadPicture]]) -> list[Picture]:
    concept = config.concepts[index]
    where = f"concepts[{index}].class_data_dir"
    folder = Path(concept.class_data_dir).expanduser()
    paths = list_pictures(folder) if folder.is_dir() else []
    if not paths:
        raise DatasetError(f"{where}: {folder} holds no class pictures; generate them first "
                           "(prior preservation) or turn prior preservation off")
    scan = scan_folder(folder, paths=paths[:config.class_images_for(concept)])
    bad += [(where, b) for b in scan.bad]
    return [Picture(path, caption_for(path, concept.class_prompt,
                                      caption_extension=config.caption_extension),
                    index, True, size, bucket_for(size, config))
            for path, size in scan.sizes.items()]


def _existing_folder(value: str, field_: str, what: str) -> Path:
    if not value.strip():
        raise DatasetError(f"{field_}: empty; give {what}")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{field_}: {folder} is not a folder; give {what}")
    return folder
