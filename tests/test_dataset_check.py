"""The dataset check on a deliberately messy folder (dreambooth/dataset_check.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.data.dataset_check import check_dataset, check_main


@pytest.fixture(scope="module")
def tokenizer():
    from dreambooth.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def messy_set(root: Path) -> TrainingConfig:
    """A folder as users bring them: sizes of every kind, a copy, a broken file, a transparent
    cut-out, captions missing, too long or not UTF-8; a class folder with a real photo."""
    pictures = root / "pictures"
    pictures.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (768, 1024), (40 * i, 90, 160)).save(pictures / f"good{i}.jpg")
        (pictures / f"good{i}.txt").write_text("on a beach, smiling", encoding="utf-8")
    Image.new("RGB", (1600, 900), (10, 200, 10)).save(pictures / "wide.png")
    (pictures / "wide.txt").write_bytes("in a café".encode("cp1252"))
    shutil.copy(pictures / "good0.jpg", pictures / "good0 copy.jpg")  # duplicate
    Image.new("RGB", (200, 150), (90, 90, 90)).save(pictures / "thumbnail.jpg")  # low resolution
    cutout = Image.new("RGBA", (600, 600), (0, 0, 0, 0))
    cutout.paste((255, 0, 0, 255), (100, 100, 500, 500))
    cutout.save(pictures / "cutout.png")
    (pictures / "cutout.txt").write_text(", ".join(f"very long tag {i}" for i in range(40)),
                                         encoding="utf-8")
    (pictures / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (pictures / "notes.md").write_text("ignored: not a picture extension")
    classes = root / "class"
    classes.mkdir()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS 5D"
    Image.new("RGB", (512, 512), (1, 1, 1)).save(classes / "holiday.jpg", exif=exif.tobytes())
    Image.new("RGB", (512, 512), (5, 5, 5)).save(classes / "class_00000.png")
    concept = Concept(instance_data_dir=str(pictures), class_data_dir=str(classes),
                      instance_prompt="photo of sks person, [filewords]",
                      class_prompt="photo of a person", num_class_images=10)
    return TrainingConfig(base_model="tiny", concepts=[concept], resolution=512)


def test_report_on_a_messy_folder(tmp_path, tokenizer):
    config = messy_set(tmp_path)
    report = check_dataset(config, tokenizer)
    assert not report.ok
    assert len(report.errors) == 1 and "broken.jpg" in report.errors[0]
    assert "skip_bad_images" in report.errors[0]
    concept = report.concepts[0]
    instance = concept.instance
    assert instance.pictures == 8 and instance.undecodable[0].startswith("broken.jpg")
    assert instance.size_ranges[">= 1024"] == 0 and instance.size_ranges["768-1023"] == 6
    assert instance.size_ranges["< 256"] == 1 and instance.orientation["portrait"] == 5
    assert instance.smallest == [200, 150]
    assert instance.below_resolution == ["thumbnail.jpg (200x150)"]
    assert instance.duplicates == [["good0 copy.jpg", "good0.jpg"]]
    assert instance.transparent == ["cutout.png"]
    assert instance.captions_missing == ["good0 copy.jpg", "thumbnail.jpg"]
    assert instance.captions_not_utf8 == ["wide.txt"]
    assert len(instance.prompts_too_long) == 1 and instance.prompts_too_long[0].startswith(
        "cutout.png")
    assert instance.buckets == {"512x512": 8}  # buckets off: every picture a square
    assert concept.class_folder.pictures == 2 and concept.class_missing == 8
    assert concept.class_folder.camera_pictures == ["holiday.jpg"]
    assert concept.identifier["identifier"] == "sks"
    text = "\n".join(report.warnings)
    for expected in ("rifle", "thumbnail.jpg", "good0 copy.jpg = good0.jpg", "cutout.png",
                     "wide.txt", "holiday.jpg", "only pictures the model generated",
                     "800 steps"):
        assert expected in text, expected
    rendered = report.to_text()
    assert "8 will be generated before training" in rendered and "broken.jpg" in rendered
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False


def test_buckets_and_skipped_files_make_the_set_usable(tmp_path, tokenizer):
    config = messy_set(tmp_path)
    config.aspect_ratio_buckets = True
    config.skip_bad_images = True
    report = check_dataset(config, tokenizer)
    assert report.ok, report.errors
    # 768x1024 (3:4) -> 512x704, 16:9 -> 832x448, 4:3 -> 704x512, square -> 512x512
    assert report.concepts[0].instance.buckets == {"512x704": 5, "832x448": 1, "704x512": 1,
                                                   "512x512": 1}
    assert any("poorly with DreamBooth" in w for w in report.warnings)
    assert any("broken.jpg" in w and "skipped" in w for w in report.warnings)


def test_real_photo_in_both_folders_and_placeholder_identifier(tmp_path):
    config = messy_set(tmp_path)
    shutil.copy(tmp_path / "pictures" / "good1.jpg", tmp_path / "class" / "good1.jpg")
    config.concepts[0].instance_prompt = "photo of [V] person"
    report = check_dataset(config)  # no tokenizer: the rest is still checked
    assert any("instance folder and a class folder" in w and "good1.jpg" in w
               for w in report.warnings)
    assert any("[V]" in w for w in report.warnings)
    assert report.concepts[0].identifier is None


def test_missing_folder_and_native_training_advice(tmp_path):
    config = TrainingConfig(base_model="tiny", with_prior_preservation=False, concepts=[
        Concept(instance_data_dir=str(tmp_path / "nowhere"), instance_prompt="by ohwx")])
    report = check_dataset(config)
    assert not report.ok and "concepts[0].instance_data_dir" in report.errors[0]
    (tmp_path / "nowhere").mkdir()
    Image.new("RGB", (600, 600)).save(tmp_path / "nowhere" / "a.png")
    report = check_dataset(config)
    assert report.ok
    assert any("native training wants roughly 100" in w for w in report.warnings)
    assert any("no .txt caption" in w for w in report.warnings)  # native: captions are prompts


def test_check_command(tmp_path, capsys):
    config = messy_set(tmp_path)
    path = config.save(tmp_path / "config.json")
    assert check_main([str(path), "--no-tokenizer"]) == 2
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "error" in out
    (tmp_path / "pictures" / "broken.jpg").unlink()
    assert check_main([str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["concepts"][0]["instance"]["pictures"] == 8
    (tmp_path / "bad.json").write_text('{"resolution": "big"}')
    assert check_main([str(tmp_path / "bad.json")]) == 2
    assert "resolution" in capsys.readouterr().err
