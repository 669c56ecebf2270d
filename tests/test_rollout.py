"""rollout.py: greedy equals HF generate token for token, log-probs equal a teacher-forced pass, EOS and
compaction, shared-prefill n-sampling equals sampling repeated prompts, the sampler, bad inputs, and FSDP2 on
2 gloo ranks (sharded greedy == unsharded, no collective per decoded token)."""
import copy
import json
import os
import pathlib
import sys

import pytest
import torch
from conftest import TEST_MEDIA, torchrun

import data
import memory
import model as model_lib
import rollout

N_NEW = 16


def peaked_model(model_dir):
    """The tiny model with its text weights re-drawn at std 0.3. At the default init (0.02) a random model
    predicts the same token at every step, which would make token-for-token comparisons vacuous."""
    tiny_model, processor = model_lib.load_model(model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny_model.model.language_model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return tiny_model.eval(), processor


@pytest.fixture(scope="module")
def peaked(model_dir):
    return peaked_model(model_dir)


def mixed_batch(suite_dir, processor, which=(0, 2, 3)):
    """rl.json rows 0 (image), 2 (video), 3 (text only): three prompt lengths, left-padded."""
    rows = data.load_rows(str(suite_dir / "rl.json"))
    return data.collate([rows[i] for i in which], processor, TEST_MEDIA)


def hf_greedy(tiny_model, inputs, eos_token_ids, max_new_tokens=N_NEW):
    banned = [tiny_model.config.image_token_id, tiny_model.config.video_token_id]  # as rollout.no_media_tokens
    out = tiny_model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids,
                              pad_token_id=eos_token_ids[0], suppress_tokens=banned)
    return out[:, inputs["input_ids"].shape[1]:]


def im_end(processor):
    return processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


# -----------------------------------------------------------------------------
# exact: HF generate and a teacher-forced forward


def test_greedy_matches_hf_generate_mixed_batch(peaked, suite_dir):
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and "pixel_values" in inputs and "pixel_values_videos" in inputs
    out = rollout.generate(tiny_model, inputs, max_new_tokens=N_NEW, temperature=0, eos_token_ids=[im_end(processor)])
    reference = hf_greedy(tiny_model, inputs, [im_end(processor)])
    assert torch.equal(out["response_ids"], reference)
    # the comparison is not vacuous: no row repeats one token, and the batch holds many distinct ones
    assert all(len(set(row.tolist())) > 1 for row in reference) and len(set(reference.flatten().tolist())) > 8


@pytest.mark.parametrize("which", [(2,), (3,)])
def test_greedy_matches_hf_generate_batch_1(peaked, suite_dir, which):
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor, which)
    out = rollout.generate(tiny_model, inputs, max_new_tokens=N_NEW, temperature=0, eos_token_ids=[im_end(processor)])
    assert torch.equal(out["response_ids"], hf_greedy(tiny_model, inputs, [im_end(processor)]))


