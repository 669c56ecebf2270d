"""
Benchmarks: side-by-side timings printed as ratios (correctness lives in tests/). The last line of each is a
one-line key=value summary.

    python bench.py rollout [--model=runs/tiny-model] [--new_tokens=96] [--rounds=7]  # compiled, eager, HF
    python bench.py rewards [--per_type=300] [--rounds=5] [--seed=0]
    python bench.py rollout8b [--prompts=1,3,8] [--new_tokens=256]  # the same at Qwen3-VL-8B's shapes, one GPU
    python bench.py memory [--hidden=64] [--response_tokens=1024] [--seqs=8]  # memory.py's plan vs measured peaks
    python bench.py rollout --help                       # each benchmark's keys with their comments
"""
import dataclasses
import functools
import gc
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass

import math_verify
import numpy as np
import torch
from mathruler.grader import grade_answer
from rouge_score import rouge_scorer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

import common
import ema_grpo
import memory
import model as model_lib
import rewards
import rollout


# -----------------------------------------------------------------------------
# rollout: our generate (shared prefill, bucketed cache, compiled or eager decode) vs HF model.generate

def rollout_prompts(processor, count, seed=0):
    """`count` chat prompts cycling image / video / text-only, with questions of different lengths."""
    rng = np.random.default_rng(seed)
    questions = ["What colour is the circle?", "Give the bounding box of the red square.",
                 "How many shapes are there? A. one B. two C. three D. four", "Describe the scene in one sentence."]
    texts, images, videos, video_metadata = [], [], [], []
    for i in range(count):
        parts = [{"type": "text", "text": questions[i % len(questions)]}]
        if i % 3 == 0:
            parts.insert(0, {"type": "image"})
            images.append((rng.random((128, 128, 3)) * 255).astype(np.uint8))
        elif i % 3 == 1:
            parts.insert(0, {"type": "video"})
            videos.append((rng.random((4, 64, 64, 3)) * 255).astype(np.uint8))  # 4 frames at 2 fps
            video_metadata.append(VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3], duration=2.0,
                                                width=64, height=64))
        texts.append(processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                   tokenize=False))
    media = {}
    if images:
        media["images"] = images
    if videos:
        media.update(videos=videos, video_metadata=video_metadata, do_sample_frames=False)
    return processor(text=texts, padding=True, return_tensors="pt", **media)


