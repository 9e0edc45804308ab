"""Block swap (``blocks_to_swap``, Flux): only R = K − S of the transformer's K blocks hold their
weights on the device at any time, every block is there when it runs (forward, and recomputed in
the backward), the gradients and the trained LoRA are bit for bit those of the run without it,
and what it cannot do is refused by field."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train
from dreambooth.models.block_swap import BlockSwap, install, split_swapped, window
from dreambooth.models.families import for_kind
from dreambooth.models.families.flux import pack
from dreambooth.models.flux_files import save_flux_file
from dreambooth.models.tiny_flux import build_flux
from test_flux_training import FAST, adapter
from trainer_fixtures import RecordingReporter, base_config, run_paths

FLUX = for_kind("flux-dev")


def transformer(depth: int = 2, single_depth: int = 3):
    model = build_flux("dev", seed=0, depth=depth, single_depth=single_depth).unet
    model.enable_gradient_checkpointing()
    return model.train().requires_grad_(False)


def inputs(model, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    hidden = torch.randn(1, 7, model.config.joint_attention_dim, generator=generator)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=pack(latents).requires_grad_(True), encoder_hidden_states=hidden,
                pooled_projections=torch.randn(1, model.config.pooled_projection_dim,
                                               generator=generator),
                timestep=torch.tensor([0.6]), guidance=torch.tensor([1.0]), img_ids=ids,
                txt_ids=torch.zeros(7, 3), return_dict=False)


def step(model, seed: int = 0) -> torch.Tensor:
    """One forward and backward; the gradient of the input tokens."""
    given = inputs(model, seed)
    model(**given)[0].square().mean().backward()
    return given["hidden_states"].grad


def test_window_keeps_r_blocks_ahead_in_the_forward_and_behind_in_the_backward():
    assert list(window(0, 3, 10, backward=False)) == [0, 1, 2]
    assert list(window(4, 3, 10, backward=False)) == [4, 5, 6]
    assert list(window(9, 3, 10, backward=False)) == [7, 8, 9]  # kept inside the model
    assert list(window(9, 3, 10, backward=True)) == [7, 8, 9]
    assert list(window(4, 3, 10, backward=True)) == [2, 3, 4]
    assert list(window(1, 3, 10, backward=True)) == [0, 1, 2]


@pytest.mark.parametrize("swapped", [1, 3, 4])
def test_only_resident_blocks_hold_weights_and_the_gradients_are_unchanged(swapped):
    plain = transformer()
    expected = step(plain)
    model = copy.deepcopy(plain)
    blocks = [block for chain in FLUX.swap_blocks(model) for block in chain]  # as one chain
    count, resident = len(blocks), len(blocks) - swapped
    trace = []
    swap = BlockSwap(model, blocks, swapped, "cpu", trace=trace)
    assert swap.resident() == list(range(resident))  # at rest: the first R
    for seed in (0, 1):  # two steps: the second starts from what the first left
        del trace[:]
        got = step(model, seed)
        torch.testing.assert_close(got, step(copy.deepcopy(plain), seed), rtol=0, atol=0)
        runs = [entry for entry in trace if entry[0] == "run"]
        order = [index for _, index, _ in runs]
        forward = list(range(count))
        assert order[:count] == forward and order[count:] == forward[::-1]  # recomputed
        for _, index, here in runs:
            assert index in here and len(here) <= resident
        # each swapped block copied in once for the forward and once for the backward
        loads = [index for kind, index, *_ in trace if kind == "load"]
        assert sorted(set(loads)) == sorted(set(range(swapped)) | set(range(resident, count)))
        assert swap.resident() == list(range(resident))
    torch.testing.assert_close(expected, step(copy.deepcopy(plain)), rtol=0, atol=0)
    # a dropped block has no weights: using it outside its turn fails loudly
    linear = next(m for m in blocks[count - 1].modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(RuntimeError):
        linear(torch.zeros(1, 4, linear.in_features))
    swap.close()
    for ours, theirs in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(ours, theirs)  # every weight back in place


def test_a_forward_without_backward_then_a_training_step():
    """Samples and validation run the transformer without a backward: the next step starts
    from block 0 again."""
    plain = transformer()
    model = copy.deepcopy(plain)
    swap = BlockSwap(model, [b for chain in FLUX.swap_blocks(model) for b in chain], 3, "cpu")
    with torch.no_grad():
        out = model(**inputs(model, 5))[0]
        torch.testing.assert_close(out, plain(**inputs(plain, 5))[0], rtol=0, atol=0)
    assert swap.resident() == [3, 4]  # the forward's last window (R = 5 - 3)
    torch.testing.assert_close(step(model), step(plain), rtol=0, atol=0)
    swap.close()


def test_the_swapped_blocks_are_shared_over_the_chains_by_length():
    assert split_swapped(55, [19, 38]) == [18, 37]  # one block of each kind stays
    assert split_swapped(1, [19, 38]) == [0, 1]
    assert split_swapped(30, [19, 38]) == [10, 20]
    assert split_swapped(3, [2, 3]) == [1, 2]
    for bad in (0, 4):
        with pytest.raises(ValueError):
            split_swapped(bad, [2, 3])


def test_each_chain_swaps_on_its_own():
    """Flux's double-stream blocks, then its single-stream ones: a window in each."""
    plain = transformer(depth=3, single_depth=4)
    model = copy.deepcopy(plain)
    chains = FLUX.swap_blocks(model)
    trace = []
    swaps = install(model, chains, 3, "cpu", trace=trace)  # 1 of 3 doubles, 2 of 4 singles
    assert [s.resident() for s in swaps] == [[0, 1], [0, 1]]
    torch.testing.assert_close(step(model), step(plain), rtol=0, atol=0)
    assert [s.resident() for s in swaps] == [[0, 1], [0, 1]]
    assert max(len(entry[2]) for entry in trace if entry[0] == "run") == 2
    for swap in swaps:
        swap.close()


