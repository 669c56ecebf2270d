"""
SFT cold start (SPEC 6): full fine-tune on <think>...</think><answer>...</answer> chat data, loss on the
assistant tokens only, vision tower and projector frozen in the release preset.

    python train_sft.py                                   # the shapes preset: tiny model, built-in suite, CPU
    python train_sft.py --max_steps=50 --out_dir=runs/sft-try
    torchrun --nproc_per_node 8 train_sft.py --preset=release --model=/models/Qwen3-VL-8B-Instruct \
        --data=/data/onethinker_sft_image.json,/data/onethinker_sft_video.json --media_root=/data --out_dir=runs/sft
    python train_sft.py --out_dir=runs/sft --resume=true  # continue exactly from the newest checkpoint

The release preset is LLaMA-Factory's examples/train_full/onethinker_qwen3_sft.yaml: both data files, one row per
GPU per optimizer step, each row's token-mean loss averaged over rows, vision tower and projector frozen as
LLaMA-Factory freezes them (model.freeze_vision), its media budgets and cutoff_len 16384.
What it leaves out of the release (LLaMA-Factory): DeepSpeed ZeRO-3 (FSDP2 instead; the release's config packs no
sequences and turns no liger kernels on); README's table "What differs from the release" lists the rest. With
several rows per micro-batch (the shapes preset) a step's rows are sorted by length into micro-batches and the
padding share is logged.
The exported model (out_dir/hf) loads with from_pretrained and is the starting point of train_rl.py and eval.py.
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import model as model_lib


MEDIA = data.MediaConfig()  # the media defaults (SPEC 2), named here because a field below called `data` hides
# the module inside the class body


@dataclass
class Config:
    model: str = model_lib.DEFAULT_MODEL_DIR  # an HF directory; the default tiny model is built on first use
    data: str = os.path.join(model_lib.DEFAULT_DATA_DIR, "sft.json")  # one or more files, comma-separated
    media_root: str | None = None  # default: each data file's directory
    # prompt of rows without their own user text (messages of the assistant turn alone, with problem /
    # problem_type): "release", "project" or a JSON file (data.load_templates); None: ours
    prompt_template: str | None = None
    skip_bad_rows: bool = False  # True: drop malformed rows (counted in a log line) instead of stopping
    check_media: bool = True  # open every media file's header at start-up (the files split over ranks)
    out_dir: str = "runs/sft"
    resume: bool = False
    seed: int = 0
    # optimisation (SPEC 6: lr 1e-5 cosine, warmup 2%, weight decay 1e-6, 1 epoch)
    max_steps: int = 1500  # optimizer steps; 0 = one epoch
    batch_size: int = 32  # rows per optimizer step, over all ranks; 0: one micro-batch per rank (no accumulation)
    micro_batch_size: int = 8  # rows per forward/backward on one rank (small: length-sorted, little padding)
    # "token": the mean over every labelled token of the step (rows weigh by their length); "row": each row's
    # token mean, then the mean over the step's rows (LLaMA-Factory's for VLMs, the release's: its loss is the
    # mean over a micro-batch of 1 row, averaged over GPUs)
    loss_average: str = "token"
    lr: float = 2e-3
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.02
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # True: the vision tower's patch embedding and blocks and its merger stay as they are, as LLaMA-Factory's
    # freeze_vision_tower + freeze_multi_modal_projector (the release); the position embedding and deepstack
    # mergers still train (model.freeze_vision). False for the tiny model, whose tower is random and must learn
    freeze_vision: bool = False
    grad_checkpointing: bool = False
    bf16: bool = False  # bf16 compute on GPU; CPU runs fp32
    cutoff_len: int = 0  # > 0: longer rows are cut as LLaMA-Factory cuts them, counted and logged; 0: never cut
    # media (SPEC 2; data.py's media comment)
    fps: float = MEDIA.fps
    max_frames: int = MEDIA.max_frames
    image_min_pixels: int = MEDIA.image_min_pixels
    image_max_pixels: int = MEDIA.image_max_pixels
    video_min_pixels: int = MEDIA.video_min_pixels  # per frame
    video_max_pixels: int = MEDIA.video_max_pixels  # per frame
    sizing: str = MEDIA.sizing  # fit (ours) | easyr1 (the release's; LLaMA-Factory's image arithmetic is EasyR1's)
    cache_inputs: bool = True  # keep rows' processor outputs in memory (media decode dominates tiny steps)
    # validation, logging, checkpoints
    val_rows: int = 128  # held out of `data` (a seeded choice) for the validation loss
    val_every: int = 250
    log_every: int = 10
    save_every: int = 500
    wandb: bool = False


PRESETS = {
    # the embedded default: the tiny S model on the shapes suite, on 2 CPU cores
    "shapes": {},
    # onethinker_qwen3_sft.yaml: 1 row per GPU per step, lr 1e-5 cosine, warmup 0.02, wd 1e-6, 1 epoch, bf16,
    # frozen tower and projector, image_max_pixels 802816, video_max_pixels 100352, video_maxlen 128,
    # video_fps 2, cutoff_len 16384 (the minimums are LLaMA-Factory's defaults: 32*32 image, 16*16 video)
    "release": dict(max_steps=0, batch_size=0, micro_batch_size=1, loss_average="row", lr=1e-5, weight_decay=1e-6,
                    freeze_vision=True, grad_checkpointing=True, bf16=True, cutoff_len=16384, image_min_pixels=32 * 32,
                    image_max_pixels=802816, video_min_pixels=16 * 16, video_max_pixels=100352, sizing="easyr1",
                    prompt_template="release", cache_inputs=False, val_rows=512, val_every=500, save_every=500),
}


# -----------------------------------------------------------------------------
# the loss: the mean over the assistant tokens of the step, or over its rows of each row's token mean

LOSS_AVERAGES = ("token", "row")


def sft_loss(model, batch, denominator, average="token"):
    """Next-token cross-entropy on the labelled tokens of this micro-batch, summed ("token": over its tokens;
    "row": over its rows of each row's token mean), divided by denominator.

    denominator is the whole optimizer step's count (all micro-batches, all ranks) of labelled tokens ("token") or
    of rows with a labelled token ("row": labelled_counts), so the micro-batch losses add up to the step's mean
    and gradients summed over ranks equal one big batch's.
    """
    labels = batch["labels"]  # [B, L], -100 off the assistant turn
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()  # [B, L-1, V]; position t predicts token t+1
    targets = labels[:, 1:]  # [B, L-1]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(targets.shape)  # [B, L-1], 0 off the labels
    if average == "row":
        row_tokens = (targets != -100).sum(1).clamp(min=1)  # [B]; a row without labels adds 0
        return (token_loss.sum(1) / row_tokens).sum() / denominator
    return token_loss.sum() / denominator


def labelled_counts(batch):
    """{"token": labelled tokens, "row": rows with at least one} of a micro-batch: sft_loss's denominators."""
    labelled = batch["labels"][:, 1:] != -100  # [B, L-1]
    return {"token": float(labelled.sum()), "row": float(labelled.any(1).sum())}


def length_sorted_micro_batches(rows, micro_batch_size):
    """Split one step's rows into micro-batches of similar length (video with video, long with long), so
    left padding costs little. The key is a cheap proxy (media kinds, then text length): no media decode."""
    def key(row):
        text = "".join(m["content"] for m in row["messages"]) if row["kind"] == "sft" else row["problem"]
        return (tuple(row["media_types"]), len(text))
    rows = sorted(rows, key=key)
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def lr_at(step, cfg, total_steps):
    """Linear warmup then cosine decay to lr * min_lr_ratio."""
    warmup = max(1, round(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, rows, processor, media_cfg, templates, cfg, device, cache=None):
    """The held-out rows' loss, averaged as training averages it (each rank its share, combined over ranks)."""
    model.eval()
    total, count = 0.0, 0.0
    for chunk in length_sorted_micro_batches(rows, cfg.micro_batch_size):
        batch = {k: v.to(device) for k, v in data.collate(chunk, processor, media_cfg, templates, with_answer=True,
                                                          cache=cache, cutoff_len=cfg.cutoff_len).items()}
        with common.autocast(cfg.bf16, device):
            total += sft_loss(model, batch, 1.0, cfg.loss_average).item()
        count += labelled_counts(batch)[cfg.loss_average]
    model.train()
    sums = common.all_reduce({"loss": total, "count": count})
    return sums["loss"] / max(sums["count"], 1.0)


def step_batches(rows, processor, media_cfg, templates, cfg, device, cache):
    """This rank's rows of one step as length-sorted micro-batches on device, and the step's counts over all
    ranks: labelled tokens and rows (the loss denominators), padding and cells, rows and tokens cut by
    cutoff_len."""
    cut = {"truncated_rows": 0, "truncated_tokens": 0}
    batches = [{k: v.to(device) for k, v in data.collate(chunk, processor, media_cfg, templates, with_answer=True,
                                                         cache=cache, cutoff_len=cfg.cutoff_len, stats=cut).items()}
               for chunk in length_sorted_micro_batches(rows, cfg.micro_batch_size)]
    local = {"padding": 0.0, "cells": 0.0, "token": 0.0, "row": 0.0, **{k: float(v) for k, v in cut.items()}}
    for b in batches:
        for key, value in labelled_counts(b).items():
            local[key] += value
        local["padding"] += float((b["attention_mask"] == 0).sum())
        local["cells"] += float(b["attention_mask"].numel())
    return batches, common.all_reduce(local)


def load_model(cfg, device, rank):
    """(model, processor): the model sharded over ranks, the vision tower frozen when asked."""
    if rank == 0:
        model_lib.ensure_model(cfg.model)
    common.barrier()  # the other ranks wait for the tiny model to be built
    model, processor = model_lib.load_model(cfg.model, device=str(device))
    if cfg.freeze_vision:
        model_lib.freeze_vision(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    return common.shard_model(model, mixed_precision=cfg.bf16), processor


def load_split(cfg, rank, world_size):
    """(train rows of every data file, this rank's share of the val_rows held out for the validation loss: a seeded
    choice over all files)."""
    rows = [row for path in cfg.data.split(",")
            for row in data.load_rows(path, cfg.media_root, skip_bad_rows=cfg.skip_bad_rows,
                                           check_media=cfg.check_media)]
    bad = [r["source"] for r in rows if r["kind"] != "sft"]
    if bad:
        raise ValueError(f"{bad[0]}: train_sft.py needs SFT rows (messages with an assistant turn)")
    held_out = set(np.random.default_rng(cfg.seed).permutation(len(rows))[:cfg.val_rows].tolist())
    val_rows = [r for i, r in enumerate(rows) if i in held_out][rank::world_size]
    return [r for i, r in enumerate(rows) if i not in held_out], val_rows


def main(argv):
    cfg = common.parse_config(Config, argv, PRESETS)
    rank, world_size, _, device = common.init_distributed()
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or world_size * cfg.micro_batch_size)
    if cfg.loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {cfg.loss_average!r}")
    if cfg.batch_size % (world_size * cfg.micro_batch_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of world_size*micro_batch_size="
                         f"{world_size}*{cfg.micro_batch_size}")
    if cfg.val_rows % world_size:  # every rank must run the same number of validation forwards (FSDP)
        raise ValueError(f"val_rows={cfg.val_rows} must be a multiple of world_size={world_size}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # --- model, data, optimizer
    model, processor = load_model(cfg, device, rank)
    media_cfg = data.media_config(cfg)
    templates = data.load_templates(cfg.prompt_template) if cfg.prompt_template else None
    train_rows, val_rows = load_split(cfg, rank, world_size)
    sampler = data.ShardedSampler(len(train_rows), rank, world_size, seed=cfg.seed)
    rows_per_rank = cfg.batch_size // world_size
    cache = {} if cfg.cache_inputs else None
    total_steps = cfg.max_steps or len(train_rows) // cfg.batch_size

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    logger = common.Logger(cfg.out_dir, cfg, cfg.wandb)
    sigterm = common.install_sigterm_flag()
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    step, truncated = 0, {"truncated_rows": 0.0, "truncated_tokens": 0.0}  # cut by cutoff_len, all ranks, so far
    if cfg.resume and (path := common.latest_checkpoint(ckpt_dir)):
        extra = common.load_checkpoint(path, model, optimizer)
        step, truncated = extra["step"], extra.get("truncated", truncated)
        sampler.load_state_dict(extra["sampler"])
        common.set_rng_state(extra["rng"])
        if rank == 0:
            print(f"resumed from {path} at step {step}")

    n_train = sum(p.numel() for p in params)
    if rank == 0:
        print(f"SFT: {len(train_rows)} train rows, {cfg.val_rows} held out, {total_steps} steps, "
              f"{n_train / 1e6:.2f}M trainable parameters, world size {world_size}, device {device}")
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0, dynamic_ncols=True)
    while step < total_steps:
        t0 = time.perf_counter()
        # --- batch: this rank's rows, sorted by length into micro-batches
        step_rows = [train_rows[i] for i in sampler.next_batch(rows_per_rank)]
        batches, counts = step_batches(step_rows, processor, media_cfg, templates, cfg, device, cache)
        truncated = {k: v + counts[k] for k, v in truncated.items()}
        t_data = time.perf_counter() - t0

        # --- forward / backward over micro-batches; gradients sync on the last one only
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_total = 0.0
        for i, batch in enumerate(batches):
            common.set_grad_sync(model, i == len(batches) - 1)
            with common.autocast(cfg.bf16, device):
                loss = sft_loss(model, batch, max(counts[cfg.loss_average], 1.0), cfg.loss_average)
            loss.backward()
            loss_total += loss.item()
        loss_total = common.all_reduce(loss_total)

        # --- update (a non-finite loss or gradient skips the step: never write corrupt weights)
        grad_norm = common.clip_grad_norm(model, cfg.grad_clip)
        if math.isfinite(loss_total) and math.isfinite(grad_norm):
            optimizer.step()
        elif rank == 0:
            print(f"step {step}: non-finite loss {loss_total} / grad norm {grad_norm}: update skipped")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        # --- log, validate, save
        if step % cfg.log_every == 0 or step == total_steps:
            logger.log(step, {"loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                              "padding_share": counts["padding"] / counts["cells"],
                              "tokens_per_step": counts["token"], "epoch": sampler.epoch, **truncated,
                              "sec": {"step": time.perf_counter() - t0, "data": t_data}})
        if cfg.val_rows and (step % cfg.val_every == 0 or step == total_steps):
            logger.log(step, {"val_loss": validation_loss(model, val_rows, processor, media_cfg, templates, cfg, device,
                                                          cache)})
        stop = common.all_reduce(float(sigterm.requested), "max") > 0
        if step % cfg.save_every == 0 or step == total_steps or stop:
            common.save_checkpoint(ckpt_dir, step, model, optimizer, {
                "sampler": sampler.state_dict(), "rng": common.rng_state(), "config": dataclasses.asdict(cfg),
                "truncated": truncated})
        if stop:
            if rank == 0:
                print(f"SIGTERM: checkpoint written at step {step}; exiting")
            break
    bar.close()

    # --- export: an HF directory that train_rl.py and eval.py start from
    if step == total_steps:
        common.export_hf(model, processor, os.path.join(cfg.out_dir, "hf"))
    logger.close()
    common.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
