"""Masked training and latents sampled from the VAE posterior: masks follow every geometric
change of their picture, weight the loss, are cached with the latents and are reported by the
dataset check; ``latents_from = "sample"`` draws from the posterior, also with the cache."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth import data
from dreambooth.models import families
from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.data.dataset_check import check_dataset
from dreambooth.models.objective import dreambooth_loss, mask_weights, posterior_latents
from dreambooth.engine.trainer import LatentSource, train

from trainer_fixtures import RecordingReporter, flat, run_paths, tiny_components


def subject_picture(folder, name="a", size=(96, 64), box=(20, 10, 60, 50), alpha=False):
    """A grey picture with a red square (the subject) and its mask file (or alpha channel)."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", size, (128, 128, 128))
    picture.paste((250, 10, 10), box)
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    if alpha:
        rgba = picture.convert("RGBA")
        rgba.putalpha(mask)
        rgba.save(folder / f"{name}.png")
    else:
        picture.save(folder / f"{name}.png")
        mask.save(folder / f"{name}.mask.png")
    return folder / f"{name}.png"


def masked_config(root, **overrides) -> TrainingConfig:
    inst = root / "instance"
    if not inst.exists():
        subject_picture(inst, "a")
        subject_picture(inst, "b", box=(40, 20, 90, 60))
    values = dict(
        base_model=str(root / "base.safetensors"), model_name="masked",
        concepts=[Concept(instance_data_dir=str(inst), instance_prompt="photo of zwx toy")],
        with_prior_preservation=False, resolution=64, max_train_steps=3, learning_rate=1e-3,
        optimizer="adamw", mixed_precision="no", gradient_checkpointing=False,
        checkpoint_every_n_steps=0, seed=3, sample_steps=0, masked_training=True,
        mask_background_weight=0.0)
    values.update(overrides)
    return TrainingConfig(**values)


def run(root, **overrides):
    config = masked_config(root, **overrides)
    components = tiny_components()
    reporter = RecordingReporter()
    train(config, run_paths(root), reporter=reporter, components=components, export_model=False)
    return components, reporter


def test_mask_files_are_masks_not_pictures(tmp_path):
    subject_picture(tmp_path / "pics")
    assert [p.name for p in data.list_pictures(tmp_path / "pics")] == ["a.png"]
    pictures = data.collect_pictures(masked_config(tmp_path), include_class=False)
    assert {p.path.name: p.mask.name for p in pictures} == {"a.png": "a.mask.png",
                                                          "b.png": "b.mask.png"}


@pytest.mark.parametrize("options", [
    {}, {"random_crop": True}, {"rotation_degrees": 20.0}, {"aspect_ratio_buckets": True},
    {"random_crop": True, "rotation_degrees": 10.0, "aspect_ratio_buckets": True}])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("alpha", [False, True])
def test_the_mask_stays_on_the_subject_through_every_transform(tmp_path, options, flip, alpha):
    path = subject_picture(tmp_path / "p", alpha=alpha)
    config = masked_config(tmp_path, mask_source="alpha" if alpha else "file",
                           alpha_background="black", **options)
    size = (96, 64)
    picture = data.Picture(path, "x", 0, False, size, data.bucket_for(size, config),
                           data.mask_for(path, config.mask_source))
    pixels, mask = data.picture_and_mask(picture, config, flip=flip, rng=random.Random(5),
                                         mask=picture.mask)
    assert mask.shape[1:] == pixels.shape[1:]
    red = (pixels[0] > 0.5) & (pixels[1] < -0.5)  # where the subject is in the picture
    agree = ((mask[0] > 0.5) == red).float().mean().item()
    assert agree > 0.97, agree
    assert red.any() and (~red).any()


def test_without_a_mask_picture_tensor_is_unchanged(tmp_path):
    path = subject_picture(tmp_path / "p")
    config = masked_config(tmp_path, random_crop=True, rotation_degrees=15.0, hflip=True)
    picture = data.Picture(path, "x", 0, False, (96, 64), (64, 64))
    plain = data.picture_tensor(picture, config, flip=True, rng=random.Random(2))
    with_mask, _ = data.picture_and_mask(picture, config, flip=True, rng=random.Random(2),
                                         mask=data.mask_path(path))
    assert torch.equal(plain, with_mask)  # the same rng draws: masks change nothing else


