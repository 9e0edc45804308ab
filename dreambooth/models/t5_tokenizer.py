"""Flux's T5 tokenizer, offline: a real model's found on disk, or a small T5-style one built in
code for the tiny Flux-shaped model (tests and the demo).

A real Flux.1 model's T5-XXL tokenizer (SentencePiece, 32,100 pieces) is not in its weights
files: it comes with the model's diffusers folder (``tokenizer_2/``), with Forge (its bundled
``backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2``), or as a folder the user puts
in ``models/text_encoder/t5_tokenizer``. :func:`t5_tokenizer_places` lists where it is looked
for, in order; the extension never downloads it.

The tiny one keeps what the pipeline and the trainer rely on: T5's special ids (pad 0, eos
``</s>`` 1, unk 2), an ``</s>`` appended to every text, SentencePiece's ``▁`` word marker, and
T5's ``<extra_id_N>`` sentinels at the top of the vocabulary. Its pieces are single characters
(alone and word-initial) and about 150 common prompt words, scored so that the longest
piece always wins: every text tokenizes, deterministically, into ids below :data:`VOCAB_SIZE`.
"""
from __future__ import annotations

import string
from pathlib import Path

from dreambooth.models.detect import CheckpointError

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
VOCAB_SIZE = 512  # the tiny T5's vocab_size; the tokenizer fills it exactly
MAX_LENGTH = 512  # T5's model_max_length (Flux uses 256 or 512 tokens)
WORD_MARK = "\u2581"  # SentencePiece's word-start marker
T5_TOKENIZER_FOLDER = "t5_tokenizer"  # models/text_encoder/t5_tokenizer
FORGE_T5_TOKENIZER = Path("backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2")

# Common words of DreamBooth prompts and captions: whole-word pieces keep token counts
# realistic (one id per word) for truncation and padding tests.
WORDS = """a an the of in on at with and or by for to from is are photo picture portrait painting
drawing illustration art style sks ohwx dog cat man woman person people child boy girl face
hair eyes smile hat shirt dress red green blue yellow black white gray brown pink purple orange
golden dark light bright sunny cloudy night day sunset beach forest mountain city street room
house garden park river lake sea sky cloud tree flower grass snow rain water fire stone wood
metal glass close up full body standing sitting walking running looking camera background
detailed high quality best masterpiece realistic anime cartoon sketch oil watercolor digital
render 3d film cinematic lighting soft hard shadow sharp focus blur bokeh wide angle shot view
front side back top small large big little old young new beautiful cute happy sad""".split()


def _pieces() -> list[str]:
    """The vocabulary in id order: specials, characters, word-initial characters, words, and
    T5's sentinels last (``<extra_id_0>`` has the highest id, as in T5)."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [PAD, EOS, UNK, WORD_MARK] + chars + [WORD_MARK + c for c in chars]
    pieces += [WORD_MARK + w for w in dict.fromkeys(WORDS) if WORD_MARK + w not in pieces]
    extra = VOCAB_SIZE - len(pieces)
    if extra < 0:
        raise ValueError(f"the tiny T5 vocabulary has {len(pieces)} pieces, more than {VOCAB_SIZE}")
    return pieces + [f"<extra_id_{i}>" for i in reversed(range(extra))]


def _metaspace(module):
    """tokenizers' Metaspace, in the API of 0.13 (add_prefix_space) or >= 0.19 (prepend_scheme)."""
    try:
        return module.Metaspace(replacement=WORD_MARK, prepend_scheme="always")
    except TypeError:
        return module.Metaspace(replacement=WORD_MARK, add_prefix_space=True)


def build_t5_backend():
    """The ``tokenizers.Tokenizer``: a Unigram model over :func:`_pieces` where every piece scores
    the same, so the segmentation with the fewest (longest) pieces wins."""
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors)

    pieces = _pieces()
    scores = [(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(scores, unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                                 normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = _metaspace(pre_tokenizers)
    tokenizer.decoder = _metaspace(decoders)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)])
    # registered as special in the backend too (their ids stay), so that every transformers
    # version skips them when decoding
    tokenizer.add_special_tokens([p for i, p in enumerate(pieces)
                                  if i < 3 or p.startswith("<extra_id_")])
    return tokenizer


def load_tiny_t5_tokenizer():
    """transformers' ``T5TokenizerFast`` over :func:`build_t5_backend` (offline, in memory)."""
    from transformers import T5TokenizerFast

    sentinels = [p for p in _pieces() if p.startswith("<extra_id_")]
    return with_added_tokens_encoder(T5TokenizerFast(
        tokenizer_object=build_t5_backend(), eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_ids=0, additional_special_tokens=sentinels, model_max_length=MAX_LENGTH))


