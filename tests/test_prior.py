"""Class pictures for prior preservation (dreambooth/prior.py), made by the tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.data import collect_pictures, list_pictures
from dreambooth.engine.prior import class_pictures_needed, generate_class_pictures

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pipeline():
    from dreambooth.models.tiny import build_components

    return build_components("tiny", seed=0).pipeline()


class Spy:
    """Forwards to the real pipeline and records every call's arguments."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipeline(**kwargs)


def make_config(tmp_path: Path, *, wanted: int = 5, **options) -> TrainingConfig:
    instance = tmp_path / "instance"
    instance.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(options.pop("instance_sizes", [(64, 64)])):
        Image.new("RGB", size, (200, 30, 30)).save(instance / f"me{i}.png")
    concept = Concept(instance_data_dir=str(instance), instance_prompt="photo of ohwx dog",
                      class_data_dir=str(tmp_path / "class"), class_prompt="photo of a dog",
                      class_negative_prompt=options.pop("negative", ""))
    options = dict(dict(resolution=64, class_batch_size=2, class_sample_steps=2, seed=100,
                        num_class_images=wanted), **options)
    return TrainingConfig(base_model="tiny", concepts=[concept], **options)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_counts_prompt_files_and_existing_pictures_count(tmp_path, pipeline):
    config = make_config(tmp_path, wanted=5, negative="blurry")
    (tmp_path / "class").mkdir()
    for i in range(2):  # already generated earlier: they count
        Image.new("RGB", (64, 64), (0, 0, 90)).save(tmp_path / "class" / f"old{i}.png")
    assert class_pictures_needed(config) == [(0, 3)]
    spy, progress, lines = Spy(pipeline), [], []
    made = generate_class_pictures(config, spy, progress=lambda d, t: progress.append((d, t)),
                                   log=lines.append)
    assert made == {0: 3}
    assert class_pictures_needed(config) == []
    pictures = list_pictures(tmp_path / "class")
    assert len(pictures) == 5
    new = [p for p in pictures if p.name.startswith("class_")]
    assert [p.name for p in new] == ["class_00002.png", "class_00003.png", "class_00004.png"]
    for path in new:
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == "photo of a dog"
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert "Negative prompt: blurry" in image.info["parameters"]
    assert progress == [(0, 3), (2, 3), (3, 3)]  # "0 / 3" before the first batch
    assert [len(call["prompt"]) for call in spy.calls] == [2, 1]  # batched by class_batch_size
    assert spy.calls[0]["negative_prompt"] == ["blurry", "blurry"]
    assert spy.calls[0]["num_inference_steps"] == 2
    assert "clip_skip" not in spy.calls[0]
    assert any("3 class pictures made" in line for line in lines)
    # nothing left behind: no temporary files
    assert sorted(p.name for p in (tmp_path / "class").iterdir() if p.name.startswith(".")) == []
    # the class pictures then load with their prompt
    loaded = [p for p in collect_pictures(config) if p.is_class]
    assert len(loaded) == 5 and {p.caption for p in loaded} == {"photo of a dog"}


def test_resume_after_cancel_gives_the_same_pictures(tmp_path, pipeline):
    reference = make_config(tmp_path / "a", wanted=5)
    generate_class_pictures(reference, pipeline, log=lambda _: None)
    config = make_config(tmp_path / "b", wanted=5)
    asked = []

    def stop_after_first_batch() -> bool:
        asked.append(1)
        return len(asked) > 1

    made = generate_class_pictures(config, pipeline, should_stop=stop_after_first_batch,
                                   log=lambda _: None)
    assert made == {0: 2}
    assert len(list_pictures(tmp_path / "b" / "class")) == 2  # what was made is kept
    assert class_pictures_needed(config) == [(0, 3)]
    assert generate_class_pictures(config, pipeline, log=lambda _: None) == {0: 3}
    a = list_pictures(tmp_path / "a" / "class")
    b = list_pictures(tmp_path / "b" / "class")
    assert [p.name for p in a] == [p.name for p in b]
    for left, right in zip(a, b):
        assert np.abs(pixels(left) - pixels(right)).max() <= 1
    assert np.abs(pixels(a[0]) - pixels(a[1])).max() > 10  # each picture has its own seed
    assert generate_class_pictures(config, pipeline, log=lambda _: None) == {0: 0}


def test_existing_files_are_never_overwritten(tmp_path, pipeline):
    config = make_config(tmp_path, wanted=3, class_batch_size=4)
    folder = tmp_path / "class"
    folder.mkdir()
    mine = folder / "class_00001.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(mine)
    before = mine.read_bytes()
    (folder / "class_00002.txt").write_text("my own note", encoding="utf-8")
    assert generate_class_pictures(config, pipeline, log=lambda _: None) == {0: 2}
    assert mine.read_bytes() == before
    assert (folder / "class_00002.txt").read_text(encoding="utf-8") == "my own note"
    assert sorted(p.name for p in list_pictures(folder)) == [
        "class_00001-2.png", "class_00001.png", "class_00002-2.png"]


def test_clip_skip_and_bucket_sizes(tmp_path, pipeline):
    config = make_config(tmp_path, wanted=4, class_clip_skip=2, aspect_ratio_buckets=True,
                         class_batch_size=4,
                         instance_sizes=[(300, 200), (300, 200), (300, 200), (200, 200)])
    spy = Spy(pipeline)
    assert generate_class_pictures(config, spy, log=lambda _: None) == {0: 4}
    assert all(call["clip_skip"] == 1 for call in spy.calls)  # WebUI's CLIP skip 2
    sizes = []
    for path in list_pictures(tmp_path / "class"):
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sorted(sizes) == [(64, 64), (96, 64), (96, 64), (96, 64)]
    assert [(call["width"], call["height"]) for call in spy.calls] == [(96, 64), (64, 64)]


def test_nothing_to_do_without_prior_preservation(tmp_path, pipeline):
    config = make_config(tmp_path, with_prior_preservation=False)
    assert class_pictures_needed(config) == []
    assert generate_class_pictures(config, Spy(pipeline), log=lambda _: None) == {}
    assert not (tmp_path / "class").exists()


def test_concepts_sharing_a_class_folder_share_its_pictures(tmp_path, pipeline):
    config = make_config(tmp_path, wanted=3)
    config.concepts.append(Concept(instance_data_dir=config.concepts[0].instance_data_dir,
                                   instance_prompt="photo of pkz dog",
                                   class_data_dir=config.concepts[0].class_data_dir,
                                   class_prompt="photo of a dog", num_class_images=4))
    assert class_pictures_needed(config) == [(0, 3), (1, 1)]
    assert generate_class_pictures(config, pipeline, log=lambda _: None) == {0: 3, 1: 1}
    assert len(list_pictures(tmp_path / "class")) == 4