def test_logprobs_equal_teacher_forced_forward(peaked, suite_dir):
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    out = rollout.generate(tiny_model, inputs, n=2, max_new_tokens=N_NEW, temperature=1.0,
                           generator=torch.Generator().manual_seed(0), eos_token_ids=[im_end(processor)])
    forced = rollout.token_logprobs(tiny_model, inputs, out["response_ids"], out["response_mask"], n=2)
    assert forced.shape == out["logprobs"].shape == (6, N_NEW)
    assert torch.allclose(forced, out["logprobs"], atol=1e-4, rtol=0)
    assert (out["logprobs"][out["response_mask"] == 1] < 0).all()
    # n shared by the prompt's rows == the prompts repeated, n = 1
    repeated = rollout.token_logprobs(tiny_model, rollout.repeat_inputs(inputs, 2), out["response_ids"],
                                      out["response_mask"])
    assert torch.allclose(forced, repeated, atol=1e-5, rtol=0)
    forced.sum().backward()  # differentiable, into the vision tower too: the update pass uses it
    assert tiny_model.lm_head.weight.grad is not None
    assert tiny_model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_shared_prompt_logprobs_equal_repeated_prompts(peaked, suite_dir):
    """share_prompt (each prompt once, its KV cache repeated for the n responses) == the prompt repeated n times:
    log-probs and gradients, for image, video and text prompts of three lengths and right-padded
    responses of nine lengths."""
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    out = rollout.generate(tiny_model, inputs, n=3, max_new_tokens=N_NEW, temperature=1.0,
                           generator=torch.Generator().manual_seed(1), eos_token_ids=[im_end(processor)])
    lengths = torch.tensor([16, 3, 9, 1, 12, 16, 7, 14, 5])  # [Bn]
    mask = (torch.arange(N_NEW)[None] < lengths[:, None]).long()  # [Bn, T]
    ids = out["response_ids"].masked_fill(mask == 0, processor.tokenizer.pad_token_id)  # [Bn, T]
    grads = []
    for share in (False, True):
        logp = rollout.token_logprobs(tiny_model, inputs, ids, mask, n=3, share_prompt=share)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        grads.append({name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None})
        tiny_model.zero_grad(set_to_none=True)
        if share:
            torch.testing.assert_close(logp, repeated, rtol=0, atol=1e-5)
        repeated = logp.detach()
    assert grads[0].keys() == grads[1].keys() and "model.visual.patch_embed.proj.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-4,  # fp32 sums, reordered
                                   msg=lambda m: f"{name}: {m}")
    tiny_model.gradient_checkpointing_enable()  # its layers drop the KV cache in training mode: refused, not wrong
    tiny_model.train()
    try:
        with pytest.raises(ValueError, match="kept no KV cache"):
            rollout.token_logprobs(tiny_model, inputs, ids, mask, n=3, share_prompt=True)
    finally:
        tiny_model.gradient_checkpointing_disable()
        tiny_model.eval()


def full_logits_logprobs(model, inputs, ids, mask, n, temperature=1.0):
    """The pass token_logprobs replaced: one forward returning [R, T+1, vocab] logits, divided by the temperature
    (as the release's actor divides them in place), an fp32 log-softmax over all of them."""
    T = ids.shape[1]
    counts = rollout.repeats(n, len(inputs["input_ids"]))
    position_ids, next_pos = rollout.prompt_positions(model, inputs)
    full = rollout.repeat_inputs(inputs, n)
    prompt_mask = full["attention_mask"]
    full["input_ids"] = torch.cat([full["input_ids"], ids], 1)
    full["attention_mask"] = torch.cat([prompt_mask, mask], 1)
    full["mm_token_type_ids"] = torch.nn.functional.pad(full["mm_token_type_ids"], (0, T))
    position_ids = torch.cat([position_ids.repeat_interleave(counts, 1),
                              rollout.response_positions(prompt_mask, next_pos, n, T)], 2)
    logits = model(**full, position_ids=position_ids, logits_to_keep=T + 1).logits[:, :-1].float()  # [R, T, V]
    logp = torch.log_softmax(rollout.no_media_tokens(model, logits.div(temperature)), -1)
    return logp.gather(-1, ids[..., None]).squeeze(-1) * mask


