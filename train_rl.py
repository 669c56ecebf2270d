"""
RL with EMA-GRPO (SPEC 5-6): roll out a group of answers per prompt, score them, keep informative groups,
normalise advantages by a per-task EMA of the reward spread, and take PPO-clip steps on the policy.

    python train_rl.py                                    # the shapes preset: SFT'd tiny model, built-in suite, CPU
    python train_rl.py --estimator=grpo --out_dir=runs/rl-grpo          # ablation baselines: grpo, dr_grpo
    torchrun --nproc_per_node 2 train_rl.py --max_steps=3 --group_size=4   # FSDP2 on CPU (gloo)
    torchrun --nproc_per_node 8 train_rl.py --preset=release --model=runs/sft/hf \
        --data=/data/onethinker_rl_train.json --media_root=/data --out_dir=runs/rl
    python train_rl.py --out_dir=runs/rl --resume=true    # continue exactly from the newest intact checkpoint
    python export.py --ckpt=runs/rl/ckpt/step_000050 --out=runs/rl/hf-50   # any checkpoint -> an HF folder
    python train_rl.py --preset=release --plan=true       # the per-GPU memory plan of Qwen3-VL-8B (memory.py)

One step, top to bottom: sample prompts -> roll out group_size answers each (rollout.py) -> score (rewards.py)
-> drop groups whose mean accuracy is ~0 or ~1 and refill (all three in `collect_groups`) -> advantages
(ema_grpo.py, the task EMA shared by all ranks) -> old log-probs (when ppo_updates > 1) -> ppo_updates optimizer
steps over mini-batches -> log -> checkpoint. Meanwhile a background thread decodes the media of the prompts
drawn next (`data.Prefetcher`), and the update reuses the rollout's model inputs; sec/data logs the wait for them.

The release preset feeds the model what the release fed it: its prompt text (data.RELEASE_TEMPLATE) with the
media where <image> / <video> stand in the problem, and EasyR1's media sizing (data.py).
What it leaves out of the release (EasyR1/verl): vLLM and Ray (our own KV-cache rollout on the training
weights, one process per GPU), sequence packing / dynamic batch sizes, and the reward-model server's
deployment (rewards.py has the client; pass --reward_model_url). KL to a reference is off, as released.

Faults a long run meets, and what it does (README "Faults tried"): a row whose media do not decode or whose
prompt leaves no room in the context is named, counted and replaced from the sampler (up to max_bad_rows, any
number with skip_bad_rows); SIGTERM is honoured between the phases of a step (stop_grace_s); reward errors and
non-finite updates skip the step, and max_skipped_steps of them in a row stop the run without an export; the
reward-model client has a timeout, retries and a circuit breaker; a damaged newest checkpoint is reported and
the previous one loaded; a resume may change the number of ranks.
"""
import collections
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import common
import data
import ema_grpo
import memory
import model as model_lib
import rewards
import rollout


MEDIA = data.MediaConfig()  # the media defaults (SPEC 2, the released RL budgets), named here because a
# field below called `data` hides the module inside the class body


