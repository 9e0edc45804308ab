"""Hostile and odd input: pictures, captions, names and configs, each with the outcome a user
sees — accepted, or one clear error naming the field or the file. Never a traceback, never a
silent wrong result, never a hang (pytest-timeout stops a hang).

The config and the names are also tried property-based (hypothesis): any JSON value for any
option, any text as a model name."""
from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dreambooth import data
from dreambooth.common.config import Concept, ConfigError, TrainingConfig, merge_errors
from dreambooth.common.names import MAX_NAME_BYTES, sanitize_model_name

CASES: dict[str, str] = {}  # picture case -> expected outcome ("accepted" or words of the error)


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (the header is all Pillow reads
    before deciding whether it may decode the picture)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), "red").save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    ihdr = raw[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(raw)


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    return save(Image.new("RGB", (80, 40), "blue"), "JPEG", exif=exif)


def picture_cases() -> dict[str, tuple[str, bytes, str]]:
    """name -> (file name, bytes, expected: "accepted" or words of the refusal)."""
    good = save(Image.new("RGB", (64, 48), "green"), "PNG")
    jpeg = save(Image.new("RGB", (64, 48), "green"), "JPEG")
    palette = Image.new("P", (40, 40))
    palette.info["transparency"] = 0
    animated = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    animated[0].save(gif, format="GIF", save_all=True, append_images=animated[1:])
    return {
        "truncated png": ("cut.png", good[: len(good) // 2], "cut.png"),
        "truncated jpeg": ("cut.jpg", jpeg[: len(jpeg) // 2], "cut.jpg"),
        "empty file": ("empty.png", b"", "empty.png"),
        "text named .jpg": ("notes.jpg", b"just some text\n" * 20, "not a picture Pillow can read"),
        "html named .png": ("page.png", b"<html><body>hi</body></html>", "page.png"),
        "header of a 180 MP png": ("bomb.png", png_with_size(15000, 12000), "bomb.png"),
        "header of a 108 MP png": ("huge.png", png_with_size(12000, 9000), "too large to decode"),
        "cmyk jpeg": ("cmyk.jpg", save(Image.new("CMYK", (40, 40), (0, 80, 80, 0)), "JPEG"),
                      "accepted"),
        "16-bit png": ("deep.png", save(Image.new("I;16", (40, 40), 40000), "PNG"), "accepted"),
        "transparent png": ("alpha.png", save(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "PNG"),
                            "accepted"),
        "palette with transparency": ("pal.png", save(palette, "PNG"), "accepted"),
        "1-bit": ("bits.png", save(Image.new("1", (40, 40), 1), "PNG"), "accepted"),
        "greyscale": ("grey.png", save(Image.new("L", (40, 40), 128), "PNG"), "accepted"),
        "exif rotated jpeg": ("turned.jpg", rotated_jpeg(), "accepted"),
        "1x1 pixel": ("dot.png", save(Image.new("RGB", (1, 1), "red"), "PNG"), "accepted"),
        "4000x10 strip": ("strip.png", save(Image.new("RGB", (4000, 10), "red"), "PNG"),
                          "accepted"),
        "animated gif": ("anim.gif", gif.getvalue(), "accepted"),
        "bmp": ("pic.bmp", save(Image.new("RGB", (40, 40), "red"), "BMP"), "accepted"),
        "tiff": ("pic.tiff", save(Image.new("RGB", (40, 40), "red"), "TIFF"), "accepted"),
        "webp": ("pic.webp", save(Image.new("RGB", (40, 40), "red"), "WEBP"), "accepted"),
        "png named .jpg": ("liar.jpg", good, "accepted"),
        "upper-case extension": ("LOUD.PNG", good, "accepted"),
    }


def config_for(folder: Path, **overrides) -> TrainingConfig:
    values = dict(base_model="base.safetensors", model_name="m", resolution=64,
                  with_prior_preservation=False,
                  concepts=[Concept(instance_data_dir=str(folder), instance_prompt="photo of ohwx")])
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.mark.parametrize("case", list(picture_cases()))
def test_every_odd_picture_is_accepted_or_refused_by_name(tmp_path, case):
    name, payload, expected = picture_cases()[case]
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / name).write_bytes(payload)
    (folder / "fine.png").write_bytes(save(Image.new("RGB", (64, 64), "white"), "PNG"))
    config = config_for(folder)
    started = time.time()
    if expected == "accepted":
        pictures = data.collect_pictures(config)
        picture = next(p for p in pictures if p.path.name == name)
        tensor = data.picture_tensor(picture, config)
        assert tuple(tensor.shape) == (3, 64, 64) and -1 <= float(tensor.min()) <= float(tensor.max()) <= 1
    else:
        with pytest.raises(data.DatasetError) as info:
            data.collect_pictures(config)
        message = str(info.value)
        assert expected in message and name in message and "fine.png" not in message
        assert "instance_data_dir" in message
        skipped: list[str] = []
        kept = data.collect_pictures(config_for(folder, skip_bad_images=True), warn=skipped.append)
        assert [p.path.name for p in kept] == ["fine.png"] and name in skipped[0]
    assert time.time() - started < 20  # refused from the header: no 1 GB decode


def test_the_exif_rotation_is_honoured_in_the_size(tmp_path):
    (tmp_path / "turned.jpg").write_bytes(rotated_jpeg())
    (picture,) = data.collect_pictures(config_for(tmp_path))
    assert picture.size == (40, 80)


def test_a_huge_jpeg_is_fine_where_a_huge_png_is_not(tmp_path):
    big = Image.new("RGB", (8200, 5000), "navy")  # 41 MP, over the limit for full decodes
    (tmp_path / "huge.jpg").write_bytes(save(big, "JPEG", quality=50))
    (picture,) = data.collect_pictures(config_for(tmp_path))
    assert picture.size == (8200, 5000)
    (tmp_path / "huge.jpg").unlink()
    (tmp_path / "huge.png").write_bytes(png_with_size(8200, 5000))
    with pytest.raises(data.DatasetError, match=r"8200x5000 \(41 MP\) is too large to decode as PNG"):
        data.collect_pictures(config_for(tmp_path))


@pytest.mark.parametrize("raw, expected", [
    ("zwx dog, red hat".encode("utf-8-sig"), "zwx dog, red hat"),
    ("zwx dog, café".encode("utf-16"), "zwx dog, café"),
    ("zwx dog, café".encode("cp1252"), "zwx dog, café"),
    (b"zwx dog\x00, hidden\x1b[31m", "zwx dog , hidden [31m"),
    (b"zwx\r\ndog\r\n\r\nhat", "zwx, dog, hat"),
    (b"", ""),
    (bytes(range(256)), None),  # binary garbage: read as Windows-1252, no control characters
])
def test_captions_in_odd_encodings_become_clean_prompts(tmp_path, raw, expected):
    (tmp_path / "a.png").write_bytes(save(Image.new("RGB", (8, 8)), "PNG"))
    (tmp_path / "a.txt").write_bytes(raw)
    caption = data.read_caption(tmp_path / "a.png").text
    if expected is not None:
        assert caption == expected
    assert not any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in caption)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("con", "_con"), ("NUL.txt", "_NUL.txt"), ("com1 ", "_com1"), ("a:b", "a_b"),
    ("what?*", "what__"), ("résumé 猫", "résumé 猫")])
def test_windows_hostile_names_are_made_safe(name, expected):
    assert sanitize_model_name(name) == expected


@pytest.mark.parametrize("name", ["a\x00b", "line\nbreak", "esc\x1b", "bell\x07", "\ud800x",
                                  "猫" * 70])
def test_control_characters_and_overlong_names_are_refused(name):
    with pytest.raises(ValueError):
        sanitize_model_name(name)
    errors = TrainingConfig(model_name=name).validate()
    assert "model_name" in [e.field for e in errors]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=150))