def flux_swap_run(root, components, **settings):
    root.mkdir(parents=True)
    save_flux_file(components, root / "base.safetensors", layout="all-in-one")
    config = base_config(root, **{**FAST, "gradient_checkpointing": True, **settings})
    reporter = RecordingReporter()
    result = train(config, run_paths(root), reporter=reporter, components=components)
    return result, reporter.lines


@pytest.mark.parametrize("fp8", [False, True])
def test_block_swap_trains_the_same_lora_and_says_so(tmp_path, fp8):
    built = build_flux("dev", seed=0, depth=2, single_depth=3)
    plain, _ = flux_swap_run(tmp_path / "plain", copy.deepcopy(built), base_weights_8bit=fp8)
    swapped, lines = flux_swap_run(tmp_path / "swapped", copy.deepcopy(built), blocks_to_swap=3,
                                   base_weights_8bit=fp8)
    ours, theirs = adapter(swapped), adapter(plain)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert any("block swap: 2 of the transformer's 5 blocks" in line for line in lines)


def test_what_block_swap_cannot_do_is_refused_by_field(tmp_path):
    def problems(**settings):
        config = base_config(tmp_path, training_method="lora", **settings)
        return {e.field for e in FLUX.configured(config).config_problems(config)}

    assert "blocks_to_swap" in problems(blocks_to_swap=4, gradient_checkpointing=False)
    assert "blocks_to_swap" in problems(blocks_to_swap=4, compile_unet=True,
                                        gradient_checkpointing=True)
    assert "blocks_to_swap" in problems(blocks_to_swap=56, gradient_checkpointing=True)
    assert "blocks_to_swap" not in problems(blocks_to_swap=55, gradient_checkpointing=True)
    for kind in ("sd1", "sdxl"):
        config = base_config(tmp_path, blocks_to_swap=2)
        assert [e.field for e in for_kind(kind).config_problems(config)] == ["blocks_to_swap"]
    with pytest.raises(ConfigError) as refused:  # more than this model has, at its loading
        flux_swap_run(tmp_path / "many", build_flux("dev", depth=2, single_depth=3),
                      blocks_to_swap=4)
    assert [e.field for e in refused.value.errors] == ["blocks_to_swap"]
    assert "has 5 blocks" in str(refused.value)