def test_masked_loss_is_the_weighted_mean_of_the_error():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    weights = mask_weights(masks, 0.2)
    loss, _, _ = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=1.0,
                                 pixel_weights=weights)
    error = (pred - target) ** 2
    w = weights.expand_as(error)
    expected = ((error * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Background weight 0: the error outside the mask does not count at all.
    changed = pred.clone()
    changed[masks.expand_as(pred) == 0] += 5.0
    zero = mask_weights(masks, 0.0)
    assert dreambooth_loss(changed, target, n_instance=2, prior_loss_weight=1.0,
                           pixel_weights=zero)[0].item() == pytest.approx(
        dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=1.0,
                        pixel_weights=zero)[0].item(), rel=1e-6)


def test_masked_training_changes_what_is_learned(tmp_path):
    masked, _ = run(tmp_path / "masked")
    whole, _ = run(tmp_path / "whole", masked_training=False)
    weight_one, _ = run(tmp_path / "one", mask_background_weight=1.0)
    assert not torch.equal(flat(masked.unet), flat(whole.unet))
    assert torch.equal(flat(weight_one.unet), flat(whole.unet))  # weight 1 everywhere = no mask


def test_background_weight_changes_training(tmp_path):
    zero, _ = run(tmp_path / "zero")
    some, _ = run(tmp_path / "some", mask_background_weight=0.3)
    assert not torch.equal(flat(zero.unet), flat(some.unet))


def test_masks_are_cached_with_the_latents_and_work_without_the_cache(tmp_path):
    config = masked_config(tmp_path, hflip=True)
    components = tiny_components()
    source = LatentSource(components.vae, config, "cpu", torch.float32, families.for_kind("sd1"))
    pictures = data.collect_pictures(config, include_class=False)
    items = [(p, f, p.bucket) for p in pictures for f in (False, True)]
    source.fill_cache(items, lambda: False, lambda *_: None)
    for picture, flip, bucket in items:
        cached = source.cache[source.key(picture, flip, bucket)]
        assert cached.mask.shape == (1, 8, 8) and cached.mean.shape == (4, 8, 8)
        assert 0.1 < cached.mask.mean().item() < 0.6  # the subject's share of the picture
    a, b = (source.cache[source.key(pictures[0], f, pictures[0].bucket)].mask for f in (0, 1))
    assert torch.equal(a.flip(-1), b)
    # Random crop turns the cache off: masks are made with each step's picture.
    uncached, _ = run(tmp_path / "crop", random_crop=True)
    plain, _ = run(tmp_path / "crop-whole", random_crop=True, masked_training=False)
    assert not torch.equal(flat(uncached.unet), flat(plain.unet))


def test_broken_mask_is_named_before_training(tmp_path):
    config = masked_config(tmp_path)
    (tmp_path / "instance" / "b.mask.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match=r"b\.mask\.png: mask"):
        data.collect_pictures(config, include_class=False)
    report = check_dataset(config)
    assert any("b.mask.png" in e or "b.png" in e for e in report.errors), report.errors


def test_dataset_check_reports_pictures_with_and_without_masks(tmp_path):
    config = masked_config(tmp_path)
    inst = tmp_path / "instance"
    Image.new("RGB", (64, 64), (0, 200, 0)).save(inst / "c.png")  # no mask
    subject_picture(inst, "d")
    Image.new("L", (96, 64), 0).save(inst / "d.mask.png")  # all black
    Image.new("L", (40, 40), 255).save(inst / "b.mask.png")  # another size: stretched
    report = check_dataset(config)
    folder = report.concepts[0].instance
    assert folder.masks_found == 3 and folder.masks_missing == ["c.png"]
    assert folder.masks_empty == ["d.mask.png"]
    assert any("40x40" in b for b in folder.masks_bad)
    text = report.to_text()
    assert "masks: 3 of 4" in text and "no mask" in text and "all black" in text
    assert not report.errors
    off = check_dataset(masked_config(tmp_path, masked_training=False))
    assert "masks:" not in off.to_text()


def test_the_run_log_says_masks_were_used(tmp_path):
    _, reporter = run(tmp_path, mask_background_weight=0.25)
    (line,) = [line for line in reporter.lines if line.startswith("masked training:")]
    assert "2 of 2 instance pictures have a mask (<name>.mask.png)" in line and "0.25" in line
    _, plain = run(tmp_path / "plain", masked_training=False)
    assert not any(line.startswith("masked training:") for line in plain.lines)


def test_masked_training_without_any_mask_says_so(tmp_path):
    inst = tmp_path / "instance"
    inst.mkdir()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(inst / "c.png")
    report = check_dataset(masked_config(tmp_path, mask_source="alpha"))
    assert any("no picture has an alpha channel" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------
# Latents: the posterior mean, or a sample of it
# ------------------------------------------------------------------------------------------

def test_posterior_sample_is_mean_plus_std_times_normal():
    mean, std = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
    gen = torch.Generator().manual_seed(4)
    drawn = posterior_latents(mean, std, gen)
    expected = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(drawn, expected)
    assert torch.equal(posterior_latents(mean, None, gen), mean)


def test_sampled_latents_keep_the_std_in_the_cache_and_change_training(tmp_path):
    config = masked_config(tmp_path, masked_training=False, latents_from="sample")
    components = tiny_components()
    source = LatentSource(components.vae, config, "cpu", torch.float32, families.for_kind("sd1"))
    picture = data.collect_pictures(config, include_class=False)[0]
    source.fill_cache([(picture, False, picture.bucket)], lambda: False, lambda *_: None)
    cached = source.cache[source.key(picture, False, picture.bucket)]
    with torch.no_grad():
        dist = components.vae.encode(data.picture_tensor(picture, config)[None]).latent_dist
    scale = components.vae.config.scaling_factor
    assert torch.allclose(cached.std, dist.std[0] * scale) and cached.std.min() > 0
    sampled, _ = run(tmp_path / "s", masked_training=False, latents_from="sample")
    again, _ = run(tmp_path / "s2", masked_training=False, latents_from="sample")
    mean, _ = run(tmp_path / "m", masked_training=False)
    assert torch.equal(flat(sampled.unet), flat(again.unet))  # drawn from the step's seed
    assert not torch.equal(flat(sampled.unet), flat(mean.unet))
    uncached, _ = run(tmp_path / "u", masked_training=False, latents_from="sample",
                      cache_latents=False)
    assert torch.equal(flat(uncached.unet), flat(sampled.unet))  # the cache changes nothing


# ------------------------------------------------------------------------------------------
# Masks read by their real mode (16-bit, palette, alpha ...), and all-black masks refused
# ------------------------------------------------------------------------------------------

def raw_png(path, array, color_type, trns: bytes = b""):
    """A 16-bit PNG written by hand (Pillow cannot save 16-bit LA nor 16-bit grey with tRNS)."""
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + (chunk(b"tRNS", trns) if trns else b"")
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def grey16(value, size=(64, 64)):
    return Image.fromarray(np.full(size[::-1], value, np.uint16), "I;16")


def palette(index_alpha=None):
    """A palette picture of index 1 (white); ``index_alpha``: index 1's opacity."""
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 255, 255, 255])
    if index_alpha is not None:
        image.info["transparency"] = bytes([255, index_alpha])
    return image


def grey_palette():
    image = Image.new("P", (64, 64), 0)
    image.putpalette([128, 128, 128])
    return image


def save_png(image):
    return lambda path: image.save(path)


def save_tiff(image):  # content decides the format: a 32-bit or float mask can only be a TIFF
    return lambda path: image.save(path, format="TIFF")


MASK_FILES = {  # name -> (how the mask file is written, the value training must see)
    "I;16 near black": (save_png(grey16(1000)), 1000 / 65535),
    "I;16 white": (save_png(grey16(65535)), 1.0),
    "I;16 half": (save_png(grey16(32768)), 0.5),
    "I 16-bit range": (save_png(Image.fromarray(np.full((64, 64), 1000, np.int32), "I")),
                       1000 / 65535),
    "I 32-bit": (save_tiff(Image.fromarray(np.full((64, 64), 2 ** 30, np.int32), "I")), 0.5),
    "F 0..1": (save_tiff(Image.fromarray(np.full((64, 64), 0.25, np.float32), "F")), 0.25),
    "F 0..255": (save_tiff(Image.fromarray(np.full((64, 64), 64.0, np.float32), "F")),
                 64 / 255),
    "1": (save_png(Image.new("1", (64, 64), 1)), 1.0),
    "P grey": (save_png(grey_palette()), 128 / 255),
    "P half transparent": (save_png(palette(128)), 0.5),
    "LA half transparent": (save_png(Image.new("LA", (64, 64), (255, 128))), 0.5),
    "LA 16-bit": (lambda p: raw_png(p, np.dstack([np.full((64, 64), 65535),
                                                  np.full((64, 64), 32768)]), 4), 0.5),
    "RGBA half transparent": (save_png(Image.new("RGBA", (64, 64), (255, 255, 255, 128))), 0.5),
    "RGBA opaque grey": (save_png(Image.new("RGBA", (64, 64), (64, 64, 64, 255))), 64 / 255),
    "I;16 colour key": (lambda p: raw_png(p, np.full((64, 64), 65535), 0,
                                          trns=(65535).to_bytes(2, "big")), 0.0),
    "RGB red": (save_png(Image.new("RGB", (64, 64), (255, 0, 0))), 76 / 255),
    "CMYK white": (save_tiff(Image.new("CMYK", (64, 64), (0, 0, 0, 0))), 1.0),
}


def mask_seen_in_training(root, **overrides):
    """The mask tensor training sees for root/instance/a.png, as collect_pictures finds it."""
    config = masked_config(root, mask_background_weight=0.1, **overrides)
    picture = data.collect_pictures(config, include_class=False, warn=lambda _: None)[0]
    _, mask = data.picture_and_mask(picture, config, mask=picture.mask)
    return mask


@pytest.mark.parametrize("name", list(MASK_FILES))
def test_mask_files_are_read_by_their_real_mode(tmp_path, name):
    write, expected = MASK_FILES[name]
    inst = tmp_path / "instance"
    inst.mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(inst / "a.png")
    write(inst / "a.mask.png")
    mask = mask_seen_in_training(tmp_path)
    assert mask.shape == (1, 64, 64)
    assert mask.mean().item() == pytest.approx(expected, abs=0.006), name
    assert mask.std().item() < 1e-6  # uniform masks stay uniform


def test_a_16_bit_png_mask_comes_back_from_pillow_as_16_bit(tmp_path):
    grey16(1000).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:  # "I" in Pillow 9.5, "I;16" in later ones
        assert image.mode in ("I", "I;16") and image.getextrema() == (1000, 1000)


def half_key_grey16():
    """16-bit grey, left half the tRNS colour key (transparent), right half opaque."""
    array = np.full((64, 64), 40000)
    array[:, :32] = 1234
    return array


ALPHA_PICTURES = {  # name -> (how the picture is written, its mean opacity)
    "RGBA": (save_png(Image.new("RGBA", (64, 64), (200, 10, 10, 128))), 0.5),
    "LA": (save_png(Image.new("LA", (64, 64), (200, 128))), 0.5),
    "P with transparency": (save_png(palette(128)), 0.5),
    "LA 16-bit": (lambda p: raw_png(p, np.dstack([np.full((64, 64), 9000),
                                                  np.full((64, 64), 32768)]), 4), 0.5),
    "I;16 colour key": (lambda p: raw_png(p, half_key_grey16(), 0,
                                          trns=(1234).to_bytes(2, "big")), 0.5),
}


@pytest.mark.parametrize("name", list(ALPHA_PICTURES))
def test_alpha_masks_are_the_opacity_of_every_mode(tmp_path, name):
    write, expected = ALPHA_PICTURES[name]
    inst = tmp_path / "instance"
    inst.mkdir()
    write(inst / "a.png")
    mask = mask_seen_in_training(tmp_path, mask_source="alpha")
    assert mask.mean().item() == pytest.approx(expected, abs=0.006), name


def black_masked_folder(root, black=("a", "b")):
    config = masked_config(root)  # makes a.png, b.png with white-square masks
    for name in black:
        Image.new("L", (96, 64), 0).save(root / "instance" / f"{name}.mask.png")
    return config


def test_all_black_masks_with_background_weight_0_are_refused_by_name(tmp_path):
    config = black_masked_folder(tmp_path)
    with pytest.raises(data.DatasetError,
                       match=r"concepts\[0\]\.instance_data_dir: .*mask_background_weight"):
        data.collect_pictures(config, include_class=False)
    report = check_dataset(config)
    assert any("mask_background_weight" in e and "train nothing" in e for e in report.errors)
    with pytest.raises(data.DatasetError, match="mask_background_weight"):
        train(config, run_paths(tmp_path), reporter=RecordingReporter(),
              components=tiny_components(), export_model=False)
    some = masked_config(tmp_path, mask_background_weight=0.2)  # the background still trains
    assert len(data.collect_pictures(some, include_class=False)) == 2
    assert not check_dataset(some).errors


def test_a_16_bit_near_black_mask_is_all_black_not_white(tmp_path):
    config = black_masked_folder(tmp_path, black=())
    grey16(100).save(tmp_path / "instance" / "a.mask.png")  # 100/65535: black at 8 bits
    grey16(100).save(tmp_path / "instance" / "b.mask.png")
    with pytest.raises(data.DatasetError, match="mask_background_weight"):
        data.collect_pictures(config, include_class=False)
    folder = check_dataset(config).concepts[0].instance
    assert folder.masks_empty == ["a.mask.png", "b.mask.png"]


def test_some_black_masks_are_warned_and_listed_as_training_nothing(tmp_path):
    config = black_masked_folder(tmp_path, black=("b",))
    warnings: list[str] = []
    pictures = data.collect_pictures(config, include_class=False, warn=warnings.append)
    assert len(pictures) == 2
    assert len(warnings) == 1 and "b.png" in warnings[0] and "trains nothing" in warnings[0]
    report = check_dataset(config)
    assert report.concepts[0].instance.masks_empty == ["b.mask.png"]
    assert not report.errors
    assert any("b.mask.png" in w and "train nothing" in w for w in report.warnings)
    assert "train nothing" in report.to_text()
    weighted = check_dataset(masked_config(tmp_path, mask_background_weight=0.3))
    assert not any("train nothing" in w for w in weighted.warnings)
