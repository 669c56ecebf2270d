"""
Rewards (SPEC 4): format, structure bonus and accuracy for every problem_type, as the released OneThinker
reward computes them, plus the POLAR reward-model client for open-ended answers.

    overall, parts = score(response, ground_truth, problem_type, data_type)
    results = compute_score(items, format_weight=0.1)   # the released batch interface, drop-in for EasyR1

overall = (1 - format_weight) * accuracy + format_weight * format + structure, at most 1.5.
Where the release is odd we keep its behaviour and say so in a comment starting "release:".

Symbolic checks (math-verify, and mathruler's grade_answer that multiple choice and math use) can hang on
adversarial text: 2^(9^(9^9)) is a C-level big-integer power that no signal interrupts. They run in one child
Python process per process (started on first use, shared by all threads under a lock), which is killed and
restarted when an item overruns `math_timeout`; that item scores 0, so an item costs at most the timeout plus
a restart. Pipes and poll need neither signals nor the main thread, so this works from any thread, and the
child caps its own CPU time per request so that it cannot outlive a dead parent by more than the bound. It runs
in its own session, so a signal to the trainer's process group (a preemption) does not reach it. compute_score's
math_batch_timeout bounds a whole batch's symbolic time. Cheap exact fast paths and a cache come first.

Speed: `python bench.py rewards`. Tests: tests/test_rewards.py, tests/test_reward_server.py.
"""
import atexit
import collections
import contextlib
import functools
import http.client
import itertools
import json
import math
import os
import re
import select
import string
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
from nltk.stem import porter

MATH_TIMEOUT_S = 5.0  # per symbolic check; math-verify's own per-operation default
POLAR_MODEL = "internlm/POLAR-7B"

# Events that training logs (and clears) with pop_counters(): reward-model batches, failures, retries and
# fallbacks (rm_*), symbolic checks that timed out or crashed their worker, or were skipped once the batch's
# time was spent (symbolic_*).
COUNTERS = collections.Counter()


def pop_counters():
    """The counters since the last call, as a plain dict; resets them."""
    counts = dict(COUNTERS)
    COUNTERS.clear()
    return counts


# -----------------------------------------------------------------------------
# parsing (SPEC 4 steps 1-3)

_TAG_CHAR = re.compile(r"([<>/])")
_THINK_TO_ANSWER = re.compile(r"</think>\s*<answer>")


def normalize_tags(text):
    """Remove whitespace around every <, > and / in the response (SPEC 4.1), so '< / think >' is '</think>'."""
    # Same result as the release's re.sub(r"\s*(<|>|/)\s*", r"\1", text), in linear time: that pattern is
    # quadratic in a long run of spaces (4.5 s for 20,000) and 8x slower on ordinary responses.
    parts = _TAG_CHAR.split(text)  # text, char, text, char, ..., text
    last = len(parts) - 1
    for i in range(0, last + 1, 2):
        piece = parts[i]
        if i > 0:
            piece = piece.lstrip()
        if i < last:
            piece = piece.rstrip()
        parts[i] = piece
    return "".join(parts)


def format_reward(text):
    """1.0 when the normalised text fully matches SPEC 4.2's regex (dot matches newlines), else 0.0:
    \\A\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*\\Z"""
    # The same test as that regex without its backtracking: stripped, the text opens with <think>, closes with
    # </answer>, and somewhere between them a </think> is followed (after whitespace) by <answer>.
    text = text.strip()
    return float(text.startswith("<think>") and text.endswith("</answer>")
                 and _THINK_TO_ANSWER.search(text, 7, len(text) - 9) is not None)


def extract_answer(text):
    """The text inside the first <answer>...</answer>, stripped; None when there is no such pair."""
    start = text.find("<answer>")
    end = text.find("</answer>", start + 8) if start >= 0 else -1
    return text[start + 8:end].strip() if end >= 0 else None


def answer_text(text):
    """What accuracy is computed on: the text inside the first <answer>...</answer>, or the whole stripped text
    when there is no such pair or it is empty (release). Ground truths and, after normalize_tags, responses."""
    return extract_answer(text) or text.strip()


