"""
Per-GPU memory plans of train_rl.py and eval.py configs at real scale: each phase's terms, as functions of the
model config (Qwen3-VL-8B built on the meta device: no weights, no memory) and the script's config.

    python train_rl.py --preset=release --plan=true   # RL: rollout, update micro-batch, optimizer step; 80 and 141 GB
    python eval.py --preset=release --plan=true       # eval: prefill and decode of the largest batch; 80 and 141 GB
    python bench.py memory                            # the same update terms against a peak measured on CPU

What each term counts (per GPU; FSDP2 over `gpus` ranks; bytes: p the weights' dtype, c the compute dtype):
- sharded state: weights p + gradients p + optimizer 8 (AdamW fp32 moments) or 6 (common.KahanAdamW: bf16
  moments and compensation) bytes per parameter, over the GPUs. Gradients exist only in the update.
- gathered weights: in the update the root unit (embeddings, vision tower, lm_head: common.shard_model keeps it
  gathered) and two decoder layers (the current one and the prefetched next), in c, plus their unsharded
  gradients in c and in fp32 for the reduce-scatter; in a rollout every weight (rollout.gathered_params).
- activations of one update micro-batch with gradient checkpointing: every decoder layer's input (c x hidden per
  token), plus one layer recomputed in backward (its saved tensors, `text_layer_bytes`) and two [tokens,
  intermediate] gradients in flight; the vision tower likewise per patch (`vision_block_bytes`), run once per
  sequence (token_logprobs repeats the prompt) unless share_prompt. Without checkpointing every layer keeps its
  saved tensors.
- logits: rollout.sampled_logprobs holds one chunk's logits at a time; at the peak of its backward that is
  3 fp32 [LOGITS_CHUNK, vocab] tensors (log_softmax's output, its gradient and the gather's gradient).
- KV cache: rollout.generate's layout and growth rule: the prompt held once per group of n samples (prompts
  rounded up to a power of two), the generated tokens per row, their length t rounded up to a power of two, and
  while it doubles the old and the new both live (`kv_cache_slots`). Never rows x (P + max_new_tokens)
  preallocated.
- prefill (no gradients): one layer's transient activations of every prompt token, the prompt's KV cache as HF
  returns it beside its copy into the decode cache, and the vision tower's per-patch transients.
The terms of a phase are summed as if they were all alive at once: an upper bound where they are not (gradients
are written while the logits chunks are freed). Left out: the allocator's fragmentation (PyTorch's caching
allocator rounds blocks; keep the headroom the plan prints), CUDA context and NCCL buffers (~1-2 GB, not measured
here), and prompts longer than the media budgets allow (PROMPT_TEXT_TOKENS of text is an allowance).
"""
import math

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import rollout

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
GiB = 1024 ** 3
GPU_GB = (80, 141)  # the GPUs the plans are printed for (H100 / H200), in GB as sold: 10^9 bytes
PROMPT_TEXT_TOKENS = 512  # text around the media in the longest prompt (question, options, template): an allowance


def qwen3_vl_8b():
    return Qwen3VLConfig(**QWEN3_VL_8B)


def param_counts(config):
    """Parameters of the model of `config`, built on the meta device: total, the vision tower, one text decoder
    layer, and the root unit of common.shard_model (everything but the decoder layers)."""
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    layers = model.model.language_model.layers
    return {"total": total, "vision": sum(p.numel() for p in model.model.visual.parameters()),
            "layer": sum(p.numel() for p in layers[0].parameters()),
            "root": total - sum(p.numel() for p in layers.parameters())}


