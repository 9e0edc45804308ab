"""Fake only: what the fake interrogators "see" in a picture — its mean colour, so a test can tell
which picture got which caption (the real ones run BLIP, CLIP and DeepDanbooru networks)."""
from __future__ import annotations

# a few named colours; a picture is called by the nearest one
_NAMES = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200),
          "yellow": (230, 210, 40), "white": (245, 245, 245), "black": (10, 10, 10),
          "grey": (128, 128, 128)}


def mean_colour(pil_image) -> tuple[int, int, int]:
    small = pil_image.convert("RGB").resize((8, 8))
    pixels = list(small.getdata())
    return tuple(round(sum(p[i] for p in pixels) / len(pixels)) for i in range(3))


def colour_name(rgb: tuple[int, int, int]) -> str:
    return min(_NAMES, key=lambda n: sum((a - b) ** 2 for a, b in zip(_NAMES[n], rgb)))


def hex_of(rgb: tuple[int, int, int]) -> str:
    return "%02x%02x%02x" % rgb