def parse_json_answer(text):
    """The JSON value of an answer, or None when it is not JSON (NaN and Infinity are accepted, as json does)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # ValueError also covers integers too long to convert
        return None


def _floats(x, n):
    """x as a tuple of n floats, or None unless x is a list of n items that all pass float() (the release's
    test for a list of numbers, so numeric strings and bools count)."""
    if not isinstance(x, list) or len(x) != n:
        return None
    try:
        return tuple(map(float, x))
    except (TypeError, ValueError, OverflowError):
        return None


def is_number_list(x, n):
    """A list of n items that all pass float()."""
    return _floats(x, n) is not None


def _relu(x):
    """max(0.0, x), NaN -> 0.0 as there, but cheaper (box IoU is the inner loop of tracking)."""
    return x if x > 0.0 else 0.0


def _unit(x):
    """x clamped to [0, 1]; NaN -> 0 (a NaN or inf inside a JSON answer can make the release's arithmetic NaN)."""
    return x if 0.0 <= x <= 1.0 else (1.0 if x > 1.0 else 0.0)


# -----------------------------------------------------------------------------
# geometry (SPEC 4.5): shared with eval.py

def temporal_iou(pred, gt):
    """tIoU of two [start, end] lists; 0 unless both are lists of 2 numbers."""
    a, b = _floats(pred, 2), _floats(gt, 2)
    if a is None or b is None:
        return 0.0
    (s1, e1), (s2, e2) = a, b
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = max(e1, e2) - min(s1, s2)
    return _unit(inter / union) if union > 1e-12 else 0.0


def box_iou(pred, gt):
    """IoU of two [x1, y1, x2, y2] boxes; 0 unless both are lists of 4 numbers."""
    a, b = _floats(pred, 4), _floats(gt, 4)
    if a is None or b is None:
        return 0.0
    (x1, y1, x2, y2), (X1, Y1, X2, Y2) = a, b
    inter = _relu(min(x2, X2) - max(x1, X1)) * _relu(min(y2, Y2) - max(y1, Y1))
    union = _relu(x2 - x1) * _relu(y2 - y1) + _relu(X2 - X1) * _relu(Y2 - Y1) - inter
    return _unit(inter / union) if union > 1e-12 else 0.0


def _three_points(points):
    """Exactly 3 [x, y] number pairs as float tuples, or None."""
    if not isinstance(points, list) or len(points) != 3:
        return None
    points = [_floats(p, 2) for p in points]
    return None if None in points else points


def point_set_similarity(pred, gt, sigma=50.0):
    """exp(-d^2 / (2 sigma^2)), d the mean distance under the best one-to-one matching of 3 points to 3 points;
    0 unless both are lists of exactly 3 [x, y] number pairs."""
    pred, gt = _three_points(pred), _three_points(gt)
    return 0.0 if pred is None or gt is None else _matched_similarity(pred, gt, sigma)


def _matched_similarity(pred, gt, sigma=50.0):
    dist = [[math.hypot(px - gx, py - gy) for gx, gy in gt] for px, py in pred]  # [3 pred, 3 gt]
    sums = (dist[i][0] + dist[j][1] + dist[k][2] for i, j, k in itertools.permutations(range(3)))
    best = min((s for s in sums if math.isfinite(s)), default=math.inf)  # release: skip inf / NaN matchings
    if not math.isfinite(best):
        return 0.0
    d = best / 3.0
    return _unit(math.exp(-d * d / (2.0 * sigma * sigma)))


# -----------------------------------------------------------------------------
# accuracy per problem_type (SPEC 4.5), each in [0, 1]. Text types take answer strings, JSON types parsed values.

def _to_float(text):
    """The release's number parse: float() after removing commas (so 'nan', 'inf' and '1_000' parse too)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def numerical_accuracy(pred, gt):
    """1 when both parse as numbers that are equal after rounding to 2 decimals."""
    p, g = _to_float(pred), _to_float(gt)
    return float(p is not None and g is not None and round(p, 2) == round(g, 2))


# release: mean relative accuracy in torch float32. Thresholds are 0.50..0.95 rounded to float32 and every step
# below is float32 too, because at exact boundaries (8 vs 10 has relative error 0.2 = 1 - 0.8) float32 and
# float64 disagree, and such boundaries are common with integer answers.
_MRA_MARGINS = (1.0 - np.array([0.5 + 0.05 * i for i in range(10)]).astype(np.float32)).astype(np.float32)  # [10] 1 - t


def mean_relative_accuracy(pred, gt):
    """Share of thresholds t in {0.50, 0.55, ..., 0.95} with |pred - gt| / (|gt| + 1e-8) < 1 - t."""
    with np.errstate(all="ignore"):  # overflow to inf and inf - inf give a NaN error, which scores 0
        p, g = np.float32(pred), np.float32(gt)
        rel = np.abs(p - g) / (np.abs(g) + np.float32(1e-8))
        return int(np.count_nonzero(rel < _MRA_MARGINS)) / 10.0


def regression_accuracy(pred, gt):
    """Mean relative accuracy of two number strings; 0 when either does not parse."""
    p, g = _to_float(pred), _to_float(gt)
    return 0.0 if p is None or g is None else mean_relative_accuracy(p, g)


def word_error_rate(ref, hyp):
    """Word-level edit distance between whitespace-split words, divided by the reference length (at least 1)."""
    ref, hyp = ref.split(), hyp.split()
    if ref == hyp:
        return 0.0
    row = list(range(len(hyp) + 1))  # edit distances of ref[:i] to every prefix of hyp
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], diag if r == h else 1 + min(diag, row[j], row[j - 1])
    return row[-1] / max(1, len(ref))


def ocr_accuracy(pred, gt):
    """max(0, 1 - WER) of the prediction against the ground truth."""
    return _unit(1.0 - word_error_rate(gt, pred))


# ROUGE as rouge_score computes it: its tokenizer and formulas, equal to RougeScorer(["rouge1", "rouge2",
# "rougeL"], use_stemmer=True) to the last bit (tested), about 6x faster. Porter stems are cached (stemming is
# where rouge_score spends most of its time, and a stem depends on the word alone) and the LCS is bit-parallel
# instead of a Python table. (The release also builds a new RougeScorer on every call.)
_stem = functools.lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text):
    """rouge_score's tokens: lower-case alphanumeric words, Porter-stemmed when longer than 3 characters."""
    return [_stem(w) if len(w) > 3 else w for w in _NON_ALNUM.sub(" ", text.lower()).split()]


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (bit-parallel: Crochemore et al. 2001)."""
    masks = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)  # bit i: a[i] is this token
    full = (1 << len(a)) - 1
    v = full  # a zero bit per element of a used in the LCS so far
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def _f_measure(overlap, n_pred, n_ref):
    precision, recall = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngram_f(ref, hyp):
    """ROUGE-N F-measure of two lists of n-grams (clipped counts)."""
    ref_counts, hyp_counts = collections.Counter(ref), collections.Counter(hyp)
    overlap = sum(min(c, hyp_counts[g]) for g, c in ref_counts.items() if g in hyp_counts)
    return _f_measure(overlap, len(hyp), len(ref))


def rouge_accuracy(pred, gt):
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures with Porter stemming."""
    ref, hyp = rouge_tokens(gt), rouge_tokens(pred)
    rouge_1 = _ngram_f(ref, hyp)
    rouge_2 = _ngram_f(list(zip(ref, ref[1:])), list(zip(hyp, hyp[1:])))
    rouge_l = _f_measure(lcs_length(ref, hyp), len(hyp), len(ref)) if ref and hyp else 0.0
    return _unit((rouge_1 + rouge_2 + rouge_l) / 3.0)


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def math_accuracy(pred, gt, timeout=MATH_TIMEOUT_S):
    """1 when math-verify finds pred equal to gt (grade_answer if math-verify raises); 0 on timeout."""
    # Fast path: two plain decimals of at most 15 digits are equal exactly when their floats are, and
    # math-verify agrees (it compares them as numbers). Anything else, including unequal numbers that
    # math-verify may still call equal after its rounding, goes to the worker.
    if (len(pred) <= 16 and len(gt) <= 16 and _PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(gt)
            and float(pred) == float(gt)):
        return 1.0
    return float(_symbolic_within(timeout, "math", pred, gt))


def _is_letter(text):
    return len(text) == 1 and text in string.ascii_letters


def multiple_choice_accuracy(pred, gt, timeout=MATH_TIMEOUT_S):
    """1 when mathruler's grade_answer accepts pred for the option letter gt (release); 0 on timeout."""
    pred, gt = pred.strip(), gt.strip()
    if pred == gt:
        return 1.0
    if _is_letter(pred) and _is_letter(gt):
        return float(pred.lower() == gt.lower())  # what grade_answer says for two letters (checked for all pairs)
    return float(_symbolic_within(timeout, "choice", pred, gt))


def _symbolic_within(timeout, kind, pred, gt):
    """symbolic_equal, or False without asking the worker when the batch's time for symbolic checks is spent
    (timeout <= 0, compute_score's math_batch_timeout), counted as symbolic_skipped."""
    if timeout <= 0:
        COUNTERS["symbolic_skipped"] += 1
        return False
    return symbolic_equal(kind, pred, gt, timeout)


def temporal_accuracy(pred, gt):
    """tIoU of the "time" spans."""
    if not (isinstance(pred, dict) and isinstance(gt, dict)):
        return 0.0
    return temporal_iou(pred.get("time"), gt.get("time"))


def spatial_accuracy(pred, gt):
    """Box IoU of the "boxes" values."""
    if not (isinstance(pred, dict) and isinstance(gt, dict)):
        return 0.0
    return box_iou(pred.get("boxes"), gt.get("boxes"))


def spatial_temporal_accuracy(pred, gt):
    """0.5 tIoU + 0.5 mean box IoU over the seconds present in both (missing seconds are not penalised)."""
    if not (isinstance(pred, dict) and isinstance(gt, dict)):
        return 0.0
    tiou = temporal_iou(pred.get("time"), gt.get("time"))
    pred_boxes, gt_boxes = pred.get("boxes"), gt.get("boxes")
    miou = 0.0
    if isinstance(pred_boxes, dict) and isinstance(gt_boxes, dict):
        common = [k for k in pred_boxes if k in gt_boxes]
        if common:
            miou = sum(box_iou(pred_boxes[k], gt_boxes[k]) for k in common) / len(common)
    return 0.5 * tiou + 0.5 * miou


def tracking_accuracy(pred, gt):
    """Mean box IoU over the ground-truth seconds; a second missing from the prediction counts 0."""
    if not (isinstance(pred, dict) and isinstance(gt, dict)):
        return 0.0
    pred_boxes, gt_boxes = pred.get("boxes"), gt.get("boxes")
    if not (isinstance(pred_boxes, dict) and isinstance(gt_boxes, dict)) or not gt_boxes:
        return 0.0
    return sum(box_iou(pred_boxes.get(k), box) for k, box in gt_boxes.items()) / len(gt_boxes)


def segmentation_accuracy(pred, gt, data_type):
    """image: 0.5 IoU + 0.25 pos_sim + 0.25 neg_sim; video: 0.3 IoU + 0.3 exp(-|dt| / 2) + 0.2 pos + 0.2 neg."""
    if not (isinstance(pred, dict) and isinstance(gt, dict)):
        return 0.0
    pos = _three_points(pred.get("positive_points")), _three_points(gt.get("positive_points"))
    neg = _three_points(pred.get("negative_points")), _three_points(gt.get("negative_points"))
    if None in pos or None in neg:
        return 0.0  # any malformed point list scores 0
    iou = box_iou(pred.get("boxes"), gt.get("boxes"))
    pos_sim, neg_sim = _matched_similarity(*pos), _matched_similarity(*neg)
    if data_type == "image":
        return 0.5 * iou + 0.25 * pos_sim + 0.25 * neg_sim
    if data_type == "video":
        t_pred, t_gt = pred.get("time"), gt.get("time")
        if not (isinstance(t_pred, (int, float)) and isinstance(t_gt, (int, float))):
            return 0.0  # release: the keyframe must be a JSON number (a bool passes, as int)
        time_sim = _unit(math.exp(-abs(float(t_pred) - float(t_gt)) / 2.0))
        return 0.3 * iou + 0.3 * time_sim + 0.2 * pos_sim + 0.2 * neg_sim
    return 0.0


JSON_TYPES = ("temporal grounding", "spatial grounding", "spatial-temporal grounding", "tracking", "segmentation")


def accuracy(answer, gt, problem_type, data_type, pred_obj=None, gt_obj=None, math_timeout=MATH_TIMEOUT_S):
    """Accuracy in [0, 1] of an answer string for a (lower-case) problem_type; any exception scores 0 (release).

    JSON types use pred_obj / gt_obj, the parsed answer and ground truth. Unknown types score 0."""
    try:
        if problem_type == "multiple choice":
            return multiple_choice_accuracy(answer, gt, math_timeout)
        if problem_type == "numerical":
            return numerical_accuracy(answer, gt)
        if problem_type == "regression":
            return regression_accuracy(answer, gt)
        if problem_type == "ocr":
            return ocr_accuracy(answer, gt)
        if problem_type == "open-ended":
            return rouge_accuracy(answer, gt)
        if problem_type == "math":
            return math_accuracy(answer, gt, math_timeout)
        if problem_type == "temporal grounding":
            return temporal_accuracy(pred_obj, gt_obj)
        if problem_type == "spatial grounding":
            return spatial_accuracy(pred_obj, gt_obj)
        if problem_type == "spatial-temporal grounding":
            return spatial_temporal_accuracy(pred_obj, gt_obj)
        if problem_type == "tracking":
            return tracking_accuracy(pred_obj, gt_obj)
        if problem_type == "segmentation":
            return segmentation_accuracy(pred_obj, gt_obj, data_type)
    except ChildProcessError:
        raise  # a broken environment, not a bad answer: it must not score every math item 0 in silence
    except Exception:
        pass
    return 0.0


# -----------------------------------------------------------------------------
# structure bonus (SPEC 4.4)

def _box_dict(boxes):
    return isinstance(boxes, dict) and all(is_number_list(b, 4) for b in boxes.values())


def structure_bonus(problem_type, data_type, pred, gt):
    """The bonus for a well-formed answer: pred and gt are the parsed answer (None without a tag) and ground truth."""
    if problem_type in ("spatial-temporal grounding", "tracking"):
        bonus = 0.0
        if isinstance(pred, dict) and _box_dict(pred.get("boxes")) and (
                problem_type == "tracking" or (isinstance(pred.get("time"), list) and len(pred["time"]) == 2)):
            bonus += 0.25
        if isinstance(pred, dict) and isinstance(gt, dict):
            pred_boxes, gt_boxes = pred.get("boxes", {}), gt.get("boxes", {})
            if isinstance(pred_boxes, dict) and isinstance(gt_boxes, dict) and gt_boxes:
                bonus += 0.25 * len(pred_boxes.keys() & gt_boxes.keys()) / len(gt_boxes)
        return bonus
    if problem_type == "temporal grounding":
        return 0.5 if isinstance(pred, dict) and is_number_list(pred.get("time"), 2) else 0.0
    if problem_type == "spatial grounding":
        return 0.5 if isinstance(pred, dict) and is_number_list(pred.get("boxes"), 4) else 0.0
    if problem_type == "segmentation":
        ok = (isinstance(pred, dict) and is_number_list(pred.get("boxes"), 4)
              and _three_points(pred.get("positive_points")) is not None
              and _three_points(pred.get("negative_points")) is not None)
        if data_type == "image":
            return 0.5 if ok else 0.0
        if data_type == "video":
            return 0.5 if ok and isinstance(pred.get("time"), (int, float)) else 0.0
        return 0.0
    return 0.5  # release: every other type, unknown ones included, gets the bonus


# -----------------------------------------------------------------------------
# one response, and the released batch interface

def score(response, ground_truth, problem_type, data_type, *, format_weight=0.1, math_timeout=MATH_TIMEOUT_S):
    """(overall, parts) for one response; parts has overall, format, accuracy, structure_reward (SPEC 4)."""
    response = normalize_tags(response)
    gt = answer_text(ground_truth)  # a ground truth wrapped in <answer> tags is unwrapped
    problem_type, data_type = problem_type.lower(), data_type.lower()
    fmt = format_reward(response)
    tagged = extract_answer(response)
    # release: without an answer tag (or with an empty one) accuracy is computed on the whole response,
    # while the structure bonus sees an empty answer
    answer = answer_text(response)
    pred_obj = gt_obj = None
    if problem_type in JSON_TYPES:
        pred_obj, gt_obj = parse_json_answer(answer), parse_json_answer(gt)
    acc = _unit(accuracy(answer, gt, problem_type, data_type, pred_obj, gt_obj, math_timeout))
    structure = structure_bonus(problem_type, data_type, pred_obj if tagged else None, gt_obj) if fmt else 0.0
    overall = overall_reward(acc, fmt, structure, format_weight)
    return overall, {"overall": overall, "format": fmt, "accuracy": acc, "structure_reward": structure}


def overall_reward(accuracy, fmt, structure, format_weight=0.1):
    """SPEC 4.6: (1 - format_weight) x accuracy + format_weight x format + structure (0.9 / 0.1 released)."""
    return (1.0 - format_weight) * accuracy + format_weight * fmt + structure


def compute_score(items, format_weight=0.1, *, reward_model_url=None, reward_model_name=POLAR_MODEL,
                  reward_model_batch_size=64, reward_model_timeout=60.0, reward_model_retries=3,
                  reward_model_backoff=1.0, reward_model_breaker=0, reward_model_cooldown=300.0,
                  math_timeout=MATH_TIMEOUT_S, math_batch_timeout=None):
    """The released batch interface: items are dicts with response, ground_truth, data_type, problem_type
    (optional problem, problem_id); returns one dict per item with overall, format, accuracy, structure_reward.

    With reward_model_url (a vLLM /pooling endpoint serving POLAR), open-ended accuracy comes from the reward
    model, normalised within each problem_id group; a batch that fails after its retries falls back to ROUGE
    (reward_model_scores: the circuit breaker). math_batch_timeout: seconds for all symbolic checks of this call
    together; once spent, the remaining ones score 0 (counted symbolic_skipped), so an adversarial batch costs
    at most this plus one item's math_timeout. None: no bound (the release). Scores then depend on the clock,
    but only for items that adversarial."""
    if not isinstance(items, list):
        raise TypeError(f"compute_score takes a list of dicts (the released batch interface), "
                        f"got {type(items).__name__}")
    results, rm_queue = [], []
    deadline = None if math_batch_timeout is None else time.monotonic() + math_batch_timeout
    for i, item in enumerate(items):
        fields = {key: item.get(key) or "" for key in ("response", "ground_truth", "problem_type", "data_type")}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise TypeError(f"compute_score item {i}: field {key!r} must be a string, got {value!r:.80}")
        timeout = math_timeout if deadline is None else min(math_timeout, deadline - time.monotonic())
        _, parts = score(fields["response"], fields["ground_truth"], fields["problem_type"], fields["data_type"],
                         format_weight=format_weight, math_timeout=timeout)
        results.append(parts)
        if reward_model_url and fields["problem_type"].lower() == "open-ended":
            rm_queue.append({"index": i, "prompt": item.get("problem") or "",
                             "reference": answer_text(fields["ground_truth"]),
                             "output": extract_answer(normalize_tags(fields["response"])) or "",
                             "problem_id": item.get("problem_id")})
    if rm_queue:
        scores = reward_model_scores(rm_queue, reward_model_url, model=reward_model_name,
                                     batch_size=reward_model_batch_size, timeout=reward_model_timeout,
                                     retries=reward_model_retries, backoff=reward_model_backoff,
                                     breaker=reward_model_breaker, cooldown=reward_model_cooldown)
        scores = normalize_by_group(scores, [q["problem_id"] for q in rm_queue])
        for q, s in zip(rm_queue, scores):
            parts = results[q["index"]]
            parts["accuracy"] = _unit(s)
            parts["overall"] = overall_reward(parts["accuracy"], parts["format"], parts["structure_reward"],
                                              format_weight)
    return results


# -----------------------------------------------------------------------------
# the POLAR reward-model client (SPEC 4, open-ended; the paper's setting, off by default as in the release)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the release bypasses proxies too


def polar_text(prompt, reference, output):
    """POLAR's input: the reference and the candidate, each after the prompt, then the reward token."""
    return f"{prompt}\n{reference}<|reward|>{prompt}\n{output}[UNUSED_TOKEN_130]"


def _last_value(x):
    while isinstance(x, list):
        x = x[-1]
    return float(x)


def request_rewards(url, texts, *, model=POLAR_MODEL, timeout=60.0, retries=3, backoff=1.0):
    """One score per text from a vLLM /pooling endpoint (the last pooled value of each); raises RuntimeError
    after 1 + retries failed attempts, sleeping backoff * 2^k seconds before retry k."""
    body = json.dumps({"model": model, "input": texts}).encode()
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with _OPENER.open(request, timeout=timeout) as response:
                rows = json.loads(response.read())["data"]
            scores = [_last_value(row["data"]) for row in rows]
            if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
                raise ValueError(f"expected {len(texts)} finite scores, got {scores!r:.200}")
            return scores
        except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError) as e:
            error = e  # OSError covers refused connections, timeouts and HTTP error statuses
        if attempt < retries:
            COUNTERS["rm_retries"] += 1
            time.sleep(backoff * 2 ** attempt)
    raise RuntimeError(f"reward model at {url} failed {retries + 1} times, last: {error!r}")