@pytest.mark.parametrize("share,temperature", [(False, 1.0), (True, 1.0), (False, 0.7), (True, 0.7)])
def test_chunked_logprobs_equal_full_logits(peaked, suite_dir, monkeypatch, share, temperature):
    """lm_head over 7 response tokens at a time, recomputed in backward == one pass over the full logits: values
    and gradients, with 3, 1 and 2 responses for the three prompts (a micro-batch cut inside groups); at
    temperature 0.7 the log-probs of the logits divided by it (the sampling distribution's)."""
    tiny_model, processor = peaked
    monkeypatch.setattr(rollout, "LOGITS_CHUNK", 7)
    inputs = mixed_batch(suite_dir, processor)
    counts = [3, 1, 2]
    gen = torch.Generator().manual_seed(2)
    banned = set(processor.tokenizer.all_special_ids) | {tiny_model.config.image_token_id,
                                                          tiny_model.config.video_token_id}
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in banned])
    ids = allowed[torch.randint(len(allowed), (6, 10), generator=gen)]  # [R, T] text tokens only
    mask = (torch.arange(10)[None] < torch.tensor([10, 4, 7, 1, 9, 6])[:, None]).long()  # [R, T] 47 tokens
    weights = torch.randn(6, 10, generator=gen)  # a loss that weighs every token differently
    results = []
    for fn in (lambda: full_logits_logprobs(tiny_model, inputs, ids, mask, counts, temperature),
               lambda: rollout.token_logprobs(tiny_model, inputs, ids, mask, counts, share, temperature)):
        logp = fn()
        (logp * weights).sum().backward()
        results.append((logp.detach(), {name: p.grad.clone() for name, p in tiny_model.named_parameters()
                                        if p.grad is not None}))
        tiny_model.zero_grad(set_to_none=True)
    (full, full_grads), (chunked, chunked_grads) = results
    # log-probs of random tokens reach -20 at temperature 0.7: fp32 rounding of ~1e-6 of them (seen: 1.2e-5 at -14)
    torch.testing.assert_close(chunked, full, rtol=2e-6, atol=1e-5)
    assert (chunked[mask == 0] == 0).all() and (chunked[mask == 1] < 0).all()
    assert full_grads.keys() == chunked_grads.keys()
    assert "model.language_model.embed_tokens.weight" in full_grads  # lm_head (tied to the embeddings)
    for name in full_grads:
        # float sums in another order: errors scale with the tensor's largest entries, not with each element (seen
        # on an AMD EPYC: 1.8e-5 on an entry of 0.008 of a gradient whose largest is 61; at most 2.3e-6 of the
        # largest over all tensors). A wrong gradient (a chunk lost or counted twice) is off by that largest's order
        scale = full_grads[name].abs().max().clamp(min=1).item()
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-3, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


def test_repeat_inputs_equals_collating_repeated_rows(tiny, suite_dir):
    _, processor = tiny
    rows = data.load_rows(str(suite_dir / "rl.json"))
    which = (0, 2, 3, 1)  # image, video, text, image
    repeated = rollout.repeat_inputs(data.collate([rows[i] for i in which], processor, TEST_MEDIA), 2)
    expected = data.collate([rows[i] for i in which for _ in range(2)], processor, TEST_MEDIA)
    assert repeated.keys() == expected.keys()
    assert all(torch.equal(repeated[k], expected[k]) for k in expected)


# -----------------------------------------------------------------------------
# EOS, compaction, n samples


