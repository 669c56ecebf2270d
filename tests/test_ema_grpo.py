"""EMA-GRPO advantages (SPEC 5) and the PPO loss (SPEC 6) against hand-computed values; the tracker on 2 ranks."""
import json
import math
import os
import sys

import pytest
import torch
from conftest import torchrun

import common
from ema_grpo import TaskEMA, advantages, kl_penalty, ppo_loss



def approx(values, rel=1e-6, abs=1e-9):
    return pytest.approx(values, rel=rel, abs=abs)


# -----------------------------------------------------------------------------
# EMA-GRPO over a sequence of batches; expected numbers worked out by hand (derivations in comments)


def test_ema_grpo_sequence_by_hand():
    tracker = TaskEMA(decay=0.99, min_std=1e-3)

    # batch 1: every task is new, so its moments are this batch's moments
    # math [1,0,1,0]: m1 = 0.5, m2 = 0.5, var 0.25, std 0.5; centred +-0.5
    # grounding [.5,.7,.6,.6]: m1 = .6, m2 = (.25+.49+.36+.36)/4 = .365, var .005; centred [-.1,.1,0,0]
    scores = torch.tensor([1, 0, 1, 0, 0.5, 0.7, 0.6, 0.6], dtype=torch.float64)
    keys = ["math"] * 4 + ["spatial grounding"] * 4
    adv = advantages(scores, [0, 0, 0, 0, 1, 1, 1, 1], keys, tracker)
    assert tracker.moments["math"] == approx([0.5, 0.5])
    assert tracker.moments["spatial grounding"] == approx([0.6, 0.365])
    assert tracker.std("spatial grounding") == approx(math.sqrt(0.005))
    s = math.sqrt(0.005) + 1e-6
    assert adv.tolist() == approx([0.5 / 0.500001, -0.5 / 0.500001] * 2 + [-0.1 / s, 0.1 / s, 0, 0])
    assert adv.dtype == torch.float64  # the scores' dtype

    # batch 2: state carried; OCR seen for the first time mid-sequence
    # math groups [1,1,1,1] and [1,0,0,0]: batch m1 = m2 = 5/8; m1 = m2 = .99*.5 + .01*.625 = .50125
    #   var = .50125 * .49875 = .2499984375; group 2 centred [.75,-.25,-.25,-.25]
    # grounding [.6,.6,.6,.62]: batch m1 .605, m2 (3*.36+.3844)/4 = .3661
    #   m1 = .99*.6 + .01*.605 = .60005, m2 = .99*.365 + .01*.3661 = .365011, var = .365011 - .60005^2 = .0049509975
    #   centred [-.005,-.005,-.005,.015]
    # OCR [0,0,0,1]: first batch, m1 = m2 = .25, var .1875; centred [-.25,-.25,-.25,.75]
    scores = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0.6, 0.6, 0.6, 0.62, 0, 0, 0, 1], dtype=torch.float64)
    gids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4
    keys = ["math"] * 8 + ["spatial grounding"] * 4 + ["OCR"] * 4
    adv = advantages(scores, gids, keys, tracker)
    assert tracker.moments["math"] == approx([0.50125, 0.50125])
    assert tracker.moments["spatial grounding"] == approx([0.60005, 0.365011])
    assert tracker.moments["OCR"] == approx([0.25, 0.25])
    math_std = math.sqrt(0.2499984375) + 1e-6
    grounding_std = math.sqrt(0.0049509975) + 1e-6
    ocr_std = math.sqrt(0.1875) + 1e-6
    expected = ([0.0] * 4 + [0.75 / math_std] + [-0.25 / math_std] * 3
                + [-0.005 / grounding_std] * 3 + [0.015 / grounding_std]
                + [-0.25 / ocr_std] * 3 + [0.75 / ocr_std])
    assert adv.tolist() == approx(expected)

    # batch 3: the guard. grounding [0,1,.5,.5]: batch m1 .5, m2 .375
    #   m1 = .99*.60005 + .01*.5 = .5990495, m2 = .99*.365011 + .01*.375 = .36511089, var = .00626059..., std .0791
    #   .5 / .0791 = 6.3 > 5, so the group uses its population std sqrt(.125): advantages +-1.414
    # math [0,1] in the same batch keeps the EMA std: m1 = .99*.50125 + .01*.5 = .5012375 = m2
    adv = advantages(torch.tensor([0, 1, 0.5, 0.5, 0.0, 1.0], dtype=torch.float64), [7, 7, 7, 7, 8, 8],
                     ["spatial grounding"] * 4 + ["math"] * 2, tracker)
    assert tracker.moments["spatial grounding"] == approx([0.5990495, 0.36511089])
    assert 0.5 / tracker.std("spatial grounding") > 5
    pop = math.sqrt(0.125) + 1e-6
    math_std = math.sqrt(0.5012375 - 0.5012375 ** 2) + 1e-6
    assert adv.tolist() == approx([-0.5 / pop, 0.5 / pop, 0, 0, -0.5 / math_std, 0.5 / math_std])


