"""
RL with EMA-GRPO (SPEC 5-6): roll out n answers per prompt, score them, keep informative groups, normalise
advantages by a per-task EMA of the reward spread, and take PPO-clip steps on the policy.

    python train_rl.py                                    # the shapes preset: SFT'd tiny model, built-in suite, CPU
    python train_rl.py --estimator=grpo --out_dir=runs/rl-grpo          # ablation baselines: grpo, dr_grpo
    torchrun --nproc_per_node 2 train_rl.py -- --max_steps=3 --n=4      # FSDP2 on CPU (gloo)
    torchrun --nproc_per_node 8 train_rl.py -- --preset=release --model=runs/sft/hf \
        --data=/data/onethinker_rl_train.json --media_root=/data --out_dir=runs/rl
    python train_rl.py --out_dir=runs/rl --resume=true    # continue exactly from the newest checkpoint
    python train_rl.py --plan_8b=true                     # the 8B memory plan on 8 x 80 GB, built on meta

Under torchrun put `--` before the script's options: torchrun's own parser reads `--n=4` as an abbreviation of
its --nnodes / --nproc_per_node and stops with "ambiguous option".

One step, top to bottom: sample prompts -> roll out n each (rollout.py) -> score (rewards.py) -> drop groups
whose mean accuracy is ~0 or ~1 and refill -> advantages (ema_grpo.py, the task EMA shared by all ranks) ->
old log-probs (when ppo_updates > 1) -> ppo_updates optimizer steps over mini-batches -> log -> checkpoint.

What it leaves out of the release (EasyR1/verl): vLLM and Ray (our own KV-cache rollout on the training
weights, one process per GPU), sequence packing / dynamic batch sizes, and the reward-model server's
deployment (rewards.py has the client; pass --reward_model_url). KL to a reference is off, as released.
"""
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import data
import ema_grpo
import model as model_lib
import rewards
import rollout


@dataclass
class Config:
    model: str = "runs/sft/hf"  # where train_sft.py exports; falls back to the raw tiny model if missing
    data: str = os.path.join(model_lib.DEFAULT_DATA_DIR, "rl.json")
    media_root: str | None = None
    skip_bad_rows: bool = False
    prompt_template: str | None = None  # JSON problem_type -> type line, to match a released checkpoint's prompt
    out_dir: str = "runs/rl"
    resume: bool = False
    seed: int = 0
    max_steps: int = 150  # rollout steps
    # rollout (SPEC 6: 128 prompts x 8, temperature 1, top_p 1, up to 4096 new tokens)
    prompts_per_step: int = 16  # over all ranks
    n: int = 8
    rollout_batch_prompts: int = 16  # prompts per generate call on one rank: bounds the KV cache (x n rows)
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    balance_modalities: bool = True  # interleave image and video rows in the prompt order
    # online filtering (SPEC 6): drop groups whose mean accuracy is <= low or >= high, refill up to max tries
    filter_groups: bool = True
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_refill_tries: int = 20  # rollout batches per step at most, the first included
    # reward (SPEC 4)
    format_weight: float = 0.1
    reward_model_url: str | None = None  # a vLLM /pooling endpoint serving POLAR for open-ended answers
    # advantages (SPEC 5)
    estimator: str = "ema_grpo"  # ema_grpo | grpo | dr_grpo
    ema_decay: float = 0.99
    min_std: float = 1e-3
    # policy update (SPEC 6)
    ppo_updates: int = 1  # optimizer steps per rollout step; the release: 4 (mini-batch = prompts / 4)
    micro_batch_prompts: int = 4  # prompts (x n responses) per forward/backward on one rank
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.0  # > 0 loads a frozen reference copy of the starting model
    kl_kind: str = "low_var_kl"
    freeze_vision: bool = False  # the release trains the vision tower in RL
    share_prompt: bool = True  # update forwards run each prompt once, its KV cache repeated for the n responses
    grad_checkpointing: bool = False
    bf16: bool = False
    # media (SPEC 2)
    fps: float = 2.0
    max_frames: int = 128
    image_max_pixels: int = 1048576
    video_max_pixels: int = 64 * 32 * 32
    cache_inputs: bool = True  # keep rows' processor outputs in memory (media decode dominates tiny steps)
    # logging and checkpoints
    log_every: int = 1
    sample_every: int = 25  # dump a few rollouts to out_dir/samples.jsonl
    save_every: int = 50
    wandb: bool = False
    plan_8b: bool = False  # print the Qwen3-VL-8B memory plan for 8 x 80 GB and exit