def test_eos_stops_each_row_and_later_rows_continue_unchanged(peaked, suite_dir):
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    free = rollout.generate(tiny_model, inputs, max_new_tokens=N_NEW, temperature=0, eos_token_ids=[])["response_ids"]
    assert free.shape == (3, N_NEW)
    # two stop ids taken from the free run, so rows stop at different steps (or never)
    stop_ids = [free[0, 2].item(), free[1, 5].item()]
    out = rollout.generate(tiny_model, inputs, max_new_tokens=N_NEW, temperature=0, eos_token_ids=stop_ids)
    lengths, reasons = [], []
    for row in free.tolist():
        hits = [t for t, token in enumerate(row) if token in stop_ids]
        lengths.append(hits[0] + 1 if hits else N_NEW)
        reasons.append("stop" if hits else "length")
    assert min(lengths) < max(lengths)
    assert out["response_mask"].sum(1).tolist() == lengths and out["finish_reasons"] == reasons
    assert out["response_ids"].shape == (3, max(lengths))
    for i, length in enumerate(lengths):
        assert torch.equal(out["response_ids"][i, :length], free[i, :length])  # compaction kept the others exact
        assert (out["response_ids"][i, length:] == stop_ids[0]).all()  # padded with the first EOS id
        assert (out["logprobs"][i, length:] == 0).all()
    reference = hf_greedy(tiny_model, inputs, stop_ids)
    assert torch.equal(reference[out["response_mask"] == 1], out["response_ids"][out["response_mask"] == 1])


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20)])
def test_shared_prefill_equals_sampling_repeated_prompts(peaked, suite_dir, temperature, top_p, top_k):
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    stop = [im_end(processor), processor.tokenizer.convert_tokens_to_ids("</answer>")]
    kwargs = dict(max_new_tokens=N_NEW, temperature=temperature, top_p=top_p, top_k=top_k, eos_token_ids=stop)
    shared = rollout.generate(tiny_model, inputs, n=3, generator=torch.Generator().manual_seed(7), **kwargs)
    repeated = rollout.generate(tiny_model, rollout.repeat_inputs(inputs, 3), n=1,
                                generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(shared["response_ids"], repeated["response_ids"])
    assert torch.allclose(shared["logprobs"], repeated["logprobs"], atol=1e-5)
    assert shared["finish_reasons"] == repeated["finish_reasons"]
    samples = shared["response_ids"].view(3, 3, -1)  # [prompt, sample, T]
    assert all(not torch.equal(samples[i, 0], samples[i, 1]) for i in range(3))  # the n samples differ


# -----------------------------------------------------------------------------
# the KV cache grown in buckets, and the compiled decode step


def record_resizes(monkeypatch):
    """Every cache layout rollout.generate allocates, as (prompt groups, rows, generated slots)."""
    sizes, regroup = [], rollout.regroup

    def recording(prompt_cache, prompt_mask, cache, groups, keep, length, static):
        out = regroup(prompt_cache, prompt_mask, cache, groups, keep, length, static)
        sizes.append((out[1].shape[0], len(keep), length))
        return out
    monkeypatch.setattr(rollout, "regroup", recording)
    return sizes


def test_cache_grows_with_what_is_generated(peaked, suite_dir, monkeypatch):
    """max_new_tokens=600, rows stopping after at most 30 tokens: the generated tokens' cache never holds 600 slots,
    only the next power of two of the longest response so far; the prompt is held once per group of n samples, and
    finished rows leave the batch (then groups with none left); the tokens are those of a run that never stops
    (compaction and growth keep every row exact)."""
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    free = rollout.generate(tiny_model, inputs, n=2, max_new_tokens=30, temperature=0, eos_token_ids=[])
    stop_ids = free["response_ids"][[0, 2, 4], [5, 17, 29]].tolist()  # rows stop by steps 6, 18, 30 at the latest
    sizes = record_resizes(monkeypatch)
    out = rollout.generate(tiny_model, inputs, n=2, max_new_tokens=600, temperature=0, eos_token_ids=stop_ids)
    lengths = out["response_mask"].sum(1)
    assert lengths.max() <= 30 and lengths.min() < lengths.max()
    for i, length in enumerate(lengths.tolist()):
        assert torch.equal(out["response_ids"][i, :length], free["response_ids"][i, :length])
    assert sizes[0] == (4, 8, rollout.FIRST_SLOTS)  # 3 prompts in 4 groups of their 2 samples
    assert all(groups & (groups - 1) == 0 and slots & (slots - 1) == 0 for groups, _, slots in sizes)  # powers of 2
    assert max(slots for *_, slots in sizes) == max(rollout.FIRST_SLOTS, rollout.bucket(int(lengths.max())))
    for before, after in zip(sizes, sizes[1:]):  # rows and groups only leave
        assert after[0] <= before[0] and after[1] <= before[1]
    assert sizes[-1][1] < sizes[0][1]


@pytest.mark.parametrize("n", [1, 2])
def test_rows_keep_their_prompt_when_the_cache_grows_after_a_prompt_finished(peaked, suite_dir, n):
    """4 prompts (4 groups, no padding group); the first prompt's rows stop within a few tokens, the others run past
    the first generated bucket: the cache grows while a finished group sits before unfinished ones (3 of 4 groups
    left: no compaction). Every row's tokens are those of a run that never stops."""
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor, (0, 1, 2, 3))
    new_tokens = rollout.FIRST_SLOTS + 8
    free = rollout.generate(tiny_model, inputs, n=n, max_new_tokens=new_tokens, temperature=0, eos_token_ids=[])
    others = set(free["response_ids"][n:].flatten().tolist())
    stop_ids = [next(token for token in free["response_ids"][0, :6].tolist() if token not in others)]
    out = rollout.generate(tiny_model, inputs, n=n, max_new_tokens=new_tokens, temperature=0, eos_token_ids=stop_ids)
    lengths = out["response_mask"].sum(1).tolist()
    assert max(lengths[:n]) <= 6 and min(lengths[n:]) == new_tokens
    for i, length in enumerate(lengths):
        assert torch.equal(out["response_ids"][i, :length], free["response_ids"][i, :length])


