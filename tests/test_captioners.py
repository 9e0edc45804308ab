"""Our own captioners, offline, on tiny models built here and read through the real loading
paths: a WD tagger v3 of the real shape (an ONNX graph exported with torch, NHWC float input ->
a probability per tag of its selected_tags.csv) run by onnxruntime, and a tiny BLIP saved with
save_pretrained(safe_serialization=True) and opened with from_pretrained(use_safetensors=True).
Each tagger option's effect, the download on first use (the hub's functions replaced, no
network), the one message offline, cancel, the user's captions kept, the CLI and the panel."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.app import cli, service
from dreambooth.app.job import JobRunner
from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.common.run_types import Reporter
from dreambooth.data import captioners, captions
from dreambooth.data.captioners import TaggerOptions
from dreambooth.data.captioners.wd_tagger import WDTagger, prepare
from dreambooth.host import StandaloneHost
from dreambooth.tab import ui_captions

ROOT = Path(__file__).resolve().parent.parent
TAGGER = "wd-vit-tagger-v3"
RED, BLUE = (200, 30, 30), (30, 60, 200)
# name, category, fixed probability (None: from the picture's colour)
TAGS = [("general", 9, 0.8), ("sensitive", 9, 0.15), ("questionable", 9, 0.05),
        ("explicit", 9, 0.01), ("1girl", 0, 0.95), ("long_hair", 0, 0.6), ("smile", 0, 0.4),
        ("simple_background", 0, 0.3), ("^_^", 0, 0.7), ("red_theme", 0, None),
        ("blue_theme", 0, None), ("hatsune_miku", 4, 0.9), ("other_character", 4, 0.78)]
RED_DEFAULT = "red theme, 1girl, hatsune miku, ^_^, long hair, smile"


def export_tagger(folder: Path, side: int = 32) -> Path:
    """A tagger of the real one's shape: input [batch, side, side, 3] float 0..255 BGR, output a
    probability per tag; "red_theme" follows the red channel (the last, in BGR) and
    "blue_theme" the blue one, every other tag has a fixed probability."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, len(TAGS))
            with torch.no_grad():
                self.head.weight.zero_()
                for index, (name, _, p) in enumerate(TAGS):
                    if p is None:
                        channel = 2 if name == "red_theme" else 0  # BGR
                        self.head.weight[index, channel] = 12.0
                        self.head.bias[index] = -6.0
                    else:
                        self.head.bias[index] = math.log(p / (1 - p))

        def forward(self, x):
            return torch.sigmoid(self.head(x.mean(dim=(1, 2)) / 255.0))

    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Tiny().eval(), torch.zeros(1, side, side, 3), str(folder / "model.onnx"),
                      input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
                      dynamo=False)
    lines = ["tag_id,name,category,count"] + [f"{1000 + i},{name},{category},{500 - i}"
                                              for i, (name, category, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tagger_files(tmp_path_factory) -> Path:
    return export_tagger(tmp_path_factory.mktemp("hub") / "SmilingWolf" / TAGGER)


@pytest.fixture(scope="module")
def blip_files(tmp_path_factory):
    """A tiny BLIP laid out as Salesforce's repo (config, model.safetensors, processor and
    tokenizer files), and the in-memory model it was saved from."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    folder = tmp_path_factory.mktemp("hub") / "Salesforce" / "blip-image-captioning-base"
    work = tmp_path_factory.mktemp("vocab")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "on", "couch",
             "red", "blue", "picture", "of", "the", "sitting"]
    (work / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(work / "vocab.txt"), model_max_length=32)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's own tokenizer
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=37,
                         max_position_embeddings=64, **ids),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37, image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    # Random weights may end a caption at once (transformers 4.57 does, 4.30 does not): the
    # special tokens get no chance, so every lane's tiny BLIP writes words
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tokenizer.all_special_ids] = -1e4
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder, model, processor


def install(source: Path, models: Path, name: str) -> Path:
    """The model's files in <models>/captioners/<repo name>, as a download leaves them."""
    target = captioners.model_folder(models / "captioners", name)
    shutil.copytree(source, target)
    return target


def draw(folder: Path, colours: dict[str, tuple]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
    return folder


def config_for(folder: Path) -> TrainingConfig:
    return TrainingConfig(concepts=[Concept(instance_data_dir=str(folder),
                                            instance_prompt="photo of ohwx toy")])


def run(folder: Path, models: Path, **options):
    jobs = JobRunner()
    service.start_captions(config_for(folder), StandaloneHost(models), jobs, **options)
    return jobs.wait(120)


def logged(snap, words: str) -> bool:
    return any(line.endswith(words) for line in snap.log)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- the WD tagger --------------------------------------------------------------------------
def test_the_tagger_writes_tags_by_confidence_loading_its_model_once(tagger_files, tmp_path,
                                                                    monkeypatch):
    import onnxruntime

    made: list = []
    real = onnxruntime.InferenceSession

    class Counted(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    models = tmp_path / "models"
    install(tagger_files, models, TAGGER)
    pics = draw(tmp_path / "pics", {"red": RED, "blue": BLUE, "pink": (230, 40, 200)})
    snap = run(pics, models, captioner=TAGGER)
    assert snap.phase == "done", snap.log
    # the most confident first; the red channel read as red: the picture went in as BGR
    assert text(pics / "red.txt") == RED_DEFAULT
    assert text(pics / "blue.txt") == "blue theme, 1girl, hatsune miku, ^_^, long hair, smile"
    assert text(pics / "pink.txt").startswith("red theme, blue theme, 1girl")
    assert len(made) == 1  # one session for the three pictures
    import gc

    gc.collect()
    assert made[0]() is None  # and dropped when the run ended
    assert not any("downloading" in line for line in snap.log)  # in its folder: no network


def caption_with(folder: Path, colour=RED, **options) -> str:
    tagger = WDTagger(TAGGER, folder, TaggerOptions(**options))
    try:
        return tagger.caption(Image.new("RGB", (32, 32), colour))
    finally:
        tagger.close()


def test_each_tagger_option_has_its_effect(tagger_files):
    assert caption_with(tagger_files) == RED_DEFAULT
    # general threshold: lower adds simple background (0.3), higher drops smile (0.4)
    assert caption_with(tagger_files, general_threshold=0.25) == RED_DEFAULT + ", simple background"
    assert caption_with(tagger_files, general_threshold=0.5) == RED_DEFAULT.replace(", smile", "")
    # character threshold: 0.75 lets other_character (0.78) in; 0.95 keeps hatsune_miku (0.9) out
    assert "other character" in caption_with(tagger_files, character_threshold=0.75)
    assert "hatsune miku" not in caption_with(tagger_files, character_threshold=0.95)
    # the rating: the most likely one (general, 0.8), in its place by confidence
    assert caption_with(tagger_files, include_rating=True) == \
        "red theme, 1girl, hatsune miku, general, ^_^, long hair, smile"
    assert caption_with(tagger_files, include_characters=False) == \
        "red theme, 1girl, ^_^, long hair, smile"
    # underscores: kept on request; the kaomoji ^_^ keeps its underscore either way
    assert caption_with(tagger_files, underscores_to_spaces=False) == \
        "red_theme, 1girl, hatsune_miku, ^_^, long_hair, smile"
    # exclusion matches with spaces or underscores, any case
    assert caption_with(tagger_files, exclude=("1girl", "Long_Hair", "^_^")) == \
        "red theme, hatsune miku, smile"
    assert caption_with(tagger_files, max_tags=3) == "red theme, 1girl, hatsune miku"
    assert caption_with(tagger_files, exclude=("red theme",), max_tags=2) == "1girl, hatsune miku"


def test_the_picture_is_padded_on_white_to_the_models_side_in_bgr(tmp_path):
    import numpy as np

    picture = Image.new("RGB", (64, 16), RED)
    array = prepare(picture, 32)
    assert array.shape == (1, 32, 32, 3) and array.dtype == np.float32
    assert array[0, 0, 0].tolist() == [255.0, 255.0, 255.0]  # padding: white
    assert array[0, 16, 16].tolist() == [30.0, 30.0, 200.0]  # the picture, centred, BGR
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert prepare(clear, 16)[0, 8, 8].tolist() == [255.0, 255.0, 255.0]  # transparent: white
    # the side comes from the model's input shape
    folder = export_tagger(tmp_path / "side24", side=24)
    tagger = WDTagger(TAGGER, folder, TaggerOptions())
    assert tagger.side == 24 and tagger.caption(Image.new("RGB", (50, 50), RED)) == RED_DEFAULT


def test_a_tag_list_from_another_model_is_named(tagger_files, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tagger_files, folder)
    with open(folder / "selected_tags.csv", "a", encoding="utf-8") as handle:
        handle.write("9999,extra_tag,0,1\n")
    tagger = WDTagger(TAGGER, folder, TaggerOptions())
    with pytest.raises(captioners.CaptionerError, match="13 scores but selected_tags.csv has 14"):
        tagger.caption(Image.new("RGB", (32, 32), RED))
    (folder / "selected_tags.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(captioners.CaptionerError, match="selected_tags.csv.*tag_id,name,category"):
        WDTagger(TAGGER, folder, TaggerOptions())


def test_bad_tagger_options_are_refused_naming_the_field(tmp_path):
    pics = draw(tmp_path / "pics", {"red": RED})
    with pytest.raises(captions.CaptionError, match="general_threshold must be between 0 and 1"):
        run(pics, tmp_path / "models", captioner=TAGGER,
            tagger=TaggerOptions(general_threshold=1.5))
    with pytest.raises(captions.CaptionError, match="max_tags must be 0"):
        run(pics, tmp_path / "models", captioner=TAGGER, tagger=TaggerOptions(max_tags=-1))


# --- BLIP ------------------------------------------------------------------------------------
def test_blip_captions_through_from_pretrained_with_safetensors(blip_files, tmp_path):
    import torch

    folder, model, processor = blip_files
    models = tmp_path / "models"
    install(folder, models, "blip-base")
    pics = draw(tmp_path / "pics", {"red": RED, "blue": BLUE})
    snap = run(pics, models, captioner="blip-base", prefix="ohwx toy,")
    assert snap.phase == "done", snap.log
    for name, colour in (("red", RED), ("blue", BLUE)):  # what the saved model itself says
        pixels = processor(images=Image.new("RGB", (32, 32), colour),
                           return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=40)
        expected = processor.decode(out[0], skip_special_tokens=True).strip()
        assert expected and text(pics / f"{name}.txt") == f"ohwx toy, {expected}"


def test_blip_is_loaded_from_safetensors_only(blip_files, tmp_path, monkeypatch):
    folder, _, _ = blip_files
    models = tmp_path / "models"
    target = install(folder, models, "blip-base")
    (target / "model.safetensors").rename(target / "pytorch_model.bin")  # a pickle: never read
    pics = draw(tmp_path / "pics", {"red": RED})
    with pytest.raises(captions.CaptionError, match="model.safetensors"):
        run(pics, models, captioner="blip-base")
    # online, a repo without safetensors is refused before any download, saying so
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: [
        "config.json", "pytorch_model.bin", "preprocessor_config.json", "tokenizer_config.json",
        "vocab.txt"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    snap = run(pics, models, captioner="blip-base")
    assert snap.phase == "failed" and "has no model.safetensors" in snap.error
    assert "safetensors only" in snap.error and not (pics / "red.txt").exists()


# --- download, offline ----------------------------------------------------------------------
def test_offline_with_an_empty_folder_one_message_says_what_to_put_where(tmp_path):
    pics = draw(tmp_path / "pics", {"red": RED})
    models = tmp_path / "models"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(captions.CaptionError) as caught:
        run(pics, models, captioner=TAGGER)
    message = str(caught.value)
    folder = models / "captioners" / TAGGER
    for part in (TAGGER, "HF_HUB_OFFLINE", str(folder), "model.onnx", "selected_tags.csv",
                 "https://huggingface.co/SmilingWolf/wd-vit-tagger-v3"):
        assert part in message, message
    assert not (pics / "red.txt").exists()


@pytest.fixture
def online(monkeypatch):
    """No offline switch (the hub's functions are replaced by each test: still no network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub

    return huggingface_hub


def test_no_connection_to_the_hub_gives_the_same_clear_message(online, tmp_path, monkeypatch):
    import requests

    pics = draw(tmp_path / "pics", {"red": RED})

    def refused(*args, **kwargs):
        raise requests.ConnectionError("Failed to establish a new connection")

    monkeypatch.setattr(online, "list_repo_files", refused)
    snap = run(pics, tmp_path / "models", captioner="blip-large")
    assert snap.phase == "failed", snap.log
    assert "no connection to the Hugging Face hub" in snap.error
    assert "blip-image-captioning-large" in snap.error and "model.safetensors" in snap.error
    assert "Traceback" not in "\n".join(snap.log)
    # the listing worked, the file download did not (the hub's offline error)
    from huggingface_hub.utils import LocalEntryNotFoundError

    def no_file(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub, and the file is not on disk")

    monkeypatch.setattr(online, "list_repo_files", lambda repo: ["model.onnx", "selected_tags.csv"])
    monkeypatch.setattr(online, "hf_hub_download", no_file)
    snap = run(pics, tmp_path / "models", captioner=TAGGER)
    assert snap.phase == "failed" and "no connection to the Hugging Face hub" in snap.error
    assert "put them in" in snap.error and not (pics / "red.txt").exists()


def fake_hub(hub_module, monkeypatch, source: Path, calls: list):
    """The hub's two functions replaced: the repo lists ``source``'s files (and a few we never
    need), a download copies one into local_dir."""
    monkeypatch.setattr(hub_module, "list_repo_files", lambda repo: sorted(
        [p.name for p in source.iterdir()] + ["README.md", "model.msgpack", "sample.png"]))

    def download(repo, filename, local_dir=None, **kwargs):
        calls.append((repo, filename))
        target = Path(local_dir) / filename
        shutil.copyfile(source / filename, target)
        return str(target)

    monkeypatch.setattr(hub_module, "hf_hub_download", download)


def test_the_model_is_downloaded_on_first_use_then_used_without_network(
        online, tagger_files, tmp_path, monkeypatch):
    pics = draw(tmp_path / "pics", {"red": RED})
    models = tmp_path / "models"
    calls: list = []
    fake_hub(online, monkeypatch, tagger_files, calls)
    snap = run(pics, models, captioner=TAGGER)
    assert snap.phase == "done", snap.log
    # only the files the tagger needs, into <models>/captioners/<repo name>
    assert calls == [("SmilingWolf/wd-vit-tagger-v3", "model.onnx"),
                     ("SmilingWolf/wd-vit-tagger-v3", "selected_tags.csv")]
    assert sorted(p.name for p in (models / "captioners" / TAGGER).iterdir()) == \
        ["model.onnx", "selected_tags.csv"]
    assert logged(snap, "phase: downloading")
    assert logged(snap, "downloading captioner wd-vit-tagger-v3: model.onnx (1 / 2 files)")
    assert logged(snap, "downloading captioner wd-vit-tagger-v3: selected_tags.csv (2 / 2 files)")
    assert text(pics / "red.txt") == RED_DEFAULT
    # the second time: from the folder, the hub never asked
    monkeypatch.setattr(online, "list_repo_files", pytest.fail)
    monkeypatch.setattr(online, "hf_hub_download", pytest.fail)
    snap = run(pics, models, captioner=TAGGER, overwrite=True)
    assert snap.phase == "done" and not any("downloading" in line for line in snap.log), snap.log


class StopAfter(Reporter):
    def __init__(self, checks: int):
        self.checks, self.lines = checks, []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def should_stop(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_cancel_during_the_download_and_between_pictures(online, tagger_files, tmp_path,
                                                          monkeypatch):
    pics = draw(tmp_path / "pics", {"blue": BLUE, "green": (30, 160, 60), "red": RED})
    models = tmp_path / "models"
    calls: list = []
    fake_hub(online, monkeypatch, tagger_files, calls)
    request = captions.CaptionRequest((captions.CaptionFolder(pics),), captioner=TAGGER,
                                      models_dir=models / "captioners")
    tasks = captions.check(request, [])
    summary = captions.caption_pictures(request, tasks, StandaloneHost(models), StopAfter(1))
    assert summary.cancelled and summary.left == 3 and calls == [calls[0]]  # one file came down
    assert not list(pics.glob("*.txt"))
    # the model in its folder now: cancel after the first picture; what is written is whole
    summary = captions.caption_pictures(request, tasks, StandaloneHost(models), StopAfter(2))
    assert summary.cancelled and summary.left == 2 and len(summary.written) == 1
    assert text(pics / "blue.txt").startswith("blue theme")
    assert sorted(p.name for p in pics.iterdir() if p.suffix == ".txt") == ["blue.txt"]
    assert not [p for p in pics.iterdir() if p.name.startswith(".")]


def test_a_users_caption_is_never_replaced_unless_overwrite(tagger_files, tmp_path):
    models = tmp_path / "models"
    install(tagger_files, models, TAGGER)
    pics = draw(tmp_path / "pics", {"red": RED, "blue": BLUE})
    (pics / "red.txt").write_text("my own words", encoding="utf-8")
    snap = run(pics, models, captioner=TAGGER)
    assert snap.phase == "done" and text(pics / "red.txt") == "my own words"
    assert text(pics / "blue.txt").startswith("blue theme")
    snap = run(pics, models, captioner=TAGGER, overwrite=True,
               tagger=TaggerOptions(max_tags=1))
    assert snap.phase == "done" and text(pics / "red.txt") == "red theme"


# --- the CLI and the panel -------------------------------------------------------------------
def test_cli_captions_with_our_tagger_without_a_webui(tagger_files, tmp_path, capsys):
    models = tmp_path / "models"
    install(tagger_files, models, TAGGER)
    pics = draw(tmp_path / "pics", {"red": RED, "blue": BLUE})
    (pics / "blue.txt").write_text("mine", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dreambooth", "caption", str(pics),
                           "--captioner", TAGGER, "--models-dir", str(models), "--rating",
                           "--no-characters", "--keep-underscores", "--exclude", "1girl",
                           "--general-threshold", "0.5", "--prefix", "ohwx,", "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert text(pics / "red.txt") == "ohwx, red_theme, general, ^_^, long_hair"
    assert text(pics / "blue.txt") == "mine"
    assert "1 caption(s) written, 1 existing caption(s) kept" in done.stdout
    # in process: the remaining flags, and each a visible effect
    assert cli.caption_main([str(pics), "--captioner", TAGGER, "--models-dir", str(models),
                             "--overwrite", "--max-tags", "2", "--character-threshold", "0.75",
                             "--quiet"]) == 0
    assert text(pics / "red.txt") == "red theme, 1girl"
    assert text(pics / "blue.txt") == "blue theme, 1girl"
    assert cli.caption_main([str(pics), "--captioner", TAGGER, "--models-dir", str(models),
                             "--overwrite", "--character-threshold", "0.75", "--exclude",
                             "red theme,blue theme,1girl,hatsune miku", "--quiet"]) == 0
    assert text(pics / "red.txt").startswith("other character, ^_^")
    capsys.readouterr()
    assert cli.caption_main([str(pics), "--captioner", TAGGER, "--general-threshold", "2",
                             "--models-dir", str(models), "--quiet"]) == 2
    assert "general_threshold must be between 0 and 1" in capsys.readouterr().err


def test_cli_offline_without_the_model_exits_2_with_one_message(tmp_path, capsys):
    pics = draw(tmp_path / "pics", {"red": RED})
    assert cli.caption_main([str(pics), "--captioner", "blip-large", "--models-dir",
                             str(tmp_path / "models"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "blip-large" in err and "Traceback" not in err
    assert str(tmp_path / "models" / "captioners" / "blip-image-captioning-large") in err
    assert not (pics / "red.txt").exists()


def test_the_panel_offers_ours_always_and_the_webuis_where_it_has_them(tmp_path, make_fake_webui):
    standalone = StandaloneHost(tmp_path / "models")
    ours = ["blip-base", "blip-large", "wd-vit-tagger-v3", "wd-swinv2-tagger-v3",
            "wd-eva02-large-tagger-v3"]
    assert ui_captions.interrogator_choices(standalone) == ours
    note = ui_captions.panel_note(standalone)
    assert "no WebUI interrogators here" in note and "dreambooth-error" not in note
    assert str(tmp_path / "models" / "captioners") in note
    assert captions.default_captioner(standalone.interrogators()) == "blip-base"

    make_fake_webui()
    from dreambooth.host import get_host

    host = get_host()
    assert ui_captions.interrogator_choices(host) == ours + ["blip", "clip", "deepbooru"]
    assert captions.default_captioner(host.interrogators()) == "blip"  # as before
    assert "WebUI&#x27;s DeepBooru" in ui_captions.panel_note(host)


def test_the_tagger_options_show_only_for_a_tagger_and_reach_the_run(tagger_files, tmp_path,
                                                                      idle_runner):
    import gradio as gr

    host = StandaloneHost(tmp_path / "models")
    install(tagger_files, tmp_path / "models", TAGGER)
    pics = draw(tmp_path / "pics", {"red": RED})
    with gr.Blocks() as blocks:
        panel = ui_captions.build_panel(gr, host)
        out = gr.HTML()
        ui_captions.wire(panel, [], lambda _: config_for(pics), [out], host)
    config = blocks.get_config_file()
    by_id = {c["id"]: c for c in config["components"]}
    box = next(c for c in config["components"]
               if c.get("props", {}).get("elem_id") == "dreambooth_caption_tagger")
    assert box["props"].get("visible") is False  # blip-base first
    change = [(i, d) for i, d in enumerate(config["dependencies"])
              if panel.interrogator._id in [t[0] if isinstance(t, (list, tuple)) else t
                                            for t in d["targets"]]]
    assert len(change) == 1 and by_id[change[0][1]["outputs"][0]] is box
    fns = blocks.fns
    fn = (fns[change[0][1].get("id", change[0][0])] if isinstance(fns, dict)
          else fns[change[0][0]]).fn
    assert fn(TAGGER)["visible"] is True and fn("blip-base")["visible"] is False
    assert fn("deepbooru")["visible"] is False
    # the button's fields, in order, reach the tagger
    answer = ui_captions.start_from_form(lambda: config_for(pics), TAGGER, "", False,
                                         0.35, 0.85, True, True, False, "1girl", 3, host=host)
    assert "Captioning" in answer, answer
    assert idle_runner.wait(60).phase == "done"
    assert text(pics / "red.txt") == "red_theme, hatsune_miku, general"  # 1girl left out
    assert ui_captions.tagger_from_form() == TaggerOptions()
    assert ui_captions.tagger_from_form(0.5, 0.75, True, False, False, " a, b_c ,", 4.0) == \
        TaggerOptions(general_threshold=0.5, character_threshold=0.75, include_rating=True,
                      include_characters=False, underscores_to_spaces=False,
                      exclude=("a", "b_c"), max_tags=4)
    answer = ui_captions.start_from_form(lambda: config_for(pics), TAGGER, "", True,
                                         "x", host=host)
    assert "dreambooth-error" in answer and "tagger options" in answer