PRESETS = {
    "shapes": {},
    "release": dict(max_steps=200, prompts_per_step=128, n=8, max_new_tokens=4096, ppo_updates=4,
                    micro_batch_prompts=1, rollout_batch_prompts=2, lr=2e-6, weight_decay=0.01, grad_checkpointing=True, bf16=True,
                    share_prompt=False,  # gradient checkpointing (needed at 8B) drops the prompt's KV cache
                    balance_modalities=False, image_max_pixels=1048576, video_max_pixels=64 * 32 * 32,
                    cache_inputs=False, sample_every=10, save_every=25),
}


# -----------------------------------------------------------------------------
# one rollout step's pieces

def roll_out(model, processor, rows, cfg, media_cfg, templates, generator, device, eos_ids, cache=None):
    """Generate n responses for each row, rollout_batch_prompts rows per generate call (bounds the KV cache).
    Returns one group per row: {"row", "texts" (n), "response_ids" [n, T_i], "response_mask" [n, T_i], "finish"}."""
    groups = []
    model.eval()
    for start in range(0, len(rows), cfg.rollout_batch_prompts):
        chunk = rows[start:start + cfg.rollout_batch_prompts]
        inputs = {k: v.to(device)
                  for k, v in data.collate(chunk, processor, media_cfg, templates, cache=cache).items()}
        with torch.no_grad(), common.autocast(cfg.bf16, device):
            out = rollout.generate(model, inputs, n=cfg.n, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                   generator=generator, eos_token_ids=eos_ids)
        lengths = out["response_mask"].sum(1).tolist()  # [Bn]
        texts = [processor.tokenizer.decode(ids[:length], skip_special_tokens=True)
                 for ids, length in zip(out["response_ids"].tolist(), lengths)]
        for i, row in enumerate(chunk):
            sl = slice(i * cfg.n, (i + 1) * cfg.n)
            length = max(lengths[sl])
            groups.append({"row": row, "texts": texts[sl],
                           "response_ids": out["response_ids"][sl, :length].cpu(),  # [n, T_i]
                           "response_mask": out["response_mask"][sl, :length].cpu(),  # [n, T_i]
                           "finish": out["finish_reasons"][sl]})
    model.train()
    return groups


def score_groups(groups, cfg):
    """Attach the reward parts of every response (SPEC 4) as g["scores"]; one compute_score call per batch.

    A non-finite reward raises (naming the row): it would poison the task EMA, which lives on in checkpoints.
    """
    items = [{"response": text, "ground_truth": data.ground_truth(g["row"]),
              "problem_type": g["row"]["problem_type"], "data_type": g["row"]["data_type"],
              "problem": g["row"]["problem"], "problem_id": str(g["row"].get("problem_id", ""))}
             for g in groups for text in g["texts"]]
    scores = rewards.compute_score(items, cfg.format_weight, reward_model_url=cfg.reward_model_url)
    for i, g in enumerate(groups):
        g["scores"] = scores[i * cfg.n:(i + 1) * cfg.n]
        for s in g["scores"]:
            if not all(math.isfinite(s[part]) for part in ("overall", "accuracy", "format", "structure_reward")):
                raise ValueError(f"{g['row']['source']}: non-finite reward {s}")


def keep_group(group, cfg):
    """Online filtering (SPEC 6): a group where all answers are right (or all wrong) teaches nothing."""
    if not cfg.filter_groups:
        return True
    mean_acc = sum(s["accuracy"] for s in group["scores"]) / len(group["scores"])
    return cfg.filter_low < mean_acc < cfg.filter_high


def micro_batch_inputs(groups, processor, media_cfg, templates, cfg, device, cache=None):
    """Model inputs for a micro-batch of groups: prompts repeated n times, responses right-padded."""
    rows = [g["row"] for g in groups]
    inputs = data.collate(rows, processor, media_cfg, templates, cache=cache)  # the prompts once; token_logprobs repeats
    T = max(g["response_ids"].shape[1] for g in groups)
    pad = processor.tokenizer.pad_token_id
    response_ids = torch.full((len(groups) * cfg.n, T), pad, dtype=torch.long)  # [mn, T]
    response_mask = torch.zeros(len(groups) * cfg.n, T, dtype=torch.long)  # [mn, T]
    for i, g in enumerate(groups):
        t = g["response_ids"].shape[1]
        response_ids[i * cfg.n:(i + 1) * cfg.n, :t] = g["response_ids"]
        response_mask[i * cfg.n:(i + 1) * cfg.n, :t] = g["response_mask"]
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs, response_ids.to(device), response_mask.to(device)