_BREAKERS = {}  # url -> {"failures": failed batches in a row, "open_until": time.monotonic() to call it again}


def reward_model_scores(queue, url, *, model=POLAR_MODEL, batch_size=64, timeout=60.0, retries=3, backoff=1.0,
                        breaker=0, cooldown=300.0):
    """Raw reward-model scores for dicts with prompt, reference, output, in batches; a batch that fails falls
    back to ROUGE for its items (release), counted in COUNTERS and printed.

    Circuit breaker (breaker > 0): after that many failed batches in a row the server is not called for
    `cooldown` seconds (its batches go straight to ROUGE, counted rm_breaker_items); then one batch tries it
    again, and a success closes the breaker. Without it, a server that accepts and never answers costs
    (1 + retries) x timeout plus the backoffs for every batch."""
    scores, state = [], _BREAKERS.setdefault(url, {"failures": 0, "open_until": 0.0})
    for start in range(0, len(queue), batch_size):
        batch = queue[start:start + batch_size]
        COUNTERS["rm_batches"] += 1
        if time.monotonic() < state["open_until"]:
            COUNTERS["rm_breaker_items"] += len(batch)
            COUNTERS["rm_fallback_items"] += len(batch)
            scores += [rouge_accuracy(q["output"], q["reference"]) for q in batch]
            continue
        try:
            scores += request_rewards(url, [polar_text(q["prompt"], q["reference"], q["output"]) for q in batch],
                                      model=model, timeout=timeout, retries=retries, backoff=backoff)
            state["failures"] = 0
        except RuntimeError as e:
            COUNTERS["rm_failed_batches"] += 1
            COUNTERS["rm_fallback_items"] += len(batch)
            state["failures"] += 1
            print(f"{e}: {len(batch)} items scored by ROUGE", flush=True)
            if breaker and state["failures"] >= breaker:
                state["open_until"] = time.monotonic() + cooldown
                print(f"reward model at {url}: {state['failures']} batches failed in a row; not called for "
                      f"{cooldown:.0f} s (ROUGE meanwhile)", flush=True)
            scores += [rouge_accuracy(q["output"], q["reference"]) for q in batch]
    return scores


