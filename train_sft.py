"""
SFT cold start (SPEC 6): full fine-tune on <think>...</think><answer>...</answer> chat data, loss on the
assistant tokens only, vision tower and projector frozen in the release preset.

    python train_sft.py                                   # the shapes preset: tiny model, built-in suite, CPU
    python train_sft.py --max_steps=50 --out_dir=runs/sft-try
    torchrun --nproc_per_node 8 train_sft.py --preset=release --model=/models/Qwen3-VL-8B-Instruct \
        --data=/data/onethinker_sft_image.json,/data/onethinker_sft_video.json --media_root=/data --out_dir=runs/sft
    python train_sft.py --out_dir=runs/sft --resume=true  # continue exactly from the newest intact checkpoint
    python export.py --ckpt=runs/sft/ckpt/step_000500 --out=runs/sft/hf-500   # any checkpoint -> an HF folder

The release preset is LLaMA-Factory's examples/train_full/onethinker_qwen3_sft.yaml: both data files, one row per
GPU per optimizer step, each row's token-mean loss averaged over rows, vision tower and projector frozen as
LLaMA-Factory freezes them (model.freeze_vision), its media budgets and cutoff_len 16384.
What it leaves out of the release (LLaMA-Factory): DeepSpeed ZeRO-3 (FSDP2 instead; the release's config packs no
sequences and turns no liger kernels on); README's table "What differs from the release" lists the rest. With
several rows per micro-batch (the shapes preset) a step's rows are sorted by length into micro-batches and the
padding share is logged. A background thread decodes the next step's rows while this one trains (data.Prefetcher);
sec/data logs the wait for them.
Validation logs val_loss and val_media_gap: the loss of the held-out rows with each row's media swapped for those
of another held-out row of the same grid, minus their loss with their own (media_swapped); near 0 when the
answers are read from the text alone: a draw that reads its media needs a gap, though a gap alone does not make
a good draw (README, "The demo").
The exported model (out_dir/hf) loads with from_pretrained and is the starting point of train_rl.py and eval.py.
Faults (README "Faults tried"): as in train_rl.py, a row that fails at run time (media that do not decode, more
tokens than the model context, a cutoff_len that would cut into its media) is named and replaced, SIGTERM is
honoured between micro-batches, and max_skipped_steps non-finite steps in a row stop the run without an export.
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
    skip_bad_rows: bool = False  # drop malformed rows at load (counted in a log line) and any number at run time
    check_media: bool = True  # open every media file's header at start-up (the files split over ranks)
    max_bad_rows: int = 10  # rows failing at run time (media that do not decode, more tokens than the model
    # context) are named, skipped and replaced up to this many per run; past it the run stops with the list
    allow_media_outside_root: bool = False  # accept media paths that lead out of media_root (.., absolute paths)
    out_dir: str = "runs/sft"
    resume: bool = False  # continue from the newest intact checkpoint in out_dir/ckpt, on any number of ranks
    overwrite: bool = False  # start over in an out_dir that holds a run (its checkpoints and metrics are deleted)
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
    # AdamW's second-moment decay: the release's (HF's default). 0.95 (nanoGPT's) forgets the demo's early clipped
    # gradients in ~20 steps instead of ~1,000; on three suites it helped one and hurt two (NOTES.md, "AdamW's beta2")
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    max_skipped_steps: int = 5  # non-finite steps in a row stop the run, exit non-zero and export nothing
    # True: the vision tower's patch embedding and blocks and its merger stay as they are, as LLaMA-Factory's
    # freeze_vision_tower + freeze_multi_modal_projector (the release); the position embedding and deepstack
    # mergers still train (model.freeze_vision). True for the tiny model too, though its tower is random: trained,
    # the tower's features collapse in the first ~200 steps and fewer draws learn to read their media (NOTES.md)
    freeze_vision: bool = True
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
    val_rows: int = 128  # held out of `data` (a seeded choice) for the validation loss and val_media_gap
    val_every: int = 250
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2  # complete checkpoints kept (0: all); the one this run resumed from is never deleted
    stop_grace_s: float = 20.0  # seconds from SIGTERM to a committed checkpoint (train_rl.py's, README)
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
    token_loss, targets = token_losses(model, batch)
    if average == "row":
        row_tokens = (targets != -100).sum(1).clamp(min=1)  # [B]; a row without labels adds 0
        return (token_loss.sum(1) / row_tokens).sum() / denominator
    return token_loss.sum() / denominator


def token_losses(model, batch):
    """(cross-entropy of each next token [B, L-1], 0 off the labels; the targets [B, L-1], -100 off the labels)."""
    labels = batch["labels"]  # [B, L], -100 off the assistant turn
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()  # [B, L-1, V]; position t predicts token t+1
    targets = labels[:, 1:]  # [B, L-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="none").view(targets.shape), targets


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


def micro_batches(pairs, cfg, pad_id, device, cut=None, sources=None):
    """(row, encoded row) pairs sorted by length into padded micro-batches on the device; cut, a dict, counts the
    rows and tokens cutoff_len cut (data.count_truncated); sources, a list, gets each micro-batch's row sources."""
    items = {row["source"]: item for row, item in pairs}
    batches = []
    for chunk in length_sorted_micro_batches([row for row, _ in pairs], cfg.micro_batch_size):
        encoded = [items[row["source"]] for row in chunk]
        if sources is not None:
            sources.append([row["source"] for row in chunk])
        if cut is not None:
            data.count_truncated(encoded, cut)
        batches.append({k: v.to(device) for k, v in data.pad_batch(encoded, pad_id, with_answer=True).items()})
    return batches