def ppo_step(model, optimizer, micro_batches, cfg, ref_model=None):
    """One optimizer step over micro-batches (each: inputs, response ids/mask, old log-probs or None for the
    current policy's, advantages).

    The loss is the global token mean over the mini-batch (all micro-batches, all ranks: SPEC 6); gradients
    are summed over ranks (common.shard_model), so one process and N ranks take the same step.
    A non-finite loss or gradient norm (on any rank) skips optimizer.step: the weights and AdamW state stay as
    they were, and the returned metrics say skipped=1.0. Returns floats: loss, clip fractions, ratio, KLs,
    entropy, grad_norm (before clipping), skipped.
    """
    num_tokens = common.all_reduce(sum(float(mb["mask"].sum()) for mb in micro_batches))
    totals = {"loss": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "ratio": 0.0, "approx_kl": 0.0,
              "kl": 0.0, "entropy": 0.0}
    for i, mb in enumerate(micro_batches):
        common.set_grad_sync(model, i == len(micro_batches) - 1)
        with common.autocast(cfg.bf16, mb["inputs"]["input_ids"].device):
            logp = rollout.token_logprobs(model, mb["inputs"], mb["ids"], mb["mask"], cfg.n,
                                          cfg.share_prompt)  # [mn, T]
            old_logp = logp.detach() if mb["old_logp"] is None else mb["old_logp"]  # None: on-policy (ratio 1)
            loss, metrics = ema_grpo.ppo_loss(logp, old_logp, mb["adv"], mb["mask"], cfg.clip_low,
                                              cfg.clip_high, cfg.dual_clip, num_tokens=max(num_tokens, 1.0))
            if ref_model is not None:
                with torch.no_grad():
                    ref_logp = rollout.token_logprobs(ref_model, mb["inputs"], mb["ids"], mb["mask"], cfg.n,
                                                     cfg.share_prompt)
                kl = (ema_grpo.kl_penalty(logp, ref_logp, cfg.kl_kind) * mb["mask"]).sum() / max(num_tokens, 1.0)
                loss = loss + cfg.kl_coef * kl
                totals["kl"] += kl.item()
        loss.backward()
        totals["loss"] += loss.item()
        # -log p of the sampled tokens: an unbiased estimate of the policy entropy at temperature 1
        totals["entropy"] += float(-(logp.detach() * mb["mask"]).sum()) / max(num_tokens, 1.0)
        for key, value in metrics.items():
            totals[key] += value
    totals = common.all_reduce(totals)
    grad_norm = common.clip_grad_norm(model, cfg.grad_clip)
    finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": grad_norm, "skipped": float(not finite)}


def task_metrics(groups):
    """Mean reward parts per task key (SPEC 5's keys) and over all tasks ("all"), from every rank's groups."""
    parts = ("overall", "accuracy", "format", "structure_reward")
    local = [(data.task_key(g["row"]["problem_type"], g["row"]["data_type"]), [s[p] for p in parts])
             for g in groups for s in g["scores"]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = [item for rank_items in gathered for item in rank_items]
    by_task = {}
    for key, values in local:
        by_task.setdefault(key, []).append(values)
    if local:
        by_task["all"] = [values for _, values in local]
    return {key: dict(zip(parts, np.mean(values, 0).tolist())) for key, values in sorted(by_task.items())}


def advantage_metrics(groups):
    """Per task key, over every rank's kept groups: the mean spread of the reward within a group (population std)
    and the mean |advantage| the estimator gave, the two numbers GRPO, Dr.GRPO and EMA-GRPO relate differently."""
    local = [(data.task_key(g["row"]["problem_type"], g["row"]["data_type"]),
              [float(np.std([s["overall"] for s in g["scores"]])), float(g["adv"].abs().mean())]) for g in groups]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = [item for rank_items in gathered for item in rank_items]
    by_task = {}
    for key, values in local:
        by_task.setdefault(key, []).append(values)
    return {key: dict(zip(("group_std", "abs"), np.mean(values, 0).tolist())) for key, values in sorted(by_task.items())}


# -----------------------------------------------------------------------------
# the real-scale check: Qwen3-VL-8B on the meta device, the memory plan for 8 x 80 GB

QWEN3_VL_8B = dict(  # public config facts of Qwen/Qwen3-VL-8B-Instruct
    text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                                          mrope_interleaved=True), tie_word_embeddings=False),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False,
)


