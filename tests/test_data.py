"""Pictures, captions, identifiers, buckets and augmentation (dreambooth/data.py).

Every picture is generated here with Pillow; nothing is downloaded."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.data import (SEED_BUCKETS_512, DatasetError, Picture, assign_bucket,
                             bucket_batches, bucket_list, cache_flips, caption_for,
                             collect_pictures, epoch_flips, guess_identifier,
                             has_random_augmentation, identifier_hint, identifier_report,
                             list_pictures, open_picture, picture_tensor, prompt_variant,
                             prompt_warnings, suggest_identifiers, token_length)

torch.set_num_threads(2)
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
ROOT = Path(__file__).resolve().parents[1]


def halves(size: tuple[int, int], left=RED, right=BLUE, mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another: orientation and flips become visible."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode) if mode != "RGB" else image


def config_for(folder: Path, **options) -> TrainingConfig:
    concept = Concept(instance_data_dir=str(folder), instance_prompt=options.pop(
        "instance_prompt", "photo of ohwx dog"), class_data_dir=options.pop("class_dir", ""),
        class_prompt="photo of a dog")
    options.setdefault("with_prior_preservation", False)
    return TrainingConfig(base_model="tiny", concepts=[concept], **options)


def pixel(tensor: torch.Tensor, x: int, y: int) -> tuple[int, int, int]:
    """An RGB pixel of a (3, H, W) tensor in [-1, 1], back in 0..255."""
    values = ((tensor[:, y, x] + 1) * 127.5).round().int().tolist()
    return tuple(values)


def close(a, b, tolerance: int = 12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tokenizer():
    from dreambooth.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def test_list_pictures_by_extension_sorted_not_recursive(tmp_path):
    for name in ("b.png", "A.JPG", "c.webp", "notes.txt", "d.pdf", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in list_pictures(tmp_path)] == ["A.JPG", "b.png", "c.webp"]
    assert [p.name for p in list_pictures(tmp_path, recursive=True)] == [
        "A.JPG", "b.png", "c.webp", "e.png"]


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    halves((80, 40)).save(path, exif=exif.tobytes(), quality=95)
    image = open_picture(path)
    assert image.size == (40, 80)  # shown portrait
    assert close(image.getpixel((20, 5)), RED) and close(image.getpixel((20, 75)), BLUE)
    picture = collect_pictures(config_for(tmp_path))[0]
    assert picture.size == (40, 80)


@pytest.mark.parametrize("background, expected", [("white", WHITE), ("black", BLACK),
                                                  ("#808080", (128, 128, 128))])
def test_alpha_is_composited_on_the_background(tmp_path, background, expected):
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (8, 8, 24, 24))
    image.save(tmp_path / "cutout.png")
    result = open_picture(tmp_path / "cutout.png", background=background)
    assert result.mode == "RGB"
    assert result.getpixel((1, 1)) == expected and result.getpixel((16, 16)) == RED


def test_bad_background_colour_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="alpha_background"):
        collect_pictures(config_for(tmp_path, alpha_background="not-a-colour"))


def test_palette_with_transparency_greyscale_and_cmyk_become_rgb(tmp_path):
    palette = halves((32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    transparent = palette.copy()
    transparent.info["transparency"] = palette.getpixel((0, 0))  # the red half is see-through
    transparent.save(tmp_path / "gif.gif", transparency=palette.getpixel((0, 0)))
    Image.new("L", (16, 16), 100).save(tmp_path / "grey.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    assert close(open_picture(tmp_path / "palette.png").getpixel((2, 2)), RED)
    gif = open_picture(tmp_path / "gif.gif")
    assert gif.getpixel((2, 2)) == WHITE and close(gif.getpixel((30, 2)), BLUE)
    assert open_picture(tmp_path / "grey.png").getpixel((3, 3)) == (100, 100, 100)
    assert close(open_picture(tmp_path / "print.jpg").getpixel((3, 3)), RED, 20)


def test_16_bit_pictures_are_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp, "I;16").save(tmp_path / "scan16.png")
    image = open_picture(tmp_path / "scan16.png")
    assert image.mode == "RGB"
    values = [image.getpixel((x, 4))[0] for x in (0, 32, 63)]
    assert values[0] == 0 and 120 <= values[1] <= 135 and values[2] == 255


def test_tiny_picture_is_upscaled_to_the_training_size(tmp_path):
    halves((16, 16)).save(tmp_path / "icon.png")
    config = config_for(tmp_path, resolution=64)
    picture = collect_pictures(config)[0]
    assert picture.size == (16, 16) and picture.bucket == (64, 64)
    tensor = picture_tensor(picture, config)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert close(pixel(tensor, 5, 32), RED) and close(pixel(tensor, 58, 32), BLUE)


def test_open_picture_max_side_keeps_aspect(tmp_path):
    halves((3000, 2000)).save(tmp_path / "big.png")
    halves((3000, 2000)).save(tmp_path / "big.jpg", quality=90)
    for name in ("big.png", "big.jpg"):
        image = open_picture(tmp_path / name, max_side=600)
        assert image.size == (600, 400)
        assert close(image.getpixel((100, 200)), RED) and close(image.getpixel((500, 200)), BLUE)


# Peak memory from VmHWM: a new program gets a fresh one (ru_maxrss would carry pytest's own peak
# over the exec).
HUGE_PROBE = """
import sys
from pathlib import Path
import torch
from dreambooth.common.config import TrainingConfig
from dreambooth.data import Picture, open_picture, picture_tensor
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
path = Path(sys.argv[1])
before = peak_kb()
image = open_picture(path, max_side=512)
tensor = picture_tensor(Picture(path, "", 0, False, (8000, 6000), (512, 512)), TrainingConfig())
print(image.size[0], image.size[1], (peak_kb() - before) // 1024, *tensor.shape)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_huge_photo_is_decoded_reduced_without_blowing_memory(tmp_path):
    path = tmp_path / "camera.jpg"
    image = Image.new("RGB", (8000, 6000), RED)
    image.paste(BLUE, (4000, 0, 8000, 6000))
    image.save(path, quality=80)
    del image
    # A fresh process, so that its peak memory is only the decode (a full one is 144 MB).
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE, str(path)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    width, height, grown_mb, *shape = map(int, out)
    assert (width, height) == (512, 384) and shape == [3, 512, 512]
    assert grown_mb < 60, f"decoding an 8000x6000 JPEG grew memory by {grown_mb} MB"
    config = config_for(tmp_path)
    tensor = picture_tensor(collect_pictures(config)[0], config)
    assert close(pixel(tensor, 10, 256), RED) and close(pixel(tensor, 500, 256), BLUE)


def corrupt_files(folder: Path) -> None:
    (folder / "random.jpg").write_bytes(os.urandom(2000))
    good = folder / "_tmp.png"
    halves((256, 256)).save(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8))
    noise.save(good, quality=90, format="JPEG")
    data = good.read_bytes()
    good.unlink()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # a download that stopped halfway
    (folder / "text.png").write_text("this is not a picture")


