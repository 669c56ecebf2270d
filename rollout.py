"""
Rollout: batched generation for image, video and text prompts with a KV cache, plus teacher-forced log-probs.

    out = generate(model, inputs, n=8, max_new_tokens=256, temperature=1.0, generator=g, eos_token_ids=[im_end])
    logp = token_logprobs(model, inputs, out["response_ids"], out["response_mask"], n=8)

How a rollout runs (one screen each below):
1. prefill: the left-padded prompt batch goes once through the HF forward (vision tower, deepstack, 3D rope
   positions computed here once); its KV cache is held once per prompt, for all n samples, and the generated
   tokens' in a second cache whose rows and length are powers of two, grown as decoding goes (generate's
   docstring has the rule).
2. decode: one token per step through our own decode step, which calls the model's own layers (norms,
   projections, MLP, rotary) on the cached keys/values. Rows that stop are ignored, and dropped from the batch
   and the cache once the rest fit half of it. compile=True runs the step through torch.compile (CUDA graphs on
   GPU: one graph replay per token for the forward instead of a kernel launch per operation). Equivalence with
   `model.generate`, eager and compiled, is tested in tests/test_rollout.py (on a GPU too, where there is one).
3. sampling: `sample` is a pure function of logits and a torch.Generator (temperature, top-k, top-p, or greedy
   at temperature 0); the compiled step takes its uniforms from outside (`sample_with`).

generate's log-probs are of the sampled tokens under the raw (temperature 1, unfiltered) distribution. The
update's come from `token_logprobs`, of the logits divided by the rollout's temperature (top-p/top-k not applied),
as the release's actor computes them; with the released recipe's temperature 1.0 and no top-p/top-k both are the
sampling distribution's.
`token_logprobs` never holds the logits of a whole micro-batch: the forward returns the final hidden states and
lm_head runs on LOGITS_CHUNK response tokens at a time, recomputed in backward (`sampled_logprobs`).

Under FSDP2 the prefill is an ordinary sharded forward and the decode loop runs with every parameter gathered
once (`gathered_params`): no collective per token. The same code runs in one process without FSDP.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

MEDIA = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))  # mm_token_type 1, 2
# response tokens per lm_head call in token_logprobs: at Qwen3-VL's 151,936-token vocabulary the backward of one
# chunk holds 3 fp32 [chunk, vocab] tensors, 0.87 GiB (memory.py; measured by `python bench.py memory`)
LOGITS_CHUNK = 512


# -----------------------------------------------------------------------------
# positions: Qwen3-VL's multimodal rope (t, h, w) for the prompt, plain text positions after it

def prompt_positions(model, inputs):
    """position_ids [4, B, P] as the HF forward takes them (text row, then t/h/w rows), and next_pos [3, B].

    Padding gets position 0. The response continues from the last prompt token's position + 1 on each axis (HF
    generate does the same); a chat prompt ends in text, where t = h = w = max position, as Qwen3-VL's
    rope_deltas assume. Passing these explicitly means the model's cached `rope_deltas` never matter.
    """
    mask = inputs["attention_mask"]
    text_pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, P]
    if any(inputs.get(grid) is not None for _, grid in MEDIA):
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError("rollout: inputs carry images/videos but no mm_token_type_ids (the processor returns "
                             "it; Qwen3-VL's 3D rope positions need it)")
        rope_pos, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)  # [3, B, P]
    else:
        rope_pos = text_pos.expand(3, -1, -1)  # [3, B, P]
    position_ids = torch.cat([text_pos[None], rope_pos], 0)  # [4, B, P]
    next_pos = rope_pos[:, :, -1] + 1  # [3, B]; left padding puts the last real token in the last column
    return position_ids, next_pos


def check_prompts(model, inputs, max_new_tokens):
    """Clear errors for what would otherwise generate silently wrong: empty, right-padded or too-long prompts."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape != mask.shape:
        raise ValueError(f"rollout: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be "
                         f"the same [B, P] with B >= 1")
    lengths = mask.sum(1).tolist()
    context = model.config.text_config.max_position_embeddings
    for row, length in enumerate(lengths):
        if length == 0:
            raise ValueError(f"rollout: row {row} has an empty prompt (attention_mask all 0)")
        if mask[row, -1] == 0 or mask[row, -length:].sum() != length:
            raise ValueError(f"rollout: row {row} is not left-padded (attention_mask {mask[row].tolist()[:8]}...); "
                             f"build generation batches with padding_side='left'")
        if length + max_new_tokens > context:
            raise ValueError(f"rollout: row {row}: prompt of {length} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the model context max_position_embeddings={context}")


# -----------------------------------------------------------------------------
# sampling

