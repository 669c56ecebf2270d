"""
EMA-GRPO advantages (SPEC 5), the GRPO / Dr.GRPO baselines, and the token-level PPO loss (SPEC 6).

    tracker = TaskEMA(decay=0.99, min_std=1e-3)       # one per run, saved in checkpoints
    adv = advantages(scores, group_ids, task_keys, tracker)          # [B], same order as scores
    loss, metrics = ppo_loss(logp, old_logp, adv, mask, num_tokens=global_token_count)

Groups (the n responses of one prompt) live on one rank, so centring is local. The task EMA is global: every
rank calls `advantages` once per rollout step (it all-gathers), and every rank ends with the same tracker state.
The release keeps the tracker in one process and resets it on resume; here it is shared and checkpointed.
"""
import math

import torch

import common

# -----------------------------------------------------------------------------
# the per-task EMA of the score moments (SPEC 5 steps 2-3)


class TaskEMA:
    """EMA of the first and second moments of the score, per task key, identical on every rank."""

    def __init__(self, decay=0.99, min_std=1e-3):
        self.decay = decay
        self.min_std = min_std
        self.moments = {}  # task key -> [m1, m2], plain floats so the state goes straight into a checkpoint

    def update(self, scores, task_keys):
        """Fold this step's scores of every task into its moments; all ranks' scores when distributed.

        A collective under torch.distributed: every rank must call it, each with its own local scores.
        """
        pairs = common.all_gather_list(zip(task_keys, torch.as_tensor(scores, dtype=torch.float64).tolist(),
                                           strict=True))
        by_task = {}
        for key, score in pairs:
            by_task.setdefault(key, []).append(score)
        for key in sorted(by_task):
            task_scores = by_task[key]
            # fsum: the batch moments do not depend on how the scores were split across ranks
            batch_m1 = math.fsum(task_scores) / len(task_scores)
            batch_m2 = math.fsum(s * s for s in task_scores) / len(task_scores)
            if key not in self.moments:  # a task's first batch initialises its moments
                self.moments[key] = [batch_m1, batch_m2]
            else:
                m1, m2 = self.moments[key]
                d = self.decay
                self.moments[key] = [d * m1 + (1 - d) * batch_m1, d * m2 + (1 - d) * batch_m2]

    def mean(self, task):
        return self.moments[task][0]

    def std(self, task):
        """sqrt(max(m2 - m1^2, min_std^2)) (SPEC 5 step 3)."""
        m1, m2 = self.moments[task]
        return math.sqrt(max(m2 - m1 * m1, self.min_std ** 2))

    def stats(self):
        """{task: {"mean": m1, "std": ema_std}} for logging every step."""
        return {task: {"mean": self.mean(task), "std": self.std(task)} for task in sorted(self.moments)}

    def state_dict(self):
        return {"decay": self.decay, "min_std": self.min_std,
                "moments": {task: list(m) for task, m in self.moments.items()}}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.min_std = state["min_std"]
        self.moments = {task: [float(m[0]), float(m[1])] for task, m in state["moments"].items()}


# -----------------------------------------------------------------------------
# advantages (SPEC 5 steps 1 and 4; GRPO and Dr.GRPO for ablations)

ESTIMATORS = ("ema_grpo", "grpo", "dr_grpo")
GUARD = 5.0  # |advantage| above this in a group sends the group back to its own std (SPEC 5 step 4)