def test_corrupt_files_are_listed_in_one_clear_error(tmp_path):
    halves((64, 64)).save(tmp_path / "good.png")
    corrupt_files(tmp_path)
    with pytest.raises(DatasetError) as error:
        collect_pictures(config_for(tmp_path))
    message = str(error.value)
    for name in ("random.jpg", "truncated.png", "cut.jpg", "text.png"):
        assert name in message
    assert "good.png" not in message and "skip_bad_images" in message


def test_corrupt_files_are_skipped_with_warnings_when_allowed(tmp_path):
    halves((64, 64)).save(tmp_path / "good.png")
    corrupt_files(tmp_path)
    warnings: list[str] = []
    pictures = collect_pictures(config_for(tmp_path, skip_bad_images=True), warn=warnings.append)
    assert [p.path.name for p in pictures] == ["good.png"]
    assert sorted(w.split("skipped ")[1].split(" ")[0].rsplit("/", 1)[-1] for w in warnings) == [
        "cut.jpg", "random.jpg", "text.png", "truncated.png"]


def test_missing_or_empty_folder_names_the_field(tmp_path):
    with pytest.raises(DatasetError, match=r"concepts\[0\]\.instance_data_dir"):
        collect_pictures(config_for(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"concepts\[0\]\.instance_data_dir.*no pictures"):
        collect_pictures(config_for(tmp_path))


def test_class_folder_must_hold_pictures_with_prior_preservation(tmp_path):
    (tmp_path / "me").mkdir()
    halves((64, 64)).save(tmp_path / "me" / "a.png")
    config = config_for(tmp_path / "me", with_prior_preservation=True,
                        class_dir=str(tmp_path / "dog"))
    with pytest.raises(DatasetError, match=r"concepts\[0\]\.class_data_dir"):
        collect_pictures(config)
    assert len(collect_pictures(config, include_class=False)) == 1
    (tmp_path / "dog").mkdir()
    for i in range(5):
        halves((64, 64)).save(tmp_path / "dog" / f"c{i}.png")
    config.num_class_images = 3
    pictures = collect_pictures(config)
    assert [p.is_class for p in pictures] == [False, True, True, True]
    assert pictures[1].caption == "photo of a dog"
    # recursive: a class folder kept inside the instance folder does not become instances
    shutil.move(str(tmp_path / "dog"), str(tmp_path / "me" / "dog"))
    (tmp_path / "me" / "more").mkdir()
    halves((64, 64)).save(tmp_path / "me" / "more" / "b.png")
    config.concepts[0].class_data_dir = str(tmp_path / "me" / "dog")
    config.recursive = True
    pictures = collect_pictures(config)
    assert [(p.path.name, p.is_class) for p in pictures] == [
        ("a.png", False), ("b.png", False), ("c0.png", True), ("c1.png", True), ("c2.png", True)]


# ------------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------------
def test_bucket_list_is_the_seeds_and_scales():
    assert bucket_list(512) == list(SEED_BUCKETS_512)
    assert len(bucket_list(512)) == 19
    assert bucket_list(1024) == [(w * 2, h * 2) for w, h in SEED_BUCKETS_512]
    for resolution in (768, 1024):
        buckets = bucket_list(resolution)
        assert (resolution, resolution) in buckets
        assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
        assert all((h, w) in buckets for w, h in buckets)  # portrait and landscape alike


@pytest.mark.parametrize("size, bucket", [
    ((1000, 1000), (512, 512)), ((1000, 1500), (512, 768)), ((1920, 1080), (832, 448)),
    ((1080, 1920), (448, 832)), ((4000, 1000), (1024, 256)), ((100, 10000), (256, 1024)),
    ((600, 560), (576, 640)[::-1])])
def test_assign_bucket_nearest_aspect(size, bucket):
    assert assign_bucket(*size, bucket_list(512)) == bucket


def test_buckets_shape_the_tensors_and_square_fallback(tmp_path):
    halves((300, 200)).save(tmp_path / "wide.png")
    halves((200, 300)).save(tmp_path / "tall.png")
    on = config_for(tmp_path, aspect_ratio_buckets=True, resolution=512)
    by_name = {p.path.name: p for p in collect_pictures(on)}
    assert by_name["wide.png"].bucket == (768, 512) and by_name["tall.png"].bucket == (512, 768)
    assert picture_tensor(by_name["wide.png"], on).shape == (3, 512, 768)
    assert picture_tensor(by_name["tall.png"], on).shape == (3, 768, 512)
    off = config_for(tmp_path, resolution=64)
    assert {p.bucket for p in collect_pictures(off)} == {(64, 64)}
    # Square fallback: resize to cover, then a center crop (the middle of the picture stays).
    stripes = Image.new("RGB", (300, 100), RED)
    stripes.paste(GREEN, (100, 0, 200, 100))
    stripes.paste(BLUE, (200, 0, 300, 100))
    stripes.save(tmp_path / "wide.png")
    tensor = picture_tensor(Picture(tmp_path / "wide.png", "", 0, False, (300, 100), (64, 64)), off)
    assert close(pixel(tensor, 2, 32), GREEN, 40) and close(pixel(tensor, 61, 32), GREEN, 40)


def test_bucket_batches_hold_one_bucket_and_keep_partial_batches():
    buckets = [(512, 512)] * 5 + [(768, 512)] * 3 + [(512, 768)] * 1
    pictures = [Picture(Path(f"{i}.png"), "", 0, False, b, b) for i, b in enumerate(buckets)]
    batches = bucket_batches(pictures, 2, random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(9))
    assert all(len({pictures[i].bucket for i in batch}) == 1 for batch in batches)
    assert sorted(len(b) for b in batches) == [1, 1, 1, 2, 2, 2]
    assert batches == bucket_batches(pictures, 2, random.Random(0))
    assert any(bucket_batches(pictures, 2, random.Random(s)) != batches for s in range(1, 5))


# ------------------------------------------------------------------------------------------------
# Captions and prompts
# ------------------------------------------------------------------------------------------------
def test_filewords_from_caption_file_or_file_name(tmp_path):
    halves((8, 8)).save(tmp_path / "dog1.png")
    (tmp_path / "dog1.txt").write_text("sitting on grass,\nsunny\n", encoding="utf-8")
    halves((8, 8)).save(tmp_path / "00012-red_car (2).png")
    template = "photo of ohwx dog, [filewords]"
    assert caption_for(tmp_path / "dog1.png", template) == (
        "photo of ohwx dog, sitting on grass, sunny")
    assert caption_for(tmp_path / "00012-red_car (2).png", template) == "photo of ohwx dog, red car"
    (tmp_path / "00001.png").write_bytes(b"")
    assert caption_for(tmp_path / "00001.png", template) == "photo of ohwx dog"
    (tmp_path / "dog1.caption").write_text("other", encoding="utf-8")
    assert caption_for(tmp_path / "dog1.png", "[filewords]",
                       caption_extension=".caption") == "other"


def test_caption_files_dreambooth_versus_native(tmp_path):
    halves((64, 64)).save(tmp_path / "a.png")
    halves((64, 64)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("by ohwx, a castle at dusk", encoding="utf-8")
    dreambooth = config_for(tmp_path, with_prior_preservation=True, class_dir=str(tmp_path))
    captions = {p.path.name: p.caption for p in collect_pictures(dreambooth, include_class=False)}
    assert captions == {"a.png": "photo of ohwx dog", "b.png": "photo of ohwx dog"}
    native = config_for(tmp_path, instance_prompt="by ohwx")
    captions = {p.path.name: p.caption for p in collect_pictures(native)}
    assert captions == {"a.png": "by ohwx, a castle at dusk", "b.png": "by ohwx"}


def test_non_utf8_and_bom_caption_files_are_read(tmp_path):
    halves((8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, crème brûlée".encode("cp1252"))
    assert caption_for(tmp_path / "a.png", "[filewords]") == "café, crème brûlée"
    (tmp_path / "a.txt").write_bytes("\ufeffnaïve".encode("utf-8"))
    assert caption_for(tmp_path / "a.png", "[filewords]") == "naïve"
    (tmp_path / "a.txt").write_bytes("小狗".encode("utf-16"))
    assert caption_for(tmp_path / "a.png", "[filewords]") == "小狗"


def test_tag_shuffle_is_deterministic_and_keeps_leading_tags():
    config = TrainingConfig(shuffle_tags=True, keep_tokens=1)
    caption = "ohwx, red hair, smiling, outdoors, night, from side"
    first = prompt_variant(caption, config, random.Random(7))
    assert first == prompt_variant(caption, config, random.Random(7))
    variants = {prompt_variant(caption, config, random.Random(s)) for s in range(20)}
    assert len(variants) > 5
    for variant in variants:
        tags = variant.split(", ")
        assert tags[0] == "ohwx" and sorted(tags) == sorted(caption.split(", "))
    unchanged = TrainingConfig()
    assert prompt_variant(caption, unchanged, random.Random(0)) == caption


def test_tag_dropout_never_drops_kept_tags():
    config = TrainingConfig(tag_dropout=0.5, keep_tokens=2)
    caption = ", ".join(["ohwx", "woman"] + [f"tag{i}" for i in range(20)])
    lengths = []
    for seed in range(10):
        tags = prompt_variant(caption, config, random.Random(seed)).split(", ")
        assert tags[:2] == ["ohwx", "woman"]
        lengths.append(len(tags))
    assert min(lengths) < 22 and 6 < sum(lengths) / len(lengths) - 2 < 14


def test_long_prompts_are_reported(tmp_path, tokenizer):
    assert token_length("a photo of a cat", tokenizer) == 5
    halves((8, 8)).save(tmp_path / "long.png")
    halves((8, 8)).save(tmp_path / "short.png")
    (tmp_path / "long.txt").write_text(", ".join(f"tag number {i}" for i in range(40)))
    (tmp_path / "short.txt").write_text("a dog")
    pictures = collect_pictures(config_for(tmp_path, instance_prompt="[filewords]"))
    warnings = prompt_warnings(pictures, tokenizer)
    assert len(warnings) == 1 and "long.png" in warnings[0] and "75" in warnings[0]


def test_identifier_report(tokenizer):
    sks = identifier_report("sks", tokenizer)
    assert sks["tokens"] == 1 and sks["verdict"] == "poor" and "rifle" in sks["message"]
    assert sks["suggestions"] and "sks" not in sks["suggestions"]
    dog = identifier_report("dog", tokenizer)
    assert dog["common_word"] and dog["verdict"] == "poor"
    good = identifier_report("ohwx", tokenizer)
    assert good["tokens"] == 1 and good["verdict"] == "good" and good["ids"] == [47993]
    zwx = identifier_report("zwx", tokenizer)  # the seed's example takes two tokens
    assert zwx["tokens"] == 2 and zwx["verdict"] == "ok"
    assert identifier_report("[V]", tokenizer)["verdict"] == "poor"
    for suggestion in sks["suggestions"]:
        assert identifier_report(suggestion, tokenizer)["verdict"] == "good"
    json.dumps(sks)


def old_hint(instance_prompt: str, class_prompt: str, tokenizer) -> dict:
    """What the tab showed before identifier_hint: service.identifier_check's two calls, and the
    suggestions as identifier_report made them then (the fixed list, nothing left out)."""
    report = identifier_report(guess_identifier(instance_prompt, class_prompt), tokenizer)
    report["suggestions"] = suggest_identifiers(tokenizer) if report["verdict"] != "good" else []
    return report


@pytest.mark.parametrize("prompt, identifier, verdict, tokens", [
    ("photo of zwx dog", "zwx", "ok", 2),  # the seed's example: z + wx
    ("photo of ohwx dog", "ohwx", "good", 1),
    ("a photo of sks dog", "sks", "poor", 1),  # the rifle, not "sks dog"
    ("photo of zwx corgi", "zwx", "ok", 2),  # corgi is one known token: not the identifier
    ("photo of ohwx chihuahua, [filewords]", "ohwx", "good", 1),  # chihuahua: a known token
])
def test_without_a_class_prompt_the_class_noun_is_not_counted_in(tokenizer, prompt, identifier,
                                                                 verdict, tokens):
    hint = identifier_hint(prompt, "", tokenizer)
    assert (hint["identifier"], hint["verdict"], hint["tokens"]) == (identifier, verdict, tokens)
    old = old_hint(prompt, "", tokenizer)
    assert old["identifier"] != identifier and old["tokens"] > tokens  # e.g. "zwx dog"


def test_the_identifier_hint_agrees_where_the_old_guess_was_right(tokenizer):
    for prompt, class_prompt in (("photo of zwx dog", "photo of a dog"),
                                 ("photo of sks ohwx dog", "photo of a dog"),
                                 ("[filewords], by ohwx", ""), ("by ohwx", "")):
        hint = identifier_hint(prompt, class_prompt, tokenizer)
        old = old_hint(prompt, class_prompt, tokenizer)
        assert {k: v for k, v in hint.items() if k != "suggestions"} == {
            k: v for k, v in old.items() if k != "suggestions"}, prompt


def test_without_a_class_prompt_or_a_rare_word_the_hint_says_so(tokenizer):
    hint = identifier_hint("photo of a dog", "", tokenizer)
    assert hint["verdict"] == "poor" and "no rare word" in hint["message"]
    assert hint["suggestions"] and "dog" not in hint["suggestions"]
    assert identifier_hint("photo of [V] dog", "", tokenizer)["verdict"] == "poor"
    for nothing in (("", ""), ("   ", "photo of a dog"), ("[filewords]", ""),
                    ("photo of a dog", "photo of a dog")):
        assert identifier_hint(*nothing, tokenizer) is None, nothing
    assert identifier_hint("photo of zwx dog", "", None) is None  # no tokenizer: nothing to say
    json.dumps(identifier_hint("photo of zwx dog", "", tokenizer))


@pytest.mark.parametrize("instance_prompt, class_prompt, in_use", [
    ("photo of ohwx dog", "", "ohwx"),  # the identifier itself (as "ohwx dog" before)
    ("photo of sks ohwx dog", "photo of a dog", "ohwx"),  # a word of the identifier
    ("photo of zwx dog on a nyrd rug", "photo of a dog", "nyrd"),  # a word of the prompt
    ("photo of zwx dog", "photo of a dog, wawx", "wawx"),  # a word of the class prompt
])
def test_suggestions_never_repeat_a_word_of_the_prompts(tokenizer, instance_prompt, class_prompt,
                                                        in_use):
    assert in_use in old_hint(instance_prompt, class_prompt, tokenizer)["suggestions"]
    hint = identifier_hint(instance_prompt, class_prompt, tokenizer)
    words = set((instance_prompt + " " + class_prompt).replace(",", " ").lower().split())
    assert not words & set(hint["suggestions"]), hint
    if hint["verdict"] != "good":
        assert len(hint["suggestions"]) == 5  # as many as before: others take their place
        for suggestion in hint["suggestions"]:
            assert identifier_report(suggestion, tokenizer)["verdict"] == "good"


# ------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------
def test_flip_with_cached_latents_gives_both_orientations(tmp_path):
    halves((64, 64)).save(tmp_path / "a.png")
    halves((64, 64)).save(tmp_path / "b.png")
    config = config_for(tmp_path, resolution=64, hflip=True)
    pictures = collect_pictures(config)
    assert cache_flips(config) == (False, True)
    cached = {(i, f): picture_tensor(p, config, flip=f)
              for i, p in enumerate(pictures) for f in cache_flips(config)}
    assert close(pixel(cached[0, False], 2, 30), RED) and close(pixel(cached[0, True], 2, 30), BLUE)
    assert torch.equal(cached[0, True], cached[0, False].flip(-1))
    rng = random.Random(3)
    for _ in range(5):  # every epoch sees both orientations
        assert sorted(epoch_flips(len(pictures), config, rng)) == [False, True]
    assert cache_flips(config_for(tmp_path)) == (False,)
    assert epoch_flips(4, config_for(tmp_path), rng) == [False] * 4


def test_random_augmentation_is_deterministic_per_rng(tmp_path):
    picture = Image.new("RGB", (96, 64))
    picture.putdata([((x * 3) % 256, (y * 4) % 256, 128) for y in range(64) for x in range(96)])
    picture.save(tmp_path / "gradient.png")
    config = config_for(tmp_path, resolution=64, random_crop=True, rotation_degrees=10,
                        brightness_jitter=0.2, contrast_jitter=0.2)
    assert has_random_augmentation(config) and not has_random_augmentation(config_for(tmp_path))
    item = collect_pictures(config)[0]
    a = picture_tensor(item, config, rng=random.Random(1))
    assert torch.equal(a, picture_tensor(item, config, rng=random.Random(1)))
    assert not torch.equal(a, picture_tensor(item, config, rng=random.Random(2)))
    assert a.shape == (3, 64, 64) and a.min() >= -1 and a.max() <= 1
    plain = config_for(tmp_path, resolution=64)
    assert torch.equal(picture_tensor(item, plain, rng=random.Random(1)),
                       picture_tensor(item, plain, rng=random.Random(2)))


def test_rotation_leaves_no_black_corners(tmp_path):
    Image.new("RGB", (64, 64), WHITE).save(tmp_path / "white.png")
    config = config_for(tmp_path, resolution=64, rotation_degrees=30)
    item = collect_pictures(config)[0]
    for seed in range(5):
        tensor = picture_tensor(item, config, rng=random.Random(seed))
        assert tensor.min() > 0.9  # all white: the rotated box still covers the crop
