"""The tab's form: every option of TrainingConfig, grouped, with its label and the info text the
WebUI shows under a field (tests/test_ui.py checks that nothing of TrainingConfig is left out).
Data only: ``ui.py`` builds the components from these tables."""
from __future__ import annotations

from dreambooth.common.config import (ATTENTION, EXPORT_DTYPES, EXPORT_FORMATS,
                                      FLUX_TIMESTEP_SAMPLING, LATENT_SOURCES, LORA_LAYERS,
                                      MASK_SOURCES, OPTIMIZERS, PRECISIONS, SCHEDULERS,
                                      TRAINING_METHODS)

MODEL_FIELDS = ("base_model", "vae_path", "clip_l_path", "t5xxl_path", "prediction_type",
                "base_use_ema", "model_name")
NOT_IN_FORM = ("concepts", "models_dir")  # concepts have their own rows; folders come from the host

GROUPS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    # At the top of the Parameters tab, not folded: what the run trains. Only the options that
    # apply to the chosen method are shown (APPLIES).
    ("method", "Training method", [
        ("training_method", "Training method",
         "full: the whole model, a new checkpoint; lora / locon / loha / lokr: a small file in "
         "models/Lora beside the frozen model, used with <lora:name:1> in a prompt"),
        ("lora_layers", "LoRA layers", "attention: the attention layers; attention_mlp: also the "
                                       "feed-forward layers and projections (kohya's default)"),
        ("lora_rank", "Rank (network dim)", "16-32 for a person or an object, more for a style; "
                                            "the file grows with it"),
        ("lora_alpha", "Alpha", "the update is scaled by alpha / rank: rank / 2 is usual; "
                                "0 = alpha is the rank"),
        ("lora_conv_rank", "Conv rank", "the ResNet convolutions (textures, styles): LoCon always; "
                                        "LoHa / LoKr: 0 = none"),
        ("lora_conv_alpha", "Conv alpha", "as Alpha, for the convolutions; 0 = the conv rank"),
        ("lora_dropout", "Adapter dropout", "drops part of the adapter's output while training; "
                                            "0 = off (not with DoRA)"),
        ("dora", "DoRA", "weight-decomposed LoRA: learns direction and size apart, often closer "
                         "to a full fine-tune; slower (lora / locon)"),
        ("lokr_factor", "LoKr factor", "how the weights are split into a Kronecker product; -1 = "
                                       "as balanced as the shapes allow, larger = smaller file"),
    ]),
    ("basics", "Basics", [
        ("max_train_steps", "Training steps", "0 = instance pictures × 100 (the rule of thumb)"),
        ("learning_rate", "Learning rate", "1e-6 is the classic DreamBooth value; higher learns "
                                           "faster and overfits sooner"),
        ("lr_scheduler", "Learning-rate schedule", "how the rate changes over the run"),
        ("lr_warmup_steps", "Warmup steps", "steps to ramp the rate up from 0"),
        ("train_batch_size", "Batch size", "pictures per step; more needs more GPU memory"),
        ("resolution", "Resolution", "training size in pixels (multiple of 8); 0 = the model's "
                                     "own: 512 SD 1.x/2.x, 768 SD 2.x v, 1024 SDXL"),
        ("seed", "Seed", "same seed and settings give the same model"),
        ("optimizer", "Optimizer", "adamw8bit: 8-bit Adam (bitsandbytes), far less memory "
                                   "(the default; adamw where bitsandbytes is not installed, as "
                                   "in Forge Neo without --bnb); "
                                   "adafactor: little memory, no bitsandbytes (SDXL on 16 GB); "
                                   "prodigy needs no learning rate tuning (set it to 1.0)"),
        ("save_every_n_steps", "Save a checkpoint every N steps", "0 = only at the end; "
                                                                  "extra files get -step suffixes"),
        ("checkpoint_every_n_steps", "Resume point every N steps", "0 = none; resume continues "
                                                                  "from the latest one"),
        ("sample_every_n_steps", "Sample pictures every N steps", "0 = only at the end"),
        ("sample_prompts", "Sample prompts (one per line)", "empty: each concept's sample prompt, "
                                                            "else its instance prompt"),
    ]),
    ("memory", "Memory & speed", [
        ("mixed_precision", "Mixed precision", "fp16: half the memory on NVIDIA GPUs; bf16 on "
                                               "Ampere and newer; no: full precision (CPU)"),
        ("gradient_checkpointing", "Gradient checkpointing", "recomputes activations: much less "
                                                             "memory, ~20% slower"),
        ("gradient_accumulation_steps", "Gradient accumulation", "steps added up before an "
                                                                 "update: a larger batch for free"),
        ("fused_backward", "Fused backward pass", "each weight is updated as soon as its gradient "
                                                  "is ready: no full set of gradients in memory; "
                                                  "needs clipping off (0), accumulation 1, bf16 "
                                                  "or no mixed precision, one GPU"),
        ("trained_precision", "Trained weights", "fp32: the usual master copy; bf16: half the "
                                                 "memory of the trained weights, updated with "
                                                 "stochastic rounding (needs bf16 mixed precision)"),
        ("base_weights_8bit", "Base model in 8 bits (LoRA)", "the frozen model's linear layers "
                                                             "in int8 (bitsandbytes): SDXL's UNet "
                                                             "-43 %, SD1.5's -16 %; not with DoRA"),
        ("base_weights_4bit", "Base model in 4 bits (NF4, LoRA)", "the frozen model's linear "
                                                                  "layers in NF4 (bitsandbytes): "
                                                                  "Flux 22 → 6.7 GB; not with DoRA"),
        ("blocks_to_swap", "Flux: blocks to swap", "of the transformer's 57 blocks, how many wait "
                                                   "in RAM and are copied in as their turn comes: "
                                                   "-0.19 GB each with an fp8 base; slower steps"),
        ("attention", "Attention", "sdpa (PyTorch's fused attention) or xformers when installed"),
        ("compile_unet", "Compile the UNet", "torch.compile: a slow first step, then maybe "
                                             "faster steps; torch >= 2.2 (not A1111's 2.1)"),
        ("allow_tf32", "Allow TF32", "faster matrix maths on Ampere and newer GPUs"),
        ("cache_latents", "Cache latents", "encode every picture once; the VAE then leaves "
                                           "the GPU"),
        ("vae_fp16_safe", "VAE is fp16-safe", "SDXL: else latents are encoded in fp32 (its stock "
                                              "VAE overflows in fp16); tick for an fp16-fix VAE"),
        ("cache_text_embeddings", "Cache text embeddings", "while the text encoder is frozen, "
                                                           "encode prompts once"),
    ]),
    ("text_encoder", "Text encoder", [
        ("train_text_encoder", "Train the text encoder", "better likeness for people; more "
                                                         "memory (~1.5 GB; SDXL: both encoders)"),
        ("clip_skip", "CLIP skip", "2 for anime / NovelAI-family models, else 1"),
        ("text_encoder_lr", "Text encoder learning rate", "0 = the UNet's rate"),
        ("text_encoder_stop", "Stop training it at", "a fraction of the steps (0.3 = first 30%) "
                                                     "or a step number"),
        ("text_encoder_2_lr", "Text encoder 2 LR (SDXL)", "the second (OpenCLIP-G) encoder; "
                                                          "0 = as the first"),
        ("text_encoder_2_stop", "Text encoder 2 stop (SDXL; 0 = keep frozen)",
         "as 'Stop training it at'; 0 keeps the big second encoder frozen (less memory)"),
    ]),
    ("prior", "Prior preservation", [
        ("with_prior_preservation", "Prior preservation", "trains on generated class pictures "
                                                          "too, so 'a dog' stays any dog; off = "
                                                          "native training with captions"),
        ("prior_loss_weight", "Prior loss weight", "lower overfits less but learns less; 1.0 is "
                                                   "the paper's value"),
        ("num_class_images", "Class pictures per concept", "generated by the base model when the "
                                                           "class folder holds fewer"),
        ("class_batch_size", "Class picture batch", "pictures generated at once"),
        ("class_sample_steps", "Class picture sampler steps", "steps per generated picture"),
        ("class_guidance_scale", "Class picture CFG scale", "guidance when generating them"),
        ("class_clip_skip", "Class picture CLIP skip", "2 is advised for anime-family models"),
    ]),
    ("pictures", "Pictures & captions", [
        ("aspect_ratio_buckets", "Aspect-ratio buckets", "keeps pictures' shapes (19 buckets); "
                                                         "suits native training, works poorly "
                                                         "with DreamBooth"),
        ("random_crop", "Random crop", "off: center crop"),
        ("hflip", "Horizontal flip", "each picture also mirrored; avoid for asymmetric subjects "
                                     "(text, logos)"),
        ("rotation_degrees", "Rotation (degrees)", "random small rotations, 0 = off"),
        ("brightness_jitter", "Brightness jitter", "0 = off, 0.1 = ±10%"),
        ("contrast_jitter", "Contrast jitter", "0 = off, 0.1 = ±10%"),
        ("caption_extension", "Caption file extension", "a caption beside a picture (same name) "
                                                        "fills [filewords]"),
        ("shuffle_tags", "Shuffle caption tags", "comma-separated tags in random order"),
        ("keep_tokens", "Keep first N tags", "not shuffled or dropped"),
        ("tag_dropout", "Tag dropout", "chance to drop each tag, 0 = off"),
        ("alpha_background", "Transparent background becomes", "white (default), black or a "
                                                               "#rrggbb colour"),
        ("masked_training", "Masked training", "the loss follows a mask per picture "
                                               "(photo.mask.png beside photo.jpg, white = subject)"),
        ("mask_source", "Masks from", "file: photo.mask.png; alpha: the picture's transparency"),
        ("mask_background_weight", "Background weight", "loss weight outside the mask; 0 = "
                                                        "background ignored"),
        ("recursive", "Read subfolders", "pictures in subfolders of the instance folder too"),
        ("skip_bad_images", "Skip unreadable pictures", "off: stop with the list of bad files"),
    ]),
    ("advanced", "Advanced", [
        ("lr_num_cycles", "Restart cycles", "for cosine_with_restarts"),
        ("lr_power", "Polynomial power", "for the polynomial schedule"),
        ("adam_beta1", "Adam beta1", ""),
        ("adam_beta2", "Adam beta2", ""),
        ("adam_epsilon", "Adam epsilon", ""),
        ("weight_decay", "Weight decay", ""),
        ("max_grad_norm", "Gradient clipping", "max gradient norm, 0 = no clipping"),
        ("offset_noise", "Offset noise", "0.05-0.1 helps very dark or bright pictures; 0 = off"),
        ("zero_terminal_snr", "Zero terminal SNR (also on when the model file says so)",
         "the noise schedule reaches pure noise; for v-prediction models (NoobAI-style)"),
        ("min_snr_gamma", "Min-SNR gamma", "5 is the paper's value: steadier training; 0 = off"),
        ("min_snr_on_prior", "Min-SNR on class pictures too", "off: the class loss unweighted, "
                                                              "as diffusers' example"),
        ("latents_from", "Latents from", "mean: the VAE's mean (exact cache); sample: a fresh "
                                         "sample each step, as diffusers' example"),
        ("flux_timestep_sampling", "Flow: noise levels drawn by",
         "Flux and rectified-flow SDXL. shift: moved towards noise (Flux dev: by the "
         "picture's size, as it samples; rectified SDXL: by the shift below); sigmoid; uniform"),
        ("flow_shift", "Rectified-flow SDXL: shift", "noise levels moved towards noise, as "
                                                     "Neo's Shift moves its sampling; 1 = none"),
        ("flux_guidance", "Flux: training guidance", "the guidance value Flux dev is given while "
                                                     "training; 1 as kohya and ai-toolkit"),
        ("t5_max_length", "Flux: T5 tokens", "512 for dev, 256 for schnell (as each was trained)"),
        ("use_ema", "EMA of the weights", "exports a moving average: smoother, needs memory for "
                                          "a copy of the UNet"),
        ("ema_decay", "EMA decay", ""),
        ("validation_split", "Validation: pictures held out", "share of each concept's "
                                                              "pictures scored, not trained on; 0 = off"),
        ("validate_every_n_steps", "Validation every N steps", "0 = only at the end"),
        ("validation_timesteps", "Validation noise levels", "fixed levels over the schedule"),
        ("keep_best", "Keep the best step", "also save it as <name>_best"),
        ("checkpoints_total_limit", "Resume points kept", "older ones are deleted"),
        ("save_on_cancel", "Save the model on cancel", "off: a cancelled run writes nothing"),
        ("export_dtype", "Saved precision", "fp16 halves the file (the seed's --half)"),
        ("export_format", "Saved format", "safetensors is safe to load; ckpt is pickle"),
        ("overwrite", "Overwrite an existing file", "off: refuse a name already taken"),
        ("sample_negative_prompt", "Sample negative prompt", ""),
        ("sample_steps", "Sample sampler steps", "0 = no sample pictures"),
        ("sample_guidance_scale", "Sample CFG scale", ""),
        ("sample_seed", "Sample seed", "fixed, so samples are comparable across steps"),
        ("sample_size", "Sample size", "0 = the training resolution"),
    ]),
]

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "mixed_precision": PRECISIONS,
    "attention": ATTENTION, "export_dtype": EXPORT_DTYPES, "export_format": EXPORT_FORMATS,
    "latents_from": LATENT_SOURCES, "mask_source": MASK_SOURCES,
    "training_method": TRAINING_METHODS, "lora_layers": LORA_LAYERS,
    "flux_timestep_sampling": FLUX_TIMESTEP_SAMPLING,
}

