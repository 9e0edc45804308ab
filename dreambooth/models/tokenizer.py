"""The real CLIP tokenizer, built offline from the BPE vocabulary that open-clip-torch ships.

The WebUI, SD1.x and SD2.x all tokenize with OpenAI's CLIP BPE. When neither the model folder nor
the Hugging Face cache has a tokenizer, we rebuild the very same vocabulary from
``open_clip/bpe_simple_vocab_16e6.txt.gz`` (without importing ``open_clip``, whose ``__init__``
pulls in timm and torchvision).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from dreambooth.common.files import write_text

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # the merges CLIP actually uses
SD1_PAD = "<|endoftext|>"  # openai/clip-vit-large-patch14 pads with the end token
OPENCLIP_PAD = "!"  # SD2.x / SDXL's OpenCLIP text encoders were trained padding with id 0 ("!")


def open_clip_bpe_path() -> Path:
    """Locate open-clip-torch's bundled BPE file without importing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open-clip-torch is not installed, so the CLIP vocabulary cannot be built offline; "
            "install it (the WebUI ships it) or put a tokenizer in the model folder")
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from open-clip-torch")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_files(folder: Path, pad_token: str = SD1_PAD) -> Path:
    """Write vocab.json, merges.txt and the configs of a CLIPTokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = read_merges(open_clip_bpe_path())
    vocab = build_vocab(merges)
    # merges.txt before vocab.json: a folder with vocab.json is complete (offline_tokenizer_dir)
    write_text(folder / "merges.txt",
               "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", overwrite=True)
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token, "errors": "replace",
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2), overwrite=True)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2), overwrite=True)
    write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False), overwrite=True)
    return folder


def default_cache_dir() -> Path:
    root = os.environ.get("DREAMBOOTH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sd-webui-dreambooth")
    return Path(root)


def offline_tokenizer_dir(pad_token: str = SD1_PAD, cache_dir: Path | None = None) -> Path:
    """A tokenizer folder built from open-clip-torch's vocabulary, made once and cached."""
    name = "clip-tokenizer-openclip-pad" if pad_token == OPENCLIP_PAD else "clip-tokenizer"
    folder = Path(cache_dir or default_cache_dir()) / name
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_tokenizer_files(folder, pad_token)
    return folder


def load_clip_tokenizer(pad_token: str = SD1_PAD, cache_dir: Path | None = None):
    """The CLIP tokenizer built offline (transformers' CLIPTokenizer over the rebuilt vocabulary)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(offline_tokenizer_dir(pad_token, cache_dir)))