@torch.no_grad()
def validation_losses(model, pairs, cfg, pad_id, device):
    """{source: (loss, weight)} of this rank's held-out (row, encoded row) pairs, as training averages them: the
    summed loss and labelled tokens of each row ("token"), or its mean loss and 1 ("row")."""
    model.eval()
    out, sources = {}, []
    batches = micro_batches(pairs, cfg, pad_id, device, sources=sources)
    for batch, batch_sources in zip(batches, sources):
        with common.autocast(cfg.bf16, device):
            token_loss, targets = token_losses(model, batch)  # [B, L-1] each
        labelled = (targets != -100).sum(1)  # [B]
        row_loss = token_loss.sum(1) / labelled.clamp(min=1) if cfg.loss_average == "row" else token_loss.sum(1)
        for source, loss, tokens in zip(batch_sources, row_loss.tolist(), labelled.tolist()):
            out[source] = (loss, float(tokens) if cfg.loss_average == "token" else float(tokens > 0))
    model.train()
    return out


def mean_loss(losses, sources=None):
    """The mean over ranks of validation_losses' rows (those of `sources` only, when given)."""
    kept = [losses[s] for s in (losses if sources is None else sources)]
    sums = common.all_reduce({"loss": sum(loss for loss, _ in kept), "count": sum(w for _, w in kept)})
    return sums["loss"] / max(sums["count"], 1.0)


MEDIA_TENSORS = {"image_grid_thw": "pixel_values", "video_grid_thw": "pixel_values_videos"}  # grid -> pixels


def media_swapped(pairs):
    """(originals, swapped): of the (row, encoded row) pairs, those whose media another pair's can stand in for
    (the same grids, so the same media tokens and the same text), and each of them again with the pixels of the
    next such pair. The validation loss on `swapped` minus that on `originals` is how much the model reads its
    media: ~0 when it answers from the text alone (NOTES.md: the demo's SFT draws that do not read their media). Rows
    of real data rarely share a grid; the shapes suite's mostly do."""
    groups = {}
    for row, item in pairs:
        grids = tuple((key, tuple(item[key].flatten().tolist())) for key in MEDIA_TENSORS if key in item)
        if grids:
            groups.setdefault(grids, []).append((row, item))
    originals, swapped = [], []
    for group in groups.values():
        for i, (row, item) in enumerate(group if len(group) > 1 else []):
            other = group[(i + 1) % len(group)][1]
            originals.append((row, item))
            pixels = {key: other[key] for grid, key in MEDIA_TENSORS.items() if grid in item}
            swapped.append((row, {**item, **pixels}))
    keep = int(common.all_reduce(float(len(originals)), "min"))  # every rank the same number of forwards (FSDP)
    return originals[:keep], swapped[:keep]


def step_batches(pairs, cfg, pad_id, device):
    """This rank's (row, encoded row) pairs of one step as length-sorted micro-batches on device, and the step's
    counts over all ranks: labelled tokens and rows (the loss denominators), padding and cells, rows and tokens
    cut by cutoff_len."""
    cut = {"truncated_rows": 0, "truncated_tokens": 0}
    batches = micro_batches(pairs, cfg, pad_id, device, cut)
    local = {"padding": 0.0, "cells": 0.0, "token": 0.0, "row": 0.0, **{k: float(v) for k, v in cut.items()}}
    for b in batches:
        for key, value in labelled_counts(b).items():
            local[key] += value
        local["padding"] += float((b["attention_mask"] == 0).sum())
        local["cells"] += float(b["attention_mask"].numel())
    return batches, common.all_reduce(local)


