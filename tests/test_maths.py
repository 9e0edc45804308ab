"""Pinned maths: the loop's loss, optimizer step, schedules and EMA equal references written
from the published formulas (not from the loop's own helpers), on the tiny model in fp32.

What the reference shares with the loop are its *inputs* only: the base weights, the picture,
the noise and timesteps drawn from the step's generator (``step_generator``), the prompt. The
maths — noising (DDPM: sqrt(a)x0 + sqrt(1-a)eps), targets (eps; v = sqrt(a)eps - sqrt(1-a)x0),
MSE, prior weight, min-SNR-gamma (Hang et al.; diffusers' compute_snr), offset noise, clipping
and AdamW — is written here again, so a rewrite of the loop (fused backward, bf16, LoRA, SDXL)
that changes any of it fails. Tolerance: fp32 on the CPU, relative 1e-5 for losses and 1e-6
absolute for weights after one step (torch's foreach and single-tensor AdamW differ in the last
bits only).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth.common.config import SCHEDULERS, Concept, TrainingConfig
from dreambooth.models.objective import step_generator
from dreambooth.engine.optimizers import EMA
from dreambooth.engine.trainer import train
from dreambooth.engine.training_log import read_log

from trainer_fixtures import RecordingReporter, flat, run_paths, tiny_components

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6
# Adam's first step moves every weight by about lr x sign(gradient): a weight whose gradient is
# rounding noise (|g| ~ 1e-8) moves by +-lr either way. An epsilon well above that noise keeps
# the comparison about the formula (bias correction, decoupled decay, clipping), not the noise.
ADAM_EPS = 1e-3


def one_picture_config(root, **overrides) -> TrainingConfig:
    """One instance and one class picture, batch 1: every step sees exactly these two rows."""
    inst, cls = root / "instance", root / "class"
    if not inst.exists():
        inst.mkdir()
        cls.mkdir()
        gradient = Image.linear_gradient("L").resize((64, 64))
        Image.merge("RGB", (gradient, gradient.rotate(90), Image.new("L", (64, 64), 90))
                    ).save(inst / "a.png")
        Image.new("RGB", (64, 64), (40, 160, 90)).save(cls / "b.png")
    values = dict(
        base_model=str(root / "base.safetensors"), model_name="maths",
        concepts=[Concept(instance_data_dir=str(inst), instance_prompt="photo of zwx toy",
                          class_data_dir=str(cls), class_prompt="photo of a toy")],
        with_prior_preservation=True, num_class_images=1, resolution=64, max_train_steps=1,
        learning_rate=1e-3, optimizer="adamw", mixed_precision="no", weight_decay=1e-2,
        gradient_checkpointing=False, checkpoint_every_n_steps=0, seed=11, max_grad_norm=0,
        sample_steps=0)
    values.update(overrides)
    return TrainingConfig(**values)


def pixels_of(path) -> torch.Tensor:
    array = torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.float32)
    return (array.reshape(64, 64, 3).permute(2, 0, 1) / 255.0 * 2.0 - 1.0)[None]


def reference_loss(components, config: TrainingConfig):
    """The first step's loss, from the formulas (see the module docstring)."""
    concept = config.concepts[0]
    rows = [sorted(Path(concept.instance_data_dir).iterdir())[0]]
    prompts = [concept.instance_prompt]
    if config.with_prior_preservation:
        rows.append(sorted(Path(concept.class_data_dir).iterdir())[0])
        prompts.append(concept.class_prompt)
    vae, unet, te, tok = (components.vae, components.unet, components.text_encoder,
                          components.tokenizer)
    with torch.no_grad():
        x0 = torch.cat([vae.encode(pixels_of(p)).latent_dist.mean for p in rows])
        x0 = x0 * vae.config.scaling_factor
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        hidden = te(ids)[0]
    gen = step_generator(config.seed, 0)
    eps = torch.randn(x0.shape, generator=gen)
    if config.offset_noise:
        eps = eps + config.offset_noise * torch.randn(x0.shape[:2] + (1, 1), generator=gen)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, 0)[t].float().reshape(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    v = config.prediction_type == "v_prediction"
    target = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0 if v else eps
    pred = unet(noisy, t, hidden).sample
    per_row = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if config.min_snr_gamma:
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        weights = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1 if v else snr)
        if not config.min_snr_on_prior:
            weights[1:] = 1.0
        per_row = per_row * weights
    loss = per_row[0]
    if config.with_prior_preservation:
        loss = loss + config.prior_loss_weight * per_row[1]
    return loss


