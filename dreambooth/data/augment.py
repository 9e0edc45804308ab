"""Pictures -> tensors: a picture as training sees it (its bucket, random crop, rotation,
colour jitter, the flip the trainer chose) and its mask through exactly the same steps."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth.common.config import TrainingConfig
from dreambooth.data.pictures import (RANDOM_CROP_MAX_ZOOM, Picture, _decode, background_color,
                                      open_mask)


def has_random_augmentation(config: TrainingConfig) -> bool:
    """True when pictures change from epoch to epoch beyond a flip (random crop, rotation,
    brightness or contrast jitter): latents then cannot be cached exactly."""
    return bool(config.random_crop or config.rotation_degrees > 0
                or config.brightness_jitter > 0 or config.contrast_jitter > 0)


def cache_flips(config: TrainingConfig) -> tuple[bool, ...]:
    """The orientations to cache per picture: both when horizontal flip is on."""
    return (False, True) if config.hflip else (False,)


def epoch_flips(count: int, config: TrainingConfig, rng: random.Random) -> list[bool]:
    """Which of ``count`` pictures to mirror this epoch: half of them (shuffled) when hflip is on,
    so both orientations are seen every epoch; none when it is off."""
    if not config.hflip:
        return [False] * count
    flips = [i < count // 2 for i in range(count)]
    if count % 2:
        flips[-1] = rng.random() < 0.5
    rng.shuffle(flips)
    return flips


def picture_tensor(picture: Picture, config: TrainingConfig, *, flip: bool = False,
                   rng: random.Random | None = None,
                   bucket: tuple[int, int] | None = None) -> "torch.Tensor":
    """The picture as float32 (3, H, W) in [-1, 1]; see :func:`picture_and_mask`."""
    return picture_and_mask(picture, config, flip=flip, rng=rng, bucket=bucket)[0]


def picture_and_mask(picture: Picture, config: TrainingConfig, *, flip: bool = False,
                     rng: random.Random | None = None, bucket: tuple[int, int] | None = None,
                     mask: Path | None = None) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """The picture and its mask; see :func:`picture_view`."""
    view = picture_view(picture, config, flip=flip, rng=rng, bucket=bucket, mask=mask)
    return view.pixels, view.mask


@dataclass
class View:
    """A picture as training sees it: pixels (3, H, W) in [-1, 1], its mask (1, H, W) in [0, 1]
    or None, and where the crop's top-left corner lies in the resized picture, (top, left) in
    pixels, mirrored with the picture (SDXL is conditioned on it)."""

    pixels: "torch.Tensor"
    mask: "torch.Tensor | None"
    crop_top_left: tuple[int, int]


def picture_view(picture: Picture, config: TrainingConfig, *, flip: bool = False,
                 rng: random.Random | None = None, bucket: tuple[int, int] | None = None,
                 mask: Path | None = None) -> View:
    """The picture as float32 (3, H, W) in [-1, 1] at ``bucket or picture.bucket``: resized to
    cover the bucket and cropped (center, or random with config.random_crop and an ``rng``), then
    rotated / brightness / contrast jittered when configured and an ``rng`` is given. The same rng
    state gives the same tensor. ``flip`` mirrors it (the trainer decides flips). With ``mask``
    (see :func:`mask_for`) also the mask as float32 (1, H, W) in [0, 1], through the same resize,
    crop, rotation and flip; else None."""
    import torch

    width, height = bucket or picture.bucket
    angle = zoom = 0.0
    if rng is not None and config.random_crop:
        zoom = rng.uniform(0.0, RANDOM_CROP_MAX_ZOOM - 1.0)
    if rng is not None and config.rotation_degrees > 0:
        angle = rng.uniform(-config.rotation_degrees, config.rotation_degrees)
    # The box to cut before rotating: big enough that the rotated box still covers W x H.
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    box_w = math.ceil(width * cos + height * sin)
    box_h = math.ceil(width * sin + height * cos)
    src_w, src_h = picture.size
    cover = max(box_w / src_w, box_h / src_h) * (1.0 + zoom)
    # One resample only: the decoder skips what the cover size does not need, _cover does the rest.
    image = _decode(picture.path, background_color(config.alpha_background), cover)
    layers = [image]
    if mask is not None:
        layers.append(open_mask(mask, config.mask_source, image.size))
    layers = [_cover(layer, box_w, box_h, zoom) for layer in layers]
    left, top = _crop_origin(layers[0].size, (box_w, box_h), rng if config.random_crop else None)
    resized_width = layers[0].width
    layers = [layer.crop((left, top, left + box_w, top + box_h)) for layer in layers]
    # The corner of the final width x height window (inside the rotated box when rotating).
    corner = (top + (box_h - height) // 2, left + (box_w - width) // 2)
    if angle:
        left, top = (box_w - width) // 2, (box_h - height) // 2
        layers = [layer.rotate(angle, resample=Image.Resampling.BICUBIC)
                  .crop((left, top, left + width, top + height)) for layer in layers]
    array = np.asarray(layers[0], dtype=np.float32) / 255.0
    if rng is not None and config.brightness_jitter > 0:
        array = array * (1.0 + rng.uniform(-config.brightness_jitter, config.brightness_jitter))
    if rng is not None and config.contrast_jitter > 0:
        mean = float(array.mean())
        array = (array - mean) * (1.0 + rng.uniform(-config.contrast_jitter,
                                                    config.contrast_jitter)) + mean
    array = np.clip(array, 0.0, 1.0) * 2.0 - 1.0
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    mask_tensor = None
    if mask is not None:
        mask_tensor = torch.from_numpy(np.asarray(layers[1], dtype=np.float32) / 255.0)[None]
    if flip:
        tensor = tensor.flip(-1).contiguous()
        mask_tensor = mask_tensor.flip(-1).contiguous() if mask_tensor is not None else None
        corner = (corner[0], resized_width - corner[1] - width)
    return View(tensor, mask_tensor, corner)


def _cover(image: Image.Image, width: int, height: int, zoom: float) -> Image.Image:
    """Resize so the picture covers width x height (times 1 + zoom) with no side short."""
    scale = max(width / image.width, height / image.height) * (1.0 + zoom)
    target = (max(width, math.ceil(image.width * scale - 1e-6)),
              max(height, math.ceil(image.height * scale - 1e-6)))
    if target == image.size:
        return image
    upscale = target[0] > image.width
    return image.resize(target, Image.Resampling.BICUBIC if upscale else Image.Resampling.LANCZOS,
                        reducing_gap=None if upscale else 3.0)


def _crop_origin(size: tuple[int, int], box: tuple[int, int],
                 rng: random.Random | None) -> tuple[int, int]:
    spare_w, spare_h = size[0] - box[0], size[1] - box[1]
    if rng is None:
        return spare_w // 2, spare_h // 2
    return rng.randint(0, spare_w), rng.randint(0, spare_h)