def test_any_text_is_a_safe_name_or_a_clear_refusal(tmp_path, text):
    try:
        name = sanitize_model_name(text)
    except ValueError as exc:
        assert str(exc).startswith("model name")
        return
    assert "/" not in name and "\\" not in name and name not in (".", "..")
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    target = tmp_path / f"{name}_1000000.safetensors"
    target.write_bytes(b"x")  # the file system takes it
    assert target.resolve().parent == tmp_path.resolve()
    target.unlink()


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
FIELDS = [f for f in TrainingConfig.__dataclass_fields__]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10 ** 400, max_value=10 ** 400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["concepts_list", "use_8bit_adam", "typo"]),
                       json_values, max_size=6))
def test_any_json_config_is_accepted_or_refused_field_by_field(config):
    try:
        built = TrainingConfig.from_dict(config)
    except ConfigError as exc:
        assert exc.errors and all(e.field and e.message for e in exc.errors)
        return
    errors = built.validate()  # never raises: every problem is a FieldError
    assert all(e.field and e.message for e in errors)
    json.dumps(built.to_dict(), allow_nan=False)  # an accepted config round-trips as JSON


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["concepts_list", "use_8bit_adam", "typo"]),
                       json_values, max_size=6) | json_values)
def test_parse_keeps_what_parsed_and_lists_the_rest(config):
    """parse never raises; its errors are from_dict's; its partial config can still be checked."""
    partial, errors = TrainingConfig.parse(config)
    try:
        built = TrainingConfig.from_dict(config)
    except ConfigError as exc:
        assert [str(e) for e in exc.errors] == [str(e) for e in errors]
    else:
        assert not errors and built == partial
    assert all(e.field and e.message for e in partial.validate())  # never raises
    json.dumps(partial.to_dict(), allow_nan=False)


