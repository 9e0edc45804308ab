"""Masks read by their real mode: any Pillow image -> an "L" mask (255 = subject).

``convert("L")`` is wrong for masks: it clips 16- and 32-bit greyscale at 255 (a near-black 16-bit
mask becomes all white) and drops alpha. Here:

* greyscale: "1" and "L" as they are; "I;16*" scaled by 65535; "I" by 65535 when its largest value
  fits 16 bits (Pillow loads 16-bit PNGs as "I"; PNG holds no more), else by 2**31 - 1 (32-bit);
  "F" read as 0..1 when its largest value is <= 1, else as 0..255; negatives and NaN are 0;
* every other mode ("P" through its palette, "RGB", "CMYK", "YCbCr" ...) by its luminance;
* alpha (RGBA, LA, PA, La, RGBa, a palette or colour key with transparency): in a mask FILE a
  transparent pixel is background (luminance times opacity); with ``mask_source = "alpha"`` the
  mask is the opacity alone.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

INT16_FULL = 65535
INT32_FULL = 2 ** 31 - 1  # the largest value of Pillow's signed 32-bit "I"
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_NUMERIC_MODES = ("I", "F")  # Pillow's convert() ignores their colour-key transparency


def _is_numeric(mode: str) -> bool:
    return mode in _NUMERIC_MODES or mode.startswith("I;")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def grey_levels(image: Image.Image) -> np.ndarray:
    """Luminance as float64 (H, W) in [0, 1], scaled by the mode's real depth."""
    mode = image.mode
    if not _is_numeric(mode):
        if mode not in ("L", "1"):  # via RGBA: a palette with transparency warns on any other way
            image = image.convert("RGBA")
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = array.max(initial=0.0)
    if mode == "F":
        full = 1.0 if top <= 1.0 else 255.0
    else:
        full = INT16_FULL if mode.startswith("I;16") or top <= INT16_FULL else INT32_FULL
    return np.clip(array / full, 0.0, 1.0)


def alpha_levels(image: Image.Image) -> np.ndarray | None:
    """Opacity as float64 (H, W) in [0, 1]; None when the image has no alpha."""
    if not has_alpha(image):
        return None
    if _is_numeric(image.mode):  # a 16-bit PNG with a tRNS grey: that one value is transparent
        return (np.asarray(image) != image.info["transparency"]).astype(np.float64)
    return np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float64) / 255.0


def mask_image(image: Image.Image, source: str) -> Image.Image:
    """The mask of ``image`` as "L" (255 = subject): its opacity with ``source == "alpha"``,
    else its luminance times its opacity (a transparent pixel of a mask file is background)."""
    if image.mode == "L" and "transparency" not in image.info and source != "alpha":
        return image  # the common case, untouched
    alpha = alpha_levels(image)
    if source == "alpha":
        if alpha is None:
            raise ValueError(f"a {image.mode} picture has no alpha channel")
        levels = alpha
    else:
        levels = grey_levels(image) if alpha is None else grey_levels(image) * alpha
    return Image.fromarray(np.rint(levels * 255.0).astype(np.uint8), "L")


def is_blank(mask: Image.Image) -> bool:
    """All black: with mask_background_weight 0 the picture trains nothing."""
    return mask.getextrema()[1] == 0
