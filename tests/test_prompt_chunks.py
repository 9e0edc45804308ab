"""Prompts longer than 75 tokens, read as the WebUI reads them: in chunks of 75 (each with its
start and end markers), cut after a comma near the end of a chunk, hidden states concatenated,
SDXL's pooled projection from the first chunk; cached and uncached batches equal."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from dreambooth.models import families
from dreambooth.models.families.base import CHUNK_TOKENS, chunk_count, prompt_chunks
from dreambooth.models.tiny import build_components, build_variant

TAGS = ", ".join(f"tag{i} thing" for i in range(40))  # about 120 tokens of booru-style tags


@functools.lru_cache(maxsize=2)
def _model(kind: str):
    return build_components("tiny", 0) if kind == "sd1" else build_variant(kind, 0)


def model(kind: str):
    return copy.deepcopy(_model(kind))


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_a_short_prompt_is_one_chunk_exactly_as_the_tokenizer_pads_it(name):
    tokenizer = getattr(model("sdxl"), name)
    prompts = ["photo of zwx toy", "a red toy, on a table"]
    ours = prompt_chunks(tokenizer, prompts)
    plain = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
    assert ours.shape == (2, 1, 77) and torch.equal(ours[:, 0], plain)


def test_long_prompts_are_chunked_at_a_comma_with_markers_on_each_chunk():
    tokenizer = model("sd1").tokenizer
    ids = prompt_chunks(tokenizer, [TAGS])[0]
    tokens = tokenizer(TAGS, add_special_tokens=False).input_ids
    assert ids.shape[0] == -(-len(tokens) // CHUNK_TOKENS) == chunk_count(tokenizer, TAGS) >= 2
    comma = tokenizer.get_vocab()[",</w>"]
    for chunk in ids:
        assert chunk[0] == tokenizer.bos_token_id
    first = [t for t in ids[0].tolist()[1:] if t not in (tokenizer.eos_token_id,)]
    assert first[-1] == comma and len(first) <= CHUNK_TOKENS  # the chunk ends after a comma
    # every token is read once, in order
    read = [t for chunk in ids.tolist() for t in chunk[1:] if t != tokenizer.eos_token_id]
    assert read == tokens


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_tokens_past_75_reach_the_conditioning(kind):
    components = model(kind)
    family = families.of_components(components)
    a = family.encode(components, [TAGS + ", blue sky"], 1, "cpu")
    b = family.encode(components, [TAGS + ", green grass"], 1, "cpu")
    assert a.hidden.shape[1] == 77 * chunk_count(components.tokenizer, TAGS + ", blue sky")
    assert not torch.equal(a.hidden, b.hidden)
    if kind == "sdxl":  # the pooled projection is the first chunk's, as in the WebUI
        first = family.encode(components, [TAGS], 1, "cpu")
        assert torch.equal(a.pooled, first.pooled)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_cached_rows_stack_to_what_the_batch_encodes(kind):
    components = model(kind)
    family = families.of_components(components)
    prompts = ["photo of zwx toy", TAGS]
    with torch.no_grad():
        batch = family.encode(components, prompts, 1, "cpu")
        rows = [family.encode(components, [p], 1, "cpu").rows()[0] for p in prompts]
        empty = family.encode(components, [""], 1, "cpu").rows()[0]
    stacked = families.Conditioning.stack(rows, "cpu", empty=empty)
    assert stacked.hidden.shape == batch.hidden.shape
    assert torch.allclose(stacked.hidden, batch.hidden, atol=1e-6)
    if kind == "sdxl":
        assert torch.allclose(stacked.pooled, batch.pooled, atol=1e-6)


def test_a_run_with_long_captions_trains_the_same_cached_or_not(tmp_path):
    from pathlib import Path

    from dreambooth.common.config import TrainingConfig
    from dreambooth.engine.trainer import train
    from trainer_fixtures import RecordingReporter, base_config, flat, run_paths, tiny_components

    config = base_config(tmp_path)
    for i, picture in enumerate(sorted(Path(config.concepts[0].instance_data_dir).glob("*.png"))):
        picture.with_suffix(".txt").write_text(f"zwx toy {i}, " + (TAGS if i % 2 else "short"))
    concepts = TrainingConfig.from_dict({"concepts": [dict(
        instance_data_dir=config.concepts[0].instance_data_dir, instance_prompt="[filewords]")]}
    ).concepts
    weights = {}
    for cached in (True, False):
        components = tiny_components()
        reporter = RecordingReporter()
        train(base_config(tmp_path, concepts=concepts, with_prior_preservation=False,
                          train_batch_size=2, cache_text_embeddings=cached),
              run_paths(tmp_path / str(cached)), reporter=reporter, components=components,
              export_model=False)
        weights[cached] = flat(components.unet)
        assert any("trained in chunks of 75" in line for line in reporter.lines)
    assert torch.allclose(weights[True], weights[False], atol=1e-6)
