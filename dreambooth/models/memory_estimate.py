"""What a training run should hold on the GPU, by the categories the bench measures
(``bench --memory``): the frozen weights, the trained weights, their gradients, the optimizer's
state and the activations, plus the CUDA context. Bytes per parameter from what each setting
keeps; the activations of one picture calibrated on the CPU measures of the bench (SD1.5 at 512 px
and SDXL at 1024 px, gradient checkpointing, bf16; see the README's Performance section). A rough
figure for the tab's estimate line and for choosing a card-size preset, not a measure.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 2 ** 30


@dataclass(frozen=True)
class FamilySize:
    """Parameter counts of one family's models (SD1.5, SD2, SDXL base: counted on the real
    architectures) and the activations of one picture at ``resolution`` with gradient
    checkpointing in half precision (GB)."""

    unet: float
    unet_linear: float  # of which in Linear layers: what base_weights_8bit keeps in int8
    unet_conv: float  # ... and in convolutions (Adafactor factors only their last two dims)
    encoders: tuple[float, ...]  # in prompt order
    resolution: int
    activations_gb: float
    adapter_per_rank: float  # adapter parameters per unit of rank, attention + feed-forward
    adapter_conv_per_rank: float  # ... and on the ResNet convolutions (LoCon)
    trainable_encoders: int = 2  # of ``encoders`` (Flux: CLIP-L only, T5 never trains)
    chains: tuple[tuple[int, float], ...] = ()  # block swap: (blocks, parameters of one) per chain


SIZES = {
    "sd1": FamilySize(859.5e6, 270.0e6, 589.0e6, (123.1e6,), 512, 0.36, 0.56e6, 0.25e6),
    "sd2": FamilySize(865.9e6, 301.2e6, 563.0e6, (340.4e6,), 768, 0.8, 0.6e6, 0.25e6),
    "sdxl": FamilySize(2567.5e6, 2232.6e6, 333.2e6, (123.1e6, 694.7e6), 1024, 0.72, 3.4e6, 0.9e6),
    # Flux.1 dev's transformer (counted on its real architecture, built on the meta device) and
    # CLIP-L + T5-XXL's encoder. Its activations are not measured yet: reckoned from what
    # per-block checkpointing keeps (each of the 57 blocks' input, 4096 + 512 tokens x 3072 in
    # bf16: 1.6 GB) plus one block recomputed (~0.9 GB).
    "flux": FamilySize(11901.4e6, 11898.3e6, 0.0, (123.1e6, 4762.3e6), 1024, 2.5, 5.37e6, 0.0,
                       trainable_encoders=1, chains=((19, 339.8e6), (38, 141.6e6))),
}
# Optimizer state, bytes per trained parameter: AdamW's two fp32 moments, their 8-bit versions,
# Lion's one moment, SGD's momentum, Prodigy's four copies; Adafactor's factored second moment
# is a row and a column per matrix (a few bytes per thousand weights) — but transformers'
# Adafactor factors the last two dimensions, so a 3x3 convolution keeps 2/3 of its size in fp32
# (measured: 0.91 GB for SDXL's UNet, whose convolutions hold 333 M weights).
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "lion": 4.0, "lion8bit": 1.0, "sgd": 4.0,
               "prodigy": 16.0, "adafactor": 0.02}
# Adapter parameters per unit of rank relative to LoRA's two matrices.
ADAPTER_PARAMS = {"lora": 1.0, "locon": 1.0, "loha": 2.0, "lokr": 0.25}
FUSED_GRADIENTS = 0.1  # the share of a full gradient set alive at once in the fused pass
# (measured: 0.21 GB of bf16 gradients at the peak for SD1.5 + its text encoder, 1.8 GB in all)
NF4_BYTES = 0.5 + 4 / 64  # base_weights_4bit: two weights a byte, an fp32 scale per 64
CUDA_OVERHEAD_GB = 0.6  # the CUDA context and the allocator's slack


def estimate(family: str, *, method: str = "full", train_text_encoder: bool = False,
             trained_encoders: int = 1, optimizer: str = "adamw8bit", mixed_precision: str = "fp16",
             trained_precision: str = "fp32", fused_backward: bool = False,
             base_weights_8bit: bool = False, base_weights_4bit: bool = False,
             gradient_checkpointing: bool = True,
             resolution: int = 0, pictures: int = 1, rank: int = 32, conv_rank: int = 0,
             cache_text_embeddings: bool = True, blocks_to_swap: int = 0) -> dict[str, float]:
    """GB by category ("frozen weights", "trained weights", "gradients", "optimizer state",
    "activations", "CUDA context") and their "total". ``pictures``: per step, the class
    pictures of prior preservation included; ``trained_encoders``: how many text encoders train
    when ``train_text_encoder`` (SDXL: 2 unless the second is frozen); ``blocks_to_swap``: the
    frozen base's share on the GPU is what block swap keeps there."""
    size = SIZES.get(family, SIZES["sd1"])
    half = mixed_precision != "no"
    frozen_bytes = 2 if half else 4
    trained_bytes = 2 if trained_precision == "bf16" else 4
    encoders = list(size.encoders)
    trained_te = (encoders[:min(trained_encoders, size.trainable_encoders)]
                  if train_text_encoder else [])
    other_te = encoders[len(trained_te):]
    # frozen text encoders are cached and leave the GPU, unless the prompts are encoded each step
    frozen_te = 0.0 if cache_text_embeddings else sum(other_te)
    if method == "full":
        trained = size.unet + sum(trained_te)
        frozen = frozen_te * frozen_bytes
    else:
        share = ADAPTER_PARAMS.get(method, 1.0) * (size.adapter_per_rank * rank
                                                   + size.adapter_conv_per_rank * conv_rank)
        trained = share * (1.0 if train_text_encoder else 0.9)  # the encoders' share of layers
        linear = size.unet_linear if base_weights_8bit or base_weights_4bit else 0.0
        per_linear = NF4_BYTES if base_weights_4bit else 1
        frozen = (linear * per_linear + (size.unet - linear) * frozen_bytes) * on_gpu_share(
            size, blocks_to_swap)
        frozen += (sum(trained_te) + frozen_te) * frozen_bytes
    grads = trained * trained_bytes * (FUSED_GRADIENTS if fused_backward else 1.0)
    scale = (max(resolution, 64) / size.resolution) ** 2 if resolution else 1.0
    activations = size.activations_gb * scale * max(pictures, 1)
    activations *= (1 if gradient_checkpointing else 4) * (1 if half else 2)
    state = trained * STATE_BYTES.get(optimizer, 8.0)
    if optimizer == "adafactor" and method == "full":
        state += size.unet_conv * 2 / 3 * 4
    figures = {"frozen weights": frozen / GB, "trained weights": trained * trained_bytes / GB,
               "gradients": grads / GB, "optimizer state": state / GB,
               "activations": activations, "CUDA context": CUDA_OVERHEAD_GB}
    figures["total"] = sum(figures.values())
    return figures