@dataclass
class Config:
    model: str = "runs/sft/hf"  # where train_sft.py exports; falls back to the raw tiny model if missing
    data: str = os.path.join(model_lib.DEFAULT_DATA_DIR, "rl.json")
    media_root: str | None = None  # folder the media paths are relative to; None: the data file's folder
    skip_bad_rows: bool = False  # drop malformed rows at load (counted in a log line) and any number at run time
    max_bad_rows: int = 10  # rows failing at run time (media that do not decode, a prompt too long for the context)
    # are named, skipped and replaced up to this many per run; past it the run stops with the list
    check_media: bool = True  # open every media file's header at start-up (the files split over ranks)
    allow_media_outside_root: bool = False  # accept media paths that lead out of media_root (.., absolute paths)
    prompt_template: str | None = None  # "release", "project" or a JSON file (data.load_templates); None: ours
    out_dir: str = "runs/rl"
    resume: bool = False  # continue from the newest intact checkpoint in out_dir/ckpt, on any number of ranks
    overwrite: bool = False  # start over in an out_dir that holds a run (its checkpoints and metrics are deleted)
    seed: int = 0
    max_steps: int = 150  # rollout steps
    # rollout (SPEC 6: 128 prompts x 8, temperature 1, top_p 1, up to 4096 new tokens)
    prompts_per_step: int = 16  # over all ranks
    group_size: int = 8  # responses per prompt (the release's rollout.n)
    rollout_batch_prompts: int = 16  # prompts per generate call on one rank: bounds the KV cache (x group_size)
    max_new_tokens: int = 96
    temperature: float = 1.0  # the update's log-probs divide the logits by it, as the release's actor (0: greedy
    # rollouts, as the tests run; rollout.token_logprobs then takes the raw logits')
    top_p: float = 1.0
    top_k: int = 0
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU); false: the eager loop
    balance_modalities: bool = True  # interleave image and video rows in the prompt order
    # online filtering (SPEC 6): drop groups whose mean accuracy is <= low or >= high, refill up to max tries
    filter_groups: bool = True
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_refill_tries: int = 20  # rollout batches per step at most, the first included
    # reward (SPEC 4)
    format_weight: float = 0.1
    reward_model_url: str | None = None  # a vLLM /pooling endpoint serving POLAR for open-ended answers
    reward_model_timeout: float = 30.0  # seconds per request to the reward model
    reward_model_retries: int = 1  # retries of a failed request (backoff 1 s, 2 s, ...) before ROUGE scores the batch
    reward_model_breaker: int = 3  # failed batches in a row that stop calls to the server for reward_model_cooldown
    reward_model_cooldown: float = 300.0  # seconds without calls once the breaker opened (ROUGE meanwhile)
    math_batch_timeout: float = 60.0  # seconds of symbolic checks per reward batch; past it they score 0 (counted)
    # advantages (SPEC 5)
    estimator: str = "ema_grpo"  # ema_grpo | grpo | dr_grpo
    ema_decay: float = 0.99
    min_std: float = 1e-3
    # policy update (SPEC 6)
    ppo_updates: int = 1  # optimizer steps per rollout step; the release: 4 (mini-batch = prompts / 4)
    micro_batch_seqs: int = 32  # sequences (a prompt + one response) per forward/backward on one rank
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.0  # > 0 loads a frozen reference copy of the starting model
    kl_kind: str = "low_var_kl"  # low_var_kl | k1
    freeze_vision: bool = False  # the release trains the vision tower in RL; true: model.freeze_vision (as SFT)
    max_skipped_steps: int = 5  # steps in a row without an update (reward error, non-finite loss) stop the run,
    # exit non-zero and export nothing
    share_prompt: bool = True  # update forwards run each prompt once, its KV cache repeated for the group
    grad_checkpointing: bool = False
    bf16: bool = False  # bf16 compute on GPU; CPU runs fp32
    param_dtype: str = "fp32"  # fp32 | bf16: the sharded weights' dtype; bf16 trains with common.KahanAdamW
    dist_timeout_min: float = 30.0  # minutes a collective waits for the slowest rank before the job is killed
    # media (SPEC 2)
    fps: float = MEDIA.fps
    max_frames: int = MEDIA.max_frames
    image_max_pixels: int = MEDIA.image_max_pixels
    video_max_pixels: int = MEDIA.video_max_pixels
    sizing: str = MEDIA.sizing  # fit (ours) | easyr1 (the release's RL sizing: data.py's media comment)
    cache_inputs: bool = True  # keep rows' processor outputs in memory (media decode dominates tiny steps). It
    # grows with the rows drawn: fp32 pixels, 0.39 MB a demo image row and 0.88 MB a clip row, up to 2.0 GB for the
    # demo's 3,600 RL rows: a demo RL process held 1.7 GB at step 10, 3.0-3.2 GB by step 90. Off in the release preset
    # logging, checkpoints, preemption
    log_every: int = 1
    sample_every: int = 25  # dump a few rollouts to out_dir/samples.jsonl
    save_every: int = 50
    keep_last: int = 2  # complete checkpoints kept (0: all); the one this run resumed from is never deleted
    stop_grace_s: float = 20.0  # seconds from SIGTERM to a committed checkpoint (torchrun kills 30 s after
    # SIGTERM): the step in progress is finished if it fits, else dropped at the next phase boundary (README)
    wandb: bool = False
    plan: bool = False  # print the per-GPU memory plan of this config for Qwen3-VL-8B on 8 GPUs (memory.py), exit