def normalize_by_group(scores, group_ids):
    """Z-score then min-max scale to [0, 1] within each group; a group with no spread scores 1 (release).

    release: ROUGE fallbacks are normalised together with reward-model scores of the same group."""
    groups = collections.defaultdict(list)
    for i, gid in enumerate(group_ids):
        groups[gid].append(i)
    out = [0.0] * len(scores)
    for indices in groups.values():
        v = np.array([scores[i] for i in indices], dtype=np.float32)  # [group]
        if v.std() == 0:
            norm = np.ones_like(v)
        else:
            z = (v - v.mean()) / (v.std() + 1e-6)
            norm = (z - z.min()) / (z.max() - z.min() + 1e-12)
        for i, s in zip(indices, norm.tolist()):
            out[i] = s
    return out


# -----------------------------------------------------------------------------
# symbolic checks in a child process (see the module docstring)

WORKER_START_TIMEOUT_S = 120.0
_worker = None  # subprocess.Popen of the child, or None
_worker_pid = None  # os.getpid() when it was started: a forked process starts its own
_worker_ready = False
_worker_lock = threading.Lock()


def _symbolic_equal_here(kind, pred, gt):
    """What the release computes for multiple choice ("choice") and math; runs inside the worker."""
    from math_verify import parse, verify
    from mathruler.grader import grade_answer
    try:
        if kind == "math":
            try:
                return bool(verify(parse(gt), parse(pred)))
            except Exception:
                return grade_answer(pred, gt)  # release: grade_answer only when math-verify raises
        return grade_answer(pred, gt)
    except Exception:
        return False