def test_min_std_floors_a_near_constant_task():
    # [.5,.5,.5,.5005]: m1 = .500125, m2 = 1.00050025/4, var = 4.6875e-8 -> std 2.2e-4 < min_std = 1e-3
    tracker = TaskEMA()
    adv = advantages(torch.tensor([0.5, 0.5, 0.5, 0.5005], dtype=torch.float64), [0] * 4, ["numerical"] * 4, tracker)
    assert tracker.std("numerical") == 1e-3
    assert adv.tolist() == approx([-0.000125 / 0.001001] * 3 + [0.000375 / 0.001001], rel=1e-6)
    # a task that has only ever scored 1.0 has zero variance: std is min_std, advantages 0
    advantages(torch.ones(4), [1] * 4, ["OCR"] * 4, tracker)
    assert tracker.std("OCR") == 1e-3


def test_segmentation_is_split_by_modality():
    from data import task_key  # here, not at the top: the 2-rank worker below imports this file
    rows = [("segmentation", "image")] * 2 + [("segmentation", "video")] * 2
    keys = [task_key(problem_type, data_type) for problem_type, data_type in rows]
    tracker = TaskEMA()
    advantages(torch.tensor([0.2, 0.4, 0.9, 1.0]), [0, 0, 1, 1], keys, tracker)
    assert tracker.moments["segmentation/image"] == approx([0.3, (0.04 + 0.16) / 2])
    assert tracker.moments["segmentation/video"] == approx([0.95, (0.81 + 1.0) / 2])
    assert set(tracker.stats()) == {"segmentation/image", "segmentation/video"}


def test_state_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, generator=gen), [0] * 4 + [1] * 4, ["math"] * 4 + ["OCR"] * 4) for _ in range(4)]
    tracker = TaskEMA(decay=0.9, min_std=1e-2)
    for batch in batches[:2]:
        advantages(*batch, tracker)
    restored = TaskEMA()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))  # checkpointable as plain JSON
    assert restored.stats() == tracker.stats() and restored.decay == 0.9 and restored.min_std == 1e-2
    for batch in batches[2:]:
        assert torch.equal(advantages(*batch, tracker), advantages(*batch, restored))
    assert restored.state_dict() == tracker.state_dict()


def test_grpo_and_dr_grpo():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3])
    gids, keys = [0, 0, 0, 0, 1], ["math"] * 5
    # group mean .25, centred [.75,-.25,-.25,-.25]; unbiased std sqrt((.5625 + 3*.0625)/3) = .5
    grpo = advantages(scores, gids, keys, None, estimator="grpo")
    assert grpo.tolist() == approx([0.75 / 0.500001] + [-0.25 / 0.500001] * 3 + [0.0])
    assert grpo.dtype == torch.float32  # the scores' dtype
    dr = advantages(scores, gids, keys, None, estimator="dr_grpo")
    assert dr.tolist() == approx([0.75, -0.25, -0.25, -0.25, 0.0])
    tracker = TaskEMA()
    advantages(scores, gids, keys, tracker, estimator="grpo")  # the tracker is still fed, for logging
    assert tracker.mean("math") == approx(0.26)


def test_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match="estimator"):
        advantages(torch.zeros(2), [0, 0], ["math"] * 2, TaskEMA(), estimator="ppo")
    with pytest.raises(ValueError, match="needs a TaskEMA"):
        advantages(torch.zeros(2), [0, 0], ["math"] * 2, None)
    with pytest.raises(ValueError, match="2 scores, 2 group ids, 1 task keys"):
        advantages(torch.zeros(2), [0, 0], ["math"], TaskEMA())


# -----------------------------------------------------------------------------
# PPO loss and KL