def loop_step(tmp_path, **overrides):
    """(config, components before, components after one step, reporter)."""
    config = one_picture_config(tmp_path, **overrides)
    before, after = tiny_components(), tiny_components()
    scheduler = before.noise_scheduler.config  # what the reference's betas assume
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end,
            scheduler.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    reporter = RecordingReporter()
    train(config, run_paths(tmp_path), reporter=reporter, components=after, export_model=False)
    return config, before, after, reporter


CASES = {
    "epsilon": {},
    "epsilon, prior weight 0.3": {"prior_loss_weight": 0.3},
    "native (no prior)": {"with_prior_preservation": False},
    "v-prediction": {"prediction_type": "v_prediction"},
    "min-SNR 5, epsilon": {"min_snr_gamma": 5.0},
    "min-SNR 1, v, prior unweighted": {"min_snr_gamma": 1.0, "prediction_type": "v_prediction",
                                       "min_snr_on_prior": False},
    "min-SNR 2, epsilon, prior unweighted": {"min_snr_gamma": 2.0, "min_snr_on_prior": False},
    "offset noise 0.1": {"offset_noise": 0.1},
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_loops_loss_equals_the_formula(tmp_path, case):
    config, before, _, reporter = loop_step(tmp_path, **CASES[case])
    expected = reference_loss(before, config).item()
    (_, loss, _), = reporter.steps
    assert loss == pytest.approx(expected, rel=LOSS_RTOL)


def test_min_snr_on_prior_changes_the_loss_only_when_there_is_a_prior(tmp_path):
    both = reference_loss(tiny_components(), one_picture_config(tmp_path, min_snr_gamma=1.0))
    example = reference_loss(tiny_components(), one_picture_config(
        tmp_path, min_snr_gamma=1.0, min_snr_on_prior=False))
    assert both.item() != pytest.approx(example.item(), rel=1e-3)


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_one_step_equals_torch_adamw_with_clipping(tmp_path, clip):
    config, before, after, _ = loop_step(tmp_path, max_grad_norm=clip, weight_decay=0.05,
                                         adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=ADAM_EPS)
    loss = reference_loss(before, config)
    loss.backward()
    params = list(before.unet.parameters())
    if clip:
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        assert norm > clip  # the clipping really acts in this case
        for p in params:
            p.grad.mul_(min(1.0, clip / (float(norm) + 1e-6)))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.8, 0.99), eps=ADAM_EPS,
                                  weight_decay=0.05, foreach=False)
    optimizer.step()
    assert torch.allclose(flat(after.unet), flat(before.unet), atol=WEIGHT_ATOL, rtol=0)
    assert not torch.equal(flat(after.unet), flat(tiny_components().unet))


def test_text_encoder_step_uses_its_own_lr(tmp_path):
    config, before, after, _ = loop_step(tmp_path, train_text_encoder=True, text_encoder_lr=3e-4,
                                         cache_text_embeddings=False, adam_epsilon=ADAM_EPS)
    # The reference with the text encoder in the graph.
    concept = config.concepts[0]
    groups = [{"params": list(before.unet.parameters()), "lr": 1e-3},
              {"params": list(before.text_encoder.parameters()), "lr": 3e-4}]
    loss = _loss_with_trained_text_encoder(before, config, concept)
    loss.backward()
    torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=1e-2,
                      foreach=False).step()
    assert torch.allclose(flat(after.text_encoder), flat(before.text_encoder), atol=WEIGHT_ATOL,
                          rtol=0)
    assert torch.allclose(flat(after.unet), flat(before.unet), atol=WEIGHT_ATOL, rtol=0)