def test_memory_plan_counts_the_caches_generate_holds(peaked, suite_dir, monkeypatch):
    """memory.kv_cache_slots (the plans of train_rl/eval --plan=true) equals the most slots generate's caches hold at
    once: the prompt per group, the generated slots per row, and the old generated cache during its copy."""
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    P = inputs["input_ids"].shape[1]
    for n, new_tokens in ((2, 40), (1, rollout.FIRST_SLOTS)):
        sizes = record_resizes(monkeypatch)
        rollout.generate(tiny_model, inputs, n=n, max_new_tokens=new_tokens, temperature=0, eos_token_ids=[])
        held = [groups * P + rows * slots + (before[1] * before[2] if before else 0)
                for before, (groups, rows, slots) in zip([None] + sizes, sizes)]
        assert max(held) == memory.kv_cache_slots(3, n, P, new_tokens)


def test_decode_step_shares_the_prompt_and_reads_only_written_slots(peaked, suite_dir):
    """One decode step, three ways, on a cache with left padding and garbage in the generated slots past the
    token: the prompt held once for 2 samples each (groups of 2 rows) and attended over the whole generated bucket
    (the CUDA-graph step's fixed shapes), the same over the written slots only, and the prompt copied to every row
    (groups of 1): the same logits and K/V written."""
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    with torch.no_grad():
        out = tiny_model(**inputs, position_ids=rollout.prompt_positions(tiny_model, inputs)[0], use_cache=True)
        garbage = torch.Generator().manual_seed(0)
        tokens, positions = torch.tensor([5, 6, 7, 8, 9, 10]), torch.full((3, 6), inputs["input_ids"].shape[1])
        logits, written = [], []
        for groups, m, length in ((torch.arange(3), 2, rollout.FIRST_SLOTS), (torch.arange(3), 2, 2),
                                  (torch.arange(3).repeat_interleave(2), 1, 2)):
            prompt_cache, prompt_mask, cache = rollout.first_caches(out.past_key_values, inputs["attention_mask"],
                                                                    groups, m, static=False)
            for keys, values in cache:
                keys.normal_(generator=garbage), values.normal_(generator=garbage)  # unwritten slots hold garbage
            logits.append(rollout.decode_step(tiny_model, tokens, positions, prompt_cache, prompt_mask, cache,
                                              torch.tensor([0]), length))
            written.append([(keys[:, :, 0], values[:, :, 0]) for keys, values in cache])
    for other in (1, 2):
        torch.testing.assert_close(logits[other], logits[0], rtol=0, atol=1e-4)  # float rounding: the grouped
        torch.testing.assert_close(written[other], written[0], rtol=0, atol=1e-5)  # product sums in another order


def test_compiled_step_builds_for_every_device():
    """torch.compile checks its arguments when called, not at the first step: the GPU setting (CUDA graphs) must
    build on a machine without a GPU too (it raised there before: a mode and options together)."""
    for device_type in ("cpu", "cuda"):
        assert callable(rollout.compiled_step(device_type))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the CUDA-graph path runs where one is"))])