def test_flux_pictures_from_encoded_prompts_are_the_pipelines_own():
    """Samples and class pictures give FluxPipeline the run's encoding of the prompt (T5 then
    stays off the GPU): the same picture as the pipeline encoding the prompt itself."""
    import numpy as np

    components = build_flux("dev", seed=0)
    pipe = FLUX.pipeline(components, components.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    family = FLUX.configured(base_config(Path("/nonexistent"), t5_max_length=256))
    common = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=256,
                  output_type="np")
    with torch.no_grad():
        own = pipe(prompt="photo of zwx toy", generator=torch.Generator().manual_seed(1),
                   **common).images
        given = family.prompt_inputs(family.encode(components, ["photo of zwx toy"], 1, "cpu"))
        ours = pipe(**given, generator=torch.Generator().manual_seed(1), **common).images
    assert np.array_equal(own, ours)


def test_a_swapped_flux_run_makes_its_pictures_without_running_t5_again(tmp_path):
    """Class pictures (through block swap too) and samples: T5 runs only to encode the class
    prompts and to fill the cache, never while pictures are made; the pictures are those of
    the run without block swap."""
    built = build_flux("dev", seed=0, depth=2, single_depth=3)
    pictures = {}
    for name, swap in (("plain", 0), ("swapped", 3)):
        components = copy.deepcopy(built)
        reporter = RecordingReporter()
        t5_phases = []
        forward = components.text_encoder_2.forward
        components.text_encoder_2.forward = lambda *a, **k: (
            t5_phases.append(reporter.phases[-1]), forward(*a, **k))[1]
        root = tmp_path / name
        root.mkdir()
        save_flux_file(components, root / "base.safetensors", layout="all-in-one")
        config = base_config(root, **{**FAST, "gradient_checkpointing": True,
                                      "with_prior_preservation": True, "num_class_images": 6,
                                      "class_sample_steps": 2, "sample_steps": 2,
                                      "blocks_to_swap": swap})
        train(config, run_paths(root), reporter=reporter, components=components)
        assert set(t5_phases) == {"class_images", "caching"} and "sampling" in reporter.phases
        made = sorted(Path(config.concepts[0].class_data_dir).glob("class_*.png"))  # the made ones
        made += sorted(run_paths(root).samples_dir.glob("*.png"))
        assert len(made) == 3
        pictures[name] = [p.read_bytes() for p in made]
    assert pictures["plain"] == pictures["swapped"]


def test_a_crashed_swapped_run_resumes_to_the_adapter_of_a_straight_one(tmp_path):
    """The crash releases the swapped blocks (their weights back in place); the resumed run
    installs the swap again and ends where a run without swap and without crash does."""
    from trainer_fixtures import Crash, crash_at

    built = build_flux("dev", seed=0, depth=2, single_depth=3)
    options = dict(max_train_steps=4, checkpoint_every_n_steps=2)
    straight, _ = flux_swap_run(tmp_path / "straight", copy.deepcopy(built), **options)
    root = tmp_path / "crashed"
    root.mkdir()
    save_flux_file(built, root / "base.safetensors", layout="all-in-one")
    config = base_config(root, **{**FAST, "gradient_checkpointing": True, "blocks_to_swap": 3,
                                  **options})
    components = copy.deepcopy(built)
    with pytest.raises(Crash):
        train(config, run_paths(root), reporter=crash_at(3), components=components)
    for ours, theirs in zip(components.unet.parameters(), built.unet.parameters()):
        assert ours.shape == theirs.shape  # no block left without its weights
    resumed = train(config, run_paths(root), reporter=RecordingReporter(),
                    components=copy.deepcopy(built), resume=True)
    ours, theirs = adapter(resumed), adapter(straight)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