def advantages(scores, group_ids, task_keys, tracker, estimator="ema_grpo"):
    """One advantage per response, shape [B], in the order of `scores`.

    scores: float tensor [B] (the overall reward); group_ids: B hashables, equal within one prompt's n responses;
    task_keys: B strings (data.task_key). The tracker is updated with this batch BEFORE normalising, as the
    released code does; it is also updated under "grpo" / "dr_grpo" so the per-task stats are logged in
    ablations too (tracker may be None there). A group of one response has no spread: its advantage is 0.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"ema_grpo.advantages: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not len(scores) == len(group_ids) == len(task_keys):
        raise ValueError(f"ema_grpo.advantages: {len(scores)} scores, {len(group_ids)} group ids, "
                         f"{len(task_keys)} task keys")
    scores = torch.as_tensor(scores)
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    s = scores.double()  # [B]
    if tracker is not None:
        tracker.update(s, task_keys)
    elif estimator == "ema_grpo":
        raise ValueError("ema_grpo.advantages: estimator 'ema_grpo' needs a TaskEMA tracker")

    groups = {}
    for i, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append(i)
    adv = torch.zeros_like(s)  # [B]
    for idx in groups.values():
        idx = torch.tensor(idx)
        group_scores = s[idx]  # [n]
        centred = group_scores - group_scores.mean()  # [n]
        if estimator == "dr_grpo":
            adv[idx] = centred
        elif estimator == "grpo":
            group_std = group_scores.std(unbiased=True) if len(idx) > 1 else 0.0
            adv[idx] = centred / (group_std + 1e-6)
        else:
            ema_std = torch.tensor([tracker.std(task_keys[i]) for i in idx.tolist()], dtype=s.dtype)  # [n]
            group_adv = centred / (ema_std.to(s.device) + 1e-6)
            if (group_adv.abs() > GUARD).any():
                group_adv = centred / (group_scores.std(unbiased=False) + 1e-6)
            adv[idx] = group_adv
    return adv.to(out_dtype)


# -----------------------------------------------------------------------------
# policy loss (SPEC 6)


def ppo_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0, num_tokens=None):
    """Token-level PPO-clip with clip-higher and dual-clip; returns (loss, metrics).

    logp, old_logp, mask: [N, T] (mask 1 on response tokens); advantages: [N] (one per response) or [N, T].
    Per token: ratio r = exp(logp - old_logp); l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); for A < 0
    also l = min(l, -A dual_clip), so a huge ratio on a bad token cannot blow the loss up.
    Normaliser: the loss is sum(l * mask) / num_tokens. Pass num_tokens = the response-token count of the whole
    mini-batch, summed over its micro-batches and all-reduced over ranks (common.all_reduce); then the sum of
    the micro-batch losses is the global token mean of SPEC 6, and since common.shard_model sums gradients over
    ranks, the gradient is that of the global token mean. num_tokens=None: this call's own token count.
    metrics: floats normalised the same way (sum over this call's tokens / num_tokens), so they add up across
    micro-batches and ranks like the loss: clip_frac (the clip bound is active), dual_clip_frac, ratio,
    approx_kl (k1 of old vs new).
    """
    mask = mask.to(logp.dtype)  # [N, T]
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)  # [N, T]
    advantages = advantages.to(logp.dtype)
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    # the clamp only keeps exp finite on a wildly off-policy token; the clipped loss ignores such ratios anyway
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # [N, T]
    ratio = log_ratio.exp()  # [N, T]
    loss_unclipped = -advantages * ratio  # [N, T]
    loss_clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)  # [N, T]
    token_loss = torch.maximum(loss_unclipped, loss_clipped)  # [N, T]
    dual_bound = -advantages * dual_clip  # [N, T]
    negative = advantages < 0
    dual_active = negative & (token_loss > dual_bound)
    token_loss = torch.where(negative, torch.minimum(token_loss, dual_bound), token_loss)  # [N, T]
    loss = (token_loss * mask).sum() / num_tokens
    with torch.no_grad():
        def token_mean(x):
            return ((x.to(mask.dtype) * mask).sum() / num_tokens).item()
        metrics = {
            "clip_frac": token_mean(loss_clipped > loss_unclipped),
            "dual_clip_frac": token_mean(dual_active),
            "ratio": token_mean(ratio),
            "approx_kl": token_mean(-log_ratio),
        }
    return loss, metrics


KL_KINDS = ("low_var_kl", "k1")


def kl_penalty(logp, ref_logp, kind="low_var_kl"):
    """Per-token KL estimate of the policy from a frozen reference, [N, T]; samples come from the policy.

    "k1": logp - ref_logp (unbiased, high variance, can be negative).
    "low_var_kl": Schulman's k3, exp(ref_logp - logp) - (ref_logp - logp) - 1 >= 0 (unbiased, low variance),
    clamped to [0, 10] as verl/EasyR1 do so that one token whose reference probability vanished cannot dominate.
    Add it as beta * sum(kl * mask) / num_tokens, with the same num_tokens as ppo_loss (KL is off by default).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "low_var_kl":
        log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # [N, T]
        return (log_ratio.exp() - log_ratio - 1).clamp(max=10.0)
    raise ValueError(f"ema_grpo.kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}")