def load_model(cfg, device, rank, world_size):
    """(model, processor): the model sharded over ranks (rank 0 alone reads the weights), the vision tower frozen
    when asked."""
    if rank == 0:
        model_lib.ensure_model(cfg.model)
    common.barrier()  # the other ranks wait for the tiny model to be built
    model, full, processor = model_lib.load_model_to_shard(cfg.model, str(device), torch.float32, rank, world_size)
    if cfg.freeze_vision:
        model_lib.freeze_vision(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    return common.shard_model(model, mixed_precision=cfg.bf16, full_model=full), processor


def load_split(cfg, rank, world_size):
    """(train rows of every data file, this rank's share of the val_rows held out for the validation loss: a seeded
    choice over all files)."""
    rows = [row for path in cfg.data.split(",")
            for row in data.load_rows(path, cfg.media_root, skip_bad_rows=cfg.skip_bad_rows,
                                      check_media=cfg.check_media, allow_outside_root=cfg.allow_media_outside_root)]
    bad = [r["source"] for r in rows if r["kind"] != "sft"]
    if bad:
        raise ValueError(f"{bad[0]}: train_sft.py needs SFT rows (messages with an assistant turn)")
    held_out = set(np.random.default_rng(cfg.seed).permutation(len(rows))[:cfg.val_rows].tolist())
    val_rows = [r for i, r in enumerate(rows) if i in held_out][rank::world_size]
    return [r for i, r in enumerate(rows) if i not in held_out], val_rows


def make_encoder(cfg, processor, context):
    """One SFT row -> its encoded prompt and answer (data.encode_cached, cut to cutoff_len); a ValueError naming the
    row when its media do not decode or it holds more tokens than the model context (data.draw_rows replaces it)."""
    media_cfg, cache = data.media_config(cfg), {} if cfg.cache_inputs else None
    templates = data.load_templates(cfg.prompt_template) if cfg.prompt_template else None

    def encode_row(row):
        item = data.encode_cached(row, processor, media_cfg, templates, True, cache, cfg.cutoff_len)
        return data.check_length(row, item, context)
    return encode_row


def encoded_val_rows(val_rows, encode_row, bad_rows):
    """(row, encoded row) pairs of this rank's held-out rows that encode; every rank keeps as many as the rank
    with the fewest (each validation forward is a collective under FSDP). Collective."""
    pairs = []
    for row in val_rows:
        try:
            pairs.append((row, encode_row(row)))
        except ValueError as e:
            bad_rows.record(row, e)
    bad_rows.report()
    return pairs[:int(common.all_reduce(float(len(pairs)), "min"))]


def forward_backward(model, batches, denominator, cfg, device, stop):
    """The step's summed loss over its micro-batches (gradients sync on the last one), or None when a preemption
    drops the step before one of them (stop.drop_step; the caller discards the gradients)."""
    loss_total = 0.0
    for i, batch in enumerate(batches):
        if stop.drop_step():
            return None
        common.set_grad_sync(model, i == len(batches) - 1)
        with common.autocast(cfg.bf16, device):
            loss = sft_loss(model, batch, denominator, cfg.loss_average)
        loss.backward()
        loss_total += loss.item()
    return common.all_reduce(loss_total)


def count_skipped(skipped, finite, cfg, step):
    """Non-finite steps in a row; a run that cannot learn stops with an error (no export) at max_skipped_steps."""
    skipped = 0 if finite else skipped + 1
    if cfg.max_skipped_steps and skipped >= cfg.max_skipped_steps:
        raise RuntimeError(f"step {step}: {skipped} non-finite steps in a row; stopping without an export "
                           f"(max_skipped_steps={cfg.max_skipped_steps})")
    return skipped


def main(argv):
    cfg = common.parse_config(Config, argv, PRESETS, {"loss_average": LOSS_AVERAGES, "sizing": data.SIZINGS})
    rank, world_size, _, device = common.init_distributed()
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or world_size * cfg.micro_batch_size)
    if cfg.batch_size % (world_size * cfg.micro_batch_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of world_size*micro_batch_size="
                         f"{world_size}*{cfg.micro_batch_size}")
    if cfg.val_rows % world_size:  # every rank must run the same number of validation forwards (FSDP)
        raise ValueError(f"val_rows={cfg.val_rows} must be a multiple of world_size={world_size}")
    common.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    stop = common.StopFlag(cfg.stop_grace_s)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # --- model, data, optimizer
    model, processor = load_model(cfg, device, rank, world_size)
    pad_id = processor.tokenizer.pad_token_id
    encode_row = make_encoder(cfg, processor, model.config.text_config.max_position_embeddings)
    prefetcher = data.Prefetcher(encode_row)  # decodes the next step's rows while this one trains
    bad_rows = data.BadRows(None if cfg.skip_bad_rows else cfg.max_bad_rows)
    train_rows, val_rows = load_split(cfg, rank, world_size)
    val_pairs = encoded_val_rows(val_rows, encode_row, bad_rows) if cfg.val_rows else []
    own_media, swapped_media = media_swapped(val_pairs)
    sampler = data.ShardedSampler(len(train_rows), rank, world_size, seed=cfg.seed)
    rows_per_rank = cfg.batch_size // world_size
    total_steps = cfg.max_steps or len(train_rows) // cfg.batch_size

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2))
    logger = common.Logger(cfg.out_dir, cfg, cfg.wandb, resume=cfg.resume)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    step, truncated = 0, {"truncated_rows": 0.0, "truncated_tokens": 0.0}  # cut by cutoff_len, all ranks, so far
    resumed_from, extra = common.resume_checkpoint(ckpt_dir, model, optimizer) if cfg.resume else (None, None)
    if resumed_from:
        step, truncated = extra["step"], extra.get("truncated", truncated)
        sampler.load_state_dict(extra["sampler"])
        common.restore_rng(extra, cfg.seed)
        bad_rows.errors.update(extra["bad_rows"])
        if rank == 0:
            print(f"resumed from {resumed_from} at step {step}" + (
                f" (written by {extra['world_size']} ranks)" if extra.get("resharded") else ""))
    saved_step, skipped = step, 0

    n_train = sum(p.numel() for p in params)
    if rank == 0:
        print(f"SFT: {len(train_rows)} train rows, {len(val_pairs)} held out on each rank, {total_steps} steps, "
              f"{n_train / 1e6:.2f}M trainable parameters, world size {world_size}, device {device}")
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=rank != 0, dynamic_ncols=True)
    while step < total_steps:
        stop.start_step()
        before = {"sampler": sampler.state_dict(), "rng": common.rng_state(), "truncated": truncated}
        t0 = time.perf_counter()
        # --- batch: this rank's rows (a row that fails to encode is named and replaced), sorted by length
        pairs = data.draw_batch(train_rows, sampler, rows_per_rank, prefetcher, bad_rows)
        new_bad = bad_rows.report()
        batches, counts = step_batches(pairs, cfg, pad_id, device)
        truncated = {k: v + counts[k] for k, v in truncated.items()}
        t_data = time.perf_counter() - t0

        # --- forward / backward over micro-batches; a preemption with no time to finish drops the step
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_total = forward_backward(model, batches, max(counts[cfg.loss_average], 1.0), cfg, device, stop)
        if loss_total is None:
            optimizer.zero_grad(set_to_none=True)
            common.save_dropped_step(ckpt_dir, step, saved_step, model, optimizer, processor,
                                     data.checkpoint_state(before, bad_rows), cfg, resumed_from)
            break

        # --- update (a non-finite loss or gradient skips the step: never write corrupt weights)
        grad_norm = common.clip_grad_norm(model, cfg.grad_clip)
        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        elif rank == 0:
            print(f"step {step}: non-finite loss {loss_total} / grad norm {grad_norm}: update skipped")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        skipped = count_skipped(skipped, finite, cfg, step)

        # --- log, validate, save
        if step % cfg.log_every == 0 or step == total_steps or new_bad:
            logger.log(step, {"loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                              "padding_share": counts["padding"] / counts["cells"],
                              "tokens_per_step": counts["token"], "epoch": sampler.epoch, **truncated,
                              "bad_rows": float(len(bad_rows.errors)),
                              **({"bad_rows_new": "; ".join(new_bad)} if new_bad else {}),
                              "sec": {"step": time.perf_counter() - t0, "data": t_data}})
        if cfg.val_rows and (step % cfg.val_every == 0 or step == total_steps):
            losses = validation_losses(model, val_pairs, cfg, pad_id, device)  # the own-media rows' too
            logger.log(step, {"val_loss": mean_loss(losses), **(
                {"val_media_gap": mean_loss(validation_losses(model, swapped_media, cfg, pad_id, device))
                 - mean_loss(losses, [row["source"] for row, _ in own_media])} if own_media else {})})
        stopping = stop.stop_after_step()
        if step % cfg.save_every == 0 or step == total_steps or stopping:
            state = {"sampler": sampler.state_dict(), "rng": common.rng_state(), "truncated": truncated}
            common.save_run(ckpt_dir, step, model, optimizer, processor, data.checkpoint_state(state, bad_rows), cfg,
                            resumed_from)
            saved_step = step
        if stopping:
            if rank == 0:
                print(f"SIGTERM: checkpoint written at step {step}; exiting")
            break
    bar.close()
    prefetcher.worker.shutdown(cancel_futures=True)

    # --- export: an HF directory that train_rl.py and eval.py start from
    if step == total_steps:
        common.export_hf(model, processor, os.path.join(cfg.out_dir, "hf"))
    logger.close()
    common.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