PRESETS = {
    "shapes": {},
    "release": dict(max_steps=200, prompts_per_step=128, group_size=8, max_new_tokens=4096, ppo_updates=4,
                    # sized by memory.py for 8 x 80 GB (`--preset=release --plan=true` prints it): fp32 master
                    # weights (the default) fit with 4-sequence micro-batches and four prompts (32 rows) per
                    # generate call, the rollout's KV caches the peak (58.2 GiB; 8 prompts: 87.7); the release's
                    # bf16 weights (--param_dtype=bf16) save 6 GiB, too little for 8-sequence micro-batches. On
                    # 8 x 141 GB: --micro_batch_seqs=8 --rollout_batch_prompts=8.
                    micro_batch_seqs=4, rollout_batch_prompts=4, lr=2e-6, weight_decay=0.01,
                    grad_checkpointing=True, bf16=True,
                    share_prompt=False,  # gradient checkpointing (needed at 8B) drops the prompt's KV cache
                    balance_modalities=False, cache_inputs=False, compile=True, sample_every=10, save_every=25,
                    prompt_template="release", sizing="easyr1"),
}
CHOICES = {"estimator": ema_grpo.ESTIMATORS, "kl_kind": ema_grpo.KL_KINDS, "sizing": data.SIZINGS,
           "param_dtype": tuple(common.PARAM_DTYPES)}


# -----------------------------------------------------------------------------
# one rollout step's pieces