def test_a_partial_config_keeps_every_field_that_parsed():
    partial, errors = TrainingConfig.parse({
        "resolution": 100000, "learning_rate": "fast", "typo": 1, "seed": "12",
        "concepts": [{"instance_prompt": "photo of ohwx dog", "instance_data_dir": 7}, 3,
                     {"instance_prompt": "photo of zwx cat"}]})
    assert [e.field for e in errors] == ["learning_rate", "typo", "concepts[0].instance_data_dir",
                                         "concepts[1]"]
    assert partial.resolution == 100000 and partial.seed == 12
    assert partial.learning_rate == TrainingConfig().learning_rate  # the default
    assert [c.instance_prompt for c in partial.concepts] == ["photo of ohwx dog", "",
                                                             "photo of zwx cat"]  # indices kept
    later = partial.validate()
    merged = merge_errors(errors, later + [errors[0]])
    fields = [e.field for e in merged]
    assert fields[:4] == [e.field for e in errors] and "resolution" in fields
    assert "concepts[0].instance_data_dir" not in fields[4:]  # failed to parse: not again
    assert not any(f.startswith("concepts[1]") for f in fields[4:])
    assert "concepts[2].instance_data_dir" in fields[4:]  # parsed, still empty: reported
    assert len(merged) == len({(e.field, e.message) for e in merged})
    _, file_errors = TrainingConfig.parse({"concepts_list": "/no/such/list.json"})
    assert [e.field for e in merge_errors(file_errors, TrainingConfig().validate())] == [
        "concepts_list", "base_model"]  # not "concepts: add at least one concept" as well


@pytest.mark.parametrize("field, value, words", [
    ("seed", 10 ** 400, "seed: must be in [0, 4294967295], not a 401-digit number"),
    ("learning_rate", 10 ** 400, "learning_rate: expected a number"),
    ("resolution", 100000, "resolution: must be in [0, 4096]"),
    ("resolution", 32, "resolution: must be 0 (the model's own) or at least 64, not 32"),
    ("resolution", 100, "resolution: must be a multiple of 8"),
    ("max_train_steps", -5, "max_train_steps: must be in [0, 10000000]"),
    ("train_batch_size", 10 ** 9, "train_batch_size: must be in [1, 256]"),
    ("learning_rate", float("inf"), "learning_rate: expected a number"),
    ("learning_rate", "1e-6", None),
    ("seed", "12", None),
    ("seed", True, "seed: expected a whole number"),
    ("sample_steps", -1, "sample_steps: must be in [0, 1000]"),
    ("tag_dropout", 1, "tag_dropout: must be in [0, 1)"),
])
def test_absurd_numbers_are_named_before_any_work(field, value, words):
    try:
        config = TrainingConfig.from_dict({field: value})
        messages = [str(e) for e in config.validate()]
    except ConfigError as exc:
        messages = [str(e) for e in exc.errors]
    found = [m for m in messages if m.startswith(field)]
    assert (words is None and not found) or (words is not None and any(words in m for m in found)), messages