def test_compiled_decode_equals_eager_and_hf(peaked, suite_dir, monkeypatch, device):
    """compile=True: greedy tokens equal to eager and to HF generate (rows stopping at different steps, the cache
    growing past its first bucket); sampling with the same seed draws the same tokens, log-probs within float
    rounding; then other shapes run without compiling again (dynamic shapes; error_on_recompile). On a GPU the
    compiled step replays CUDA graphs over whole cache buckets (generate's static path)."""
    tiny_model, processor = peaked
    inputs = mixed_batch(suite_dir, processor)
    if device != "cpu":
        tiny_model, inputs = copy.deepcopy(tiny_model).to(device), {k: v.to(device) for k, v in inputs.items()}
    P = inputs["input_ids"].shape[1]
    new_tokens = rollout.FIRST_SLOTS + 8  # crosses the first cache bucket
    free = rollout.generate(tiny_model, inputs, max_new_tokens=new_tokens, temperature=0, eos_token_ids=[])
    never = set(free["response_ids"][2].tolist())  # row 2 runs to the end, rows 0 and 1 stop early
    stop_ids = [next(token for token in free["response_ids"][row, step:].tolist() if token not in never)
                for row, step in ((0, 3), (1, 9))]
    sizes = record_resizes(monkeypatch)
    eager = rollout.generate(tiny_model, inputs, max_new_tokens=new_tokens, temperature=0, eos_token_ids=stop_ids)
    compiled = rollout.generate(tiny_model, inputs, max_new_tokens=new_tokens, temperature=0, eos_token_ids=stop_ids,
                                compile=True)
    assert torch.equal(compiled["response_ids"], eager["response_ids"])
    assert compiled["finish_reasons"] == eager["finish_reasons"]
    reference = hf_greedy(tiny_model, inputs, stop_ids, new_tokens)
    mask = eager["response_mask"] == 1
    assert torch.equal(reference[:, :mask.shape[1]][mask], compiled["response_ids"][mask])
    assert len({slots for *_, slots in sizes}) > 1 and len({rows for _, rows, _ in sizes}) > 1  # both changed
    torch.testing.assert_close(compiled["logprobs"], eager["logprobs"], rtol=0, atol=1e-4)
    kwargs = dict(max_new_tokens=N_NEW, temperature=0.8, top_p=0.95, eos_token_ids=[im_end(processor)])
    eager = rollout.generate(tiny_model, inputs, n=3, generator=torch.Generator(device).manual_seed(0), **kwargs)
    compiled = rollout.generate(tiny_model, inputs, n=3, generator=torch.Generator(device).manual_seed(0),
                                compile=True, **kwargs)
    assert torch.equal(compiled["response_ids"], eager["response_ids"])
    torch.testing.assert_close(compiled["logprobs"], eager["logprobs"], rtol=0, atol=1e-4)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # other rows, prompt length, buckets
    other = {k: v.to(device) for k, v in mixed_batch(suite_dir, processor, (3, 2)).items()}
    rollout.generate(tiny_model, other, n=5, compile=True, **kwargs)


# -----------------------------------------------------------------------------
# the sampler


def test_sample_distribution_and_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(20000, -1)  # token 3 has probability 0
    tokens = rollout.sample(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015) and freq[3] == 0
    top2 = torch.bincount(rollout.sample(logits, top_k=2, generator=torch.Generator().manual_seed(0)), minlength=4)
    assert top2[2:].sum() == 0 and abs(top2[0] / top2.sum() - 0.625) < 0.015  # 0.5 / (0.5 + 0.3)
    # top_p 0.6: the smallest prefix holding 60% of the mass is {0, 1}
    top_p = torch.bincount(rollout.sample(logits, top_p=0.6, generator=torch.Generator().manual_seed(0)), minlength=4)
    assert top_p[2:].sum() == 0
    assert torch.equal(rollout.sample(logits[:3], temperature=0), torch.zeros(3, dtype=torch.long))
    assert (rollout.sample(logits, top_p=0.1, generator=torch.Generator().manual_seed(0)) == 0).all()
    # a uniform at the top of the range (u * total rounding up to the total) still lands on a positive token, the
    # last one, never on the zero-probability tail or past the vocabulary
    edge = torch.log(torch.tensor([[0.25, 0.25, 0.5, 0.0, 0.0]]))
    for u in (1.0, 1 - 1e-8, 0.0):
        assert rollout.sample_with(edge, torch.tensor([[u]]), 1.0, 1.0, 0).item() == (2 if u else 0)


def test_sample_draws_one_uniform_per_row():
    gen, expected = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rollout.sample(torch.randn(5, 11), temperature=0.8, top_p=0.9, top_k=4, generator=gen)
    torch.rand(5, 1, generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())


# -----------------------------------------------------------------------------
# bad input


