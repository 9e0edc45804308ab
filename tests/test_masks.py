"""Masked training and latents sampled from the VAE posterior: masks follow every geometric
change of their picture, weight the loss, are cached with the latents and are reported by the
dataset check; ``latents_from = "sample"`` draws from the posterior, also with the cache."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from dreambooth import data, families
from dreambooth.config import Concept, TrainingConfig
from dreambooth.dataset_check import check_dataset
from dreambooth.objective import dreambooth_loss, mask_weights, posterior_latents
from dreambooth.trainer import LatentSource, train

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
