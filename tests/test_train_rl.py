"""train_rl.py: exact resume (sampler, rollout generator, AdamW, task EMA), a non-finite update is skipped, a
reward exception and a filter that keeps nothing skip the step and training goes on, and on 2 gloo ranks the
PPO update equals one process's on the same global micro-batches while both ranks hold the same task EMA.

The runs use the untrained tiny model on open-ended rows: its random words overlap the reference a little, so
ROUGE gives groups a spread of rewards (non-zero advantages) without any SFT first."""
import copy
import faulthandler
import json
import math
import os
import shutil
import sys
import threading

import pytest
import torch
from conftest import REPO, TEST_MEDIA, torchrun
from safetensors.torch import load_file

import common
import data
import ema_grpo
import model as model_lib
import rewards
import rollout
import train_rl

pytestmark = pytest.mark.usefixtures("restore_sigterm_handler")
REFERENCE = "I look at the picture and count the shapes"


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {row.pop("step"): row for row in map(json.loads, f)}


def exported_weights(out_dir):
    return load_file(os.path.join(out_dir, "hf", "model.safetensors"))


def checkpoint_weights(model_dir, path):
    """(state dict, extra of rank 0) of a checkpoint, loaded into the model of model_dir."""
    tiny_model, _ = model_lib.load_model(model_dir)
    extra = common.load_checkpoint(path, tiny_model)
    return tiny_model.state_dict(), extra


@pytest.fixture(scope="module")
def rl_args(suite_dir, model_dir, tmp_path_factory):
    """6 open-ended prompts (5 image, 1 video) plus a multiple-choice one; 2 prompts x 4 samples of 8 tokens a
    step, 2 PPO updates of 1 prompt each."""
    rows = [{"problem": f"Describe picture {i}.", "answer": f"<answer>{REFERENCE}</answer>",
             "problem_type": "open-ended", "data_type": "image", "images": [f"media/{'ab'[i % 2]}.png"],
             "problem_id": i} for i in range(5)]
    rows.append({"problem": "Describe the clip.", "answer": REFERENCE, "problem_type": "open-ended",
                 "data_type": "video", "videos": ["media/clip.mp4"], "problem_id": 5})
    rows.append({"problem": "What colour is the circle?", "options": ["A. red", "B. blue"], "answer": "B",
                 "problem_type": "multiple choice", "data_type": "image", "images": ["media/a.png"], "problem_id": 6})
    path = tmp_path_factory.mktemp("rl_data") / "rl.json"
    path.write_text(json.dumps(rows))
    return [f"--model={model_dir}", f"--data={path}", f"--media_root={suite_dir}", "--prompts_per_step=2", "--group_size=4",
            "--max_new_tokens=8", "--micro_batch_seqs=4", "--ppo_updates=2", "--lr=1e-3", "--max_refill_tries=2",
            "--image_max_pixels=6144", "--video_max_pixels=6144", "--max_frames=8", "--sample_every=1"]


def random_groups(processor, rows, n=2, seed=0, length=6):
    """A group per row: n random responses (no special or media tokens) of 2..length tokens, advantages of both
    signs."""
    gen = torch.Generator().manual_seed(seed)
    banned = set(processor.tokenizer.all_special_ids) | set(processor.tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>"]))
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in banned])
    groups = []
    for row in rows:
        ids = allowed[torch.randint(len(allowed), (n, length), generator=gen)]  # [n, T]
        mask = (torch.arange(length)[None] < torch.randint(2, length + 1, (n, 1), generator=gen)).long()  # [n, T]
        groups.append({"row": row, "item": data.encode_row(row, processor, TEST_MEDIA), "response_ids": ids,
                       "response_mask": mask, "adv": torch.randn(n, generator=gen)})
    return groups