def plan_8b(cfg, gpus=8, gpu_gb=80):
    """Build the 8B architecture on meta, count parameters, and print the per-GPU memory plan."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**QWEN3_VL_8B))
    n = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    text = QWEN3_VL_8B["text_config"]
    gb = 1024 ** 3
    # FSDP2 shards fp32 master weights, fp32 grads and fp32 AdamW moments over the GPUs
    weights, grads, adam = 4 * n / gpus / gb, 4 * n / gpus / gb, 8 * n / gpus / gb
    # rollout gathers the bf16 weights once for the whole phase (rollout.gathered_params)
    gathered = 2 * n / gb
    # KV cache: 2 (k, v) x layers x kv_heads x head_dim x bf16 per token
    kv_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2
    rollout_rows = cfg.rollout_batch_prompts * cfg.n  # responses in one generate call on one GPU
    # the longest RL prompt (SPEC 2): max_frames / temporal patch 2 frame pairs, each video_max_pixels / 32^2
    # tokens after the 2x2 merge, plus ~512 text tokens
    prompt_tokens = cfg.max_frames // 2 * cfg.video_max_pixels // (32 * 32) + 512
    kv = kv_per_token * rollout_rows * (prompt_tokens + cfg.max_new_tokens) / gb
    # training activations with checkpointing: one hidden state per layer per token kept, bf16
    seq = prompt_tokens + cfg.max_new_tokens
    acts = 2 * text["hidden_size"] * text["num_hidden_layers"] * seq * cfg.micro_batch_prompts / gb
    logits = 4 * text["vocab_size"] * cfg.max_new_tokens * cfg.micro_batch_prompts / gb  # fp32 response logits
    print(f"Qwen3-VL-8B on meta: {n / 1e9:.2f}B parameters ({n_vision / 1e9:.2f}B vision)")
    print(f"per GPU ({gpus} x {gpu_gb} GB, FSDP2): fp32 weights {weights:.1f} GB + grads {grads:.1f} GB + "
          f"AdamW {adam:.1f} GB = {weights + grads + adam:.1f} GB sharded state")
    print(f"rollout: gathered bf16 weights {gathered:.1f} GB + KV cache {kv:.1f} GB for {rollout_rows} responses "
          f"of {prompt_tokens}+{cfg.max_new_tokens} tokens ({kv_per_token / 1024:.0f} KiB per token)")
    print(f"update: activations with checkpointing {acts:.1f} GB + response logits {logits:.1f} GB per "
          f"micro-batch of {cfg.micro_batch_prompts} sequence(s) of {seq} tokens")
    peak = weights + grads + adam + max(gathered + kv, acts + logits)
    print(f"peak ~{peak:.1f} GB of {gpu_gb} GB (before allocator overhead and vision activations)")
    return n


def main(argv):
    cfg = common.parse_config(Config, argv, PRESETS)
    if cfg.plan_8b:
        plan_8b(cfg)
        return
    rank, world_size, _, device = common.init_distributed()
    if cfg.share_prompt and cfg.grad_checkpointing:
        raise ValueError("share_prompt=true needs the prompt's KV cache, which grad_checkpointing=true drops: "
                         "turn one of them off")
    if cfg.prompts_per_step % (world_size * cfg.ppo_updates):
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of world_size*ppo_updates="
                         f"{world_size}*{cfg.ppo_updates}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)  # rollout sampling

    # --- model, reference, optimizer, data
    model_path = cfg.model
    if not os.path.exists(os.path.join(model_path, "config.json")) and model_path == Config.model:
        model_path = model_lib.DEFAULT_MODEL_DIR
        if rank == 0:
            print(f"{cfg.model} not found (run train_sft.py first): starting from the untrained {model_path}")
            model_lib.ensure_model(model_path)
        common.all_reduce(0.0)
    model, processor = model_lib.load_model(model_path, device=str(device))
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = model_lib.load_model(model_path, device=str(device))
        ref_model.requires_grad_(False)
        ref_model = common.shard_model(ref_model, mixed_precision=cfg.bf16)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model = common.shard_model(model, mixed_precision=cfg.bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tracker = ema_grpo.TaskEMA(decay=cfg.ema_decay, min_std=cfg.min_std)

    templates = data.load_templates(cfg.prompt_template) if cfg.prompt_template else None
    media_cfg = data.MediaConfig(fps=cfg.fps, max_frames=cfg.max_frames, image_max_pixels=cfg.image_max_pixels,
                                 video_max_pixels=cfg.video_max_pixels)
    rows = data.load_rows(cfg.data, cfg.media_root, skip_bad=cfg.skip_bad_rows)
    strata = [str(r["data_type"]) for r in rows] if cfg.balance_modalities else None
    sampler = data.ShardedSampler(len(rows), rank, world_size, seed=cfg.seed, strata=strata)
    cache = {} if cfg.cache_inputs else None
    tokenizer = processor.tokenizer
    eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id})
    prompts_per_rank = cfg.prompts_per_step // world_size

    # stdout gets the headline numbers; metrics.jsonl and wandb get every key (per task, EMA, clip, ...)
    logger = common.Logger(cfg.out_dir, cfg, cfg.wandb, stdout_keys=(
        "reward/all/", "response_length", "filter_keep_rate", "loss", "grad_norm", "update_skipped", "sec/"))
    sigterm = common.install_sigterm_flag()
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    step = 0
    if cfg.resume and (path := common.latest_checkpoint(ckpt_dir)):
        extra = common.load_checkpoint(path, model, optimizer)
        step = extra["step"]
        sampler.load_state_dict(extra["sampler"])
        tracker.load_state_dict(extra["ema"])
        common.set_rng_state(extra["rng"], {"rollout": generator})
        if rank == 0:
            print(f"resumed from {path} at step {step}")

    def save():
        common.save_checkpoint(ckpt_dir, step, model, optimizer, {
            "sampler": sampler.state_dict(), "ema": tracker.state_dict(),
            "rng": common.rng_state({"rollout": generator}), "config": dataclasses.asdict(cfg)})

    if rank == 0:
        print(f"RL ({cfg.estimator}): {len(rows)} prompts, {cfg.prompts_per_step} x {cfg.n} per step, "
              f"{cfg.max_steps} steps, world size {world_size}, device {device}")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="rl", disable=rank != 0, dynamic_ncols=True)
    while step < cfg.max_steps:
        timing = {"rollout": 0.0, "reward": 0.0}  # seconds per phase of this step

        # --- rollout + reward, with online filtering: refill until every rank has its prompts (or tries run out)
        kept, rolled, tried, reward_error = [], [], 0, False
        while True:
            t0 = time.perf_counter()
            batch_rows = [rows[i] for i in sampler.next_batch(prompts_per_rank)]
            groups = roll_out(model, processor, batch_rows, cfg, media_cfg, templates, generator, device, eos_ids,
                              cache)
            timing["rollout"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                score_groups(groups, cfg)
            except Exception:  # a reward failure must not kill a long run: log it and skip this step's update
                traceback.print_exc()
                groups, reward_error = [], True
            timing["reward"] += time.perf_counter() - t0
            tried += len(batch_rows)
            rolled += groups
            kept += [g for g in groups if keep_group(g, cfg)]
            # one decision for all ranks: a rollout runs FSDP forwards, so every rank must roll out equally often
            state = common.all_reduce({"short": float(len(kept) < prompts_per_rank), "error": float(reward_error)},
                                      "max")
            if state["error"] or not state["short"] or tried // prompts_per_rank >= cfg.max_refill_tries:
                break
        # every rank must run the same number of forwards in the update: all use the smallest kept count
        n_groups = 0 if state["error"] else int(common.all_reduce(float(min(len(kept), prompts_per_rank)), "min"))
        kept = kept[:n_groups]

        # --- advantages: the task EMA is updated with every rank's kept scores first (SPEC 5)
        t0 = time.perf_counter()
        update_metrics = {}
        if n_groups > 0:
            scores = torch.tensor([s["overall"] for g in kept for s in g["scores"]])  # [k*n]
            group_ids = [i for i, g in enumerate(kept) for _ in g["scores"]]
            task_keys = [data.task_key(g["row"]["problem_type"], g["row"]["data_type"])
                         for g in kept for _ in g["scores"]]
            adv = ema_grpo.advantages(scores, group_ids, task_keys, tracker, cfg.estimator)  # [k*n]
            for i, g in enumerate(kept):
                g["adv"] = adv[i * cfg.n:(i + 1) * cfg.n]  # [n]
        timing["advantage"] = time.perf_counter() - t0

        # --- old log-probs under the policy that sampled (recomputed with the training forward, as released).
        # With ppo_updates=1 the policy that sampled is the one the single update starts from: its old log-probs
        # are the update's own, detached (ratio 1), so ppo_step takes them there and this forward is skipped.
        t0 = time.perf_counter()
        micro_batches = []
        for start in range(0, n_groups, cfg.micro_batch_prompts):
            chunk = kept[start:start + cfg.micro_batch_prompts]
            inputs, ids, mask = micro_batch_inputs(chunk, processor, media_cfg, templates, cfg, device, cache)
            old_logp = None
            if cfg.ppo_updates > 1:
                with torch.no_grad(), common.autocast(cfg.bf16, device):
                    old_logp = rollout.token_logprobs(model, inputs, ids, mask, cfg.n,
                                                      cfg.share_prompt)  # [mn, T]
            micro_batches.append({"inputs": inputs, "ids": ids, "mask": mask, "old_logp": old_logp,
                                  "adv": torch.cat([g["adv"] for g in chunk]).to(device).float()})  # adv [mn]
        timing["old_logp"] = time.perf_counter() - t0

        # --- update: ppo_updates optimizer steps, each over a mini-batch of the kept groups
        t0 = time.perf_counter()
        per_update = max(1, math.ceil(len(micro_batches) / cfg.ppo_updates))
        mini_batches = [micro_batches[i:i + per_update] for i in range(0, len(micro_batches), per_update)]
        for mini_batch in mini_batches:
            for key, value in ppo_step(model, optimizer, mini_batch, cfg, ref_model).items():
                update_metrics[key] = update_metrics.get(key, 0.0) + value / len(mini_batches)
        timing["update"] = time.perf_counter() - t0
        step += 1
        bar.update(1)
        if update_metrics.get("skipped") and rank == 0:
            print(f"step {step}: non-finite loss or gradient norm: {update_metrics['skipped']:.0%} of the optimizer "
                  f"steps skipped")

        # --- log
        if step % cfg.log_every == 0:
            lengths = [float(g["response_mask"][j].sum()) for g in rolled for j in range(cfg.n)]
            stats = common.all_reduce({"kept": float(n_groups), "tried": float(tried),
                                       "length_sum": float(sum(lengths)), "length_n": float(len(lengths))})
            metrics = {
                "reward": task_metrics(rolled),  # every rolled-out group, before filtering
                "advantage": advantage_metrics(kept),  # the groups the update used
                "ema": tracker.stats(),
                "response_length": stats["length_sum"] / max(stats["length_n"], 1.0),
                "filter_keep_rate": stats["kept"] / max(stats["tried"], 1.0),
                "reward_errors": state["error"],  # 1: some rank's reward raised, this step took no update
                "reward_counters": rewards.pop_counters(),
                "sec": timing,
                **update_metrics,
            }
            if n_groups == 0:
                metrics["update_skipped"] = "reward error" if state["error"] else "no groups kept after filtering"
            logger.log(step, metrics)
        if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0 and kept:
            with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
                for g in kept[:4]:
                    f.write(json.dumps({"step": step, "problem": g["row"]["problem"],
                                        "problem_type": g["row"]["problem_type"],
                                        "ground_truth": data.ground_truth(g["row"]), "response": g["texts"][0],
                                        "score": g["scores"][0]}) + "\n")

        # --- checkpoint
        stop = common.all_reduce(float(sigterm.requested), "max") > 0
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop:
            save()
        if stop:
            if rank == 0:
                print(f"SIGTERM: checkpoint written at step {step}; exiting")
            break
    bar.close()

    if step == cfg.max_steps:
        common.export_hf(model, processor, os.path.join(cfg.out_dir, "hf"))
        if rank == 0:
            print(f"exported {os.path.join(cfg.out_dir, 'hf')}")
    logger.close()
    common.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