def roll_out(model, batch, cfg, generator, device, stop_ids, tokenizer, stop):
    """Generate group_size responses for each (row, encoded row) of batch, rollout_batch_prompts rows per generate
    call (bounds the KV cache). Between calls a preemption may drop the step (stop.drop_step: the groups so far
    come back and the caller discards them).
    Returns one group per row: {"row", "item" (its encoded prompt, reused by the update), "texts",
    "response_ids" [G, T_i], "response_mask" [G, T_i], "finish"}."""
    groups, G = [], cfg.group_size
    model.eval()
    for start in range(0, len(batch), cfg.rollout_batch_prompts):
        if start and stop.drop_step():
            break
        chunk = batch[start:start + cfg.rollout_batch_prompts]
        inputs = data.pad_batch([item for _, item in chunk], tokenizer.pad_token_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad(), common.autocast(cfg.bf16, device):
            out = rollout.generate(model, inputs, n=G, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                   generator=generator, eos_token_ids=stop_ids, compile=cfg.compile)
        lengths = out["response_mask"].sum(1).tolist()  # [B*G]
        texts = [tokenizer.decode(ids[:length], skip_special_tokens=True)
                 for ids, length in zip(out["response_ids"].tolist(), lengths)]
        for i, (row, item) in enumerate(chunk):
            sl = slice(i * G, (i + 1) * G)
            length = max(lengths[sl])
            groups.append({"row": row, "item": item, "texts": texts[sl],
                           "response_ids": out["response_ids"][sl, :length].cpu(),  # [G, T_i]
                           "response_mask": out["response_mask"][sl, :length].cpu(),  # [G, T_i]
                           "finish": out["finish_reasons"][sl]})
    model.train()
    return groups


def score_groups(groups, cfg):
    """Attach the reward parts of every response (SPEC 4) as g["scores"]; one compute_score call per batch.

    A non-finite reward raises (naming the row): it would poison the task EMA, which lives on in checkpoints.
    """
    items = [{"response": text, "ground_truth": data.ground_truth(g["row"]),
              "problem_type": g["row"]["problem_type"], "data_type": g["row"]["data_type"],
              # the reward model's prompt: the row's problem_reserved_text, as the release passes it
              "problem": g["row"].get("problem_reserved_text", g["row"]["problem"]),
              "problem_id": str(g["row"].get("problem_id", ""))}
             for g in groups for text in g["texts"]]
    scores = rewards.compute_score(items, cfg.format_weight, reward_model_url=cfg.reward_model_url,
                                   reward_model_timeout=cfg.reward_model_timeout,
                                   reward_model_retries=cfg.reward_model_retries,
                                   reward_model_breaker=cfg.reward_model_breaker,
                                   reward_model_cooldown=cfg.reward_model_cooldown,
                                   math_batch_timeout=cfg.math_batch_timeout)
    for i, g in enumerate(groups):
        g["scores"] = scores[i * cfg.group_size:(i + 1) * cfg.group_size]
        for s in g["scores"]:
            if not all(math.isfinite(s[part]) for part in ("overall", "accuracy", "format", "structure_reward")):
                raise ValueError(f"{g['row']['source']}: non-finite reward {s}")


def keep_group(group, cfg):
    """Online filtering (SPEC 6): a group where all answers are right (or all wrong) teaches nothing."""
    if not cfg.filter_groups:
        return True
    mean_acc = sum(s["accuracy"] for s in group["scores"]) / len(group["scores"])
    return cfg.filter_low < mean_acc < cfg.filter_high


def collect_groups(model, prefetcher, rows, sampler, bad_rows, cfg, generator, device, stop_ids, tokenizer,
                   timing, stop):
    """Rollout + reward + online filtering for one step: roll out and score batches of this rank's prompts until
    every rank holds prompts_per_step / world_size kept groups, or max_refill_tries batches ran.

    Prompts come from data.draw_rows: a row that fails to encode (the prefetcher raises, naming it) is recorded in
    bad_rows and replaced, so every batch keeps its size. Every rank then keeps the same number of groups (the
    smallest kept count), since each update forward is a collective under FSDP. A reward failure on any rank
    (logged with its traceback) leaves every rank with no groups: the step takes no update. A preemption that
    drops the step (stop.drop_step, asked between generate calls and batches) returns at once, with no groups.
    Returns (kept, rolled, tried, reward_error): the kept groups, every rolled-out group of this rank (for
    logging), the prompts tried on this rank, and whether a reward raised on some rank.
    """
    per_rank = cfg.prompts_per_step // sampler.world_size
    kept, rolled, tried, reward_error = [], [], 0, False
    while not stop.drop_step():
        t0 = time.perf_counter()
        batch = data.draw_batch(rows, sampler, per_rank, prefetcher, bad_rows)
        timing["data"] += time.perf_counter() - t0  # waiting for media: ~0 while the prefetch keeps up
        t0 = time.perf_counter()
        groups = roll_out(model, batch, cfg, generator, device, stop_ids, tokenizer, stop)
        timing["rollout"] += time.perf_counter() - t0
        if stop.drop_step():
            break
        t0 = time.perf_counter()
        try:
            score_groups(groups, cfg)
        except Exception:  # a reward failure must not kill a long run: log it and skip this step's update
            traceback.print_exc()
            groups, reward_error = [], True
        timing["reward"] += time.perf_counter() - t0
        tried += len(batch)
        rolled += groups
        for g in groups:
            if keep_group(g, cfg):
                kept.append(g)
            else:
                del g["item"]  # the update gets kept groups only: their media are freed now
        # one decision for all ranks: a rollout runs FSDP forwards, so every rank must roll out equally often
        any_rank = common.all_reduce({"short": float(len(kept) < per_rank), "reward_error": float(reward_error)},
                                     "max")
        if any_rank["reward_error"] or not any_rank["short"] or tried // per_rank >= cfg.max_refill_tries:
            n_groups = 0 if any_rank["reward_error"] else int(common.all_reduce(float(min(len(kept), per_rank)), "min"))
            return kept[:n_groups], rolled, tried, bool(any_rank["reward_error"])
    return [], rolled, tried, reward_error


def assign_advantages(kept, tracker, cfg):
    """Each kept group's "adv" [G]: the estimator's advantages over all kept groups at once, EMA-GRPO's task EMA
    updated with every rank's kept scores first (ema_grpo.advantages, SPEC 5)."""
    if not kept:
        return
    scores = torch.tensor([s["overall"] for g in kept for s in g["scores"]])  # [k*G]
    group_ids = [i for i, g in enumerate(kept) for _ in g["scores"]]
    task_keys = [data.task_key(g["row"]["problem_type"], g["row"]["data_type"]) for g in kept for _ in g["scores"]]
    adv = ema_grpo.advantages(scores, group_ids, task_keys, tracker, cfg.estimator)  # [k*G]
    for i, g in enumerate(kept):
        g["adv"] = adv[i * cfg.group_size:(i + 1) * cfg.group_size]  # [G]


def micro_batch_inputs(seqs, pad_id, device):
    """Model inputs for a micro-batch of sequences [(group, response index)] in group order: each prompt once
    (token_logprobs repeats it for its responses) as the rollout encoded it (no second media decode), responses
    right-padded to the longest of them:
    (inputs, counts [responses of each prompt], response_ids [m, T], response_mask [m, T])."""
    groups, counts = [], []
    for g, _ in seqs:
        if groups and groups[-1] is g:
            counts[-1] += 1
        else:
            groups.append(g)
            counts.append(1)
    inputs = {k: v.to(device) for k, v in data.pad_batch([g["item"] for g in groups], pad_id).items()}
    lengths = [int(g["response_mask"][j].sum()) for g, j in seqs]
    response_ids = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)  # [m, T]
    response_mask = torch.zeros(len(seqs), max(lengths), dtype=torch.long)  # [m, T]
    for i, ((g, j), length) in enumerate(zip(seqs, lengths)):
        response_ids[i, :length] = g["response_ids"][j, :length]
        response_mask[i, :length] = g["response_mask"][j, :length]
    return inputs, counts, response_ids.to(device), response_mask.to(device)