ADAPTERS = tuple(m for m in TRAINING_METHODS if m != "full")
# The options that apply to some training methods only (the tab hides them for the others);
# every other option applies to all (EMA, for one, averages the adapter as it does the model).
APPLIES: dict[str, tuple[str, ...]] = {
    "lora_layers": ADAPTERS, "lora_rank": ADAPTERS, "lora_alpha": ADAPTERS,
    "lora_dropout": ADAPTERS,
    "lora_conv_rank": ("locon", "loha", "lokr"), "lora_conv_alpha": ("locon", "loha", "lokr"),
    "dora": ("lora", "locon"),
    "lokr_factor": ("lokr",),
    "export_format": ("full",),  # a LoRA file is always .safetensors
}
# The options that apply to one kind of base only: shown while the base model is of that kind
# (as the Model tab's CLIP-L / T5-XXL row follows a Flux file), hidden for the others, which
# refuse or ignore them. A base's kind: "flux", "rectified" (rectified-flow SDXL) or "".
FLUX_ONLY = ("flux_guidance", "t5_max_length", "blocks_to_swap")
BASE_DEPENDENT: dict[str, tuple[str, ...]] = {
    **{name: ("flux",) for name in FLUX_ONLY},
    "flux_timestep_sampling": ("flux", "rectified"),
    "flow_shift": ("rectified",),
}