def _serve_symbolic():
    """The worker: reads [kind, pred, gt, timeout] JSON lines on stdin, answers 1 or 0 a line on stdout."""
    import logging
    import resource
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its own timeouts log warnings; they score 0 anyway
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the CPU cap below must not leave core files behind
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print from a library goes to stderr, not into the replies
    _symbolic_equal_here("math", "\\frac{1}{2}", "0.5")  # imports and sympy's first-use caches before "ready",
    _symbolic_equal_here("choice", "(C)", "B")  # so that startup is not billed to the first item's time bound
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        kind, pred, gt, timeout = json.loads(line)
        # A CPU-time cap per request (SIGXCPU ends the process): the parent kills us on overrun anyway, but this
        # bound also holds when the parent died mid-request.
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + math.ceil(timeout) + 2)
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        out.write(b"1\n" if _symbolic_equal_here(kind, pred, gt) else b"0\n")


def _start_worker():
    global _worker, _worker_pid, _worker_ready
    # its own session: a SIGTERM / SIGINT sent to the trainer's process group (torchrun, Slurm, Ctrl-C) must not
    # kill it mid-request and score a right answer 0 in the step being saved; it still ends with its parent, on
    # the end of its stdin
    _worker = subprocess.Popen([sys.executable, "-c", "import rewards; rewards._serve_symbolic()"],
                               cwd=os.path.dirname(os.path.abspath(__file__)),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    _worker_pid, _worker_ready = os.getpid(), False


def _stop_worker():
    global _worker
    if _worker is not None and _worker_pid == os.getpid():
        _worker.kill()
        _worker.wait()
        with contextlib.suppress(OSError):  # a request may still sit in the buffer of the dead pipe
            _worker.stdin.close()
        _worker.stdout.close()
    _worker = None


def _read_line(proc, timeout):
    """One line from the worker's stdout, or None on timeout or end of file."""
    fd, line = proc.stdout.fileno(), b""
    poller = select.poll()  # not select.select, which fails on descriptors above 1024
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        line += chunk
    return line.strip()


def _ask_worker(request, timeout):
    global _worker_ready
    if _worker is None or _worker_pid != os.getpid() or _worker.poll() is not None:
        _start_worker()
    if not _worker_ready:
        if _read_line(_worker, WORKER_START_TIMEOUT_S) != b"ready":
            _stop_worker()
            raise ChildProcessError(f"rewards.py: the symbolic-check worker ({sys.executable}) did not start; "
                                    "see its error above")
        _worker_ready = True
    _worker.stdin.write(request)
    _worker.stdin.flush()
    return _read_line(_worker, timeout)


@functools.lru_cache(maxsize=1 << 14)
def symbolic_equal(kind, pred, gt, timeout=MATH_TIMEOUT_S):
    """grade_answer ("choice") or math-verify ("math") in the worker, killed after timeout seconds (-> False)."""
    request = (json.dumps([kind, pred, gt, timeout]) + "\n").encode()
    with _worker_lock:
        try:
            reply = _ask_worker(request, timeout)
        except BrokenPipeError:  # the worker died before reading the request
            reply = None
        if reply is None:  # overran, or crashed on this input (e.g. a C stack overflow)
            COUNTERS["symbolic_timeouts"] += 1
            _stop_worker()
            _start_worker()  # restart now: its imports overlap whatever the caller does next
    return reply == b"1"


atexit.register(_stop_worker)