class CountOps(TorchDispatchMode):
    """Counts the aten ops that compute (views excluded): in eager mode, one kernel launch each."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def decode_ops(model, processor):
    """(ops of one eager decode step, of which per layer): the step counted with all layers and with one."""
    inputs = rollout_prompts(processor, 2)
    lm = model.model.language_model
    out = model(**inputs, position_ids=rollout.prompt_positions(model, inputs)[0], use_cache=True)
    caches = rollout.first_caches(out.past_key_values, inputs["attention_mask"], torch.arange(2), 1, static=False)
    counts, layers = [], lm.layers
    for keep in (len(layers), 1):
        lm.layers = layers[:keep]
        with CountOps() as counter:
            rollout.decode_and_sample(model, torch.zeros(2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                                      *caches, torch.tensor([0]), 2, torch.rand(2, 1), 1.0, 1.0, 0)
        counts.append(counter.count)
    lm.layers = layers
    return counts[0], (counts[0] - counts[1]) // (len(layers) - 1)


def median_times(sides, inputs, n, new_tokens, rounds, sync=lambda: None):
    """{side: (median seconds of a call generating new_tokens per row, of one generating 1: the prefill)} for
    sides {name: fn(inputs, n, new_tokens)}, after a warm-up call each; the order rotates every round so that no side
    always runs on a warmer (or busier) machine. sync: waits for the GPU before and after each timed call."""
    times = {name: ([], []) for name in sides}
    for fn in sides.values():
        fn(inputs, n, 4)  # warm-up
    for r in range(rounds):
        for name in list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]:
            for out, k in zip(times[name], (new_tokens, 1)):
                sync()
                t0 = time.perf_counter()
                sides[name](inputs, n, k)
                sync()
                out.append(time.perf_counter() - t0)
    return {name: (statistics.median(full), statistics.median(prefill)) for name, (full, prefill) in times.items()}


@dataclass
class RolloutConfig:
    model: str = model_lib.DEFAULT_MODEL_DIR  # the tiny model is built if missing
    new_tokens: int = 96  # tokens generated per row (EOS suppressed on every side)
    rounds: int = 7  # timed rounds per side, order rotated; the median counts (3 swung 2.4x..3.1x on a loaded VM)


def bench_rollout(argv):
    """Our generate with the compiled decode step, our eager loop, and HF model.generate, on the same batches in
    one process: 16 prompts x 4 samples and 1 x 1. The compilation (first compiled calls) is timed on its own line
    and excluded. The last line's ratio= is compiled / HF tokens per second at 16 x 4."""
    args = dataclasses.asdict(common.parse_config(RolloutConfig, argv))
    model, processor = model_lib.load_model(model_lib.ensure_model(args["model"]))
    model.eval()
    banned = [model.config.image_token_id, model.config.video_token_id]
    print(f"model {args['model']}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"torch threads {torch.get_num_threads()}, sampling at temperature 1, EOS suppressed on every side")

    def ours(inputs, n, new_tokens, compile):
        rollout.generate(model, inputs, n=n, max_new_tokens=new_tokens, temperature=1.0,
                         generator=torch.Generator().manual_seed(0), eos_token_ids=[], compile=compile)

    def hf(inputs, n, new_tokens):
        # num_return_sequences repeats the prompt rows (and their media) before the prefill, as HF does
        model.generate(**inputs, do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, suppress_tokens=banned,
                       pad_token_id=processor.tokenizer.pad_token_id)

    with torch.no_grad():
        ops, per_layer = decode_ops(model, processor)
    print(f"eager decode step: {ops} aten ops a token, {per_layer} per layer (each a kernel launch; the compiled "
          f"step replays the forward's as one CUDA graph on GPU)")
    sides = {"compiled": functools.partial(ours, compile=True), "eager": functools.partial(ours, compile=False),
             "hf": hf}
    shapes = {(B, n): rollout_prompts(processor, B) for B, n in ((16, 4), (1, 1))}
    t0 = time.perf_counter()
    with torch.no_grad():
        for (B, n), inputs in shapes.items():  # dynamic shapes: one graph for many rows, one for a single row
            sides["compiled"](inputs, n, 4)
    print(f"compile {time.perf_counter() - t0:.1f}s (the first compiled calls, both batch shapes; excluded below)")
    summary = {}
    for (B, n), inputs in shapes.items():
        N = args["new_tokens"]
        with torch.no_grad():
            med = median_times(sides, inputs, n, N, args["rounds"])
        tok_s = {name: B * n * N / full for name, (full, _) in med.items()}
        print(f"batch {B} prompts x {n} samples, prompt len {inputs['input_ids'].shape[1]}, {N} new tokens:")
        for name, (full, prefill) in med.items():
            decode = full - prefill
            print(f"  {name:8s} {tok_s[name]:8.0f} tok/s  total {full:.3f}s  prefill+1 {prefill:.3f}s  "
                  f"decode {decode:.3f}s ({1000 * decode / (N - 1):.2f} ms/step)")
        ratios = {"compiled_hf": tok_s["compiled"] / tok_s["hf"], "compiled_eager": tok_s["compiled"] / tok_s["eager"],
                  "eager_hf": tok_s["eager"] / tok_s["hf"]}
        print("  " + "  ".join(f"{key.replace('_', '/')} {value:.2f}x" for key, value in ratios.items()))
        summary.update({f"b{B}x{n}_{key}": f"{value:.2f}" for key, value in ratios.items()})
        summary.update({f"b{B}x{n}_{name}_tok_s": f"{tok_s[name]:.0f}" for name in sides})
    print(f"bench=rollout new_tokens={args['new_tokens']} ops_per_layer={per_layer} "
          + " ".join(f"{k}={v}" for k, v in summary.items())
          + f" ratio={summary['b16x4_compiled_hf']}")


# -----------------------------------------------------------------------------
# rollout8b: the same loop at Qwen3-VL-8B's shapes on one GPU (README, "What to expect from Qwen3-VL-8B")

@dataclass
class Rollout8BConfig:
    prompts: str = "1,4,8"  # prompts per generate call, comma-separated: 4 is the release preset's (80 GB plan), 8
    # what a 141 GB H200 leaves room for next to the training state
    samples: int = 8  # rows per prompt (the release's rollout.n)
    prompt_tokens: int = 1024  # random text tokens per prompt: media change the prefill, not a decode step
    new_tokens: int = 256  # per row, EOS suppressed on every side
    hf: bool = True  # also time HF model.generate (eager: a launch per op, slow at 36 layers)
    layers: int = 0  # decoder layers built; 0: all 36 (1: a quick check of this benchmark on CPU)
    rounds: int = 2  # timed rounds per side; the median counts


def bench_rollout_8b(argv):
    """Qwen3-VL-8B (memory.py's config) with random bf16 weights on one GPU: a decode step's time does not depend
    on the weights' values. Our generate compiled (CUDA graphs) and eager, and HF generate, on the same text
    prompts of random tokens. Each decode step's time is printed next to its floor: every weight the step uses and
    the KV cache it attends over (the compiled step: the whole bucket) read once at the copy bandwidth measured
    here. The compilation (the first compiled call of each batch shape) is timed on its own line."""
    args = common.parse_config(Rollout8BConfig, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = memory.qwen3_vl_8b()
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    lm = model.model.language_model
    # read per step: every weight but the input embeddings (only the fed rows' are read) and the vision tower
    weight_bytes = 2 * (sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
                        + model.lm_head.weight.numel())
    dims = memory.text_dims(config)
    kv_bytes = 2 * dims["L"] * dims["KD"] * 2  # K and V of every layer in bf16, per row and slot (memory.py's)
    x = torch.empty(2 * memory.GiB // 4, device=device)
    y, times = torch.empty_like(x), []
    for _ in range(5):
        sync()
        t1 = time.perf_counter()
        y.copy_(x)
        sync()
        times.append(time.perf_counter() - t1)
    bandwidth = 2 * x.numel() * 4 / statistics.median(times)  # bytes read and written per second
    del x, y
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"Qwen3-VL-8B shapes, {dims['L']} layers, random bf16 weights, built in "
          f"{time.perf_counter() - t0:.0f}s on {name}; {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
          f"{weight_bytes / 1e9:.1f} GB read per decode step; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"torch {torch.__version__}")
    banned = [config.image_token_id, config.video_token_id]
    P, N, n = args.prompt_tokens, args.new_tokens, args.samples

    def ours(inputs, n, new_tokens, compile):
        rollout.generate(model, inputs, n=n, max_new_tokens=new_tokens, temperature=1.0, eos_token_ids=[],
                         generator=torch.Generator(device).manual_seed(0), compile=compile)

    def hf(inputs, n, new_tokens):
        model.generate(**inputs, do_sample=True, num_return_sequences=n, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0, suppress_tokens=banned,
                       pad_token_id=0)

    sides = {"compiled": functools.partial(ours, compile=True), "eager": functools.partial(ours, compile=False)}
    if args.hf:
        sides["hf"] = hf
    summary = {}
    for B in (int(b) for b in args.prompts.split(",")):
        inputs = {"input_ids": torch.randint(0, 150000, (B, P), device=device),  # below every special token id
                  "attention_mask": torch.ones(B, P, dtype=torch.long, device=device),
                  "mm_token_type_ids": torch.zeros(B, P, dtype=torch.long, device=device)}
        rows = B * n
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            sides["compiled"](inputs, n, N)  # compiles (first shape), records the CUDA graphs of this shape's buckets
            sync()
            print(f"{B} x {n} rows: first compiled call (compilation, graph recording) {time.perf_counter() - t0:.1f}s")
            med = median_times(sides, inputs, n, N, args.rounds, sync)
        # the compiled step reads each prompt once and the whole generated bucket of every row: max(FIRST_SLOTS,
        # bucket(t + 2)) slots at step t, for bucket(B) groups (a padding group is computed too)
        new_slots = statistics.mean(max(rollout.FIRST_SLOTS, rollout.bucket(t + 2)) for t in range(N - 1))
        slots = rollout.bucket(B) * (P + n * new_slots)
        floor = (weight_bytes + slots * kv_bytes) / bandwidth
        print(f"  floor: weights {weight_bytes / 1e9:.1f} GB + KV {slots * kv_bytes / 1e9:.1f} GB a step "
              f"= {1000 * floor:.2f} ms at {bandwidth / 1e12:.2f} TB/s")
        for name, (full, prefill) in med.items():
            step = (full - prefill) / (N - 1)
            tok_s = rows * N / full
            print(f"  {name:8s} {1000 * step:7.2f} ms/step ({floor / step:.0%} of the floor's speed)  "
                  f"{rows / step:7.0f} tok/s while decoding  {tok_s:7.0f} tok/s with the prefill  "
                  f"prefill {prefill:.2f}s")
            summary[f"b{rows}_{name}_ms"] = f"{1000 * step:.2f}"
            summary[f"b{rows}_{name}_tok_s"] = f"{rows / step:.0f}"
        summary[f"b{rows}_floor_ms"] = f"{1000 * floor:.2f}"
    print("bench=rollout8b " + " ".join(f"{k}={v}" for k, v in summary.items()))


# -----------------------------------------------------------------------------
# rewards: our compute_score vs the released reward's per-item path, on a fixed mixed set of responses

WORDS = ("a red circle blue square green triangle moves slowly quickly left right above below the small large "
         "shape rotates appears disappears behind next to while then stops again near far corner centre").split()


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _jitter(rng, values, scale):
    return [round(v + rng.uniform(-scale, scale), 1) for v in values]


def _box(rng):
    x, y = rng.randint(0, 700), rng.randint(0, 700)
    return [x, y, x + rng.randint(20, 300), y + rng.randint(20, 300)]


def _points(rng):
    return [[rng.randint(0, 1000), rng.randint(0, 1000)] for _ in range(3)]


def reward_items(seed=0, per_type=300):
    """A fixed mixed set: for every problem_type, `per_type` responses that are right, close, wrong, malformed,
    untagged or have spaced tags, each after a reasoning paragraph. Returns (non_math_items, math_items)."""
    rng = random.Random(seed)

    def make(problem_type, data_type):
        if problem_type == "multiple choice":
            gt = rng.choice("ABCD")
            other = rng.choice("ABCD")
            return gt, rng.choice([gt, gt, other, f"({gt})", f"{other}. {_sentence(rng, 1, 3)}"])
        if problem_type == "numerical":
            gt = str(rng.randint(0, 50))
            return gt, rng.choice([gt, str(rng.randint(0, 50)), f"{gt}.00", "about " + gt])
        if problem_type == "regression":
            gt = round(rng.uniform(1, 100), 1)
            return str(gt), str(round(gt * rng.uniform(0.3, 1.7), 1))
        if problem_type in ("OCR", "open-ended"):
            gt = _sentence(rng, 3, 8) if problem_type == "OCR" else _sentence(rng, 8, 20)
            words = gt.split()
            return gt, " ".join(w if rng.random() < 0.7 else rng.choice(WORDS) for w in words)
        if problem_type == "temporal grounding":
            s = rng.uniform(0, 60)
            gt = [round(s, 1), round(s + rng.uniform(1, 20), 1)]
            return json.dumps({"time": gt}), json.dumps({"time": _jitter(rng, gt, 5)})
        if problem_type == "spatial grounding":
            gt = _box(rng)
            return json.dumps({"boxes": gt}), json.dumps({"boxes": _jitter(rng, gt, 40)})
        if problem_type in ("spatial-temporal grounding", "tracking"):
            s = rng.randint(0, 10)
            seconds = range(s, s + rng.randint(2, 8)) if problem_type != "tracking" else range(1, rng.randint(8, 33))
            gt_boxes = {str(t): _box(rng) for t in seconds}
            pred_boxes = {t: _jitter(rng, b, 40) for t, b in gt_boxes.items() if rng.random() < 0.8}
            gt, pred = {"boxes": gt_boxes}, {"boxes": pred_boxes}
            if problem_type != "tracking":
                gt["time"], pred["time"] = [seconds[0], seconds[-1]], _jitter(rng, [seconds[0], seconds[-1]], 2)
            return json.dumps(gt), json.dumps(pred)
        if problem_type == "segmentation":
            gt = {"boxes": _box(rng), "positive_points": _points(rng), "negative_points": _points(rng)}
            pred = {"boxes": _jitter(rng, gt["boxes"], 40),
                    "positive_points": [_jitter(rng, p, 60) for p in reversed(gt["positive_points"])],
                    "negative_points": [_jitter(rng, p, 60) for p in gt["negative_points"]]}
            if data_type == "video":
                gt["time"], pred["time"] = rng.randint(0, 20), rng.randint(0, 20)
            return json.dumps(gt), json.dumps(pred)
        if problem_type == "math":
            a, b = rng.randint(1, 12), rng.randint(2, 12)
            gt = rng.choice([str(a * b), f"\\frac{{{a}}}{{{b}}}", f"{a}\\sqrt{{{b}}}"])
            pred = rng.choice([gt, str(a * b + rng.randint(1, 5)), f"{a} / {b}", f"\\sqrt{{{a * a * b}}}",
                               f"{a / b:.4f}", f"x = {a * b}"])
            return gt, pred
        raise ValueError(problem_type)

    kinds = [(t, "video" if t in ("temporal grounding", "spatial-temporal grounding", "tracking") else "image")
             for t in ("multiple choice", "numerical", "regression", "OCR", "open-ended", "temporal grounding",
                       "spatial grounding", "spatial-temporal grounding", "tracking", "segmentation", "math")]
    kinds.append(("segmentation", "video"))
    non_math, math_items = [], []
    for problem_type, data_type in kinds:
        for _ in range(per_type):
            gt, pred = make(problem_type, data_type)
            think = _sentence(rng, 20, 80)
            shape = rng.random()
            if shape < 0.7:
                response = f"<think>{think}</think>\n<answer>{pred}</answer>"
            elif shape < 0.85:
                response = f"< think >{think}< / think > < answer > {pred} </ answer >"
            elif shape < 0.95:
                response = f"{think} The answer is {pred}"
            else:
                response = f"<think>{think}</think><answer>{pred[:len(pred) // 2]}"
            item = {"response": response, "ground_truth": f"<answer>{gt}</answer>" if rng.random() < 0.5 else gt,
                    "problem_type": problem_type, "data_type": data_type}
            (math_items if problem_type == "math" else non_math).append(item)
    return non_math, math_items


# The released reward's per-item path, re-created for timing. Its results equal rewards.score's (printed as
# max_abs_diff); its costs are the release's: the backtracking tag and format regexes, a ROUGE scorer and Porter
# stemmer built on every call, grade_answer and math-verify in process (no fast paths, no cache), torch float32
# for the relative accuracy, and JSON answers parsed once for the structure bonus and again for accuracy.
_RELEASE_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_RELEASE_FORMAT = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)
_RELEASE_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def _release_answer(text):
    m = _RELEASE_ANSWER.search(text)
    return m.group(1).strip() if m else None


def _release_accuracy(answer, gt, problem_type, data_type):
    try:
        if problem_type == "multiple choice":
            return float(grade_answer(answer.strip(), gt.strip()))
        if problem_type == "regression":
            p, g = rewards._to_float(answer), rewards._to_float(gt)
            if p is None or g is None:
                return 0.0
            rel = torch.abs(torch.tensor(p) - torch.tensor(g)) / (torch.abs(torch.tensor(g)) + 1e-8)
            return (rel < 1 - torch.arange(0.5, 0.95 + 0.025, 0.05)).float().mean().item()
        if problem_type == "open-ended":
            s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gt, answer)
            return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3.0
        if problem_type == "math":
            try:
                return float(math_verify.verify(math_verify.parse(gt), math_verify.parse(answer)))
            except Exception:
                return float(grade_answer(answer, gt))
        if problem_type in rewards.JSON_TYPES:
            pred_obj, gt_obj = rewards.parse_json_answer(answer), rewards.parse_json_answer(gt)
            return rewards.accuracy(answer, gt, problem_type, data_type, pred_obj, gt_obj)
        return rewards.accuracy(answer, gt, problem_type, data_type)  # numerical, OCR: the same code as ours
    except Exception:
        return 0.0


def release_path_score(item):
    response = _RELEASE_TAG_SPACE.sub(r"\1", item["response"])
    gt = _release_answer(item["ground_truth"]) or item["ground_truth"]
    problem_type, data_type = item["problem_type"].lower(), item["data_type"].lower()
    fmt = 1.0 if _RELEASE_FORMAT.fullmatch(response) else 0.0
    tagged = _release_answer(response) or ""
    structure = rewards.structure_bonus(problem_type, data_type, rewards.parse_json_answer(tagged),
                                        rewards.parse_json_answer(gt))
    acc = _release_accuracy(_release_answer(response) or response.strip(), gt, problem_type, data_type)
    return 0.9 * acc + 0.1 * fmt + (structure if fmt else 0.0)


@dataclass
class RewardsConfig:
    per_type: int = 300  # generated items per problem type
    rounds: int = 5  # timed passes per side; the best counts
    seed: int = 0


def bench_rewards(argv):
    args = dataclasses.asdict(common.parse_config(RewardsConfig, argv))
    non_math, math_items = reward_items(args["seed"], args["per_type"])
    rewards.symbolic_equal("math", "1", "2")  # start the symbolic worker outside the timings

    def ours(items):
        rewards._stem.cache_clear()  # every timed pass starts cold: the caches help only within a pass
        rewards.symbolic_equal.cache_clear()
        return [r["overall"] for r in rewards.compute_score(items)]

    def release(items):
        return [release_path_score(item) for item in items]

    sides = {"ours": ours, "release": release}

    summary = {}
    for name, items in (("non_math", non_math), ("math", math_items)):
        by_type = {}
        for item in items:
            by_type.setdefault((item["problem_type"], item["data_type"]), []).append(item)
        totals, max_diff = {"ours": 0.0, "release": 0.0}, 0.0
        # the fastest of several passes per type: on a shared machine the slower ones measure other processes
        print(f"{name}: {len(items)} items, best of {args['rounds']} passes per type, items/s")
        print(f"  {'type':34s} {'ours':>9s} {'release':>9s} {'ratio':>7s}")
        for (problem_type, data_type), subset in by_type.items():
            times, scores = {"ours": [], "release": []}, {}
            for r in range(args["rounds"]):
                for side in (("ours", "release") if r % 2 == 0 else ("release", "ours")):
                    t0 = time.perf_counter()
                    scores[side] = sides[side](subset)
                    times[side].append(time.perf_counter() - t0)
            max_diff = max([max_diff] + [abs(a - b) for a, b in zip(scores["ours"], scores["release"])])
            best = {side: min(v) for side, v in times.items()}
            for side in totals:
                totals[side] += best[side]
            print(f"  {problem_type + ' / ' + data_type:34s} {len(subset) / best['ours']:9.0f} "
                  f"{len(subset) / best['release']:9.0f} {best['release'] / best['ours']:6.1f}x")
        rate = {side: len(items) / totals[side] for side in totals}
        print(f"  {'all ' + name:34s} {rate['ours']:9.0f} {rate['release']:9.0f} "
              f"{rate['ours'] / rate['release']:6.1f}x   max |ours - release| overall {max_diff:.1e}")
        summary.update({f"{name}_items_s": f"{rate['ours']:.0f}",
                        f"{name}_release_items_s": f"{rate['release']:.0f}",
                        f"{name}_ratio": f"{rate['ours'] / rate['release']:.1f}",
                        f"{name}_max_diff": f"{max_diff:.1e}"})
    print("bench=rewards " + " ".join(f"{k}={v}" for k, v in summary.items()))


# -----------------------------------------------------------------------------
# memory: one RL update micro-batch measured on CPU against memory.py's plan for the same config


@dataclass
class MemoryConfig:
    hidden: int = 64  # text hidden size of the measured Qwen3-VL; its vocabulary is the real 151,936
    vision_hidden: int = 64  # its vision tower's hidden size
    response_tokens: int = 1024  # every response's length (max_new_tokens of the plan's config)
    seqs: int = 8  # sequences in the micro-batch: one prompt x 8 responses, the release's smallest
    image_side: int = 256  # the prompt's image, pixels a side (256: 16 x 16 patches, 64 tokens after the merge)


def memory_model_config(hidden, vision_hidden):
    """Qwen3-VL-8B's layout (vocabulary, untied lm_head, rope, patch 16, merge 2, deepstack) at a small width."""
    text = dict(memory.QWEN3_VL_8B["text_config"], hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                rope_parameters=dict(rope_type="default", rope_theta=5000000.0,
                                     mrope_section=[hidden // 16, hidden // 32, hidden // 32], mrope_interleaved=True))
    vision = dict(memory.QWEN3_VL_8B["vision_config"], depth=2, hidden_size=vision_hidden,
                  intermediate_size=3 * vision_hidden, num_heads=4,
                  out_hidden_size=hidden, num_position_embeddings=256, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def memory_train_config(args):
    """The train_rl.Config fields the plan reads (nothing imports a trainer, so they are named here): the
    release's update settings (one prompt's responses, gradient checkpointing, no shared prompt) in fp32 on CPU,
    the media budget the bench's one image."""
    return types.SimpleNamespace(micro_batch_seqs=args["seqs"], group_size=args["seqs"],
                                 max_new_tokens=args["response_tokens"], share_prompt=False, grad_checkpointing=True,
                                 bf16=False, param_dtype="fp32", prompts_per_step=1,
                                 image_max_pixels=args["image_side"] ** 2, max_frames=2, video_max_pixels=32 * 32)


def image_prompt(config, prompt_tokens, patches, gen):
    """One left-padded prompt of exactly prompt_tokens tokens: text, then an image of `patches` patches (square
    grid), then text; random pixels and token ids (no media ids among them)."""
    v = config.vision_config
    side = int(patches ** 0.5)
    image_tokens = patches // v.spatial_merge_size ** 2
    text = prompt_tokens - image_tokens - 2
    ids = torch.randint(1000, 100000, (prompt_tokens,), generator=gen)  # [P]
    start = text // 2
    ids[start] = config.vision_start_token_id
    ids[start + 1:start + 1 + image_tokens] = config.image_token_id
    ids[start + 1 + image_tokens] = config.vision_end_token_id
    types = (ids == config.image_token_id).long()  # [P]
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, prompt_tokens, dtype=torch.long),
            "mm_token_type_ids": types[None],
            "pixel_values": torch.randn(patches, 3 * v.temporal_patch_size * v.patch_size ** 2, generator=gen),
            "image_grid_thw": torch.tensor([[1, side, side]])}


def process_memory():
    """(current, peak) resident bytes of this process (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark of resident memory starts again from the current size


def measure_update_step(args):
    """In a fresh process (bench_memory starts it): build the model and AdamW, warm up with a short update (kernels
    loaded, AdamW state allocated), then measure one micro-batch's forward + backward through the log-probs and
    the PPO loss. Peaks are read from the kernel's high-water mark of resident memory, reset just before the step
    and at the two boundaries of memory.update_phases (gradient hooks: the final hidden states' gradient is
    complete after the logits chunks, the vision merger's after the decoder layers); malloc returns freed tensors
    to the system at once (bench_memory sets MALLOC_MMAP_THRESHOLD_), so the mark follows the live tensors.
    Returns {phase: peak bytes above the resident size before the step}, the resident tensors' bytes, seconds."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = memory_model_config(args["hidden"], args["vision_hidden"])
    cfg = memory_train_config(args)
    model = Qwen3VLForConditionalGeneration(config).train()
    model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    prompt_tokens, patches = memory.longest_prompt(config, cfg)
    inputs = image_prompt(config, prompt_tokens, patches, gen)

    def update(T):
        ids = torch.randint(1000, 100000, (cfg.micro_batch_seqs, T), generator=gen)  # [m, T]
        mask = torch.ones_like(ids)  # [m, T]: every response runs to T
        adv = torch.randn(cfg.micro_batch_seqs, generator=gen)  # [m]
        logp = rollout.token_logprobs(model, inputs, ids, mask, [cfg.micro_batch_seqs], cfg.share_prompt)  # [m, T]
        loss, _ = ema_grpo.ppo_loss(logp, logp.detach(), adv, mask, num_tokens=float(mask.sum()))
        loss.backward()

    update(16)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    peaks = {}

    def end_of(phase, output):  # a forward hook that puts a gradient hook on `output(module's output)`
        def on_gradient(grad):  # the phase's peak so far, then a new mark for the next phase
            peaks[phase] = process_memory()[1] - before
            reset_peak()

        def on_forward(module, args, out):
            output(out).register_hook(on_gradient)
        return on_forward

    # the model's output logits are the final hidden states in token_logprobs
    model.register_forward_hook(end_of("backward through the logits", lambda out: out.logits))
    model.model.visual.merger.register_forward_hook(end_of("backward through a decoder layer", lambda out: out))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = weights + sum(t.numel() * t.element_size() for state in optimizer.state.values()
                             for t in state.values() if t.dim() > 0)
    resident += sum(t.numel() * t.element_size() for t in inputs.values())
    before, _ = process_memory()
    reset_peak()
    t0 = time.perf_counter()
    update(cfg.max_new_tokens)
    seconds = time.perf_counter() - t0
    peaks["backward through a vision block"] = process_memory()[1] - before
    return {"weights": weights, "resident": resident, "peaks": peaks, "seconds": seconds,
            "prompt_tokens": prompt_tokens, "patches": patches}


def bench_memory(argv):
    args = dataclasses.asdict(common.parse_config(MemoryConfig, argv))
    config, cfg = memory_model_config(args["hidden"], args["vision_hidden"]), memory_train_config(args)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # inherited by the measuring process
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        measured = pool.apply(measure_update_step, (args,))
    phases = memory.update_phases(cfg, config, gpus=1)
    vocab = config.text_config.vocab_size
    full_logits = cfg.micro_batch_seqs * cfg.max_new_tokens * vocab * 4  # one fp32 [sequences, T, vocab] tensor
    n = memory.param_counts(config)
    print(f"Qwen3-VL, text hidden {args['hidden']}, vocabulary {vocab}: {n['total'] / 1e6:.1f}M parameters; one "
          f"update micro-batch of {cfg.micro_batch_seqs} sequences of {measured['prompt_tokens']}+{cfg.max_new_tokens} "
          f"tokens ({measured['patches']} image patches each), fp32 on CPU, gradient checkpointing, "
          f"{measured['seconds']:.1f} s")
    print(f"plan (memory.update_phases, the formulas of train_rl.py --plan=true) against the measured peak of each "
          f"phase ({measured['resident'] / 2**20:.0f} MiB of weights, AdamW state and inputs before the step + the "
          f"step's rise):")
    planned, measured_peak = {}, {}
    for name, terms in phases.items():
        planned[name] = memory.print_terms(name, terms)
        measured_peak[name] = measured["resident"] + measured["peaks"][name]
        print(f"    {'measured':<50} {measured_peak[name] / 2**30:7.2f} GiB  (ratio {measured_peak[name] / planned[name]:.2f})")
    peak, plan_peak = max(measured_peak.values()), max(planned.values())
    print(f"one fp32 [{cfg.micro_batch_seqs}, {cfg.max_new_tokens}, {vocab}] logits tensor: {full_logits / 2**30:.2f} GiB")
    print(f"bench=memory hidden={args['hidden']} seqs={cfg.micro_batch_seqs} response_tokens={cfg.max_new_tokens} "
          f"measured_mib={peak / 2**20:.0f} planned_mib={plan_peak / 2**20:.0f} plan_ratio={peak / plan_peak:.2f} "
          f"logits_ratio={(peak - measured['weights']) / full_logits:.2f}")


BENCHES = {"rollout": bench_rollout, "rollout8b": bench_rollout_8b, "rewards": bench_rewards,
           "memory": bench_memory}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [--key=value ...]")
    BENCHES[sys.argv[1]](sys.argv[2:])