def _loss_with_trained_text_encoder(components, config, concept):
    """As reference_loss, with the text encoder in the graph (it is trained)."""
    paths = [sorted(Path(concept.instance_data_dir).iterdir())[0],
             sorted(Path(concept.class_data_dir).iterdir())[0]]
    tok = components.tokenizer
    with torch.no_grad():
        x0 = torch.cat([components.vae.encode(pixels_of(p)).latent_dist.mean for p in paths])
        x0 = x0 * components.vae.config.scaling_factor
    ids = tok([concept.instance_prompt, concept.class_prompt], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = components.text_encoder(ids)[0]
    gen = step_generator(config.seed, 0)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (2,), generator=gen)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, 0)[t].float().reshape(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    per_row = ((components.unet(noisy, t, hidden).sample - eps) ** 2).mean(dim=(1, 2, 3))
    return per_row[0] + config.prior_loss_weight * per_row[1]


def diffusers_lrs(name: str, steps: int, warmup: int, cycles: int, power: float,
                  base_lr: float) -> list[float]:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                              num_cycles=cycles, power=power)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])  # the lr this step trains with
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_equals_diffusers_get_scheduler(tmp_path, name):
    steps, warmup = 7, 2
    config, _, _, _ = loop_step(tmp_path, lr_scheduler=name, lr_warmup_steps=warmup,
                                max_train_steps=steps, lr_num_cycles=2, lr_power=2.0,
                                with_prior_preservation=False)
    logged = [r["lr"] for r in read_log(run_paths(tmp_path).logs_dir / "train.jsonl")
              if "loss" in r]
    # "constant" with a warm-up warms up (diffusers' "constant" would ignore the warm-up).
    reference = "constant_with_warmup" if name == "constant" else name
    expected = diffusers_lrs(reference, steps, warmup, 2, 2.0, config.learning_rate)
    assert logged == pytest.approx(expected, rel=1e-12, abs=0)


def test_text_encoder_lr_follows_the_schedule_until_its_stop_step(tmp_path):
    steps = 6
    loop_step(tmp_path, train_text_encoder=True, text_encoder_lr=2e-4, text_encoder_stop=0.5,
              lr_scheduler="linear", max_train_steps=steps, with_prior_preservation=False,
              cache_text_embeddings=False)
    records = [r for r in read_log(run_paths(tmp_path).logs_dir / "train.jsonl") if "loss" in r]
    with_te = [r["step"] for r in records if "lr_text_encoder" in r]
    assert with_te == [1, 2, 3]  # text_encoder_stop 0.5 of 6 steps
    unet = diffusers_lrs("linear", steps, 0, 1, 1.0, 1e-3)
    te = diffusers_lrs("linear", steps, 0, 1, 1.0, 2e-4)
    for r in records:
        assert r["lr"] == pytest.approx(unet[r["step"] - 1], rel=1e-12)
        if "lr_text_encoder" in r:
            assert r["lr_text_encoder"] == pytest.approx(te[r["step"] - 1], rel=1e-12)


def reference_ema(params: list[list[float]], decay: float) -> list[float]:
    """diffusers' EMAModel: at optimization step n, s = n - 1; decay 0 while s <= 0, then
    min(decay, (1 + s) / (10 + s)); shadow <- shadow - (1 - decay)(shadow - param)."""
    shadow = list(params[0])
    for n, weights in enumerate(params[1:], 1):
        s = n - 1
        d = 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))
        shadow = [a - (1 - d) * (a - w) for a, w in zip(shadow, weights)]
    return shadow


def test_ema_follows_diffusers_warm_up():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    history = [param.detach().clone().tolist()]
    ema = EMA([param], decay=0.9)
    for _ in range(12):
        with torch.no_grad():
            param.add_(torch.randn(5))
        history.append(param.detach().clone().tolist())
        ema.step([param])
    assert ema.shadow_params[0].tolist() == pytest.approx(reference_ema(history, 0.9), abs=1e-6)
    # diffusers' own EMAModel where it imports (not with the A1111 lane's transformers 4.30):
    # the same numbers.
    try:
        from diffusers.training_utils import EMAModel
    except Exception:  # its import chain fails on transformers 4.30
        return
    torch.manual_seed(0)
    theirs_param = torch.nn.Parameter(torch.randn(5))
    theirs = EMAModel([theirs_param], decay=0.9)
    torch.manual_seed(0)
    torch.randn(5)
    for _ in range(12):
        with torch.no_grad():
            theirs_param.add_(torch.randn(5))
        theirs.step([theirs_param])
    assert theirs.shadow_params[0].tolist() == pytest.approx(ema.shadow_params[0].tolist(),
                                                             abs=1e-6)


def test_first_ema_step_copies_the_weights():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.99)
    with torch.no_grad():
        param.fill_(2.0)
    ema.step([param])
    assert ema.shadow_params[0].tolist() == [2.0, 2.0, 2.0]
    assert math.isclose(ema.current_decay(), 0.0)
