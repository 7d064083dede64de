"""The training loop: SAM's simulated interactive recipe, resumable and data-parallel.

Determinism: every random choice of a step (which images, augmentation, prompts,
drop path) is seeded from (seed, step, rank), so a run resumed from a checkpoint
continues bit for bit, and the number of data-loader workers does not matter.

Data parallel: launched under ``torchrun`` (WORLD_SIZE > 1) the same command
trains one replica per process with DistributedDataParallel; each rank reads a
disjoint share of every batch (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..atomic import atomic_path, write_text_atomic
from ..build import (
    MODEL_CONFIGS,
    SamConfig,
    build_sam_from_config,
    config_from_dict,
    config_to_dict,
    resolve_device,
    save_model,
)
from ..checkpoint import load_checkpoint, read_metadata
from ..errors import SeganyError
from ..inference.mask_decoder import FastMaskDecoder
from ..inference.precision import cpu_has_native_bf16, cpu_name
from ..modeling import Sam
from ..modeling.common import DropPath
from .augment import TrainItem
from .config import ModelSection, OptimSection, TrainConfig
from .data_stream import SampleStream
from .init import load_decoder_checkpoint, load_encoder_init
from .losses import sam_loss
from .prompts import error_points, noisy_boxes, random_pixels, round_schedule
from .stopping import StopRequests
from .warmup import embedding_scale, fold_embedding_scale, random_embedding, random_shape_masks

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.safetensors"
METRICS_NAME = "metrics.jsonl"
PROGRESS_METADATA_KEY = "segany_training"
GEOMETRIC_MASKS = 16  # shapes per random embedding in a geometric warm-up step


# -- the model ----------------------------------------------------------------


def model_config(section: ModelSection) -> SamConfig:
    if section.config is not None:
        return config_from_dict(section.config)
    if section.name not in MODEL_CONFIGS:
        raise SeganyError(
            f"unknown model.name {section.name!r}; choose one of: {', '.join(MODEL_CONFIGS)}"
        )
    return MODEL_CONFIGS[section.name]


def encoder_layer_ids(model: Sam) -> tuple[dict[str, int], int]:
    """Depth index of every image-encoder parameter, for layer-wise lr decay and freezing.

    The stem is 0, the k-th transformer/conv block k, the neck ``num_layers``.
    Returns ({parameter name: index}, num_layers).
    """
    names = [name for name, _ in model.image_encoder.named_parameters()]
    block_keys: list[str] = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "blocks":
            key = ".".join(parts[:2])
        elif parts[0] == "layers" and parts[2] == "blocks":
            key = ".".join(parts[:4])
        else:
            continue
        if key not in block_keys:
            block_keys.append(key)
    num_layers = len(block_keys) + 1
    ids: dict[str, int] = {}
    last_block = 0
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else ".".join(parts[:4])
        if key in block_keys:
            last_block = block_keys.index(key) + 1
            ids[name] = last_block
        elif parts[0] == "layers" and parts[2] == "downsample":
            ids[name] = last_block  # merging after a stage trains with that stage
        elif parts[0] == "neck":
            ids[name] = num_layers
        else:
            ids[name] = 0
    return ids, num_layers


def apply_freeze(model: Sam, section: ModelSection) -> None:
    """Freeze the encoder (``encoder``) or all but its last blocks and neck (``partial``)."""
    if section.freeze == "none":
        return
    ids, num_layers = encoder_layer_ids(model)
    first_trainable = (
        num_layers + 1 if section.freeze == "encoder" else num_layers - section.trainable_blocks
    )
    for name, param in model.image_encoder.named_parameters():
        param.requires_grad_(ids[name] >= first_trainable)


def freeze_norm_statistics(model: Sam) -> None:
    """Put normalisation layers whose parameters are all frozen in eval mode.

    A frozen encoder must not change: in train mode BatchNorm would still update its
    running statistics from the fine-tuning images. Call after ``model.train()``.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def set_drop_path(model: Sam, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` over the encoder's blocks."""
    modules = [m for m in model.image_encoder.modules() if isinstance(m, DropPath)]
    for index, module in enumerate(modules):
        module.drop_prob = rate * index / max(len(modules) - 1, 1)


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    special = ("pos_embed", "rel_pos", "attention_biases", "token", "embeddings", "embed.weight")
    return param.ndim <= 1 or any(key in name for key in special)


def parameter_groups(model: Sam, optim: OptimSection) -> list[dict]:
    """AdamW groups: layer-wise lr scale for the encoder, no weight decay on norms/embeddings.

    ``lr_scale`` multiplies the schedule's lr; during a geometric warm-up the prompt
    encoder and decoder (the only parts trained then) use ``warmup_lr_scale`` = 1.
    """
    ids, num_layers = encoder_layer_ids(model)
    groups: dict[tuple[bool, float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_encoder = name.startswith("image_encoder.")
        scale = optim.decoder_lr_scale
        if in_encoder:
            scale = optim.layer_lr_decay ** (num_layers - ids[name.removeprefix("image_encoder.")])
        decay = 0.0 if _no_weight_decay(name, param) else optim.weight_decay
        groups.setdefault((in_encoder, scale, decay), []).append(param)
    return [
        {
            "params": params,
            "lr_scale": scale,
            "warmup_lr_scale": scale if in_encoder else 1.0,
            "weight_decay": decay,
            "lr": optim.lr * scale,
        }
        for (in_encoder, scale, decay), params in groups.items()
    ]


def learning_rate(optim: OptimSection, step: int, first_step: int = 0) -> float:
    """Linear warm-up from ``first_step`` (a chunk that starts with a fresh optimizer warms
    up again), then a step decay by ``lr_decay_factor`` at each ``lr_decay_steps``."""
    since = step - first_step + 1
    warmup = min(1.0, since / optim.warmup_steps) if optim.warmup_steps > 0 else 1.0
    decays = sum(step >= s for s in optim.lr_decay_steps)
    return optim.lr * warmup * optim.lr_decay_factor**decays


# -- one step -----------------------------------------------------------------


class InteractiveStep(nn.Module):
    """Loss of one batch under SAM's simulated interactive training.

    For each image: the encoder runs once; its masks get a first prompt (a
    foreground point or a noisy box, with equal chance per image), then rounds
    that add a click sampled from the previous error region, each feeding the
    previous low-res logits of the top-scoring output back as the mask prompt.
    Without items (a geometric warm-up step, see segany.train.warmup) each "image" is a
    random embedding with random shapes as its objects.
    Wrapped as a module so that DistributedDataParallel sees one forward per step.
    """

    def __init__(self, sam: Sam, optim: OptimSection) -> None:
        super().__init__()
        self.sam = sam
        self.optim = optim

    def forward(
        self,
        items: list[TrainItem] | None,
        generator: torch.Generator,
        embedding_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if items is None:
            pairs = self._geometric_batch(generator)
        else:
            device = self.sam.device
            images = torch.stack(
                [self.sam.preprocess(item.image.to(device).float()) for item in items]
            )
            embeddings, high_res = self.sam.encode_image(images)
            embeddings = embeddings * embedding_scale
            pairs = [
                (
                    embeddings[i : i + 1],
                    item.masks.to(device),
                    None if high_res is None else [f[i : i + 1] for f in high_res],
                )
                for i, item in enumerate(items)
            ]
        losses, parts = [], []
        for embedding, masks, image_high_res in pairs:
            loss, part = self._rounds(embedding, masks, generator, image_high_res)
            losses.append(loss)
            parts.append(part)
        summary = {key: torch.stack([p[key] for p in parts]).mean() for key in parts[0]}
        return torch.stack(losses).mean(), summary

    def _geometric_batch(
        self, generator: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]]:
        # One random embedding a step: the decoder's cost is per prompt, the encoder's unused.
        size = self.sam.image_encoder.img_size
        embedding = random_embedding(self.sam, self.optim.geometric_embedding_scale, generator)
        masks = random_shape_masks(GEOMETRIC_MASKS, size, generator).to(self.sam.device)
        high_res = None
        if self.sam.mask_decoder.use_high_res_features:  # no image: no detail to add
            dim, grid = embedding.shape[1], embedding.shape[-1]
            high_res = [embedding.new_zeros(1, dim // 8, 4 * grid, 4 * grid)]
            high_res.append(embedding.new_zeros(1, dim // 4, 2 * grid, 2 * grid))
        return [(embedding, masks, high_res)]

    def _rounds(
        self,
        embedding: torch.Tensor,
        masks: torch.Tensor,
        generator: torch.Generator,
        high_res: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        optim = self.optim
        prompt_encoder, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        stride = masks.shape[-1] // prompt_encoder.mask_input_size[-1]
        soft_target = nn.functional.avg_pool2d(masks[:, None].float(), stride)[:, 0]
        target = soft_target >= 0.5
        count = len(masks)
        rows = torch.arange(count, device=masks.device)

        use_box = bool(torch.rand((), generator=generator) < optim.box_probability)
        boxes = noisy_boxes(masks.cpu(), generator).to(masks.device) if use_box else None
        coords = torch.zeros(count, 0, 2, device=masks.device)
        labels = torch.zeros(count, 0, dtype=torch.long, device=masks.device)
        if not use_box:
            first, _ = random_pixels(masks.cpu(), generator)
            coords, labels = (
                first[:, None].to(masks.device),
                torch.ones(count, 1, dtype=torch.long, device=masks.device),
            )

        # The decoder runs in the inference layer's exact forms (the same function as
        # the model's plain decoder, which the tests hold to Meta's): against one image
        # they share its side between the prompt sets, and on a CPU their backward is
        # ~2x faster than the plain form's (the upscaling as products, no fused-attention
        # backward). Made here, from this step's weights, so gradients reach them.
        fast = FastMaskDecoder(
            decoder,
            prompt_encoder.get_dense_pe(),
            prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1),
        )
        schedule = round_schedule(optim.rounds, generator, optim.rounds_without_click)
        mask_input: torch.Tensor | None = None
        total = embedding.new_zeros(())
        previous: torch.Tensor | None = None
        history: dict[str, list[torch.Tensor]] = {}
        for round_index in range(optim.rounds):
            if round_index > 0 and schedule[round_index - 1]:
                assert previous is not None
                new, new_labels = error_points(previous.cpu(), target.cpu(), stride, generator)
                coords = torch.cat([coords, new[:, None].to(masks.device)], dim=1)
                labels = torch.cat([labels, new_labels[:, None].to(masks.device)], dim=1)
            points = (coords, labels) if coords.shape[1] else None
            sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            logits, iou_pred = fast.decode(
                embedding,
                sparse,
                dense,
                # A single click is ambiguous: three outputs, the best one trained. A box
                # (two corner points, as in SAM 2's recipe) or several prompts: the single
                # output, which is what a box is answered with at inference.
                multimask_output=round_index == 0 and not use_box,
                high_res_features=high_res,
            )
            loss, parts, _ = sam_loss(
                logits,
                iou_pred,
                soft_target,
                optim.focal_weight,
                optim.dice_weight,
                optim.iou_weight,
            )
            total = total + loss
            for key, value in parts.items():
                history.setdefault(key, []).append(value)
            chosen = iou_pred.detach().argmax(dim=1)
            previous_logits = logits.detach()[rows, chosen].float()
            mask_input = previous_logits[:, None]
            previous = previous_logits > 0
        summary = {key: torch.stack(values).mean() for key, values in history.items()}
        summary["iou_first"] = history["iou"][0]
        summary["iou_last"] = history["iou"][-1]
        return total / optim.rounds, summary


# -- the run ------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _seed_everything(seed: int, step: int, rank: int) -> torch.Generator:
    """Seed the global RNG for this step and rank (drop path) and return the prompt RNG."""
    global_seed, prompt_seed = np.random.SeedSequence([seed, step, rank]).generate_state(
        2, np.uint64
    )
    torch.manual_seed(int(global_seed) >> 1)
    return torch.Generator().manual_seed(int(prompt_seed) >> 1)


def _save_checkpoint(
    path: Path, sam: Sam, optimizer: torch.optim.Optimizer, step: int, optim: OptimSection
) -> None:
    # The weights stay unscaled (a resumed run needs them so); loaders fold embedding_scale.
    state = {
        "model": sam.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "embedding_scale": embedding_scale(optim, step - 1),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, sam: Sam, optimizer: torch.optim.Optimizer) -> int:
    if not path.is_file():
        raise SeganyError(f"nothing to resume: {path} does not exist; start without --resume")
    state = torch.load(path, map_location=sam.device, weights_only=True)
    sam.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _trim_metrics(path: Path, before_step: int) -> None:
    """Drop log lines of steps a resumed run will redo."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["step"] < before_step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _batches(
    stream: SampleStream, start: int, config: TrainConfig, world: Distributed
) -> Iterator[list[TrainItem]]:
    """The micro-batches of this rank from step ``start`` on, in order."""
    optim = config.optim
    for step in range(start, optim.steps):
        for micro in range(optim.grad_accum):
            first = (
                (step * optim.grad_accum + micro) * world.world_size + world.rank
            ) * optim.batch_images
            yield stream.items(range(first, first + optim.batch_images))


def training_precision(config: TrainConfig, device: torch.device) -> str:
    """``optim.precision``, with ``auto`` resolved: bf16 autocast where the hardware computes
    bfloat16 natively (a CUDA GPU, a CPU with AVX512-BF16 or AMX), else fp32 (on an AVX2-only
    CPU, bf16 is emulated and slower than fp32)."""
    if config.optim.precision != "auto":
        return config.optim.precision
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    return "bf16" if native else "fp32"


def training_progress(path: Path) -> TrainingProgress | None:
    """The progress an earlier chunk recorded in a weights file, None if it has none."""
    stored = read_metadata(path).get(PROGRESS_METADATA_KEY)
    return None if stored is None else TrainingProgress(**json.loads(stored))


def progress_so_far(config: TrainConfig) -> TrainingProgress | None:
    """An earlier chunk's progress when ``model.continue_from`` holds one, else None."""
    earlier = config.model.continue_from
    return training_progress(earlier) if earlier is not None and earlier.is_file() else None


def build_training_model(config: TrainConfig) -> tuple[SamConfig, Sam]:
    """The model to train: an earlier chunk's weights (see :func:`progress_so_far`), or
    initialised as the config says."""
    architecture = model_config(config.model)
    torch.manual_seed(config.optim.seed)
    sam = build_sam_from_config(architecture)
    name = config.model.name or "custom"
    if progress_so_far(config) is not None:
        assert config.model.continue_from is not None
        load_checkpoint(sam, config.model.continue_from, model_name=name)
    else:
        if config.model.checkpoint is not None:
            load_checkpoint(sam, config.model.checkpoint, model_name=name)
        if config.model.encoder_init is not None:
            load_encoder_init(sam, config.model.encoder_init)
        if config.model.decoder_checkpoint is not None:
            load_decoder_checkpoint(sam, config.model.decoder_checkpoint)
    apply_freeze(sam, config.model)
    set_drop_path(sam, config.model.drop_path)
    return architecture, sam


@dataclass
class TrainingProgress:
    """Where a run stands, carried in its weights' metadata from chunk to chunk."""

    step: int = 0
    hours: float = 0.0  # wall-clock hours of training so far, all chunks
    chunks: int = 0
    cpus: list[str] = field(default_factory=list)  # the processors that trained it

    def after(self, step: int, hours: float, cpu: str) -> TrainingProgress:
        cpus = self.cpus if cpu in self.cpus else [*self.cpus, cpu]
        return TrainingProgress(step, self.hours + hours, self.chunks + 1, cpus)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
) -> Path:
    """Run (or resume) training; returns the path of the saved model (safetensors).

    ``max_minutes``: stop at the first step boundary after that long (a chunk of a longer
    run), saving the checkpoint and the model with the progress reached; a later call
    goes on from there (``--resume`` on the same machine, ``model.continue_from`` on any).
    Ctrl-C or SIGTERM stops the same way at the next step boundary (one process only).
    """
    world = Distributed.from_environment()
    device = resolve_device(config.device)
    if device.type == "cuda" and world.world_size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    so_far = progress_so_far(config) or TrainingProgress()
    architecture, sam = build_training_model(config)
    sam.to(device).train()
    freeze_norm_statistics(sam)
    optimizer = torch.optim.AdamW(
        parameter_groups(sam, config.optim), lr=config.optim.lr, betas=config.optim.betas
    )
    output = config.output
    output.mkdir(parents=True, exist_ok=True)
    first_step = so_far.step
    start = _load_checkpoint(output / CHECKPOINT_NAME, sam, optimizer) if resume else first_step
    if resume:
        first_step = min(first_step, start)
    if world.is_main:
        _trim_metrics(output / METRICS_NAME, start)
        write_text_atomic(
            output / "config.json", json.dumps(config_to_dict(architecture), indent=2)
        )

    stream = SampleStream(config, architecture.img_size)
    step_module: nn.Module = InteractiveStep(sam, config.optim)
    if world.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=training_precision(config, device) == "bf16"
    )

    trainable = [p for p in sam.parameters() if p.requires_grad]
    warmup_steps = config.optim.geometric_warmup_steps
    batches = _batches(stream, max(start, warmup_steps), config, world)
    bar = tqdm(
        range(start, config.optim.steps),
        initial=start,
        total=config.optim.steps,
        disable=not (progress and world.is_main),
        desc="train",
        unit="step",
    )
    window: list[dict[str, float]] = []
    tick = began = time.perf_counter()
    done, stopped = start, False
    # Ctrl-C / SIGTERM: stop at a step boundary and save below, as at a chunk's end.
    with StopRequests(enabled=world.world_size == 1) as stop:
        for step in bar:
            out_of_time = max_minutes is not None and time.perf_counter() - began > 60 * max_minutes
            if out_of_time or stop.requested:
                stopped = True
                break
            scale_key = "warmup_lr_scale" if step < warmup_steps else "lr_scale"
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config.optim, step, first_step) * group[scale_key]
            for micro in range(config.optim.grad_accum):
                generator = _seed_everything(
                    config.optim.seed, step * config.optim.grad_accum + micro, world.rank
                )
                items = next(batches) if step >= warmup_steps else None
                last = micro == config.optim.grad_accum - 1
                sync = step_module.no_sync() if world.world_size > 1 and not last else nullcontext()
                with sync:
                    with autocast:
                        loss, parts = step_module(
                            items, generator, embedding_scale(config.optim, step)
                        )
                    (loss / config.optim.grad_accum).backward()
            if not math.isfinite(loss.item()):
                raise SeganyError(
                    f"loss became {float(loss)} at step {step}; lower optim.lr or use fp32"
                )
            if config.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(trainable, config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.append({"loss": loss.item(), **{k: float(v) for k, v in parts.items()}})

            done = step + 1
            if world.is_main and (done % config.log_every == 0 or done == config.optim.steps):
                elapsed = time.perf_counter() - tick
                record = {
                    "step": step,
                    **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                    "lr": learning_rate(config.optim, step),
                    "images_per_s": len(window)
                    * config.optim.batch_images
                    * config.optim.grad_accum
                    * world.world_size
                    / elapsed,
                }
                with (output / METRICS_NAME).open("a") as log:
                    log.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    iou=f"{record['iou_last']:.3f}",
                    img_s=f"{record['images_per_s']:.2f}",
                )
                window, tick = [], time.perf_counter()
            if world.is_main and (
                done % config.checkpoint_every == 0 or done == config.optim.steps
            ):
                _save_checkpoint(output / CHECKPOINT_NAME, sam, optimizer, done, config.optim)

    model_path = output / MODEL_NAME
    if world.is_main:
        if stopped:  # a chunk's end: --resume goes on from here
            _save_checkpoint(output / CHECKPOINT_NAME, sam, optimizer, done, config.optim)
        reached = so_far.after(done, (time.perf_counter() - began) / 3600, cpu_name())
        fold_embedding_scale(sam, embedding_scale(config.optim, done - 1))
        metadata = {PROGRESS_METADATA_KEY: json.dumps(asdict(reached))}
        save_model(sam.eval(), model_path, architecture, metadata=metadata)
        from .curves import plot_training_curves

        plot_training_curves(output / METRICS_NAME, output / "curves.png")
    if world.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model_path