def sample(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Next tokens [A] from logits [A, V]. temperature 0 is greedy (argmax, no randomness).

    Inverse-CDF sampling: exactly one uniform per row, drawn in row order from `generator`. So a step consumes
    the generator identically whatever the logits are, and two runs with the same rows and seed draw the same
    tokens, however their prompts were prefilled.
    """
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(len(logits), 1, generator=generator, device=logits.device)  # [A, 1]
    return sample_with(logits, u, temperature, top_p, top_k)


def sample_with(logits, u, temperature, top_p, top_k):
    """`sample` given its uniforms u [A, 1] in [0, 1): the part the compiled decode step runs (it cannot draw
    from a torch.Generator). top-k, then top-p on the renormalised top-k mass."""
    probs = torch.softmax(logits.float() / temperature, -1)  # [A, V]
    order = None
    if top_k > 0 or top_p < 1.0:  # sort only when filtering: a sort costs more than the rest of this on CPU
        probs, order = probs.sort(-1, descending=True)  # [A, V]
        if top_k > 0:
            probs[:, top_k:] = 0
        if top_p < 1.0:
            mass_before = (probs.cumsum(-1) - probs) / probs.sum(-1, keepdim=True)  # [A, V]
            probs = probs.masked_fill(mass_before >= top_p, 0)  # the smallest prefix holding top_p of the mass
    cdf = probs.cumsum(-1)  # [A, V]
    total = cdf[:, -1:].contiguous()  # [A, 1]
    index = torch.searchsorted(cdf, u * total, right=True)  # [A, 1] first token whose cdf exceeds u * total: never a
    # 0-probability one, except past the end when u * total rounds up to the total; then the first token whose cdf
    # reaches the total (a positive one: it raised the cdf there)
    index = torch.minimum(index, torch.searchsorted(cdf, total))
    return (index if order is None else order.gather(-1, index)).squeeze(-1)  # [A]


def no_media_tokens(model, logits):
    """Logits [..., V] with the image/video placeholder tokens at -inf.

    A response holding <|image_pad|> or <|video_pad|> cannot be fed back: the forward counts every such token as
    a media slot and fails on the update pass. A trained model never samples them, a random one does; the policy
    is defined over the other tokens, here and in token_logprobs alike (HF generate: suppress_tokens).
    """
    banned = [model.config.image_token_id, model.config.video_token_id]
    return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


# -----------------------------------------------------------------------------
# FSDP2: one all-gather per rollout phase

@contextlib.contextmanager
def gathered_params(model):
    """Unshard every FSDP2 module once, reshard on exit; a no-op without FSDP.

    The decode loop runs inside this: its steps call the layers' submodules directly, so no FSDP hook fires and
    no collective runs per token (ranks may even decode different numbers of steps). Without it FSDP2 would
    all-gather every block for every generated token. The prefill before it is an ordinary FSDP forward.
    Memory while gathered, Qwen3-VL-8B (8.8B params) on 8 x 80 GB GPUs: the full bf16 weights, 17.5 GB per GPU
    (2.2 GB sharded), next to the sharded training state (fp32 params 4.4 GB + AdamW moments 8.8 GB; grads are
    freed before a rollout) and the KV cache: 36 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 147 KB
    per token: the prompt's once per prompt, the generated tokens' per row; 4 prompts of 4.6k tokens x 8 samples
    of up to 4k tokens = 29.5 GiB at the worst (memory.kv_cache_slots; generate's growth rule: it grows that large
    only when rows run that long). Size rollout batches with `train_rl.py --plan=true`.
    """
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()


# -----------------------------------------------------------------------------
# decode step: one token per row against a cache of bucketed shape

def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def per_group(x, G):
    """[A, Hkv, Q, ...] (each row's) -> [G, Hkv, m*Q, ...] (a group's m rows side by side), A = G * m."""
    return x.unflatten(0, (G, -1)).transpose(1, 2).flatten(2, 3)


def per_row(x, Q):
    """per_group's inverse: [G, Hkv, m*Q, ...] -> [A, Hkv, Q, ...]."""
    return x.unflatten(2, (-1, Q)).transpose(1, 2).flatten(0, 1)


def decode_step(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length):
    """Logits [A, V] for one new token per row. The A rows are G groups of m rows (A = G * m) that share a prompt:
    the n samples of one prompt, or those of them still decoding. tokens [A], positions [3, A] their rope
    positions; prompt_cache a list of (keys, values) per layer, each [G, kv_heads, P, head_dim], one copy per group,
    prompt_mask [G, P] bool (False on left padding); cache the generated tokens' (keys, values) per layer, each
    [A, kv_heads, S, head_dim], this token's K/V written at `slot` (a [1] long tensor: the decode step t).

    The same layers as the HF forward, called part by part: skips the mask building, output capturing and
    cache bookkeeping that dominate a one-token forward on small batches. Deepstack adds vision features at
    vision positions only, so decode (text tokens) has none. Attention reads the prompt once per group: the
    queries of a group's m rows go through one product with its prompt keys (a matrix product, where a copy of the
    prompt per row made it m products of one query; the prompt is most of what a step reads, so this divides the
    step's cache reads by up to m), and each row's own generated keys after it, under one softmax. It reads the
    first `length` generated slots: the eager loop passes those written so far, the compiled step the whole bucket
    S, so that with the slot a tensor every shape is fixed by (G, m, S) and CUDA graphs replay one graph per
    bucket (`compiled_step`). It is written out (matmuls and a masked softmax, fp32) for one query per row, where
    SDPA would need its [A, Hq, 1, S] mask.
    """
    lm = model.model.language_model
    G, P = prompt_mask.shape
    h = lm.embed_tokens(tokens)[:, None]  # [A, 1, H]
    cos, sin = lm.rotary_emb(h, positions[:, :, None])  # [A, 1, D] each
    cos, sin = cos[:, None], sin[:, None]  # [A, 1, 1, D] broadcast over heads
    written = torch.arange(length, device=tokens.device) <= slot  # [length]
    for layer, (prompt_keys, prompt_values), (keys, values) in zip(lm.layers, prompt_cache, cache):
        attn = layer.self_attn
        x = layer.input_layernorm(h)  # [A, 1, H]
        q = attn.q_norm(attn.q_proj(x).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)  # [A, Hq, 1, D]
        k = attn.k_norm(attn.k_proj(x).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)  # [A, Hkv, 1, D]
        v = attn.v_proj(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)  # [A, Hkv, 1, D]
        keys.index_copy_(2, slot, rotate(k, cos, sin))  # in place on the whole tensor: inductor keeps it so
        values.index_copy_(2, slot, v)
        q = rotate(q, cos, sin).unflatten(1, (keys.shape[1], -1)).squeeze(3)  # [A, Hkv, Q, D], Q = Hq / Hkv
        Q = q.shape[2]
        on_prompt = (per_group(q, G) @ prompt_keys.transpose(2, 3)).masked_fill(~prompt_mask[:, None, None],
                                                                               float("-inf"))  # [G, Hkv, m*Q, P]
        on_new = (q @ keys[:, :, :length].transpose(2, 3)).masked_fill(~written, float("-inf"))  # [A, Hkv, Q, length]
        scores = torch.cat([on_prompt, per_group(on_new, G)], -1)  # [G, Hkv, m*Q, P + length]
        scores = (scores * attn.scaling).float().softmax(-1)
        y = per_row(scores[..., :P].to(prompt_values.dtype) @ prompt_values, Q)  # [A, Hkv, Q, D]
        y = y + per_row(scores[..., P:], Q).to(values.dtype) @ values[:, :, :length]  # [A, Hkv, Q, D]
        h = h + attn.o_proj(y.flatten(1))[:, None]  # [A, 1, H]
        h = h + layer.mlp(layer.post_attention_layernorm(h))  # [A, 1, H]
    return model.lm_head(lm.norm(h))[:, 0].float()  # [A, V]


def decode_logits(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length):
    """decode_step's logits [A, V] with the media tokens excluded: what a GPU's compiled step captures."""
    return no_media_tokens(model, decode_step(model, tokens, positions, prompt_cache, prompt_mask, cache, slot,
                                                   length))


def pick(logits, u, temperature, top_p, top_k):
    """The next tokens [A] from logits [A, V] (greedy when u is None, else `sample_with`) and their raw log-probs
    [A] (temperature 1, unfiltered)."""
    new = logits.argmax(-1) if u is None else sample_with(logits, u, temperature, top_p, top_k)  # [A]
    return new, logits.gather(-1, new[:, None]).squeeze(-1) - logits.logsumexp(-1)


def decode_and_sample(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length, u, temperature,
                      top_p, top_k):
    """One decode step and its sampling: the eager step, and what the CPU's compiled step compiles."""
    return pick(decode_logits(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length), u,
                temperature, top_p, top_k)


@functools.cache
def compiled_step(device_type):
    """The decode step under torch.compile. dynamic=True: one compilation serves every (groups, rows per group, cache
    length) bucket, and one more each where there is a single group, a single row per group, or both (torch
    specializes sizes of 1): at most four a process, each ~20 s on one CPU thread. Without duck sizing: torch gives
    sizes that are equal at the first call one symbol (16 groups, 16 generated slots) and compiles again when
    they part, which they do as the cache grows. No guards on the model's attributes: its parameters
    are graph inputs (their values flow in on every call), and checking the modules cost half of dynamo's per-call
    overhead (71 -> 31 us a step on CPU); a changed architecture needs a new process.
    On CPU all of decode_and_sample, in inductor's fused C++ loops. On GPU the logits only, replayed as CUDA graphs
    (the option triton.cudagraphs, which is what mode="reduce-overhead" sets: torch.compile takes one or the other),
    one graph per bucket, which is why the shapes are bucketed; `pick` runs eager after it (~10 kernels a step).
    Why: with Qwen3-VL-8B's 151,936-token vocabulary inductor failed to generate the sampler's cumsum on an H200
    (torch 2.11: the one long scan is split, SplitScan, and its Triton code raised). tests/test_rollout.py runs the
    GPU path on the tiny model (it passed on the H200 with the sampler inside the graph; this split has not run on a
    GPU yet), `bench.py rollout8b` at 8B (README, "What to expect from Qwen3-VL-8B")."""
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if device_type != "cuda":
        compiled = torch.compile(decode_and_sample, dynamic=True, options=options)
    else:
        logits_step = torch.compile(decode_logits, dynamic=True, options={**options, "triton.cudagraphs": True})

        def compiled(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length, u, temperature, top_p,
                     top_k):
            return pick(logits_step(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length), u,
                        temperature, top_p, top_k)

    def step(*args):
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args)
    return step


