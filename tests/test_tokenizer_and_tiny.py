"""The offline CLIP tokenizer equals open_clip's; the tiny model is deterministic and the same
code builds SD1.5's real sizes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dreambooth.models import tiny
from dreambooth.models.tokenizer import load_clip_tokenizer, open_clip_bpe_path

PROMPTS = [
    "a photo of a cat",
    "photo of zwx dog, masterpiece, (best quality:1.2), [blurry], 8k uhd!!!",
    "Portrait of a WOMAN in the style of Alphonse Mucha -- art nouveau; golden hour?",
    "café crème, naïve façade, Ærøskøbing, São Paulo, Zürich",
    "一只猫坐在桌子上, 日本語のテキスト, 한국어",
    "emoji 🐶🔥✨ and symbols © ® ™ ° ± ½ → ∞",
    "  lots   of\twhitespace\n and newlines  ",
    "sks zwx ohwx shs btz, a rare identifier test",
    "don't can't won't it's 1girl 2boys 1024x768 3.5mm f/1.8",
    " ".join(["a very long prompt with many many words"] * 20),
]


def open_clip_tokenizer():
    """open_clip's own tokenizer module, loaded on its own (importing the open_clip package
    would pull in timm and torchvision)."""
    path = open_clip_bpe_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_only", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(open_clip_bpe_path()))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return load_clip_tokenizer(cache_dir=tmp_path_factory.mktemp("tok")), open_clip_tokenizer()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_equal_open_clips(tokenizers, prompt):
    ours, theirs = tokenizers
    expected = [theirs.encoder["<start_of_text>"]] + theirs.encode(prompt) + [
        theirs.encoder["<end_of_text>"]]
    assert ours(prompt, truncation=False).input_ids == expected


def test_known_ids_and_window(tokenizers):
    ours, _ = tokenizers
    assert ours("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours("sks").input_ids == [49406, 48136, 49407]
    long = ours(PROMPTS[-1], padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407 and len(ours) == 49408


def test_tiny_model_is_deterministic_for_a_seed():
    a, b, c = tiny.build_components("tiny", 0), tiny.build_components("tiny", 0), \
        tiny.build_components("tiny", 1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_tiny_model_generates_a_picture():
    pipe = tiny.build_components("tiny", 0).pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = pipe("photo of zwx toy", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_the_same_code_builds_sd15_sizes():
    """SD1.5's parameter counts, built on the meta device (no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny.unet_config("sd15"))
        vae = AutoencoderKL(**tiny.vae_config("sd15"))
        text = CLIPTextModel(CLIPTextConfig(**tiny.text_config("sd15")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