SEED_LIST = '''# You can also add multiple concepts here. Try tweaking `--max_train_steps` accordingly.

concepts_list = [
    {
        "instance_prompt":      "photo of zwx dog",
        "class_prompt":         "photo of a dog",
        "instance_data_dir":    "%s",
        "class_data_dir":       "%s"
    },
#     {
#         "instance_prompt":      "photo of ukj person",
#         "class_prompt":         "photo of a person",
#     }
]
'''


def test_the_seeds_concepts_list_is_read_in_every_form(tmp_path):
    inst, cls = tmp_path / "zwx", tmp_path / "dog"
    (tmp_path / "seed.txt").write_text(SEED_LIST % (inst, cls))
    concepts = [{"instance_prompt": "photo of zwx dog", "class_prompt": "photo of a dog",
                 "instance_data_dir": str(inst), "class_data_dir": str(cls)}]
    (tmp_path / "concepts_list.json").write_text(json.dumps(concepts))
    expected = [Concept(instance_data_dir=str(inst), instance_prompt="photo of zwx dog",
                        class_data_dir=str(cls), class_prompt="photo of a dog")]
    assert TrainingConfig.load(tmp_path / "seed.txt").concepts == expected  # bare, Python form
    assert TrainingConfig.load(tmp_path / "concepts_list.json").concepts == expected  # bare JSON
    (tmp_path / "run.json").write_text(json.dumps({"concepts_list": "seed.txt", "seed": 3}))
    assert TrainingConfig.load(tmp_path / "run.json").concepts == expected  # relative to the config
    with_path = TrainingConfig.from_dict({"concepts_list": str(tmp_path / "concepts_list.json")})
    assert with_path.concepts == expected
    from dreambooth.data.dataset_check import check_main

    # `check` reads the seed's file too: it reports the missing folders, not the file's form
    assert check_main([str(tmp_path / "seed.txt"), "--no-tokenizer"]) == 2


def test_a_concepts_list_that_runs_code_or_is_missing_is_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"concepts_list = __import__('os').system('touch {marker}')")
    for given, words in ((str(tmp_path / "evil.py"), "only plain values"),
                         (str(tmp_path / "missing.json"), "cannot read"),
                         (str(tmp_path), "cannot read")):
        with pytest.raises(ConfigError) as info:
            TrainingConfig.from_dict({"concepts_list": given})
        assert info.value.errors[0].field == "concepts_list" and words in str(info.value)
    assert not marker.exists()
    (tmp_path / "bad.json").write_text('[{"instance_prompt": 3}]')
    with pytest.raises(ConfigError, match=r"concepts_list \(bad.json\): concepts\[0\].instance_prompt"):
        TrainingConfig.from_dict({"concepts_list": str(tmp_path / "bad.json")})


@pytest.mark.parametrize("field, value", [
    ("base_model", "model\x00.safetensors"), ("vae_path", "v\x01ae"),
    ("caption_extension", ".t\x00xt")])
def test_control_characters_in_paths_are_refused_up_front(field, value):
    errors = TrainingConfig(**{field: value}).validate()
    assert any(e.field == field and "control characters" in e.message for e in errors)
    concept = Concept(instance_data_dir="pics\x00", instance_prompt="zwx\x00")
    errors = {e.field for e in TrainingConfig(concepts=[concept]).validate()}
    assert {"concepts[0].instance_data_dir", "concepts[0].instance_prompt"} <= errors