FIRST_SLOTS = 16  # the generated tokens' first cache length: fewer reallocations while it is short


def bucket(n):
    """The next power of two >= n: the row counts and cache lengths the decode loop takes."""
    return 1 << max(n - 1, 0).bit_length()


def regroup(prompt_cache, prompt_mask, cache, groups, keep, length, static):
    """The caches for a new layout of the batch: prompt groups `groups` (a [G'] index of the old groups; None: the
    same groups, no copy) and rows `keep` (a [A'] index of the old rows) of the generated tokens' cache, in a new
    one of `length` slots (zeros past what it held). static: mark the new tensors as fixed addresses for CUDA
    graphs (the generated ones are written in place inside the graph; the prompt's would be copied in each replay)."""
    if groups is not None:
        prompt_mask = prompt_mask[groups]
        prompt_cache = [(keys[groups], values[groups]) for keys, values in prompt_cache]  # [G', Hkv, P, D] each
    new_cache = []
    for keys, values in cache:
        pair = []
        for old in (keys, values):
            copy = min(length, old.shape[2])  # slots kept
            new = old.new_zeros(len(keep), old.shape[1], length, old.shape[3])  # [A', Hkv, S', D]
            new[:, :, :copy] = old[keep, :, :copy]
            pair.append(new)
        new_cache.append(tuple(pair))
    if static:
        for tensor in [t for pair in (prompt_cache if groups is not None else []) + new_cache for t in pair]:
            torch._dynamo.mark_static_address(tensor)
    return prompt_cache, prompt_mask, new_cache