def test_ppo_loss_by_hand():
    # row 0 has A = +1, row 1 has A = -1; the last token of row 1 is padding (ratio 100, masked)
    ratios = torch.tensor([[1.0, 1.5, 0.5, 1.2, 1.0], [0.7, 1.1, 5.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    old_logp = torch.full((2, 5), -1.0)
    logp = (old_logp + ratios.log()).requires_grad_()
    loss, metrics = ppo_loss(logp, old_logp, torch.tensor([1.0, -1.0]), mask)
    # A=+1: r=1 -> -1; r=1.5 clipped high at 1.3 -> -1.3; r=.5 -> max(-.5, -.8) = -.5; r=1.2 inside 1.3 -> -1.2
    # A=-1: r=.7 clipped low at .8 -> .8; r=1.1 -> 1.1; r=5 -> max(5, 1.3) = 5, dual clip -> 3; r=2 -> 2 (< 3)
    assert loss.item() == approx((-1 - 1.3 - 0.5 - 1.2 + 0.8 + 1.1 + 3 + 2) / 8)
    assert metrics["clip_frac"] == approx(2 / 8)  # r=1.5 (A>0) and r=.7 (A<0)
    assert metrics["dual_clip_frac"] == approx(1 / 8)
    loss.backward()
    # d/dlogp of -A r is -A r where the unclipped branch is active, 0 where a clip bound holds
    expected_grad = torch.tensor([[-1.0, 0, -0.5, -1.2, 0], [0, 1.1, 0, 2.0, 0]]) / 8
    assert torch.allclose(logp.grad, expected_grad, atol=1e-6)


def test_ppo_loss_global_token_mean_over_micro_batches():
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 7, generator=gen)).requires_grad_()
    old_logp = logp.detach() + 0.3 * torch.randn(6, 7, generator=gen)
    adv = torch.randn(6, generator=gen)
    mask = torch.ones(6, 7)
    mask[0, 3:] = 0
    mask[4, 1:] = 0  # the two micro-batches hold different token counts
    whole, whole_metrics = ppo_loss(logp, old_logp, adv, mask)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    num_tokens = mask.sum()  # in train_rl.py: summed over micro-batches, then all-reduced over ranks
    parts = [ppo_loss(logp[i:i + 3], old_logp[i:i + 3], adv[i:i + 3], mask[i:i + 3], num_tokens=num_tokens)
             for i in (0, 3)]
    total = parts[0][0] + parts[1][0]
    (total_grad,) = torch.autograd.grad(total, logp)
    assert total.item() == approx(whole.item())
    assert torch.allclose(total_grad, whole_grad, atol=1e-7)
    for key in whole_metrics:
        assert parts[0][1][key] + parts[1][1][key] == approx(whole_metrics[key], rel=1e-5)


def test_kl_penalty_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.5), -25.0]])
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.5), -5.0]])
    assert kl_penalty(logp, ref_logp, "k1").tolist()[0] == approx([math.log(2), 0.0, -20.0])
    # k3: with x = ref - logp: exp(x) - x - 1; x = -log 2 -> .5 + log 2 - 1; x = 20 -> clamped to 10
    assert kl_penalty(logp, ref_logp).tolist()[0] == approx([0.5 + math.log(2) - 1, 0.0, 10.0], rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref_logp, "k2")


# -----------------------------------------------------------------------------
# two gloo ranks hold the same tracker, equal to one process seeing all scores


def _rank_batches(rank):
    """Three steps of local batches; rank 1 has a task rank 0 never sees, and the batch sizes differ."""
    gen = torch.Generator().manual_seed(100 + rank)
    batches = []
    for step in range(3):
        n = 4 * (2 + rank)
        keys = ["math"] * 4 + (["OCR"] * 4 if rank == 0 else ["tracking"] * (n - 4))
        batches.append((torch.rand(n, generator=gen), [f"{rank}-{step}-{i // 4}" for i in range(n)], keys))
    return batches


def _worker(out_dir):
    rank = common.init_distributed()[0]
    tracker = TaskEMA()
    advs = [advantages(*batch, tracker).tolist() for batch in _rank_batches(rank)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"state": tracker.state_dict(), "advantages": advs}, f)
    common.cleanup()


def test_two_ranks_share_the_ema_state(tmp_path):
    returncode, stderr = torchrun([os.path.abspath(__file__), str(tmp_path)], timeout=120)
    assert returncode == 0, stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["state"] == ranks[1]["state"]

    single = TaskEMA()
    for step, (b0, b1) in enumerate(zip(_rank_batches(0), _rank_batches(1))):
        adv = advantages(torch.cat([b0[0], b1[0]]), b0[1] + b1[1], b0[2] + b1[2], single)
        assert adv.tolist() == ranks[0]["advantages"][step] + ranks[1]["advantages"][step]
    assert ranks[0]["state"] == json.loads(json.dumps(single.state_dict()))
    assert set(single.moments) == {"math", "OCR", "tracking"}


if __name__ == "__main__":
    _worker(sys.argv[1])
