"""``bench --memory``: one step under PyTorch's profiler, its peak tensor memory by category.

On the tiny model (fp32, latents and text embeddings cached, so the step touches the UNet only):
the categories at the peak add up to the peak, the parameters are the UNet's bytes, full training
has a UNet-sized gradient set and LoRA a small one. No timing is asserted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from dreambooth.app import bench
from dreambooth.app import bench_run as run_figures
from dreambooth.engine import memory_profile
from dreambooth.engine.memory_profile import CATEGORIES, peak_by_category

# One warm-up, one measured step, then the profiled one; nothing else (no class pictures,
# sample or export): the profiled step and its analysis are what takes the time.
FAST = ["--size", "tiny", "--resolution", "64", "--steps", "1", "--warmup", "1", "--no-prior",
        "--class-pictures", "0", "--sample-steps", "0", "--no-export", "--threads", "2",
        "--quiet", "--memory"]
GB = 2 ** 30


@pytest.fixture(scope="module")
def unet_bytes() -> int:
    from dreambooth.models.tiny import build_components

    unet = build_components("tiny", seed=0).unet
    return sum(p.numel() * p.element_size() for p in unet.parameters())


def bench_run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "run.json"
    assert bench.bench_main(FAST + list(extra) + ["--json", str(out)]) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert run["figures"]["ok"] is True
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> dict:
    return bench_run(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict:
    return bench_run(tmp_path_factory.mktemp("lora"), "--method", "lora", "--rank", "8")


def test_the_categories_at_the_peak_add_up_to_the_peak(full_run):
    f = full_run["figures"]
    assert set(f) == set(bench.FIGURE_KEYS)
    assert f["memory_peak_gb"] > 0
    at_peak = f["memory_by_category_gb"]
    assert set(at_peak) == set(CATEGORIES)
    # Each figure is rounded to 4 significant digits: the sum within that.
    assert sum(at_peak.values()) == pytest.approx(f["memory_peak_gb"], rel=2e-3)
    d = f["memory_profile"]
    assert d["device"] == "cpu" and d["events"] > 0
    assert d["step"] == 3  # warm-up 1 + measured 1, then the profiled one
    assert d["peak_bytes"] / GB == pytest.approx(f["memory_peak_gb"], rel=1e-3)
    # Each category's own maximum is at least its value at the peak.
    for name, value in at_peak.items():
        assert d["max_by_category_gb"][name] >= value, name
    assert d["cuda_max_allocated_gb"] is None  # CPU
    # The profiled step is not one of the measured ones, and its peaks stay out of the totals.
    assert f["measured_steps"] == 1 and f["step_s"]["n"] == 1
    by_phase = f["memory_mb"]["by_phase"]
    assert run_figures.PROFILED_STEP in by_phase and "training" in by_phase
    assert "--memory" in full_run["command"] and full_run["options"]["memory"] is True


def test_full_training_parameters_gradients_and_optimizer_state(full_run, unet_bytes):
    """fp32 AdamW on the UNet: the parameters are the UNet's bytes (the VAE and text encoder
    are not touched: latents and embeddings are cached), the gradients one copy of them and the
    optimizer state two (exp_avg, exp_avg_sq)."""
    f = full_run["figures"]
    at_peak, top = f["memory_by_category_gb"], f["memory_profile"]["max_by_category_gb"]
    assert at_peak["parameters"] * GB == pytest.approx(unet_bytes, rel=0.02)
    assert top["gradients"] * GB == pytest.approx(unet_bytes, rel=0.02)
    assert top["optimizer_state"] * GB == pytest.approx(2 * unet_bytes, rel=0.02)
    assert top["activations"] > 0


def test_lora_gradients_are_rank_sized(lora_run, full_run, unet_bytes):
    """LoRA: the frozen UNet still counts as parameters (the step reads it), plus the adapter;
    the gradients and the optimizer state are the adapter's only, far below the UNet's."""
    at_peak = lora_run["figures"]["memory_by_category_gb"]
    top = lora_run["figures"]["memory_profile"]["max_by_category_gb"]
    adapter = at_peak["parameters"] * GB - unet_bytes
    assert 0 < adapter < unet_bytes / 4
    assert 0 < top["gradients"] * GB < unet_bytes / 8
    assert top["gradients"] * GB == pytest.approx(adapter, rel=0.25)
    assert top["optimizer_state"] * GB == pytest.approx(2 * top["gradients"] * GB, rel=0.25)
    full_top = full_run["figures"]["memory_profile"]["max_by_category_gb"]
    assert top["gradients"] < full_top["gradients"] / 8


def test_without_memory_the_figures_are_null(tmp_path):
    """The JSON keeps its keys: a script comparing runs with and without --memory can rely on
    them."""
    out = tmp_path / "plain.json"
    argv = [a for a in FAST if a != "--memory"] + ["--json", str(out)]
    assert bench.bench_main(argv) == 0
    [run] = json.loads(out.read_text())["runs"]
    f = run["figures"]
    assert set(f) == set(bench.FIGURE_KEYS)
    assert f["memory_peak_gb"] is None and f["memory_by_category_gb"] is None
    assert f["memory_profile"] is None
    assert run_figures.PROFILED_STEP not in f["memory_mb"]["by_phase"]
    assert run["options"]["memory"] is False and "--no-memory" in run["command"]
    empty = run_figures.empty_figures()
    assert empty["memory_peak_gb"] is None and set(empty) == set(f)


def test_the_text_output_has_a_memory_line(full_run):
    run = dict(full_run, name="tiny")
    lines = bench.summary_lines([run])
    [line] = [x for x in lines if "tensor memory" in x]
    assert line.startswith("tiny: tensor memory of step 3 on cpu")
    assert "parameters" in line and "optimizer_state" in line


# The replay itself, on a made-up timeline (no profiler): what the bench's figures rest on.

@dataclass(frozen=True)
class Key:
    name: str
    device: str = "cpu"


class Action:
    def __init__(self, name: str):
        self.name = name


PRE, CREATE, BUMP, DESTROY = (Action(n) for n in
                              ("PREEXISTING", "CREATE", "INCREMENT_VERSION", "DESTROY"))


def test_peak_by_category_replays_the_timeline():
    class Category:  # stands for torch.profiler._memory_profiler.Category
        def __init__(self, name: str):
            self.name = name

    param, grad, act, state = (Category(n) for n in
                               ("PARAMETER", "GRADIENT", "ACTIVATION", "OPTIMIZER_STATE"))
    w, a, g, m, x, gpu = Key("w"), Key("a"), Key("g"), Key("m"), Key("x"), Key("w", "cuda")
    categories = {(w, 0): param, (w, 1): param, (a, 0): act, (g, 0): grad, (m, 0): None,
                  (m, 1): state}
    # As MemoryProfile.timeline gives them: sizes are positive, DESTROY subtracts.
    timeline = [
        (-1, PRE, (w, 0), 100),      # the weights, from before the profile
        (-1, PRE, (gpu, 0), 10_000),  # another device: left out
        (5, CREATE, (a, 0), 50),     # forward: an activation
        (6, CREATE, (x, 0), 7),      # something the profiler could not place
        (7, DESTROY, (a, 0), 50),    # backward frees the activation ...
        (7, CREATE, (g, 0), 100),    # ... in the same op as it writes the gradient
        (8, CREATE, (m, 0), 200),    # zeros_like, then written in place in the same op:
        (8, BUMP, (m, 0), 200),      # version 1 is optimizer state
        (9, BUMP, (w, 0), 100),      # the weights updated in place stay parameters
        (10, DESTROY, (g, 0), 100),  # zero_grad(set_to_none=True)
    ]
    peak = peak_by_category(timeline, lambda k, v: categories.get((k, v)),
                            on_device=lambda k: k.device == "cpu")
    assert peak.peak_bytes == 100 + 7 + 100 + 200  # from t=8, before the gradient is freed
    assert peak.at_peak["parameters"] == 100 and peak.at_peak["gradients"] == 100
    assert peak.at_peak["activations"] == 0 and peak.at_peak["unknown"] == 7
    assert peak.at_peak["optimizer_state"] == 200  # the new version's category
    assert sum(peak.at_peak.values()) == peak.peak_bytes
    assert peak.max_by_category["activations"] == 50
    assert peak.max_by_category["unknown"] == 7  # m's version 0 never counts: same moment
    # One time stamp is one moment: a free and an allocation in the same op never coexist.
    swap = [(1, CREATE, (a, 0), 50), (2, DESTROY, (a, 0), 50), (2, CREATE, (g, 0), 60)]
    peak2 = peak_by_category(swap, lambda k, v: categories.get((k, v)), lambda k: True)
    assert peak2.peak_bytes == 60 and peak2.at_peak["gradients"] == 60
    assert peak2.at_peak["activations"] == 0
    assert peak.events == len(timeline) - 1
    assert peak_by_category([], lambda k, v: None, lambda k: True).peak_bytes == 0
    assert memory_profile.gb(GB // 2) == 0.5


def test_profile_memory_around_a_block():
    """The context manager on its own: one SGD step of a small layer."""
    import torch

    layer = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    layer(torch.randn(8, 256)).sum().backward()
    opt.step()  # the momentum buffer exists before the profiled step
    with memory_profile.profile_memory("cpu") as prof:
        layer(torch.randn(8, 256)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak, seconds = prof.result()
    weights = sum(p.numel() * 4 for p in layer.parameters())
    assert peak.max_by_category["parameters"] == weights
    assert peak.max_by_category["gradients"] == weights
    assert peak.max_by_category["optimizer_state"] == weights  # one momentum buffer
    assert seconds >= 0 and prof.step_s is not None
    with pytest.raises(RuntimeError, match="no step"):
        prof.result()  # the events are dropped once analysed