def micro_batch(tiny_model, processor, rows, n=2, seed=0):
    """A PPO micro-batch of whole groups for `rows` (random_groups), with old log-probs near the current ones
    (some ratios leave the clip range)."""
    groups = random_groups(processor, rows, n, seed)
    seqs = [(g, j) for g in groups for j in range(n)]
    inputs, counts, ids, mask = train_rl.micro_batch_inputs(seqs, processor.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logp = rollout.token_logprobs(tiny_model, inputs, ids, mask, counts)  # [mn, T]
    gen = torch.Generator().manual_seed(seed + 100)
    old_logp = (logp + 0.3 * torch.randn(logp.shape, generator=gen)) * mask  # [mn, T]
    adv = torch.cat([g["adv"] for g in groups])  # [mn]
    return {"inputs": inputs, "counts": counts, "ids": ids, "mask": mask, "old_logp": old_logp, "adv": adv}


# -----------------------------------------------------------------------------
# the rollout's data path: prefetched on a thread, reused by the update


def test_prefetched_batches_equal_the_synchronous_path(model_dir, suite_dir, tmp_path):
    """draw_batch with a Prefetcher gives the rows and model inputs that data.draw_rows gives encoding inline on a
    second sampler: the same rows, a row whose media do not decode recorded and replaced alike, the same encoded
    prompts, the sampler left where plain draws leave it. It sends the next draw ahead (those rows are encoded
    before they are asked for, on the background thread), and the update's inputs are the rollout's items, equal
    to collating the rows again."""
    _, processor = model_lib.load_model(model_dir)
    rows = data.load_rows(str(suite_dir / "rl.json"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    rows.append(data.normalise_row({"problem": "q", "answer": "1", "problem_type": "numerical",
                                    "data_type": "image", "images": ["bad.png"]}, 4, "inline", str(tmp_path),
                                   check_media=False))
    threads = {}

    def encode_row(row):
        threads[row["source"]] = threading.current_thread().name
        return data.encode_row(row, processor, TEST_MEDIA)
    prefetcher = data.Prefetcher(encode_row)
    sampler, plain = (data.ShardedSampler(len(rows), seed=8) for _ in range(2))  # the bad row in the 3rd batch
    bad_rows, plain_bad = data.BadRows(), data.BadRows()
    try:
        for _ in range(4):
            expected = data.draw_rows(rows, plain, 2, lambda row: data.encode_row(row, processor, TEST_MEDIA),
                                      plain_bad)
            batch = data.draw_batch(rows, sampler, 2, prefetcher, bad_rows)
            assert [row for row, _ in batch] == [row for row, _ in expected]
            assert sampler.state_dict() == plain.state_dict() and bad_rows.errors == plain_bad.errors
            for (_, got), (_, reference) in zip(batch, expected):
                assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got
                                                              if torch.is_tensor(got[k]))
            upcoming = [rows[i] for i in copy.deepcopy(plain).next_batch(2)]
            assert set(prefetcher.pending) == {row["source"] for row in upcoming}  # sent ahead
            groups = [{"row": row, "item": item, "response_ids": torch.ones(2, 3, dtype=torch.long),
                       "response_mask": torch.ones(2, 3, dtype=torch.long)} for row, item in batch]
            seqs = [(g, j) for g in groups for j in range(2)]
            inputs, counts, _, _ = train_rl.micro_batch_inputs(seqs, processor.tokenizer.pad_token_id,
                                                               torch.device("cpu"))
            reference = data.collate([row for row, _ in batch], processor, TEST_MEDIA)
            assert counts == [2, 2] and all(torch.equal(inputs[k], reference[k]) for k in reference)
    finally:
        prefetcher.worker.shutdown(cancel_futures=True)
    assert list(bad_rows.errors) == [rows[-1]["source"]] and "corrupt image" in bad_rows.errors[rows[-1]["source"]]
    assert set(threads.values()) == {"prefetch_0"}  # every encode ran on the background thread


# -----------------------------------------------------------------------------
# the update step alone


def test_advantage_metrics_per_task():
    """Per task: the spread within each group and the advantage size. GRPO divides a group by its own (unbiased)
    std, so a binary group and a narrow dense one get similar advantages; Dr.GRPO keeps the raw centred reward."""
    scores = {"multiple choice": [0.1, 1.1, 0.1, 1.1], "spatial grounding": [0.60, 0.62, 0.64, 0.66]}
    expected_abs = {"grpo": {"multiple choice": 0.5 / (1 / 3) ** 0.5, "spatial grounding": 0.02 / (0.002 / 3) ** 0.5},
                    "dr_grpo": {"multiple choice": 0.5, "spatial grounding": 0.02}}
    for estimator, expected in expected_abs.items():
        groups = [{"row": {"problem_type": task, "data_type": "image"}, "scores": [{"overall": v} for v in values],
                   "adv": ema_grpo.advantages(torch.tensor(values), [0] * 4, [task] * 4, None, estimator)}
                  for task, values in scores.items()]
        metrics = train_rl.advantage_metrics(groups)
        assert metrics["multiple choice"]["group_std"] == pytest.approx(0.5)
        assert metrics["spatial grounding"]["group_std"] == pytest.approx(0.0005 ** 0.5)
        for task, value in expected.items():
            assert metrics[task]["abs"] == pytest.approx(value, rel=1e-4), (estimator, task)


def test_ppo_step_skips_a_non_finite_update(model_dir, suite_dir):
    tiny_model, processor = model_lib.load_model(model_dir)
    rows = data.load_rows(str(suite_dir / "rl.json"))
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    cfg = train_rl.Config(group_size=2)
    mb = micro_batch(tiny_model, processor, rows[:2])
    start = copy.deepcopy(tiny_model.state_dict())
    for bad in (float("nan"), float("inf")):
        poisoned = {**mb, "adv": mb["adv"].clone().index_fill_(0, torch.tensor([1]), bad)}
        metrics = train_rl.ppo_step(tiny_model, optimizer, [poisoned], cfg)
        assert metrics["update_skipped"] == 1.0
        for name, p in tiny_model.state_dict().items():
            assert torch.equal(p, start[name]), name
        assert optimizer.state_dict()["state"] == {}  # AdamW took no step: its moments are untouched
        assert all(p.grad is None for p in tiny_model.parameters())

    metrics = train_rl.ppo_step(tiny_model, optimizer, [mb], cfg)  # training goes on
    assert metrics["update_skipped"] == 0.0 and metrics["grad_norm"] > 0 and metrics["clip_frac"] > 0
    changed = [name for name, p in tiny_model.state_dict().items() if not torch.equal(p, start[name])]
    assert changed and all(torch.isfinite(p).all() for p in tiny_model.parameters())


def test_on_policy_step_without_old_logprobs_equals_the_recomputed_one(model_dir, suite_dir):
    """old_logp=None (ppo_updates=1 skips that forward) takes the same step as old log-probs recomputed by a
    no-grad forward of the same weights: same loss, gradient norm and weights after AdamW. At temperature 0.7
    both sides take the log-probs of the logits divided by it (the release's actor)."""
    rows = data.load_rows(str(suite_dir / "rl.json"))
    cfg = train_rl.Config(group_size=2, temperature=0.7)
    results = []
    for recompute in (True, False):
        tiny_model, processor = model_lib.load_model(model_dir)
        optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
        mb = micro_batch(tiny_model, processor, rows[:2])
        if recompute:
            with torch.no_grad():
                mb["old_logp"] = rollout.token_logprobs(tiny_model, mb["inputs"], mb["ids"], mb["mask"], mb["counts"],
                                                        cfg.share_prompt, cfg.temperature)
        else:
            mb["old_logp"] = None
        metrics = train_rl.ppo_step(tiny_model, optimizer, [mb], cfg)
        results.append((metrics, tiny_model.state_dict()))
    (recomputed, weights_a), (on_policy, weights_b) = results
    assert recomputed["grad_norm"] > 0 and recomputed["clip_frac"] == 0.0
    for key in ("loss", "grad_norm", "ratio", "approx_kl"):
        assert on_policy[key] == pytest.approx(recomputed[key], abs=1e-6), key
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=0, atol=1e-6, msg=name)


def test_sequence_micro_batches_take_the_step_of_whole_groups(model_dir, suite_dir):
    """Two PPO steps (ppo_updates=2: mini-batches of 2 groups and 1 group of 4 responses, old log-probs
    recomputed) with micro_batch_seqs=4 (one group per micro-batch, as micro-batches of prompts were), 3 (groups
    cut inside: a prompt's responses in two micro-batches) and 8 (a mini-batch at once): the same losses,
    gradient norms and weights."""
    rows = data.load_rows(str(suite_dir / "rl.json"))[:3]  # image, image, video
    results = []
    for seqs, micro_batches in ((4, [2, 1]), (3, [3, 2]), (8, [1, 1])):
        tiny_model, processor = model_lib.load_model(model_dir)
        groups = random_groups(processor, rows, n=4, seed=5, length=8)
        cfg = train_rl.Config(group_size=4, micro_batch_seqs=seqs, ppo_updates=2)
        mini_batches = train_rl.build_mini_batches(tiny_model, groups, cfg, processor.tokenizer.pad_token_id,
                                                   torch.device("cpu"))
        assert [len(m) for m in mini_batches] == micro_batches
        assert [sum(len(mb["adv"]) for mb in m) for m in mini_batches] == [8, 4]
        metrics = train_rl.update(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=20.0), mini_batches, cfg,
                                  None)
        results.append((metrics, tiny_model.state_dict()))
    (reference, weights), others = results[0], results[1:]
    assert reference["update_skipped"] == 0.0 and reference["grad_norm"] > 0 and reference["clip_frac"] > 0
    for metrics, other_weights in others:
        for key in ("loss", "grad_norm", "ratio", "clip_frac", "approx_kl", "entropy"):
            assert metrics[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key  # fp32 sums reordered
        for name in weights:
            torch.testing.assert_close(other_weights[name], weights[name], rtol=1e-5, atol=1e-5, msg=name)


def test_share_prompt_with_grad_checkpointing_is_refused(rl_args, tmp_path):
    with pytest.raises(ValueError, match="grad_checkpointing=true drops"):
        train_rl.main(rl_args + [f"--out_dir={tmp_path}", "--grad_checkpointing=true"])
    assert not (tmp_path / "metrics.jsonl").exists()


# -----------------------------------------------------------------------------
# whole runs in this process


def test_resume_is_exact(rl_args, model_dir, tmp_path):
    """4 steps in one run == 2 steps + resume + 2 steps: the same rollouts (sampler and rollout generator), rewards,
    task EMA, losses and bit-identical weights. Filtering with refill is on, so the sampler position moves by a
    varying number of prompts per step."""
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train_rl.main(rl_args + [f"--out_dir={full_dir}", "--max_steps=4", "--save_every=2"])
    shutil.copytree(full_dir / "ckpt" / "step_000002", resumed_dir / "ckpt" / "step_000002")
    train_rl.main(rl_args + [f"--out_dir={resumed_dir}", "--max_steps=4", "--save_every=2", "--resume=true"])

    full, resumed = read_metrics(full_dir), read_metrics(resumed_dir)
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    updated = [step for step in full if full[step].get("update_skipped") == 0.0 and full[step]["grad_norm"] > 0]
    assert 3 in updated or 4 in updated  # the compared steps did train
    for step in (3, 4):
        keys = {key for key in full[step] if not key.startswith(("sec/", "reward_counters/"))}
        assert keys == {key for key in resumed[step] if not key.startswith(("sec/", "reward_counters/"))}
        for key in keys:
            if isinstance(full[step][key], float):
                assert resumed[step][key] == pytest.approx(full[step][key], abs=1e-6, rel=0), (step, key)
            else:
                assert resumed[step][key] == full[step][key], (step, key)

    def samples(out_dir):
        with open(out_dir / "samples.jsonl") as f:
            return [row for row in map(json.loads, f) if row["step"] > 2]
    assert samples(resumed_dir) == samples(full_dir)  # identical responses: the rollout generator was restored

    expected, got = exported_weights(full_dir), exported_weights(resumed_dir)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    (_, full_extra), (_, resumed_extra) = (checkpoint_weights(model_dir, d / "ckpt" / "step_000004")
                                           for d in (full_dir, resumed_dir))
    assert full_extra["ema"] == resumed_extra["ema"] and full_extra["ema"]["moments"]
    assert full_extra["sampler"] == resumed_extra["sampler"]


def test_reward_exception_and_non_finite_reward_skip_the_step(rl_args, model_dir, tmp_path, monkeypatch, capfd):
    """Step 1: compute_score raises; step 2: it returns a NaN reward; step 3: the real reward, plus a spread within
    each group (so the update has a gradient whatever the random model samples). Steps 1-2 are logged and take no
    update (the weights and the task EMA stay clean); step 3 trains."""
    real = rewards.compute_score
    calls = []

    def flaky(items, *args, **kwargs):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("reward server went away")
        scores = real(items, *args, **kwargs)
        if len(calls) == 2:
            scores[3] = {**scores[3], "overall": float("nan")}
        else:
            scores = [{**score, "overall": score["overall"] + 0.01 * i} for i, score in enumerate(scores)]
        return scores

    monkeypatch.setattr(rewards, "compute_score", flaky)
    train_rl.main(rl_args + [f"--out_dir={tmp_path}", "--max_steps=3", "--save_every=1", "--filter_groups=false"])
    err = capfd.readouterr().err
    assert "RuntimeError: reward server went away" in err and "non-finite reward" in err

    metrics = read_metrics(tmp_path)
    for step in (1, 2):
        assert metrics[step]["reward_errors"] == 1.0 and metrics[step]["skip_reason"] == "reward error"
        assert "loss" not in metrics[step]
    assert metrics[3]["reward_errors"] == 0.0 and metrics[3]["update_skipped"] == 0.0 and metrics[3]["grad_norm"] > 0

    start, _ = model_lib.load_model(model_dir)
    after_2, extra_2 = checkpoint_weights(model_dir, tmp_path / "ckpt" / "step_000002")
    for name, p in start.state_dict().items():
        assert torch.equal(after_2[name], p), name
    assert extra_2["ema"]["moments"] == {}  # no score reached the task EMA
    after_3, extra_3 = checkpoint_weights(model_dir, tmp_path / "ckpt" / "step_000003")
    assert any(not torch.equal(after_3[name], p) for name, p in start.state_dict().items())
    assert all(torch.isfinite(p).all() for p in after_3.values())
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")


def test_filter_that_keeps_nothing_skips_the_update(rl_args, model_dir, tmp_path):
    """No group can pass filter_low=1.0: each step refills max_refill_tries times, logs a keep rate of 0 and
    takes no update; the run still finishes, checkpoints and exports (the starting weights)."""
    train_rl.main(rl_args + [f"--out_dir={tmp_path}", "--max_steps=2", "--filter_low=1.0"])
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == [1, 2]
    for row in metrics.values():
        assert row["filter_keep_rate"] == 0.0 and row["skip_reason"] == "no groups kept after filtering"
        assert "loss" not in row and row["reward/all/overall"] >= 0
    _, extra = checkpoint_weights(model_dir, tmp_path / "ckpt" / "step_000002")
    assert extra["sampler"]["global"]["consumed"] == 2 * 2 * 2  # steps x refill tries x prompts
    start, _ = model_lib.load_model(model_dir)
    exported = exported_weights(tmp_path)
    for name, p in exported.items():
        assert torch.equal(p, start.state_dict()[name]), name


def test_bf16_weights_train_two_steps(rl_args, model_dir, tmp_path):
    """--param_dtype=bf16 (the release's bf16 weights and adamw_bf16): 2 steps on CPU update the bf16 weights; the
    checkpoint holds KahanAdamW's bf16 moments and compensation, and the export is bf16."""
    train_rl.main(rl_args + [f"--out_dir={tmp_path}", "--max_steps=2", "--param_dtype=bf16", "--filter_groups=false",
                             "--ppo_updates=1"])
    metrics = read_metrics(tmp_path)
    assert all(row["update_skipped"] == 0.0 for row in metrics.values())
    assert any(row["grad_norm"] > 0 for row in metrics.values())  # a step whose rewards all tie has no gradient
    start, _ = model_lib.load_model(model_dir, dtype=torch.bfloat16)
    exported = exported_weights(tmp_path)
    assert {p.dtype for p in exported.values()} == {torch.bfloat16}
    assert any(not torch.equal(exported[name], p) for name, p in start.state_dict().items() if name in exported)
    optimizer = common.KahanAdamW(start.parameters())
    common.load_checkpoint(str(tmp_path / "ckpt" / "step_000002"), start, optimizer)
    states = list(optimizer.state.values())
    assert states and all(state["compensation"].dtype == torch.bfloat16 for state in states)
    assert any(state["compensation"].abs().sum() > 0 for state in states)


def test_kl_to_the_reference(rl_args, tmp_path):
    """--kl_coef > 0 loads a frozen copy of the starting model: at step 1 the policy IS the reference (k3 KL exactly
    0), after one update it is not (KL > 0, finite, and in the loss)."""
    train_rl.main(rl_args + [f"--out_dir={tmp_path}", "--max_steps=2", "--kl_coef=0.5", "--filter_groups=false",
                             "--ppo_updates=1"])
    metrics = read_metrics(tmp_path)
    assert metrics[1]["kl"] == 0.0 and metrics[1]["grad_norm"] > 0
    assert 0.0 < metrics[2]["kl"] < 10.0 and math.isfinite(metrics[2]["loss"])


def test_torchrun_run_without_separator(rl_args, tmp_path):
    """`torchrun --nproc_per_node 2 train_rl.py --max_steps=2 --group_size=4 ...`: no `--` before the options."""
    returncode, stderr = torchrun([os.path.join(REPO, "train_rl.py")] + rl_args +
                                  [f"--out_dir={tmp_path}", "--max_steps=2", "--filter_groups=false", "--ppo_updates=1"])
    assert returncode == 0, stderr[-4000:]
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == [1, 2] and all(row["update_skipped"] == 0.0 for row in metrics.values())
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")


# -----------------------------------------------------------------------------
# 2 gloo ranks: the PPO update on half the micro-batches each == one process on all; the task EMA is shared

EMA_SCORES = [  # per rank, two rollout steps: (scores, task keys); groups of 2
    [([0.0, 1.0, 0.2, 0.4], ["open-ended"] * 2 + ["math"] * 2), ([1.0, 1.0, 0.0, 0.5], ["math"] * 4)],
    [([0.5, 0.1, 1.5, 1.5], ["open-ended"] * 4), ([0.3, 0.9, 0.0, 1.0], ["open-ended"] * 2 + ["tracking"] * 2)],
]


def ema_run(scores_and_keys, group_offset=0):
    """Advantages of each batch and the final tracker state, for a list of (scores, task keys) batches."""
    tracker = ema_grpo.TaskEMA()
    advs = []
    for scores, keys in scores_and_keys:
        group_ids = [group_offset + i // 2 for i in range(len(scores))]
        advs.append(ema_grpo.advantages(torch.tensor(scores), group_ids, keys, tracker).tolist())
    return advs, tracker.state_dict()


def _worker(model_dir, work_dir):
    faulthandler.dump_traceback_later(150, exit=True)  # a hung collective fails the test with its stack
    rank, world_size, _, _ = common.init_distributed()
    tiny_model, processor = model_lib.load_model(model_dir)
    tiny_model = common.shard_model(tiny_model, mixed_precision=False)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=1.0)  # the weight change is the clipped gradient
    micro_batches = torch.load(os.path.join(work_dir, "micro_batches.pt"))
    half = len(micro_batches) // world_size
    metrics = train_rl.ppo_step(tiny_model, optimizer, micro_batches[rank * half:(rank + 1) * half],
                                train_rl.Config(group_size=2))
    common.export_hf(tiny_model, processor, os.path.join(work_dir, "hf"))
    advs, ema_state = ema_run(EMA_SCORES[rank], group_offset=100 * rank)
    with open(os.path.join(work_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"metrics": metrics, "advantages": advs, "ema": ema_state}, f)
    common.cleanup()


def test_torchrun_update_and_task_ema_match_one_process(model_dir, suite_dir, tmp_path):
    """Under torchrun: ppo_step on half of the micro-batches per rank (SGD at lr 1, so the weight change is the
    clipped summed gradient), and the task EMA fed different scores per rank."""
    tiny_model, processor = model_lib.load_model(model_dir)
    rows = data.load_rows(str(suite_dir / "rl.json"))  # image, image, video, text-only
    # rank 0: an image+video micro-batch and a text one; rank 1: two image ones (its vision tower runs once)
    micro_batches = [micro_batch(tiny_model, processor, [rows[0], rows[2]], seed=1),
                     micro_batch(tiny_model, processor, [rows[3]], seed=2),
                     micro_batch(tiny_model, processor, [rows[1]], seed=3),
                     micro_batch(tiny_model, processor, [rows[0], rows[1]], seed=4)]
    torch.save(micro_batches, tmp_path / "micro_batches.pt")
    returncode, stderr = torchrun([os.path.abspath(__file__), model_dir, str(tmp_path)])
    assert returncode == 0, stderr[-4000:]

    # one process, all four micro-batches, one optimizer step
    start = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    single = train_rl.ppo_step(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1.0), micro_batches,
                               train_rl.Config(group_size=2))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # all-reduced: every rank logs the same numbers
    assert single["update_skipped"] == 0.0 and single["clip_frac"] > 0
    for key, value in single.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, abs=1e-5), key
    exported = exported_weights(tmp_path)
    for name, p in tiny_model.state_dict().items():
        if name in exported:
            assert torch.allclose(exported[name], p, atol=1e-5), name
    moved = {name.split(".")[1] for name, p in tiny_model.state_dict().items() if not torch.equal(p, start[name])}
    assert {"visual", "language_model"} <= moved  # the vision tower and the language model both got gradients

    # the task EMA: both ranks hold the state of one process that saw every rank's scores
    assert ranks[0]["ema"] == ranks[1]["ema"]
    merged = [(s0 + s1, k0 + k1) for (s0, k0), (s1, k1) in zip(*EMA_SCORES)]
    advs, ema_state = ema_run(merged)
    assert ranks[0]["ema"]["moments"].keys() == ema_state["moments"].keys()
    for task, moments in ema_state["moments"].items():
        assert ranks[0]["ema"]["moments"][task] == pytest.approx(moments, abs=1e-12), task
    for step, adv in enumerate(advs):  # groups live on one rank: its advantages are its slice of the merged ones
        assert ranks[0]["advantages"][step] + ranks[1]["advantages"][step] == pytest.approx(adv, abs=1e-6)


if __name__ == "__main__":
    _worker(*sys.argv[1:])


def test_reward_model_gets_problem_reserved_text(monkeypatch):
    """The release passes each row's problem_reserved_text as the reward model's prompt (rows without one: the
    problem)."""
    seen = []

    def capture(items, *args, **kwargs):
        seen.extend(item["problem"] for item in items)
        return [{"overall": 0.0, "accuracy": 0.0, "format": 0.0, "structure_reward": 0.0} for _ in items]
    monkeypatch.setattr(rewards, "compute_score", capture)
    base = {"kind": "rl", "answer": "a", "problem_type": "open-ended", "data_type": "image", "source": "s"}
    groups = [{"row": {**base, "problem": "<image>What is it?", "problem_reserved_text": "What is it?"},
               "texts": ["x", "y"]},
              {"row": {**base, "problem": "Why?"}, "texts": ["x", "y"]}]
    train_rl.score_groups(groups, train_rl.Config(group_size=2))
    assert seen == ["What is it?", "What is it?", "Why?", "Why?"]