def build_mini_batches(model, kept, cfg, pad_id, device):
    """The update's data: the kept groups split into ppo_updates mini-batches (one optimizer step each), each
    cut into micro-batches of micro_batch_seqs sequences in order, so a group's responses may span two
    micro-batches. The loss is normalised by the mini-batch's token count, so where the cuts fall does not change
    the step (tested). A micro-batch: inputs, counts, responses, advantages, and the old log-probs under the
    policy that sampled (recomputed with the training forward, as released).

    With ppo_updates=1 the policy that sampled is the one the single update starts from: its old log-probs are
    the update's own, detached (ratio 1), so old_logp is None and ppo_step takes them there (no extra forward).
    """
    per_update = max(1, math.ceil(len(kept) / cfg.ppo_updates))
    mini_batches = []
    for start in range(0, len(kept), per_update):
        seqs = [(g, j) for g in kept[start:start + per_update] for j in range(cfg.group_size)]
        micro_batches = []
        for first in range(0, len(seqs), cfg.micro_batch_seqs):
            chunk = seqs[first:first + cfg.micro_batch_seqs]
            inputs, counts, ids, mask = micro_batch_inputs(chunk, pad_id, device)
            old_logp = None
            if cfg.ppo_updates > 1:
                with torch.no_grad(), common.autocast(cfg.bf16, device):
                    old_logp = rollout.token_logprobs(model, inputs, ids, mask, counts, cfg.share_prompt,
                                                         cfg.temperature)  # [m, T]
            micro_batches.append({"inputs": inputs, "counts": counts, "ids": ids, "mask": mask, "old_logp": old_logp,
                                  "adv": torch.stack([g["adv"][j] for g, j in chunk]).to(device).float()})  # [m]
        mini_batches.append(micro_batches)
    return mini_batches


def ppo_step(model, optimizer, micro_batches, cfg, ref_model=None):
    """One optimizer step over micro-batches (each: inputs, responses per prompt, response ids/mask, old
    log-probs or None for the current policy's, advantages).

    The loss is the global token mean over the mini-batch (all micro-batches, all ranks: SPEC 6); gradients
    are summed over ranks (common.shard_model), so one process and N ranks take the same step. Under FSDP2 each
    micro-batch's backward reduce-scatters its gradients into the sharded ones, so no rank ever holds the whole
    model's unsharded gradients (skipping the sync until the last micro-batch would: 4 bytes x 8.77B parameters = 35 GB at 8B, memory.py).
    A non-finite loss or gradient norm (on any rank) skips optimizer.step: the weights and AdamW state stay as
    they were, and the returned metrics say update_skipped=1.0. Returns floats: loss, clip fractions, ratio,
    KLs, entropy, grad_norm (before clipping), update_skipped.
    """
    num_tokens = common.all_reduce(sum(float(mb["mask"].sum()) for mb in micro_batches))
    totals = {"loss": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio": 0.0, "approx_kl": 0.0,
              "kl": 0.0, "entropy": 0.0}
    for mb in micro_batches:
        with common.autocast(cfg.bf16, mb["inputs"]["input_ids"].device):
            logp = rollout.token_logprobs(model, mb["inputs"], mb["ids"], mb["mask"], mb["counts"],
                                          cfg.share_prompt, cfg.temperature)  # [m, T]
            old_logp = logp.detach() if mb["old_logp"] is None else mb["old_logp"]  # None: on-policy (ratio 1)
            loss, metrics = ema_grpo.ppo_loss(logp, old_logp, mb["adv"], mb["mask"], cfg.clip_low,
                                              cfg.clip_high, cfg.dual_clip, num_tokens=max(num_tokens, 1.0))
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp = rollout.token_logprobs(ref_model, mb["inputs"], mb["ids"], mb["mask"], mb["counts"],
                                                      cfg.share_prompt, cfg.temperature)
                kl = (ema_grpo.kl_penalty(logp, ref_logp, cfg.kl_kind) * mb["mask"]).sum() / max(num_tokens, 1.0)
                loss = loss + cfg.kl_coef * kl
                totals["kl"] += kl.item()
        loss.backward()
        totals["loss"] += loss.item()
        # -log p of the sampled tokens: an unbiased estimate of the sampling policy's entropy
        totals["entropy"] += float(-(logp.detach() * mb["mask"]).sum()) / max(num_tokens, 1.0)
        for key, value in metrics.items():
            totals[key] += value
    totals = common.all_reduce(totals)
    grad_norm = common.clip_grad_norm(model, cfg.grad_clip)
    finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": grad_norm, "update_skipped": float(not finite)}