def test_bad_inputs_give_clear_errors(tiny, suite_dir):
    tiny_model, processor = tiny
    inputs = mixed_batch(suite_dir, processor)
    eos = [im_end(processor)]
    context = tiny_model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model context"):
        rollout.generate(tiny_model, inputs, max_new_tokens=context, eos_token_ids=eos)
    empty = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    empty["attention_mask"][2] = 0
    with pytest.raises(ValueError, match="row 2 has an empty prompt"):
        rollout.generate(tiny_model, empty, max_new_tokens=4, eos_token_ids=eos)
    right_padded = {**inputs, "attention_mask": inputs["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="not left-padded"):
        rollout.generate(tiny_model, right_padded, max_new_tokens=4, eos_token_ids=eos)
    no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        rollout.generate(tiny_model, no_types, max_new_tokens=4, eos_token_ids=eos)
    with pytest.raises(ValueError, match="bad sampling arguments"):
        rollout.generate(tiny_model, inputs, max_new_tokens=4, top_p=0, eos_token_ids=eos)


def test_zero_new_tokens_and_text_only_batch(peaked, suite_dir):
    tiny_model, processor = peaked
    eos = [im_end(processor)]
    none = rollout.generate(tiny_model, mixed_batch(suite_dir, processor), n=2, max_new_tokens=0, eos_token_ids=eos)
    assert none["response_ids"].shape == none["logprobs"].shape == none["response_mask"].shape == (6, 0)
    assert none["finish_reasons"] == ["length"] * 6
    # no media at all: plain positions from the attention mask, still left padding aware
    text_only = data.collate([data.normalise_row({"problem": q, "answer": "1", "problem_type": "numerical"}, i,
                                                 "inline", None) for i, q in enumerate(["What is 1 + 1?", "Say a number."])],
                             processor, TEST_MEDIA)
    assert "pixel_values" not in text_only and text_only["attention_mask"].min() == 0
    out = rollout.generate(tiny_model, text_only, max_new_tokens=N_NEW, temperature=0, eos_token_ids=eos)
    assert torch.equal(out["response_ids"], hf_greedy(tiny_model, text_only, eos))


# -----------------------------------------------------------------------------
# FSDP2 on 2 gloo ranks: the same greedy tokens as unsharded, and no collective per decoded token


def _worker(model_dir, suite_dir, out_dir):
    import common
    from torch.distributed.tensor import DTensor
    rank, _, _, _ = common.init_distributed()
    tiny_model, processor = peaked_model(model_dir)
    inputs = mixed_batch(pathlib.Path(suite_dir), processor, (0, 2, 3) if rank == 0 else (3, 2))
    eos = [im_end(processor)]
    new_tokens = 8 + 8 * rank  # ranks decode different numbers of steps: a collective per token would hang
    with torch.no_grad():
        plain = rollout.generate(tiny_model, inputs, max_new_tokens=new_tokens, temperature=0, eos_token_ids=eos)
        plain_logp = rollout.token_logprobs(tiny_model, inputs, plain["response_ids"].repeat_interleave(2, 0),
                                            plain["response_mask"].repeat_interleave(2, 0), n=2)
        sharded = common.shard_model(tiny_model, mixed_precision=False)
        out = rollout.generate(sharded, inputs, max_new_tokens=new_tokens, temperature=0, eos_token_ids=eos)
        resharded = all(isinstance(p, DTensor) for p in sharded.parameters())  # the gathered weights are freed
        logp = rollout.token_logprobs(sharded, inputs, out["response_ids"].repeat_interleave(2, 0),
                                      out["response_mask"].repeat_interleave(2, 0), n=2)
    result = {"same_tokens": torch.equal(out["response_ids"], plain["response_ids"]),
              "logprob_diff": (logp - plain_logp).abs().max().item(), "length": out["response_ids"].shape[1],
              "resharded": resharded}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    common.cleanup()


def test_fsdp_two_ranks_greedy_equals_unsharded(model_dir, suite_dir, tmp_path):
    returncode, stderr = torchrun([os.path.abspath(__file__), model_dir, str(suite_dir), str(tmp_path)], timeout=180)
    assert returncode == 0, stderr[-4000:]
    for rank in range(2):
        got = json.load(open(tmp_path / f"rank{rank}.json"))
        assert got["same_tokens"] and got["resharded"] and got["length"] == 8 + 8 * rank, got
        assert got["logprob_diff"] < 1e-4, got


if __name__ == "__main__":
    _worker(*sys.argv[1:])