def with_added_tokens_encoder(tokenizer):
    """The tokenizer, given the ``added_tokens_encoder`` mapping that transformers < 4.34 lacks
    on fast tokenizers; diffusers' pipelines read it on every prompt (the textual-inversion check
    of ``maybe_convert_prompt``), so FluxPipeline fails on A1111's transformers 4.30 without it."""
    if not hasattr(tokenizer, "added_tokens_encoder"):
        tokenizer.added_tokens_encoder = dict(tokenizer.get_added_vocab())
    return tokenizer


# --------------------------------------------------------------------------------------------
# A real model's tokenizer, from disk


def t5_tokenizer_places(path: Path, t5_path: Path | None = None,
                        t5_tokenizer: Path | None = None) -> list[Path]:
    """Where the T5 tokenizer of the Flux file ``path`` is looked for, in order: ``t5_tokenizer``
    (a folder, tokenizer.json or spiece.model); beside the file (``tokenizer_2/``,
    ``tokenizer.json``, ``spiece.model``); ``t5_tokenizer/`` beside the T5 file (that is
    ``models/text_encoder/t5_tokenizer``); ``models/text_encoder/t5_tokenizer`` beside the file's
    folder (``models/Stable-diffusion``); Forge's bundled copy in the WebUI holding the file."""
    path = Path(path)
    places = [Path(t5_tokenizer)] if t5_tokenizer else []
    places += [path.parent / "tokenizer_2", path.parent / "tokenizer.json",
               path.parent / "spiece.model"]
    if t5_path is not None:
        places.append(Path(t5_path).parent / T5_TOKENIZER_FOLDER)
    places.append(path.parent.parent / "text_encoder" / T5_TOKENIZER_FOLDER)
    places += [folder / FORGE_T5_TOKENIZER for folder in list(path.resolve().parents)[:4]]
    return list(dict.fromkeys(places))


def _tokenizer_at(place: Path):
    """transformers' T5TokenizerFast from a local folder or file, or None when nothing is there."""
    from transformers import T5TokenizerFast

    folder = place if place.is_dir() else place.parent
    tokenizer_json = place if place.name == "tokenizer.json" else folder / "tokenizer.json"
    spiece = place if place.name == "spiece.model" else folder / "spiece.model"
    try:
        if place.is_dir() and (folder / "tokenizer_config.json").is_file() \
                and (tokenizer_json.is_file() or spiece.is_file()):
            return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
        if tokenizer_json.is_file() and (place.is_dir() or place == tokenizer_json):
            return T5TokenizerFast(tokenizer_file=str(tokenizer_json))
        if spiece.is_file() and (place.is_dir() or place == spiece):
            return T5TokenizerFast(vocab_file=str(spiece))
    except Exception as exc:  # e.g. spiece.model without the sentencepiece package
        raise CheckpointError(f"the T5 tokenizer at {place} cannot be read ({type(exc).__name__}: "
                              f"{exc}); a tokenizer.json (T5TokenizerFast) needs no extra package")
    return None


def load_flux_t5_tokenizer(path: Path, vocab_size: int, *, t5_path: Path | None = None,
                           t5_tokenizer: Path | None = None):
    """The T5 tokenizer for the Flux file ``path`` whose T5 has ``vocab_size`` ids: the first
    found of :func:`t5_tokenizer_places`; the one built in code only for the tiny model's
    vocabulary; otherwise a CheckpointError that says what to put where."""
    places = t5_tokenizer_places(path, t5_path, t5_tokenizer)
    for place in places:
        tokenizer = _tokenizer_at(place) if place.exists() else None
        if tokenizer is None:
            continue
        if len(tokenizer) > vocab_size:
            raise CheckpointError(f"the T5 tokenizer at {place} has {len(tokenizer)} tokens, more "
                                  f"than the T5 of {Path(path).name} ({vocab_size})")
        return with_added_tokens_encoder(tokenizer)
    if vocab_size == VOCAB_SIZE:
        return load_tiny_t5_tokenizer()
    raise CheckpointError(
        f"{Path(path).name}: Flux needs the T5-XXL tokenizer, which no weights file holds. Put "
        f"its files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, from the "
        f"model's tokenizer_2 folder or Forge's {FORGE_T5_TOKENIZER.as_posix()}) in "
        f"models/text_encoder/{T5_TOKENIZER_FOLDER}; looked in: "
        + ", ".join(str(p) for p in places))