def update(model, optimizer, mini_batches, cfg, ref_model):
    """One optimizer step per mini-batch (ppo_updates of them); metrics averaged over them."""
    totals = {}
    for mini_batch in mini_batches:
        for key, value in ppo_step(model, optimizer, mini_batch, cfg, ref_model).items():
            totals[key] = totals.get(key, 0.0) + value / len(mini_batches)
    return totals


def task_metrics(groups):
    """Mean reward parts per task key (SPEC 5's keys) and over all tasks ("all"), from every rank's groups."""
    parts = ("overall", "accuracy", "format", "structure_reward")
    scored = common.all_gather_list(
        (data.task_key(g["row"]["problem_type"], g["row"]["data_type"]), [s[p] for p in parts])
        for g in groups for s in g["scores"])
    by_task = {}
    for key, values in scored:
        by_task.setdefault(key, []).append(values)
    if scored:
        by_task["all"] = [values for _, values in scored]
    return {key: dict(zip(parts, np.mean(values, 0).tolist())) for key, values in sorted(by_task.items())}


def rollout_stats(rolled, kept, tried):
    """Prompts rolled out, response length, truncated share (no stop token within max_new_tokens) and filter
    keep rate, over all ranks."""
    masks = [g["response_mask"] for g in rolled]
    sums = common.all_reduce({
        "kept": float(len(kept)), "tried": float(tried), "responses": float(sum(len(m) for m in masks)),
        "tokens": float(sum(m.sum() for m in masks)),
        "truncated": float(sum(reason == "length" for g in rolled for reason in g["finish"]))})
    responses = max(sums["responses"], 1.0)
    return {"prompts": sums["tried"], "response_length": sums["tokens"] / responses,
            "truncated_rate": sums["truncated"] / responses,
            "filter_keep_rate": sums["kept"] / max(sums["tried"], 1.0)}


def advantage_metrics(groups):
    """Per task key, over every rank's kept groups: the mean spread of the reward within a group (population std)
    and the mean |advantage| the estimator gave, the two numbers GRPO, Dr.GRPO and EMA-GRPO relate differently."""
    local = [(data.task_key(g["row"]["problem_type"], g["row"]["data_type"]),
              [float(np.std([s["overall"] for s in g["scores"]])), float(g["adv"].abs().mean())]) for g in groups]
    by_task = {}
    for key, values in common.all_gather_list(local):
        by_task.setdefault(key, []).append(values)
    return {key: dict(zip(("group_std", "abs"), np.mean(values, 0).tolist())) for key, values in sorted(by_task.items())}


def write_samples(path, step, groups):
    """A few rollouts (the first response of the first kept groups) for reading what the policy writes."""
    with open(path, "a") as f:
        for g in groups[:4]:
            f.write(json.dumps({"step": step, "problem": g["row"]["problem"], "problem_type": g["row"]["problem_type"],
                                "ground_truth": data.ground_truth(g["row"]), "response": g["texts"][0],
                                "score": g["scores"][0]}) + "\n")


def load_policy(cfg, device, rank, world_size):
    """(model, reference model or None, processor): the policy sharded over ranks, its trainable parameters set.
    Under torchrun rank 0 alone reads the weights (model.load_model_to_shard)."""
    model_path = cfg.model
    if not os.path.exists(os.path.join(model_path, "config.json")) and model_path == Config.model:
        model_path = model_lib.DEFAULT_MODEL_DIR
        if rank == 0:
            print(f"{cfg.model} not found (run train_sft.py first): starting from the untrained {model_path}")
            model_lib.ensure_model(model_path)
        common.barrier()  # the other ranks wait for the tiny model to be built
    load_args = (model_path, str(device), common.PARAM_DTYPES[cfg.param_dtype], rank, world_size)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, full, _ = model_lib.load_model_to_shard(*load_args)
        ref_model.requires_grad_(False)
        ref_model = common.shard_model(ref_model, mixed_precision=cfg.bf16, full_model=full)
    model, full, processor = model_lib.load_model_to_shard(*load_args)
    if cfg.freeze_vision:
        model_lib.freeze_vision(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    return common.shard_model(model, mixed_precision=cfg.bf16, full_model=full), ref_model, processor


def check_config(cfg, world_size):
    if cfg.share_prompt and cfg.grad_checkpointing:
        raise ValueError("share_prompt=true needs the prompt's KV cache, which grad_checkpointing=true drops: "
                         "turn one of them off")
    if cfg.prompts_per_step % (world_size * cfg.ppo_updates):
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of world_size*ppo_updates="
                         f"{world_size}*{cfg.ppo_updates}")