def on_gpu_share(size: FamilySize, blocks_to_swap: int) -> float:
    """The share of the denoiser's weights on the GPU with ``blocks_to_swap`` swapped: what is
    not in a block, and per chain its resident blocks plus one (the block just run, whose memory
    the allocator frees once the GPU is done with it, while the next one is copied in)."""
    if not blocks_to_swap or not size.chains:
        return 1.0
    from dreambooth.models.block_swap import split_swapped

    lengths = [count for count, _ in size.chains]
    swapped = split_swapped(min(blocks_to_swap, sum(lengths) - len(lengths)), lengths)
    in_blocks = sum(count * params for count, params in size.chains)
    here = sum(min(count, count - s + 1) * params
               for (count, params), s in zip(size.chains, swapped))
    return (size.unet - in_blocks + here) / size.unet


def describe(figures: dict[str, float]) -> str:
    """"≈5.2 GB (trained weights 2.0 + optimizer state 2.0 + …)", largest parts first."""
    parts = sorted(((k, v) for k, v in figures.items() if k != "total" and v >= 0.05),
                   key=lambda kv: -kv[1])
    return f"≈{figures['total']:.1f} GB (" + " + ".join(f"{k} {v:.1f}" for k, v in parts) + ")"


def for_config(config, family: str, resolution: int) -> dict[str, float]:
    """:func:`estimate` of a :class:`~dreambooth.common.config.TrainingConfig`'s run on ``family``
    (``resolution``: the run's, the model's own when the config says 0)."""
    from dreambooth.models.adapters.lycoris import trains_convolutions

    return estimate(
        family, method=config.training_method, train_text_encoder=config.train_text_encoder,
        trained_encoders=2 if config.text_encoder_2_stop > 0 else 1, optimizer=config.optimizer,
        mixed_precision=config.mixed_precision, trained_precision=config.trained_precision,
        fused_backward=config.fused_backward, base_weights_8bit=config.base_weights_8bit,
        base_weights_4bit=config.base_weights_4bit,
        gradient_checkpointing=config.gradient_checkpointing, resolution=resolution,
        pictures=config.train_batch_size * (2 if config.with_prior_preservation else 1),
        rank=config.lora_rank,
        conv_rank=config.lora_conv_rank if trains_convolutions(config) else 0,
        cache_text_embeddings=config.cache_text_embeddings, blocks_to_swap=config.blocks_to_swap)