def first_caches(past_key_values, attention_mask, source, m, static):
    """The decode caches after the prefill: HF's prompt cache ([B, Hkv, P, D] per layer) for the groups `source`
    (a [G] index of the prompts), its left padding zeroed, and the generated tokens' cache of G * m rows and
    FIRST_SLOTS empty slots (`regroup` builds both)."""
    hf_cache = [(layer.keys, layer.values) for layer in past_key_values.layers]
    no_slots = [(keys[:, :, :0], values[:, :, :0]) for keys, values in hf_cache]  # nothing generated yet
    prompt_cache, prompt_mask, cache = regroup(hf_cache, attention_mask.bool(), no_slots, source,
                                               source.repeat_interleave(m), FIRST_SLOTS, static)
    # padded prompt slots are never attended, but zero them so no stray NaN/inf there can leak in as 0 * x
    for keys, values in prompt_cache:
        keys.masked_fill_(~prompt_mask[:, None, :, None], 0)
        values.masked_fill_(~prompt_mask[:, None, :, None], 0)
    return prompt_cache, prompt_mask, cache


# -----------------------------------------------------------------------------
# generate

@torch.no_grad()
def generate(model, inputs, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, generator=None,
             eos_token_ids, compile=False):
    """n samples for each of the B left-padded prompts in `inputs` (the HF forward's dict of tensors).

    Returns response_ids [B*n, T] (T = longest response; padded with eos_token_ids[0] after a row's end),
    response_mask [B*n, T] (1 up to and including the stop token), finish_reasons ("stop": an EOS id was sampled,
    "length": max_new_tokens ran out; train_rl logs the truncated share) and logprobs [B*n, T] (raw log-probs of
    the sampled tokens, 0 on padding: the sampler's own view, which the tests hold equal to token_logprobs;
    train_rl recomputes old log-probs with the training forward, as released). Row i*n+j is sample j of prompt
    i. An empty eos_token_ids never stops early.
    `generator` (a torch.Generator on the model's device, or None for the global RNG) is used only for the
    uniforms of `sample`: one per unfinished row per step, in row order, so with the same seed
    generate(inputs, n=k) == generate(repeat_inputs(inputs, k), n=1) up to float rounding (the shared prompt's
    product sums in another order than k copies' products: where a uniform falls within ~1e-6 of a token's
    boundary, a sample can differ).
    compile=True runs each decode step through `compiled_step` (same tokens, log-probs equal within float
    rounding; tested); the first calls pay the compilation (`bench.py rollout` prints how long).

    KV cache layout and growth rule (memory.py models it). The batch is G = bucket(B) groups of m = n rows (group g
    the samples of prompt g; groups past B are padding). The prompt's keys and values are held once per group, not
    once per sample: [G, kv_heads, P, head_dim] per layer (P the padded prompt length), as the prefill computed
    them; the generated tokens' in a second cache, [A, kv_heads, S, head_dim] with A = G * m rows and S slots,
    S = max(FIRST_SLOTS, bucket(t + 2)) at decode step t (t + 1 slots written): the next power of two above what
    is needed so far, never B*n x max_new_tokens up front. One slot stays free so that attention over the written
    slots (all but CUDA graphs) is never a slice as long as the cache, which torch.compile would compile apart.
    The generated cache is reallocated when decoding reaches that free slot (S doubles; old and new both live
    during the copy: 1.5x the new size) or when the unfinished rows fit a layout of half the rows: G' = bucket(groups
    with an unfinished row) and m' = bucket(most unfinished rows in one group); then the finished rows are dropped,
    and the prompt cache is copied to the G' groups kept if there are fewer. Between reallocations finished rows
    stay in the batch and are computed and ignored (at most half the rows), which keeps every step's shapes fixed.
    With n = 1 each group is one row: the rows-only layout of a plain batched decode.
    """
    if n < 1 or max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"rollout: bad sampling arguments n={n} max_new_tokens={max_new_tokens} "
                         f"temperature={temperature} top_p={top_p} top_k={top_k}")
    check_prompts(model, inputs, max_new_tokens)
    B, P = inputs["input_ids"].shape
    Bn, device = B * n, inputs["input_ids"].device
    pad_id = eos_token_ids[0] if len(eos_token_ids) else 0
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    # one row more than the output: finished and padding rows of the batch write their tokens there
    response_ids = torch.full((Bn + 1, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [Bn+1, T]
    logprobs = torch.zeros(Bn + 1, max_new_tokens, device=device)  # [Bn+1, T]
    lengths = torch.full((Bn + 1,), max_new_tokens, dtype=torch.long, device=device)  # [Bn+1]
    stopped = torch.zeros(Bn + 1, dtype=torch.bool, device=device)  # [Bn+1] an EOS id was sampled
    if max_new_tokens == 0:
        return dict(response_ids=response_ids[:Bn], logprobs=logprobs[:Bn],
                    response_mask=response_ids[:Bn].clone().zero_(), finish_reasons=["length"] * Bn)

    # --- prefill: once per prompt; its cache is its group's prompt cache (a padding group holds a copy of the last)
    position_ids, next_pos = prompt_positions(model, inputs)  # [4, B, P], [3, B]
    out = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    step = compiled_step(device.type) if compile else decode_and_sample
    static = compile and device.type == "cuda"

    # --- decode: record, mark finished rows, reallocate the cache when due, one step for the rest
    # inference_mode (~6% faster than no_grad here) only inside: the returned tensors were allocated outside it,
    # so they stay ordinary tensors that autograd can save (token_logprobs gathers with response_ids)
    with gathered_params(model), torch.inference_mode():
        logits = no_media_tokens(model, out.logits[:, -1].float()).repeat_interleave(n, 0)  # [Bn, V]
        tokens = sample(logits, temperature, top_p, top_k, generator)  # [Bn]
        logp = logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [Bn]
        G, m = bucket(B), n  # groups of m rows: group g the samples of prompt g, groups past B padding
        A = G * m
        source = torch.arange(G, device=device).clamp(max=B - 1)  # [G] the prompt of each group
        prompt_cache, prompt_mask, cache = first_caches(out.past_key_values, inputs["attention_mask"], source, m,
                                                        static)
        del out
        positions = next_pos[:, source.repeat_interleave(m)]  # [3, A] of the token each row feeds next
        rows = torch.arange(A, device=device).clamp(max=Bn)  # [A] output row of each batch row; Bn: none (padding)
        tokens, logp = F.pad(tokens, (0, A - Bn), value=pad_id), F.pad(logp, (0, A - Bn))  # [A]
        slot = torch.zeros(1, dtype=torch.long, device=device)  # where the fed token's K/V go: step t
        live, live_groups, widest, S = Bn, B, n, FIRST_SLOTS
        for t in range(max_new_tokens):
            response_ids[rows, t] = tokens
            logprobs[rows, t] = logp
            stop = torch.isin(tokens, eos) & (rows < Bn)  # [A]
            if stop.any():  # the step's one host sync
                lengths[rows[stop]] = t + 1
                stopped[rows[stop]] = True
                rows = rows.masked_fill(stop, Bn)
                per_group = (rows < Bn).view(G, m).sum(1).tolist()  # unfinished rows of each group
                live, live_groups, widest = sum(per_group), sum(c > 0 for c in per_group), max(per_group)
            if t + 1 == max_new_tokens or live == 0:
                break
            G2, m2 = bucket(live_groups), min(bucket(widest), m)
            if G2 * m2 <= A // 2 or t + 1 >= S:  # the unfinished rows fit half the batch, or the free slot is reached
                unfinished = (rows < Bn).view(G, m)  # [G, m]
                within = torch.argsort((~unfinished).int(), dim=1, stable=True)[:, :m2]  # [G, m2] unfinished rows first
                groups = (torch.argsort((~unfinished.any(1)).int(), stable=True)[:G2] if G2 < G  # [G2] unfinished ones
                          else torch.arange(G, device=device))  # first; all in place if none leave (no prompt copy)
                keep = (groups[:, None] * m + within[groups]).flatten()  # [G2 * m2] in order: prompt, then sample
                prompt_cache, prompt_mask, cache = regroup(prompt_cache, prompt_mask, cache, groups if G2 < G else None,
                                                           keep, max(S, bucket(t + 2)), static)
                tokens, positions, rows = tokens[keep], positions[:, keep], rows[keep]
                G, m, A, S = G2, m2, G2 * m2, cache[0][0].shape[2]
            u = None
            if temperature > 0:  # one uniform per unfinished row, in row order (finished ones get 0)
                u = torch.rand(live, 1, generator=generator, device=device)  # [live, 1]
                if live < A:
                    u = torch.zeros(A, 1, device=device).index_copy_(0, (rows < Bn).nonzero()[:, 0], u)  # [A, 1]
            if static:
                torch.compiler.cudagraph_mark_step_begin()
            length = S if static else max(t + 1, 2)  # CUDA graphs: the whole bucket (fixed shapes); else the written
            # slots, at least 2 (the unwritten one masked): torch.compile would compile a length of 1 apart
            # (on GPU the graph's logits buffer is overwritten by the next replay: `pick` has used it by then)
            tokens, logp = step(model, tokens, positions, prompt_cache, prompt_mask, cache, slot, length, u,
                                temperature, top_p, top_k)
            positions, slot = positions + 1, slot + 1

    T = int(lengths[:Bn].max())
    response_mask = torch.arange(T, device=device)[None] < lengths[:Bn, None]  # [Bn, T]
    return dict(response_ids=response_ids[:Bn, :T], logprobs=logprobs[:Bn, :T], response_mask=response_mask.long(),
                finish_reasons=["stop" if s else "length" for s in stopped[:Bn].tolist()])


# -----------------------------------------------------------------------------
# teacher-forced log-probs for the update pass

def media_per_row(mm_token_type_ids, modality, grid_thw):
    """Which images (modality 1) or videos (2) of the batch belong to each row: [[item indices of row 0], ...].

    Items are in row order; each takes prod(grid) / merge^2 placeholder tokens, and merge^2 is the batch's
    patch count over its placeholder count, so no config is needed.
    """
    tokens_per_row = (mm_token_type_ids == modality).sum(1).tolist()
    patches = grid_thw.prod(-1)  # [items]
    merge2 = int(patches.sum()) // max(sum(tokens_per_row), 1)
    tokens_per_item = (patches // max(merge2, 1)).tolist()
    items, next_item = [], 0
    for row, count in enumerate(tokens_per_row):
        mine = []
        while count > 0 and next_item < len(tokens_per_item):
            count -= tokens_per_item[next_item]
            mine.append(next_item)
            next_item += 1
        if count != 0:
            raise ValueError(f"rollout: row {row}: its media tokens do not match the grids {grid_thw.tolist()}")
        items.append(mine)
    if next_item != len(tokens_per_item):
        raise ValueError(f"rollout: {len(tokens_per_item) - next_item} grids in {grid_thw.tolist()} have no tokens")
    return items


def repeats(n, B, device=None):
    """Responses per prompt, LongTensor [B]: n is one count for all B prompts, or a list of B counts (a
    micro-batch counted in sequences may hold part of a prompt's group: train_rl.build_mini_batches)."""
    counts = torch.as_tensor([n] * B if isinstance(n, int) else list(n), dtype=torch.long, device=device)  # [B]
    if counts.shape != (B,) or bool((counts < 1).any()):
        raise ValueError(f"rollout: n={n}: expected a count >= 1 or one per prompt for {B} prompts")
    return counts


def repeat_inputs(inputs, n):
    """The inputs for the rows of n responses per prompt (n: a count or one per prompt; rows of prompt i are
    consecutive): token tensors and each row's images/videos repeated."""
    counts = repeats(n, inputs["input_ids"].shape[0], inputs["input_ids"].device)  # [B]
    out = {k: v.repeat_interleave(counts, 0) for k, v in inputs.items() if v is not None and k not in
           ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    for modality, (pixels_key, grid_key) in enumerate(MEDIA, start=1):
        grid = inputs.get(grid_key)
        if grid is None:
            continue
        pixels = inputs[pixels_key].split(grid.prod(-1).tolist())  # one [patches, C*t*p*p] block per item
        order = [item for row, count in zip(media_per_row(inputs["mm_token_type_ids"], modality, grid),
                                            counts.tolist()) for _ in range(count) for item in row]
        out[pixels_key] = torch.cat([pixels[i] for i in order])  # [patches of the repeated rows, C*t*p*p]
        out[grid_key] = grid[order]  # [items of the repeated rows, 3]
    return out


@contextlib.contextmanager
def hidden_states_as_logits(model):
    """Inside, model(...).logits holds the final hidden states [B, kept positions, H] (after the last norm, at
    the logits_to_keep positions) instead of logits, and lm_head computes nothing.

    The call stays the model's own forward, so under FSDP2 its hooks run as usual (all-gathers, the backward hook
    on the output); sampled_logprobs then applies lm_head chunk by chunk, with the root unit's parameters still
    gathered (common.shard_model keeps them after forward).
    """
    hidden = []

    def take(module, args):  # before lm_head: keep its input, hand it no positions
        hidden.append(args[0])
        return (args[0][:, :0],)  # [B, 0, H]

    def give(module, args, output):  # after lm_head: return the kept input as its output
        return hidden.pop()

    handles = [model.lm_head.register_forward_pre_hook(take), model.lm_head.register_forward_hook(give)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_logprobs(model, inputs, response_ids, response_mask, n=1, share_prompt=False, temperature=1.0):
    """Teacher-forced log-probs [R, T] of response_ids [R, T] after their prompts (0 where response_mask is 0),
    under the logits divided by `temperature`: the rollout's, as generate takes it (train_rl, as the release's actor
    does; 0, greedy, has no sampling distribution: the raw logits').

    inputs: the B prompts as generate takes them; n: responses per prompt, one count or one per prompt (R = their
    sum); the rows of prompt i follow those of prompt i-1 (row i*n+j answers prompt i when n is a count).
    Differentiable. One forward over prompt + response with the same positions as generate, returning the final
    hidden states of the response positions; sampled_logprobs turns them into log-probs without ever holding
    [R, T, vocab] logits.
    The vision tower runs on all R rows (repeat_inputs), n times per prompt: running it once per prompt needs
    calls outside the one forward (get_image_features), and under FSDP2 ranks with different media mixes then
    run different numbers of root forwards and hang in backward. For an 8B model the vision tower is ~0.6B
    parameters, so this costs a fraction of the LLM's work on the same R rows.
    share_prompt=True: the same log-probs from each prompt once (shared_prompt_logprobs).
    """
    if share_prompt:
        return shared_prompt_logprobs(model, inputs, response_ids, response_mask, n, temperature)
    T = response_ids.shape[1]
    counts = repeats(n, inputs["input_ids"].shape[0], response_ids.device)  # [B]
    position_ids, next_pos = prompt_positions(model, inputs)  # [4, B, P], [3, B]
    prompt_mask = inputs["attention_mask"].repeat_interleave(counts, 0)  # [R, P]
    full = repeat_inputs(inputs, counts)
    full["input_ids"] = torch.cat([full["input_ids"], response_ids], 1)  # [R, P+T]
    full["attention_mask"] = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], 1)  # [R, P+T]
    if full.get("mm_token_type_ids") is not None:  # responses are text (type 0)
        full["mm_token_type_ids"] = F.pad(full["mm_token_type_ids"], (0, T))
    response_pos = response_positions(prompt_mask, next_pos, counts, T)  # [4, R, T]
    position_ids = torch.cat([position_ids.repeat_interleave(counts, 1), response_pos], 2)  # [4, R, P+T]
    with hidden_states_as_logits(model):
        hidden = model(**full, position_ids=position_ids, logits_to_keep=T + 1).logits  # [R, T+1, H]
    # position P-1+t predicts token t
    return sampled_logprobs(model, hidden[:, :-1], response_ids, response_mask, temperature)


def response_positions(prompt_mask, next_pos, n, T):
    """position_ids [4, R, T] of T response tokens after their prompts (prompt_mask [R, P], next_pos [3, B], n
    responses per prompt: a count or one per prompt): the text row continues the prompt's count, the t/h/w rows
    continue from next_pos, as generate decodes."""
    steps = torch.arange(T, device=prompt_mask.device)  # [T]
    counts = repeats(n, next_pos.shape[1], next_pos.device)  # [B]
    return torch.cat([(prompt_mask.sum(1, keepdim=True) + steps)[None],
                      next_pos.repeat_interleave(counts, 1)[:, :, None] + steps])  # [4, R, T]


def chunk_logprobs(model, hidden, token_ids, temperature):
    """log p of token_ids [c] under lm_head(hidden [c, H]) / temperature, media tokens excluded: the [c, vocab]
    logits exist only inside this call. log_softmax + gather keeps 3 fp32 [c, vocab] tensors at the peak of its
    backward (logsumexp's backward keeps 4)."""
    logits = no_media_tokens(model, model.lm_head(hidden).float() / temperature)  # [c, V]
    return F.log_softmax(logits, -1).gather(-1, token_ids[:, None]).squeeze(-1)  # [c]


def sampled_logprobs(model, hidden, response_ids, response_mask, temperature=1.0):
    """log p of response_ids [R, T] from the final hidden states [R, T, H] that predict them (logits divided by
    temperature), 0 where the mask is 0.

    Only the response tokens (mask 1) go through lm_head, LOGITS_CHUNK at a time, each chunk checkpointed: its
    logits are computed in forward, dropped, and computed again in its backward. So the memory is that of one
    chunk's logits, whatever the micro-batch, where a full pass would hold [R, T, vocab] (and fp32 copies).
    Values and gradients equal the full pass (tests/test_rollout.py).
    """
    temperature = temperature or 1.0  # greedy rollouts: the raw logits' log-probs
    keep = response_mask.bool()  # [R, T]
    h, ids = hidden[keep], response_ids[keep]  # [N, H], [N]: the response tokens in row order
    chunks = [checkpoint(chunk_logprobs, model, h[i:i + LOGITS_CHUNK], ids[i:i + LOGITS_CHUNK], temperature,
                         use_reentrant=False) for i in range(0, len(ids), LOGITS_CHUNK)]
    logp = torch.cat(chunks) if chunks else h.new_zeros(0, dtype=torch.float32)  # [N]
    return torch.zeros(keep.shape, dtype=logp.dtype, device=logp.device).masked_scatter(keep, logp)  # [R, T]


def shared_prompt_logprobs(model, inputs, response_ids, response_mask, n, temperature=1.0):
    """token_logprobs with each prompt in the forward once: the B prompts (and their media) go through the model
    with a KV cache, the cache is repeated for each prompt's responses, and the R responses go through on top of
    it. Positions are those of token_logprobs, so the log-probs are the same (tested), from B*P + R*T tokens
    instead of R*(P + T), with the vision tower once per prompt; gradients reach the prompt through the repeated
    cache. Two forwards of the model per call (FSDP2 gathers the weights for each; tested on 2 ranks). Not with
    gradient checkpointing: HF's checkpointed layers drop the cache in training mode."""
    T = response_ids.shape[1]
    counts = repeats(n, inputs["input_ids"].shape[0], response_ids.device)  # [B]
    position_ids, next_pos = prompt_positions(model, inputs)  # [4, B, P], [3, B]
    with hidden_states_as_logits(model):
        prompt = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        cache = prompt.past_key_values
        if cache is None or cache.get_seq_length() != inputs["input_ids"].shape[1]:
            raise ValueError("share_prompt: the prompt forward kept no KV cache (gradient checkpointing drops it in "
                             "training mode); turn share_prompt or gradient checkpointing off")
        # [B, heads, P, d] -> [R, heads, P, d] per layer, differentiable. repeat_interleave, not indexing: the
        # backward of an index with repeats summed them in an order that varied between runs on CPU (caught by
        # tests/test_train_rl.py::test_resume_is_exact)
        cache.batch_repeat_interleave(counts)
        prompt_mask = inputs["attention_mask"].repeat_interleave(counts, 0)  # [R, P]
        attention_mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], 1)  # [R, P+T]
        out = model(input_ids=response_ids, attention_mask=attention_mask,
                    position_ids=response_positions(prompt_mask, next_pos, counts, T), past_key_values=cache,
                    use_cache=True)
    # token 0 is predicted at the prompt's last position, token t at response position t-1
    hidden = torch.cat([prompt.logits.repeat_interleave(counts, 0), out.logits[:, :-1]], 1)  # [R, T, H]
    return sampled_logprobs(model, hidden, response_ids, response_mask, temperature)