def make_encoder(cfg, processor, context):
    """One row -> its encoded prompt for the rollout (and the update, which reuses it), a ValueError naming the row
    when its media do not decode or its prompt leaves fewer than max_new_tokens of the model context
    (data.draw_rows replaces such a row)."""
    templates = data.load_templates(cfg.prompt_template) if cfg.prompt_template else None
    cache = {} if cfg.cache_inputs else None
    media_cfg = data.media_config(cfg)

    def encode_prompt(row):
        item = data.encode_cached(row, processor, media_cfg, templates, cache=cache)
        return data.check_length(row, item, context, cfg.max_new_tokens)
    return encode_prompt


def reward_counters():
    """rewards.pop_counters() summed over ranks (reward-model failures and fallbacks, symbolic timeouts)."""
    totals = collections.Counter()
    for key, value in common.all_gather_list(rewards.pop_counters().items()):
        totals[key] += value
    return dict(totals)


def run_state(sampler, tracker, generator):
    """What a checkpoint holds besides weights and AdamW, as of now (local and cheap: taken before every step, so
    that a step dropped by a preemption checkpoints the state from before it)."""
    return {"sampler": sampler.state_dict(), "ema": tracker.state_dict(), "rng": common.rng_state({"rollout": generator})}


def resume(cfg, ckpt_dir, model, optimizer, sampler, tracker, generator, bad_rows, rank):
    """(step, path) of the intact checkpoint this run continues from, loaded; (0, None) for a fresh start."""
    path, extra = common.resume_checkpoint(ckpt_dir, model, optimizer) if cfg.resume else (None, None)
    if path is None:
        return 0, None
    sampler.load_state_dict(extra["sampler"])
    tracker.load_state_dict(extra["ema"])
    common.restore_rng(extra, cfg.seed, {"rollout": generator})
    bad_rows.errors.update(extra["bad_rows"])
    if rank == 0:
        print(f"resumed from {path} at step {extra['step']}" + (
            f" (written by {extra['world_size']} ranks: weights, AdamW, task EMA and data position carried over, "
            f"sampling reseeded)" if extra.get("resharded") else ""))
    return extra["step"], path


def count_skipped(skipped, reward_error, update_metrics, cfg, step):
    """Steps in a row that took no update (a reward error, or every optimizer step non-finite); a run that
    cannot learn stops with an error (no export) after max_skipped_steps of them."""
    skipped = skipped + 1 if reward_error or update_metrics.get("update_skipped", 0.0) > 1.0 - 1e-9 else 0
    if cfg.max_skipped_steps and skipped >= cfg.max_skipped_steps:
        raise RuntimeError(f"step {step}: {skipped} steps in a row took no update (reward errors or non-finite "
                           f"losses, see above); stopping without an export (max_skipped_steps={cfg.max_skipped_steps})")
    return skipped