def kv_cache_slots(prompts, n, prompt_tokens, new_tokens):
    """Token slots of the decode caches at their largest, under rollout.generate's rule: bucket(prompts) groups of
    prompt_tokens slots (one per prompt, not per sample), and bucket(prompts) x n rows of generated slots,
    max(FIRST_SLOTS, bucket(t + 2)) at step t; when that length outgrows its bucket the cache is copied into one
    twice as long, both alive during the copy. Worst case: every row runs to new_tokens."""
    length = max(rollout.FIRST_SLOTS, rollout.bucket(new_tokens))
    doubled = length > rollout.FIRST_SLOTS
    return rollout.bucket(prompts) * (prompt_tokens + n * (length + (length // 2 if doubled else 0)))


def text_dims(config):
    t = config.text_config
    return dict(H=t.hidden_size, L=t.num_hidden_layers, I=t.intermediate_size, V=t.vocab_size,
                QD=t.num_attention_heads * t.head_dim, KD=t.num_key_value_heads * t.head_dim)


def text_layer_bytes(config, c):
    """Bytes per token one decoder layer keeps for its backward (HF's Qwen3-VL layer, compute dtype of c bytes):
    each RMSNorm its fp32 input (4; the input itself when c = 4), normalised value and output (2c), over the two
    hidden norms and the per-head q/k norms; the rotary half-rotation and result of q and k (2c); v (c); the
    keys and values repeated to the query heads (sdpa with a padding mask: 2c x q width); the attention output
    and its reshaped copy (2c); the MLP's gate, activation, up and product (4c x intermediate)."""
    d = text_dims(config)
    return ((4 + 2 * c) * (2 * d["H"] + d["QD"] + d["KD"]) + 2 * c * (d["QD"] + d["KD"]) + c * d["KD"]
            + 2 * c * d["QD"] + 2 * c * d["QD"] + 4 * c * d["I"])


def vision_block_bytes(config, c):
    """Bytes per patch one vision block keeps for its backward: norm1's output (c), the qkv projection (3c), q and
    k in fp32 for the rotary (8, unless c = 4), their half-rotations in fp32 (8) and rotated results (2c), the
    attention output and its copy (2c), the residual and norm2's output (2c), the MLP's two intermediates (2c
    each, intermediate wide)."""
    v = config.vision_config
    return (c + 3 * c + (8 if c != 4 else 0) + 8 + 2 * c + 2 * c + 2 * c) * v.hidden_size + 2 * c * v.intermediate_size


def merger_bytes(config, c):
    """Bytes per patch the patch merger and each deepstack merger keep for their backward: the LayerNorm's input
    and output, the first linear's output and the GELU's, each hidden-wide per patch (4c x hidden). Their outputs
    go into the language model's hidden states by additions, which keep nothing."""
    v = config.vision_config
    return (1 + len(v.deepstack_visual_indexes)) * 4 * c * v.hidden_size


def longest_prompt(config, media):
    """(tokens, patches) of the longest prompt the media budgets allow (media: a config with image_max_pixels,
    video_max_pixels, max_frames): the larger of one image at its pixel budget and one video at max_frames frames
    of its per-frame budget, plus PROMPT_TEXT_TOKENS of text."""
    v = config.vision_config
    image = media.image_max_pixels // v.patch_size ** 2  # patches
    video = media.max_frames // v.temporal_patch_size * (media.video_max_pixels // v.patch_size ** 2)
    patches = max(image, video)
    return patches // v.spatial_merge_size ** 2 + PROMPT_TEXT_TOKENS, patches


def dtype_bytes(cfg):
    """(weight bytes p, compute bytes c, optimizer bytes per parameter) of a train_rl.Config."""
    p = 2 if cfg.param_dtype == "bf16" else 4
    c = 2 if cfg.bf16 or p == 2 else 4
    return p, c, 6 if p == 2 else 8


def generate_phases(config, c, prompts, rows, prompt_tokens, patches, new_tokens, resident):
    """The moments of one rollout.generate call, each {term: bytes} with the `resident` terms (weights, state):
    vision: the vision tower's per-patch transients (eight hidden-wide values: residual, norm, qkv and q, k in
    fp32 for the rotary; two MLP intermediates) and the merged and deepstack features it keeps for the language
    model; prefill: one decoder layer's transients per prompt token (gate, up and activation at intermediate
    width, four hidden-wide values, q, k, v), the prompt KV cache HF fills as it goes, and those features;
    cache copy: HF's prompt cache and the decode caches: its copy, one per group, and the first generated slots;
    decode: the caches at their largest (kv_cache_slots) and the step's fp32 logits, probabilities and cdf."""
    d, v = text_dims(config), config.vision_config
    kv_token = 2 * d["L"] * d["KD"] * c
    tokens = prompts * prompt_tokens
    features = prompts * patches * c * (1 + len(v.deepstack_visual_indexes)) * v.out_hidden_size // v.spatial_merge_size ** 2
    prompt_kv = {"prompt KV cache (HF's)": tokens * kv_token}
    return {"vision tower": {**resident, "vision block transients": prompts * patches * c * (
                8 * v.hidden_size + 2 * v.intermediate_size), "merged and deepstack features": features},
            "prefill": {**resident, "one layer's transients": tokens * c * (3 * d["I"] + 4 * d["H"] + d["QD"] + 2 * d["KD"]),
                        "merged and deepstack features": features, **prompt_kv},
            "cache copy": {**resident, **prompt_kv, "first decode caches": rollout.bucket(prompts) * (
                prompt_tokens + rows // prompts * rollout.FIRST_SLOTS) * kv_token},
            "decode": {**resident, "KV caches (largest, while they double)":
                       kv_cache_slots(prompts, rows // prompts, prompt_tokens, new_tokens) * kv_token,
                       "decode logits (fp32 logits, probabilities, cdf)": rollout.bucket(rows) * d["V"] * 4 * 3}}


def update_phases(cfg, config, gpus):
    """One update micro-batch of cfg.micro_batch_seqs sequences of the longest prompt and cfg.max_new_tokens
    response tokens (a train_rl.Config) on one of `gpus` FSDP ranks, as three moments of its backward, each
    {term: bytes}: through the logits chunks (first), through one decoder layer, through one vision block (last).
    What the forward saved and the backward has not yet freed is in all three."""
    n, d, v = param_counts(config), text_dims(config), config.vision_config
    p, c, o = dtype_bytes(cfg)
    P, patches = longest_prompt(config, cfg)
    seqs, T = cfg.micro_batch_seqs, cfg.max_new_tokens
    prompts = min(seqs, math.ceil(seqs / cfg.group_size) + 1) if cfg.share_prompt else seqs  # prompts run
    tokens = prompts * P + seqs * T if cfg.share_prompt else seqs * (P + T)
    patch_count = prompts * patches
    layers, blocks = (1, 1) if cfg.grad_checkpointing else (d["L"], v.depth)  # layers' saved tensors at a time
    saved = {
        "weights (sharded)": n["total"] * p / gpus,
        "gradients (sharded)": n["total"] * p / gpus,
        "optimizer state (sharded)": n["total"] * o / gpus,
        "gathered weights (root + 2 layers)": (n["root"] + 2 * n["layer"]) * c if gpus > 1 else 0,
        "unsharded gradients (root + 2 layers)": (n["root"] * c + 2 * n["layer"] * (c + 4)) if gpus > 1 else 0,
        "step inputs (fp32 pixels of the rank's prompts)": (
            cfg.prompts_per_step // gpus * patches * 3 * v.temporal_patch_size * v.patch_size ** 2 * 4),
        "decoder layer inputs (checkpoints)": tokens * d["L"] * c * d["H"] if cfg.grad_checkpointing else 0,
        "decoder layers' saved tensors": 0 if cfg.grad_checkpointing else tokens * d["L"] * text_layer_bytes(config, c),
        "vision block inputs (checkpoints)": patch_count * v.depth * c * v.hidden_size if cfg.grad_checkpointing else 0,
        "vision blocks' saved tensors": 0 if cfg.grad_checkpointing else patch_count * v.depth * vision_block_bytes(config, c),
        "vision mergers (deepstack included)": patch_count * merger_bytes(config, c),
        "response hidden states": 2 * seqs * T * d["H"] * c,
    }
    if cfg.share_prompt:  # the prompt's KV cache repeated for every sequence, kept for the backward
        saved["repeated prompt KV cache"] = seqs * P * 2 * d["L"] * d["KD"] * c
    layer = tokens * (text_layer_bytes(config, c) if cfg.grad_checkpointing else 0)
    block = patch_count * (vision_block_bytes(config, c) if cfg.grad_checkpointing else 0)
    return {"backward through the logits": {**saved, "logits chunk": 3 * 4 * rollout.LOGITS_CHUNK * d["V"]},
            "backward through a decoder layer": {**saved, "the layer recomputed": layer,
                                                 "its gradients in flight (2 x intermediate)": tokens * 2 * c * d["I"]},
            "backward through a vision block": {**saved, "the block recomputed": block,
                                                "its gradients in flight (2 x intermediate)":
                                                    patch_count * 2 * c * v.intermediate_size}}


def rollout_phases(cfg, config, gpus):
    """A rollout's moments (generate_phases): one generate call of rollout_batch_prompts prompts x group_size
    responses, beside the sharded weights and optimizer state (gradients are freed) and, under FSDP, every weight
    gathered (rollout.gathered_params)."""
    n = param_counts(config)
    p, c, o = dtype_bytes(cfg)
    P, patches = longest_prompt(config, cfg)
    resident = {"weights (sharded)": n["total"] * p / gpus, "optimizer state (sharded)": n["total"] * o / gpus,
                "gathered weights (all)": n["total"] * c if gpus > 1 else 0}
    return generate_phases(config, c, cfg.rollout_batch_prompts, cfg.rollout_batch_prompts * cfg.group_size, P,
                           patches, cfg.max_new_tokens, resident)


def optimizer_terms(cfg, config, gpus):
    """The optimizer step: the sharded state and gradients, and fp32 temporaries of one parameter's shard (six for
    KahanAdamW's arithmetic; torch's AdamW on fp32 works in place: one)."""
    n = param_counts(config)
    p, c, o = dtype_bytes(cfg)
    with torch.device("meta"):
        largest = max(q.numel() for q in Qwen3VLForConditionalGeneration(config).parameters())
    return {"weights (sharded)": n["total"] * p / gpus, "gradients (sharded)": n["total"] * p / gpus,
            "optimizer state (sharded)": n["total"] * o / gpus,
            "step temporaries (fp32)": (6 if p == 2 else 1) * 4 * largest / gpus}


def eval_phases(cfg, config, media):
    """eval.py's prefill and decode terms on one GPU (no sharding: every rank holds the whole model) for its
    largest batch: with batch_tokens, eval.token_batches keeps every batch's kv_cache_slots within it, so the
    largest batch of the longest prompt has the most rows that fit; without, batch_size rows.
    Returns (rows, {phase: terms})."""
    n = param_counts(config)
    c = 2 if cfg.bf16 else 4
    P, patches = longest_prompt(config, media)
    rows = cfg.batch_size
    while cfg.batch_tokens and rows > 1 and kv_cache_slots(rows, 1, P, cfg.max_new_tokens) > cfg.batch_tokens:
        rows -= 1
    return rows, generate_phases(config, c, rows, rows, P, patches, cfg.max_new_tokens, {"weights": n["total"] * c})


def print_terms(title, terms):
    total = sum(terms.values())
    print(f"  {title}: {total / GiB:.1f} GiB")
    for name, value in terms.items():
        if value:
            print(f"    {name:<50} {value / GiB:7.2f} GiB")
    return total


def print_headroom(peak, gpu_gb):
    capacity = gpu_gb * 1e9
    print(f"  peak {peak / GiB:.1f} GiB of {capacity / GiB:.1f} GiB ({gpu_gb} GB): headroom {(capacity - peak) / GiB:.1f} "
          f"GiB ({1 - peak / capacity:.0%})" + ("" if peak < capacity else "  DOES NOT FIT"))


def print_rl_plan(cfg, gpus=8):
    """Print the per-GPU plan of a train_rl.Config for Qwen3-VL-8B on gpus x 80 GB and x 141 GB; returns the peak in
    bytes (the same on both)."""
    config = qwen3_vl_8b()
    n = param_counts(config)
    P, patches = longest_prompt(config, cfg)
    print(f"Qwen3-VL-8B on meta: {n['total'] / 1e9:.2f}B parameters ({n['vision'] / 1e9:.2f}B vision, "
          f"{n['root'] / 1e9:.2f}B in the root unit, {n['layer'] / 1e6:.0f}M per decoder layer)")
    print(f"per GPU, {gpus} GPUs; weights {cfg.param_dtype}, compute {'bf16' if dtype_bytes(cfg)[1] == 2 else 'fp32'}; "
          f"longest prompt {P} tokens ({patches} patches)")
    print(f"rollout: {cfg.rollout_batch_prompts} x {cfg.group_size} responses of up to {cfg.max_new_tokens} tokens "
          f"per generate call; update micro-batch: {cfg.micro_batch_seqs} sequences of {P}+{cfg.max_new_tokens} "
          f"tokens, {'checkpointed' if cfg.grad_checkpointing else 'no checkpointing'}")
    phases = {**{f"rollout, {name}": terms for name, terms in rollout_phases(cfg, config, gpus).items()},
              **{f"update, {name}": terms for name, terms in update_phases(cfg, config, gpus).items()},
              "optimizer step": optimizer_terms(cfg, config, gpus)}
    peak = max(print_terms(title, terms) for title, terms in phases.items())
    for gpu_gb in GPU_GB:
        print_headroom(peak, gpu_gb)
    return peak


def print_eval_plan(cfg, media):
    """Print the per-GPU plan of an eval.Config for Qwen3-VL-8B (media: its data.MediaConfig); returns the peak."""
    config = qwen3_vl_8b()
    P, patches = longest_prompt(config, media)
    rows, phases = eval_phases(cfg, config, media)
    print(f"eval, Qwen3-VL-8B in {'bf16' if cfg.bf16 else 'fp32'} on every GPU; longest prompt {P} tokens "
          f"({patches} patches), max_new_tokens {cfg.max_new_tokens}: the largest batch holds {rows} rows "
          f"(batch_size {cfg.batch_size}, batch_tokens {cfg.batch_tokens or 'none'})")
    peak = max(print_terms(name, terms) for name, terms in phases.items())
    for gpu_gb in GPU_GB:
        print_headroom(peak, gpu_gb)
    return peak