def shown_for_base(flow: str) -> dict[str, bool]:
    """Which of the base-dependent options a base of this kind shows."""
    return {name: flow in kinds for name, kinds in BASE_DEPENDENT.items()}
# Info texts that change with the method: {option: {method or "adapter": info}}.
METHOD_INFO: dict[str, dict[str, str]] = {
    "learning_rate": {"adapter": "LoRA trains at about 1e-4 (kohya's default; the LoRA presets "
                                 "set it); 1e-6 learns next to nothing here"},
    "text_encoder_lr": {"adapter": "the text encoder's adapter; 0 = the UNet's rate (5e-5 is "
                                   "usual for LoRA)"},
    "export_dtype": {"adapter": "of the LoRA file; fp16 is what everyone shares"},
}


def applies(name: str, method: str) -> bool:
    """Whether option ``name`` applies to a run of ``method`` (shown in the tab)."""
    return method in APPLIES.get(name, TRAINING_METHODS)


def info_for(name: str, method: str, default: str) -> str:
    """Option ``name``'s info text for ``method``: its adapter text for LoRA-family methods."""
    texts = METHOD_INFO.get(name, {})
    return texts.get(method) or (texts.get("adapter") if method in ADAPTERS else None) or default

CONCEPT_FIELDS: list[tuple[str, str, str]] = [
    ("instance_data_dir", "Instance pictures folder", "the pictures of your subject or style"),
    ("instance_prompt", "Instance prompt", "with a rare identifier: 'photo of ohwx dog'; for a "
                                           "style 'painting by ohwx'; [filewords] = caption"),
    ("class_prompt", "Class prompt", "the same without the identifier: 'photo of a dog'"),
    ("class_data_dir", "Class pictures folder", "generated pictures only, never real photos"),
    ("class_negative_prompt", "Class negative prompt", "used when generating class pictures"),
    ("num_class_images", "Class pictures", "0 = the number under Prior preservation"),
    ("sample_prompt", "Sample prompt", "empty: the instance prompt"),
    ("validation_data_dir", "Validation pictures folder", "scored, never trained on (captions "
                                                          "as for training); empty: the split"),
]

# How the concept fields sit in rows (every CONCEPT_FIELDS name exactly once).
CONCEPT_LAYOUT = [("instance_data_dir", "instance_prompt"), ("class_data_dir", "class_prompt"),
                  ("class_negative_prompt", "num_class_images"),
                  ("sample_prompt", "validation_data_dir")]