def main(argv):
    cfg = common.parse_config(Config, argv, PRESETS, CHOICES)
    if cfg.plan:
        memory.print_rl_plan(cfg)
        return
    rank, world_size, _, device = common.init_distributed(cfg.dist_timeout_min)
    check_config(cfg, world_size)
    common.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    stop = common.StopFlag(cfg.stop_grace_s)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)  # rollout sampling

    # --- model, optimizer, data
    model, ref_model, processor = load_policy(cfg, device, rank, world_size)
    optimizer = common.build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr,
                                       cfg.weight_decay, cfg.param_dtype)
    tracker = ema_grpo.TaskEMA(decay=cfg.ema_decay, min_std=cfg.min_std)
    prefetcher = data.Prefetcher(make_encoder(cfg, processor, model.config.text_config.max_position_embeddings))
    rows = data.load_rows(cfg.data, cfg.media_root, skip_bad_rows=cfg.skip_bad_rows, check_media=cfg.check_media,
                          allow_outside_root=cfg.allow_media_outside_root)
    strata = [str(r["data_type"]) for r in rows] if cfg.balance_modalities else None
    sampler = data.ShardedSampler(len(rows), rank, world_size, seed=cfg.seed, strata=strata)
    bad_rows = data.BadRows(None if cfg.skip_bad_rows else cfg.max_bad_rows)
    tokenizer = processor.tokenizer
    stop_ids = model_lib.stop_token_ids(model, tokenizer)

    # stdout gets the headline numbers and every fault; metrics.jsonl and wandb get every key
    logger = common.Logger(cfg.out_dir, cfg, cfg.wandb, resume=cfg.resume, stdout_keys=(
        "reward/all/", "response_length", "filter_keep_rate", "loss", "grad_norm", "update_skipped", "skip_reason",
        "reward_errors", "reward_counters/", "bad_rows", "sec/"))
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    step, resumed_from = resume(cfg, ckpt_dir, model, optimizer, sampler, tracker, generator, bad_rows, rank)
    saved_step, skipped = step, 0
    if rank == 0:
        print(f"RL ({cfg.estimator}): {len(rows)} prompts, {cfg.prompts_per_step} x {cfg.group_size} per step, "
              f"{cfg.max_steps} steps, world size {world_size}, device {device}")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="rl", disable=rank != 0, dynamic_ncols=True)
    while step < cfg.max_steps:
        stop.start_step()
        before = run_state(sampler, tracker, generator)
        timing = {"data": 0.0, "rollout": 0.0, "reward": 0.0}  # seconds per phase of this step

        # --- rollout + reward + online filtering (refilled until every rank has its prompts or tries run out)
        kept, rolled, tried, reward_error = collect_groups(model, prefetcher, rows, sampler, bad_rows, cfg,
                                                           generator, device, stop_ids, tokenizer, timing, stop)
        new_bad = bad_rows.report()
        if stop.drop_step():  # preempted mid-step, no time to finish it: checkpoint the state from before it
            common.save_dropped_step(ckpt_dir, step, saved_step, model, optimizer, processor,
                                     data.checkpoint_state(before, bad_rows), cfg, resumed_from)
            break

        # --- advantages: the task EMA is updated with every rank's kept scores first (SPEC 5)
        t0 = time.perf_counter()
        assign_advantages(kept, tracker, cfg)
        timing["advantage"] = time.perf_counter() - t0

        # --- old log-probs (only when ppo_updates > 1), then the update
        t0 = time.perf_counter()
        mini_batches = build_mini_batches(model, kept, cfg, tokenizer.pad_token_id, device)
        timing["old_logp"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        update_metrics = update(model, optimizer, mini_batches, cfg, ref_model) if kept else {}
        timing["update"] = time.perf_counter() - t0
        step += 1
        bar.update(1)
        if update_metrics.get("update_skipped") and rank == 0:
            print(f"step {step}: non-finite loss or gradient norm: {update_metrics['update_skipped']:.0%} of the "
                  f"optimizer steps skipped")

        # --- log (every step that met a bad row, too)
        if step % cfg.log_every == 0 or new_bad:
            metrics = {"reward": task_metrics(rolled),  # every rolled-out group, before filtering
                       "advantage": advantage_metrics(kept),  # the groups the update used
                       "ema": tracker.stats(), **rollout_stats(rolled, kept, tried),
                       "reward_errors": float(reward_error),  # 1: some rank's reward raised, no update this step
                       "reward_counters": reward_counters(), "bad_rows": float(len(bad_rows.errors)),
                       "sec": timing, **update_metrics}
            if new_bad:
                metrics["bad_rows_new"] = "; ".join(new_bad)
            if not kept:
                metrics["skip_reason"] = "reward error" if reward_error else "no groups kept after filtering"
            logger.log(step, metrics)
        if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0 and kept:
            write_samples(os.path.join(cfg.out_dir, "samples.jsonl"), step, kept)
        skipped = count_skipped(skipped, reward_error, update_metrics, cfg, step)

        # --- checkpoint
        stopping = stop.stop_after_step()
        if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
            common.save_run(ckpt_dir, step, model, optimizer, processor,
                            data.checkpoint_state(run_state(sampler, tracker, generator), bad_rows), cfg, resumed_from)
            saved_step = step
        if stopping:
            if rank == 0:
                print(f"SIGTERM: checkpoint written at step {step}; exiting")
            break
    bar.close()

    if step == cfg.max_steps:
        common.export_hf(model, processor, os.path.join(cfg.out_dir, "hf"))
    prefetcher.worker.shutdown(cancel_futures=True)
    logger.close()
    common.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
