"""
Evaluation: generate answers for eval files in the released schema, score them with the metrics of SPEC 7,
write per-row outputs and a metrics JSON, print a metric table.

    python eval.py                                                   # tiny model on the shapes eval file
    python eval.py --model=runs/tiny-model --data=data/shapes/eval.json
    python eval.py --preset=release --model=/ckpt/OneThinker-8B --data=a.json,b.json --media_root=/data/eval \
        --sam2_checkpoint=/ckpt/sam2.1_hiera_tiny.pt
    torchrun --nproc_per_node=8 eval.py --preset=release --model=... --data=...    # rows shared out by tokens
    python eval.py --preset=release --plan=true                      # its per-GPU memory plan (memory.py)

Greedy decoding (SPEC 7). Each rank gets an equal share of the file's tokens (prompt lengths read from the media
headers, `assign_rows`), in batches of similar lengths capped by batch_tokens (`token_batches`), so no rank waits
long at the end-of-file barrier. For each data file `<out_dir>/<stem>/rank<r>.jsonl` holds one record per
finished row (response, finish reason, metric parts) and `<out_dir>/<stem>.metrics.json` the metrics. A rerun
skips the rows already recorded, so an interrupted evaluation resumes where it stopped and gives the same metrics.

The release preset feeds the model what the release's Evaluation/Eval/eval_bench.py fed it: the media first, then
its prompt text (data.RELEASE_TEMPLATE), media sized by qwen-vl-utils' rules and the processor (data.py), and
generation stops at the checkpoint's EOS ids. Answers are read from the raw response as eval_bench reads them:
the first <answer>...</answer> (else the whole response), with no tag normalisation; so "< answer >" tags score
as untagged text and an exact "in / out" transcription stays exact.

Metrics per problem_type (segmentation split into image and video): QA accuracy is the training reward's
accuracy (rewards.py) on that answer; temporal grounding mean tIoU and R@0.3/0.5/0.7; spatial grounding Acc@0.5 and mean IoU;
spatial-temporal grounding mean tIoU and mean box IoU over the seconds present in both; tracking AO (mean over
videos of the per-video mean IoU, the release's), the release's "R@0.5" (share of VIDEOS with mean IoU >= 0.5)
and the GOT-10k toolkit's SR@0.5 (share of FRAMES with IoU > 0.5); segmentation gIoU / cIoU for images and
J, F, J&F for videos (DAVIS 2017 definitions; --mask_variant=release for the release's).

Segmentation answers are a box and points (and a keyframe for video); SAM2.1 Hiera-T turns them into masks.
Without --sam2_checkpoint SAM2 has random weights: the plumbing runs, the masks mean nothing, and the table says
so. Failed parses, missing or undecodable media, prompts too long for the context and SAM2 errors score 0 and are
counted (the record's "error" names why); no row leaves an average.

Where the scores differ from eval_bench's on purpose (README, "What differs from the release"):
- its box IoU crashes on every valid pair (spatial grounding, spatial-temporal grounding, tracking): fixed here;
- failures (parse, media, SAM2) count 0 in every average (its segmentation averages drop failed samples; it
  scores segmentation not at all, here SAM2 masks are scored);
- multiple choice by the reward's grade_answer (it compares the first character, so "Because ..." reads "B");
- regression by the reward's mean relative accuracy (it scores a ground truth of exactly 0 as wrong, and runs in
  float64 where the reward runs in float32).
Spatial-temporal grounding scores its time span and its boxes each on its own, as eval_bench and the reward do.
"""
import dataclasses
import json
import math
import os
import sys
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common
import data
import memory
import rewards
import rollout
import model as model_lib
from data import EVAL_MEDIA, QA_TYPES, rle_decode, task_key
from rewards import answer_text, box_iou, extract_answer, is_number_list, parse_json_answer, temporal_iou


@dataclass
class Config:
    model: str = model_lib.DEFAULT_MODEL_DIR  # a save_pretrained directory; the default tiny model is built if missing
    data: str = "data/shapes/eval.json"  # one or more eval files, comma-separated
    media_root: str | None = None  # folder the rows' media paths are relative to; None: each data file's folder
    check_media: bool = True  # open every media file's header before generating (false: only that it exists)
    allow_media_outside_root: bool = False  # accept media paths that lead out of media_root (.., absolute paths)
    out_dir: str | None = None  # None: runs/eval/<model folder name>
    batch_size: int = 16
    batch_tokens: int = 0  # cap on a batch's KV cache in token slots (memory.kv_cache_slots); 0: batch_size alone
    max_new_tokens: int = 512
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU; same tokens); false: the eager loop
    prompt_template: str | None = None  # "release", "project" or a JSON file (data.load_templates); None: ours
    limit: int = 0  # evaluate the first N rows of each file; 0 = all
    bf16: bool = True  # bf16 weights on GPU (flash-attn needs them); CPU always runs fp32
    dist_timeout_min: float = 60.0  # minutes a rank waits at a collective for the slowest one before the job dies
    sam2: bool = True  # false: no masks; segmentation is then reported by the training reward's accuracy alone
    sam2_checkpoint: str | None = None  # None: random weights, plumbing only
    sam2_image_size: int | None = None  # None: 1024 with a checkpoint (SAM2's own), 512 with random weights
    mask_variant: str = "davis"  # "davis" (standard J and F) or "release" (the release's, SPEC 7)
    # media: SPEC 2's eval budgets (data.EVAL_MEDIA) sized by "fit" (ours) or "qwen_vl_utils" (the release's
    # eval: data.py's media comment), with these minimums (per image, per video frame)
    sizing: str = EVAL_MEDIA.sizing
    image_min_pixels: int = EVAL_MEDIA.image_min_pixels
    video_min_pixels: int = EVAL_MEDIA.video_min_pixels
    plan: bool = False  # print the per-GPU memory plan of this config for Qwen3-VL-8B (memory.py) and exit


# the release's eval settings (and our decode step compiled); its media minimums are qwen-vl-utils' defaults
# (eval_bench passes none): 4 merged tokens an image, 128 a video frame. batch_tokens sized by memory.py for 80 GB
# (`--preset=release --plan=true`): 8 rows of the longest video prompt per batch, 53.8 GiB (16 fit 141 GB:
# --batch_tokens=524288, 91.4 GiB)
PRESETS = {"release": dict(max_new_tokens=8192, batch_size=64, batch_tokens=262144, compile=True,
                           prompt_template="release",
                           sizing="qwen_vl_utils", image_min_pixels=4 * 32 * 32, video_min_pixels=128 * 32 * 32)}
# counted per task, each scores 0: no parsable answer; media missing or not decodable; the prompt leaves no room
# for max_new_tokens in the model context; SAM2 raised
FAILURES = ("parse_failed", "media_missing", "too_long", "sam2_failed")
RECALL_THRESHOLDS = (0.3, 0.5, 0.7)
RANDOM_SAM2_NOTE = "SAM2 has random weights: plumbing only, masks are meaningless"

# -----------------------------------------------------------------------------
# intervals and boxes: rewards.py's temporal_iou and box_iou (0 unless both are lists of 2 / 4 numbers)


def mean_box_iou_common(pred_boxes, gt_boxes):
    """Spatial-temporal grounding: mean box IoU over the seconds present in both (0 when none are), summed in
    the prediction's order as eval_bench sums it (the same float to the bit)."""
    seconds = [k for k in pred_boxes if k in gt_boxes]
    return sum(box_iou(pred_boxes[k], gt_boxes[k]) for k in seconds) / len(seconds) if seconds else 0.0


def tracking_frame_ious(pred_boxes, gt_boxes):
    """Tracking: one IoU per ground-truth second, a second missing from the prediction counting 0."""
    return [box_iou(pred_boxes.get(k), gt) for k, gt in gt_boxes.items()]


# -----------------------------------------------------------------------------
# masks: J (region IoU) and F (boundary F-measure), DAVIS 2017 by default, the release's variant as an option

MASK_VARIANTS = ("davis", "release")


def mask_iou(pred, gt, variant="davis"):
    """J. Two empty masks score 1 in DAVIS (nothing to find, nothing found) and 0 in the release."""
    inter = np.logical_and(pred, gt).sum()
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0 if variant == "davis" else 0.0
    return float(inter / union)


def boundary_map(mask):
    """DAVIS 2017's one-pixel boundary: a pixel whose value differs from its right, lower or lower-right
    neighbour (outside the image counts as background), except that the last row compares only to the right,
    the last column only downwards, and the bottom-right pixel is never on it."""
    m = np.asarray(mask, dtype=bool)
    right = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    down = np.zeros_like(m)
    down[:-1, :] = m[1:, :]
    diag = np.zeros_like(m)
    diag[:-1, :-1] = m[1:, 1:]
    edge = (m != right) | (m != down) | (m != diag)
    edge[-1, :] = m[-1, :] != right[-1, :]
    edge[:, -1] = m[:, -1] != down[:, -1]
    edge[-1, -1] = False
    return edge


def dilate(mask, radius, shape="disk"):
    """Binary dilation by a disk (dx^2 + dy^2 <= r^2, as skimage's disk) or a square of side 2r + 1.
    Row by row: offset row dy needs a horizontal dilation by its half-width, a difference of prefix sums."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    prefix = np.zeros((h, w + 1), dtype=np.int32)
    prefix[:, 1:] = np.cumsum(m, axis=1)  # [H, W+1] mask pixels left of each column
    prefix = np.pad(prefix, ((0, 0), (radius, radius)), mode="edge")  # [H, W+1+2r] counts clamp at the edges
    near = {}  # half-width -> [H, W] a mask pixel within that many columns on the same row
    out = np.zeros_like(m)
    for dy in range(-min(radius, h - 1), min(radius, h - 1) + 1):
        half = math.isqrt(radius * radius - dy * dy) if shape == "disk" else radius
        if half not in near:
            near[half] = prefix[:, radius + half + 1:radius + half + 1 + w] > prefix[:, radius - half:radius - half + w]
        if dy >= 0:
            out[:h - dy] |= near[half][dy:]
        else:
            out[-dy:] |= near[half][:h + dy]
    return out


def boundary_f(pred, gt, variant="davis"):
    """F: boundary F-measure. A boundary pixel matches when the other mask's boundary lies within the tolerance:
    DAVIS 2017 a disk of radius ceil(0.008 x diagonal); the release a square of radius max(1, round(0.0075 x
    diagonal)). Both boundaries empty score 1; one empty scores 0."""
    pred_edge, gt_edge = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(pred_edge.sum()), int(gt_edge.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    diagonal = math.hypot(*pred_edge.shape)
    if variant == "davis":
        radius, shape = math.ceil(0.008 * diagonal), "disk"
    else:
        radius, shape = max(1, round(0.0075 * diagonal)), "square"
    precision = (pred_edge & dilate(gt_edge, radius, shape)).sum() / n_pred
    recall = (gt_edge & dilate(pred_edge, radius, shape)).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# -----------------------------------------------------------------------------
# media


def media_path(row, media_root):
    """The row's (first) image or video file: data.load_rows resolved it into `media`; a raw eval row names it
    in `path`, an RL row in `images` / `videos`."""
    if row.get("media"):
        return row["media"][0]
    path = row.get("path") or (row.get("images") or row.get("videos") or [None])[0]
    if not path:
        raise ValueError(f"row {row.get('problem_id')!r}: no media field (path / images / videos)")
    return path if os.path.isabs(path) else os.path.join(media_root, path)


def read_rgb(path):
    """The image file as an RGB array, at its stored size (SAM2 and the masks work in the file's pixels)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # [H, W, 3] uint8, writable (torchvision warns on read-only)


def write_frames(path, frame_dir):
    """Every frame of a video file (PyAV) or a folder of images (sorted by name) -> frame_dir/00000.jpg, ...
    (the layout SAM2's video predictor reads; its mp4 reader needs decord). Returns (n_frames, fps or None)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith((".jpg", ".jpeg", ".png")))
        for i, name in enumerate(names):
            with Image.open(os.path.join(path, name)) as image:
                image.convert("RGB").save(os.path.join(frame_dir, f"{i:05d}.jpg"), quality=95)
        return len(names), None
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        n = 0
        for frame in container.decode(stream):
            frame.to_image().save(os.path.join(frame_dir, f"{n:05d}.jpg"), quality=95)
            n += 1
    return n, fps


# -----------------------------------------------------------------------------
# SAM2: prompts in 0..1000 -> masks in pixels (SPEC 7)

SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def build_sam2(checkpoint=None, image_size=None, device="cpu"):
    """SAM2.1 Hiera-T as one video predictor; image rows reuse its weights through SAM2ImagePredictor.
    checkpoint None: random weights (seeded), for plumbing only. image_size None: SAM2's own 1024 with a
    checkpoint, 512 with random weights (fast on CPU)."""
    image_size = image_size or (1024 if checkpoint else 512)
    from sam2.build_sam import build_sam2_video_predictor
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        video = build_sam2_video_predictor(SAM2_CONFIG, ckpt_path=checkpoint or None, device=device,
                                           hydra_overrides_extra=[f"++model.image_size={image_size}"])
    image = SAM2ImagePredictor(video)
    # the image predictor hard-codes the backbone's feature sizes at 1024 (strides 4, 8, 16)
    image._bb_feat_sizes = [(image_size // 4,) * 2, (image_size // 8,) * 2, (image_size // 16,) * 2]
    return {"image": image, "video": video, "random": not checkpoint}


def pixel_prompts(answer, width, height):
    """(box [4], points [N, 2], labels [N]) in pixels from a 0..1000 answer; labels 1 positive, 0 negative."""
    scale = np.array([width, height], dtype=np.float64) / 1000.0
    box = (np.array(answer["box"]).reshape(2, 2) * scale).reshape(4)
    points = np.array(answer["positive"] + answer["negative"], dtype=np.float64).reshape(-1, 2) * scale
    labels = np.array([1] * len(answer["positive"]) + [0] * len(answer["negative"]), dtype=np.int32)
    return box, points, labels


def sam2_image_mask(sam2, image, answer):
    """image [H, W, 3] uint8 -> bool mask [H, W] from the predicted box and points."""
    height, width = image.shape[:2]
    box, points, labels = pixel_prompts(answer, width, height)
    predictor = sam2["image"]
    predictor.set_image(image)
    masks, _, _ = predictor.predict(point_coords=points if len(points) else None,
                                    point_labels=labels if len(points) else None,
                                    box=box, multimask_output=False)
    return masks[0] > 0  # [H, W]


def sam2_video_masks(sam2, frame_dir, key_frame, answer):
    """Prompt at the keyframe, propagate forward then backward: {frame index: bool mask [H, W]}."""
    video = sam2["video"]
    masks = {}
    with warnings.catch_warnings():
        # sam2 built without its CUDA extension skips hole filling in masks (a cosmetic post-process) and warns
        warnings.filterwarnings("ignore", message="cannot import name '_C'")
        state = video.init_state(frame_dir, offload_video_to_cpu=True)
        box, points, labels = pixel_prompts(answer, state["video_width"], state["video_height"])
        video.add_new_points_or_box(state, frame_idx=key_frame, obj_id=1, box=box,
                                    points=points if len(points) else None, labels=labels if len(points) else None)
        for reverse in (False, True):
            for frame, _, logits in video.propagate_in_video(state, start_frame_idx=key_frame, reverse=reverse):
                masks[frame] = (logits[0, 0] > 0).cpu().numpy()  # [H, W]
    return masks


# -----------------------------------------------------------------------------
# one row -> its metric parts (JSON-serialisable; failures score 0 and set their flag)


def solution_text(row):
    """The ground-truth answer text of a raw or loaded row: eval rows call it `solution`, RL rows `answer`
    (SPEC 1), unwrapped from <answer> tags as the reward does."""
    truth = row.get("solution", row.get("answer"))
    if truth is None:
        raise ValueError(f"row {row.get('problem_id')!r}: no solution/answer field")
    return rewards.answer_text(str(truth))


def parse_answer(text):
    """The JSON object in an answer, or None."""
    value = parse_json_answer(text)
    return value if isinstance(value, dict) else None


def qa_accuracy(response, truth, problem_type, data_type):
    """QA accuracy: the training reward's accuracy functions (SPEC 4.5) on the answer read from the raw response,
    as eval_bench reads it (multiple choice by grade_answer and regression by the reward's relative accuracy:
    the module docstring says why)."""
    return float(rewards.accuracy(answer_text(response), truth, problem_type.lower(), data_type.lower()))


def _finite_numbers(x, n):
    """x as n finite floats (a SAM2 prompt coordinate), or None."""
    if not is_number_list(x, n):
        return None
    out = [float(v) for v in x]
    return out if all(math.isfinite(v) for v in out) else None


def segmentation_answer(answer, video):
    """{"box", "positive", "negative"(, "time")} in 0..1000 from a parsed answer, or None. The box (and for video
    a numeric time) is required; each point list may hold any number of [x, y] pairs."""
    if answer is None:
        return None
    box = _finite_numbers(answer.get("boxes"), 4)
    positive, negative = answer.get("positive_points", []), answer.get("negative_points", [])
    if box is None or not isinstance(positive, list) or not isinstance(negative, list):
        return None
    positive, negative = [_finite_numbers(p, 2) for p in positive], [_finite_numbers(p, 2) for p in negative]
    if any(p is None for p in positive + negative):
        return None
    out = {"box": box, "positive": positive, "negative": negative}
    if video:
        time = answer.get("time")  # a JSON number, as the structure reward requires (SPEC 4.4)
        if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
            return None
        out["time"] = float(time)
    return out


def failed_parts(row, flag):
    """The parts of a row that failed (parse, media or SAM2): every metric 0, the flag set."""
    key = task_key(row["problem_type"], row.get("data_type", "image"))
    parts = dict.fromkeys(FAILURES, False)
    parts[flag] = True
    if row["problem_type"] in QA_TYPES:
        parts["accuracy"] = 0.0
    elif key == "temporal grounding":
        parts["tiou"] = 0.0
    elif key == "spatial grounding":
        parts["iou"] = 0.0
    elif key == "spatial-temporal grounding":
        parts.update(tiou=0.0, box_iou=0.0)
    elif key == "tracking":
        parts["frame_ious"] = [0.0] * len(gt_boxes(row))
    elif key == "segmentation/image":
        # for cIoU a failed image counts as an empty prediction: intersection 0, union = the ground truth
        parts.update(iou=0.0, inter=0, union=int(rle_decode(row["segmentation_output"]).sum()))
    elif key == "segmentation/video":
        n = len(row["segmentation_output"])
        parts.update(j=[0.0] * n, f=[0.0] * n)
    else:
        raise ValueError(f"row {row.get('problem_id')!r}: unknown problem_type {row['problem_type']!r}")
    return parts


def gt_answer(row, field, n=None):
    """A field of the ground-truth JSON (n: a list of n numbers); malformed ground truth is a data error."""
    gt = parse_answer(solution_text(row))
    value = gt.get(field) if gt is not None else None
    if value is None or (n is not None and not is_number_list(value, n)):
        raise ValueError(f"row {row.get('problem_id')!r}: field solution needs {field!r}"
                         f"{f' as {n} numbers' if n else ''}: {solution_text(row)!r}")
    return value


def gt_boxes(row):
    """The ground truth's {"<second>": box} map (spatial-temporal grounding, tracking)."""
    boxes = gt_answer(row, "boxes")
    if not isinstance(boxes, dict) or not boxes or not all(is_number_list(b, 4) for b in boxes.values()):
        raise ValueError(f"row {row.get('problem_id')!r}: field solution needs a non-empty map of boxes: {boxes!r}")
    return boxes


def score_row(row, response, media_root=".", sam2=None, variant="davis"):
    """A row's metric parts (SPEC 7). The answer is read from the raw response as eval_bench reads it: the first
    <answer>...</answer>, stripped, else the whole stripped response (no tag normalisation). A structured
    answer without the task's well-formed fields is a failed parse and scores 0, except spatial-temporal
    grounding, whose time span and boxes score each on its own (parse_failed: either is malformed). For QA types
    parse_failed marks a response without an <answer> tag; its accuracy is still read from the whole response."""
    problem_type, data_type = row["problem_type"], row.get("data_type", "image")
    key = task_key(problem_type, data_type)
    ok = dict.fromkeys(FAILURES, False)
    if problem_type in QA_TYPES:
        tagged = extract_answer(response) is not None
        return {**ok, "parse_failed": not tagged,
                "accuracy": qa_accuracy(response, solution_text(row), problem_type, data_type)}
    if problem_type == "segmentation":
        return score_segmentation(row, response, media_root, sam2, variant)
    answer = parse_answer(answer_text(response)) or {}
    pred_time, pred_boxes = answer.get("time"), answer.get("boxes")

    if key == "temporal grounding":
        if not is_number_list(pred_time, 2):
            return failed_parts(row, "parse_failed")
        return {**ok, "tiou": temporal_iou(pred_time, gt_answer(row, "time", 2))}

    if key == "spatial grounding":
        if not is_number_list(pred_boxes, 4):
            return failed_parts(row, "parse_failed")
        return {**ok, "iou": box_iou(pred_boxes, gt_answer(row, "boxes", 4))}

    if key == "spatial-temporal grounding":  # each part on its own, as eval_bench and the reward score it
        boxes_ok = isinstance(pred_boxes, dict)
        return {**ok, "parse_failed": not (is_number_list(pred_time, 2) and boxes_ok),
                "tiou": temporal_iou(pred_time, gt_answer(row, "time", 2)),
                "box_iou": mean_box_iou_common(pred_boxes, gt_boxes(row)) if boxes_ok else 0.0}

    if key == "tracking":
        if not isinstance(pred_boxes, dict):
            return failed_parts(row, "parse_failed")
        return {**ok, "frame_ious": tracking_frame_ious(pred_boxes, gt_boxes(row))}
    raise ValueError(f"row {row.get('problem_id')!r}: unknown problem_type {problem_type!r}")


def score_segmentation(row, response, media_root, sam2, variant):
    video = row.get("data_type") == "video"
    answer = segmentation_answer(parse_answer(answer_text(response)), video)
    if answer is None:
        return failed_parts(row, "parse_failed")
    path = media_path(row, media_root)
    if not os.path.exists(path):
        return failed_parts(row, "media_missing")
    if sam2 is None:
        raise ValueError("segmentation rows need SAM2: pass sam2=build_sam2(...)")
    ok = dict.fromkeys(FAILURES, False)

    if not video:
        gt = rle_decode(row["segmentation_output"])
        try:
            image = read_rgb(path)
        except Exception as e:  # noqa: BLE001  (an unreadable file counts with the missing ones)
            warnings.warn(f"row {row.get('problem_id')!r}: cannot read {path}: {e!r}")
            return failed_parts(row, "media_missing")
        try:
            pred = sam2_image_mask(sam2, image, answer)
        except Exception as e:  # noqa: BLE001  (a SAM2 failure scores 0 and is counted, SPEC 7)
            warnings.warn(f"row {row.get('problem_id')!r}: SAM2 failed: {e!r}")
            return failed_parts(row, "sam2_failed")
        return {**ok, **image_mask_parts(at_size(pred, gt.shape), gt, variant)}

    gt = gt_video_masks(row)
    with tempfile.TemporaryDirectory() as frame_dir:
        try:
            n_frames, native_fps = write_frames(path, frame_dir)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"row {row.get('problem_id')!r}: cannot read {path}: {e!r}")
            return failed_parts(row, "media_missing")
        if n_frames == 0:
            return failed_parts(row, "media_missing")
        fps = row.get("fps") or native_fps
        if not fps:
            raise ValueError(f"row {row.get('problem_id')!r}: field fps is missing and {path} has no frame rate")
        key_frame = min(max(round(answer["time"] * float(fps)), 0), n_frames - 1)
        try:
            masks = sam2_video_masks(sam2, frame_dir, key_frame, answer)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"row {row.get('problem_id')!r}: SAM2 failed: {e!r}")
            return failed_parts(row, "sam2_failed")
    masks = {frame: at_size(mask, gt[frame].shape) for frame, mask in masks.items() if frame in gt}
    return {**ok, **video_mask_parts(masks, gt, variant)}


def gt_video_masks(row):
    """{frame index: bool mask [H, W]} from a video row's segmentation_output (frame index -> COCO RLE)."""
    try:
        return {int(frame): rle_decode(rle) for frame, rle in row["segmentation_output"].items()}
    except (AttributeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"row {row.get('problem_id')!r}: field segmentation_output must map frame indices to "
                         f"COCO RLE masks: {e}") from None


def at_size(mask, shape):
    """A predicted mask at the annotation's size (nearest neighbour), for media stored at another resolution."""
    if mask.shape == tuple(shape):
        return mask
    return np.array(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST))


def image_mask_parts(pred, gt, variant="davis"):
    """An image's IoU (for gIoU) and its intersection and union pixel counts (for cIoU)."""
    inter, union = int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())
    return {"iou": mask_iou(pred, gt, variant), "inter": inter, "union": union}


def video_mask_parts(masks, gt, variant="davis"):
    """J and F on every frame with ground truth; a frame the prediction lacks counts as an empty mask."""
    j, f = [], []
    for frame in sorted(gt):
        pred = masks.get(frame, np.zeros_like(gt[frame]))
        j.append(mask_iou(pred, gt[frame], variant))
        f.append(boundary_f(pred, gt[frame], variant))
    return {"j": j, "f": f}


# -----------------------------------------------------------------------------
# rows' parts -> metrics per problem_type (SPEC 7)


def mean(xs):
    return float(sum(xs) / len(xs)) if len(xs) else 0.0


def summarise(key, parts):
    """One task's metrics from its rows' parts; the failure counts ride along."""
    out = {"rows": len(parts), **{flag: sum(bool(p.get(flag)) for p in parts) for flag in FAILURES}}
    if all("reward" in p for p in parts):  # records written by eval.py; compute_metrics' parts have none
        out["reward"] = mean([p["reward"] for p in parts])
        out["format_rate"] = mean([p["format"] for p in parts])
        out["reward_accuracy"] = mean([p["reward_accuracy"] for p in parts])
    if key.startswith("segmentation") and not any("iou" in p or "j" in p for p in parts):
        return out  # --sam2=false: no masks, only the reward's box/point accuracy
    if key in QA_TYPES:
        out["accuracy"] = mean([p["accuracy"] for p in parts])
    elif key == "temporal grounding":
        tious = [p["tiou"] for p in parts]
        out["mean_tiou"] = mean(tious)
        for t in RECALL_THRESHOLDS:
            out[f"r@{t}"] = mean([x >= t for x in tious])
    elif key == "spatial grounding":
        ious = [p["iou"] for p in parts]
        out["acc@0.5"] = mean([x >= 0.5 for x in ious])
        out["mean_iou"] = mean(ious)
    elif key == "spatial-temporal grounding":
        out["mean_tiou"] = mean([p["tiou"] for p in parts])
        out["mean_box_iou"] = mean([p["box_iou"] for p in parts])
    elif key == "tracking":
        video_ious = [mean(p["frame_ious"]) for p in parts]
        frame_ious = [x for p in parts for x in p["frame_ious"]]
        out["ao"] = mean(video_ious)  # mean over videos of the per-video mean IoU (the release's AO)
        out["release_video_r@0.5"] = mean([x >= 0.5 for x in video_ious])  # share of videos, the release's "R@0.5"
        out["got10k_frame_sr@0.5"] = mean([x > 0.5 for x in frame_ious])  # share of frames, the toolkit's SR
    elif key == "segmentation/image":
        out["giou"] = mean([p["iou"] for p in parts])
        inter, union = sum(p["inter"] for p in parts), sum(p["union"] for p in parts)
        out["ciou"] = inter / union if union else 0.0
    elif key == "segmentation/video":
        video_j, video_f = [mean(p["j"]) for p in parts], [mean(p["f"]) for p in parts]
        out["j"], out["f"] = mean(video_j), mean(video_f)
        out["j&f"] = mean([(a + b) / 2 for a, b in zip(video_j, video_f)])
    return out


def aggregate(rows, parts):
    """Per-row parts -> {"all": counts, task: metrics, ...} for one file."""
    by_task = defaultdict(list)
    for row, p in zip(rows, parts):
        by_task[task_key(row["problem_type"], row.get("data_type", "image"))].append(p)
    metrics = {"all": {"rows": len(parts), **{flag: sum(bool(p.get(flag)) for p in parts) for flag in FAILURES}}}
    for key in sorted(by_task):
        metrics[key] = summarise(key, by_task[key])
    return metrics


def compute_metrics(rows, predictions, media_root=".", sam2=None, variant="davis"):
    """rows (released schema) and their predictions (response strings, or records {"response", "error"} where
    error "media_missing" marks a row that could not be generated) -> metrics per problem_type."""
    if variant not in MASK_VARIANTS:
        raise ValueError(f"variant must be one of {MASK_VARIANTS}, got {variant!r}")
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    parts = []
    for row, prediction in zip(rows, predictions):
        record = {"response": prediction} if isinstance(prediction, str) else prediction
        if record.get("error") == "media_missing":
            parts.append(failed_parts(row, "media_missing"))
        else:
            parts.append(score_row(row, record["response"], media_root, sam2, variant))
    metrics = aggregate(rows, parts)
    if sam2 is not None and sam2["random"]:
        metrics["all"]["note"] = RANDOM_SAM2_NOTE
    return metrics


def format_table(metrics_by_file):
    """{file: metrics} -> a printable table: one line per (file, task) with its metrics and failure counts."""
    lines = [f"{'file':<24} {'task':<28} {'rows':>5}  {'metrics':<64} failed (parse/media/too long/sam2)"]
    notes = set()
    for name, metrics in metrics_by_file.items():
        for key, values in metrics.items():
            if key == "all":
                notes.add(values.get("note"))
                continue
            shown = "  ".join(f"{k}={v:.3f}" for k, v in values.items() if k not in FAILURES and k != "rows")
            failed = "/".join(str(values[flag]) for flag in FAILURES)
            lines.append(f"{os.path.basename(name):<24} {key:<28} {values['rows']:>5}  {shown:<64} {failed}")
    lines += [f"NOTE: {note}" for note in sorted(n for n in notes if n)]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the driver: generate, score, resume, aggregate


def read_records(folder):
    """{row index: record} from every rank's JSONL in folder; a line cut short by a crash is ignored."""
    records = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    records[record["index"]] = record
    return records


def end_with_newline(path):
    """A record cut short by a crash must not swallow the next one appended after it."""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def load_eval_rows(path, media_root, check_media=True, allow_outside_root=False):
    """data.load_rows's validation, except that a row with a missing media file is kept and marked
    `media_missing` (SPEC 7: it scores 0 and is counted, never dropped)."""
    rows = []
    for index, raw in enumerate(data.read_json_rows(path)):
        files = [raw.get("path"), raw.get("additional_path")] + list(raw.get("images") or []) + list(
            raw.get("videos") or [])
        files = [f if os.path.isabs(f) else os.path.join(media_root, f) for f in files if isinstance(f, str) and f]
        if files and not all(os.path.isfile(f) for f in files):
            rows.append({**raw, "media_missing": True})
        else:
            rows.append(data.normalise_row(raw, index, path, media_root, check_media, allow_outside_root))
    return rows


def assign_rows(costs, rank, world_size):
    """This rank's share of the rows {index: tokens}: rows dealt most tokens first, each to the rank holding the
    fewest tokens so far (greedy longest-processing-time), so the ranks reach the end-of-file barrier at about the
    same time; dealing rows round-robin would give one rank all the long videos of a file sorted by length.
    Returns the rank's indices, most tokens first (similar lengths share a batch and its padding)."""
    loads, mine = [0] * world_size, []
    for i in sorted(costs, key=lambda i: (-costs[i], i)):
        least = min(range(world_size), key=lambda r: (loads[r], r))
        loads[least] += costs[i]
        if least == rank:
            mine.append(i)
    return mine


def token_batches(order, lengths, batch_size, batch_tokens, max_new_tokens):
    """order (longest prompt first) cut into batches of at most batch_size rows whose KV cache can grow to at most
    batch_tokens token slots: memory.kv_cache_slots of the generated rows, the batch's longest prompt (left padding
    pads the others to it) and max_new_tokens (0: no cap; a row over the cap goes alone). lengths[i]: prompt
    tokens, None for a row not generated (media missing)."""
    batches, batch = [], []
    for i in order:
        rows = [j for j in batch + [i] if lengths[j] is not None]
        slots = memory.kv_cache_slots(len(rows), 1, max([lengths[j] for j in rows], default=0), max_new_tokens)
        if batch and (len(batch) == batch_size or (batch_tokens and rows and slots > batch_tokens)):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def generate_batch(model, processor, rows, cfg, templates, device):
    """Greedy responses for rows whose media exist: one {"response", "finish_reason"} per row. A row that cannot
    be encoded is not generated: {"failed": "media_missing" (media that do not decode) or "too_long" (a prompt
    leaving no room for max_new_tokens in the context), "error": the message naming its file and row}."""
    context = model.config.text_config.max_position_embeddings
    media_cfg = data.media_config(cfg, EVAL_MEDIA)
    results, items = [None] * len(rows), {}
    for i, row in enumerate(rows):
        try:
            item = data.encode_cached(row, processor, media_cfg, templates)
        except ValueError as e:
            results[i] = {"response": "", "finish_reason": "not generated", "failed": "media_missing", "error": str(e)}
            continue
        try:
            items[i] = data.check_length(row, item, context, cfg.max_new_tokens)
        except ValueError as e:
            results[i] = {"response": "", "finish_reason": "not generated", "failed": "too_long", "error": str(e)}
    for result in results:
        if result is not None:
            print(f"not generated, scored 0: {result['error']}", flush=True)
    if not items:
        return results
    inputs = data.pad_batch(list(items.values()), processor.tokenizer.pad_token_id)
    out = rollout.generate(model, {k: v.to(device) for k, v in inputs.items()}, n=1,
                           max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, generator=None,
                           eos_token_ids=model_lib.stop_token_ids(model, processor.tokenizer),
                           compile=cfg.compile)
    ids, mask = out["response_ids"].cpu(), out["response_mask"].cpu().bool()  # [B, T]
    for j, i in enumerate(items):
        results[i] = {"response": processor.tokenizer.decode(ids[j][mask[j]], skip_special_tokens=True),
                      "finish_reason": out["finish_reasons"][j]}
    return results


def score_record(cfg, row, index, generated, media_root, sam2_cache, device):
    """The record of one row: its response (generated: generate_batch's result, or None when its media are
    missing), the metric parts (SPEC 7) and the training reward's parts (SPEC 4, so eval shows what RL optimised;
    a row never generated scores 0)."""
    generated = generated or {"response": "", "finish_reason": "media_missing", "failed": "media_missing"}
    response, finish_reason = generated["response"], generated["finish_reason"]
    if generated.get("failed"):
        parts = failed_parts(row, generated["failed"])
    elif row["problem_type"] == "segmentation" and not cfg.sam2:
        parts = dict.fromkeys(FAILURES, False)
    else:
        if row["problem_type"] == "segmentation" and "sam2" not in sam2_cache:
            sam2_cache["sam2"] = build_sam2(cfg.sam2_checkpoint, cfg.sam2_image_size, device)
        parts = score_row(row, response, media_root, sam2_cache.get("sam2"), cfg.mask_variant)
    reward = rewards.score(response, solution_text(row), row["problem_type"],
                           row.get("data_type") or "image")[1] if not generated.get("failed") else {}
    parts.update(reward=reward.get("overall", 0.0), format=reward.get("format", 0.0),
                 reward_accuracy=reward.get("accuracy", 0.0))
    return {"index": index, "problem_id": row.get("problem_id"), "problem_type": row["problem_type"],
            "data_type": row.get("data_type", "image"), "response": response, "finish_reason": finish_reason,
            "parts": parts, "mask_variant": cfg.mask_variant, "sam2_checkpoint": cfg.sam2_checkpoint,
            **({"error": generated["error"]} if "error" in generated else {})}


def output_dir(cfg):
    return cfg.out_dir or os.path.join("runs", "eval", os.path.basename(os.path.normpath(cfg.model)))


def evaluate_file(cfg, path, model, processor, templates, rank, world_size, device, sam2_cache):
    """Generate and score this rank's unfinished rows of one eval file; rank 0 returns the file's metrics."""
    media_root = cfg.media_root or os.path.dirname(os.path.abspath(path))
    rows = load_eval_rows(path, media_root, cfg.check_media, cfg.allow_media_outside_root)
    rows = rows[:cfg.limit] if cfg.limit else rows
    folder = os.path.join(output_dir(cfg), os.path.splitext(os.path.basename(path))[0])
    done = read_records(folder)
    for record in done.values():
        if (record["mask_variant"], record["sam2_checkpoint"]) != (cfg.mask_variant, cfg.sam2_checkpoint):
            raise ValueError(f"{folder}: row {record['index']} was scored with mask_variant="
                             f"{record['mask_variant']!r}, sam2_checkpoint={record['sam2_checkpoint']!r}; "
                             f"this run has {cfg.mask_variant!r}, {cfg.sam2_checkpoint!r}: use another out_dir")
    common.barrier()  # every rank has read the finished set before any rank appends to it
    media_cfg = data.media_config(cfg, EVAL_MEDIA)
    lengths = {i: None if rows[i].get("media_missing") else data.prompt_length(rows[i], processor, media_cfg, templates)
               for i in range(len(rows)) if i not in done}  # every rank computes all: the same assignment
    todo = assign_rows({i: 0 if n is None else n + cfg.max_new_tokens for i, n in lengths.items()}, rank, world_size)
    os.makedirs(folder, exist_ok=True)
    shard = os.path.join(folder, f"rank{rank}.jsonl")
    end_with_newline(shard)

    with open(shard, "a") as out, \
            tqdm(total=len(todo), desc=os.path.basename(path), disable=rank != 0) as bar:
        for batch in token_batches(todo, lengths, cfg.batch_size, cfg.batch_tokens, cfg.max_new_tokens):
            have_media = [i for i in batch if not rows[i].get("media_missing")]
            results = generate_batch(model, processor, [rows[i] for i in have_media], cfg, templates, device) \
                if have_media else []
            generated = dict(zip(have_media, results))
            for i in batch:
                record = score_record(cfg, rows[i], i, generated.get(i), media_root, sam2_cache, device)
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(batch))

    common.barrier()
    if rank != 0:
        return None
    records = read_records(folder)
    missing = [i for i in range(len(rows)) if i not in records]
    if missing:
        raise RuntimeError(f"{folder}: {len(missing)} rows have no record after generation, e.g. {missing[:5]}")
    metrics = aggregate(rows, [records[i]["parts"] for i in range(len(rows))])
    if any(row["problem_type"] == "segmentation" for row in rows) and cfg.sam2 and not cfg.sam2_checkpoint:
        metrics["all"]["note"] = RANDOM_SAM2_NOTE
    with open(folder + ".metrics.json", "w") as f:
        json.dump({"data": path, "model": cfg.model, "config": dataclasses.asdict(cfg), "metrics": metrics}, f, indent=1)
    return metrics


def main(argv):
    cfg = common.parse_config(Config, argv, PRESETS, {"mask_variant": MASK_VARIANTS, "sizing": data.SIZINGS})
    if cfg.plan:
        memory.print_eval_plan(cfg, data.media_config(cfg, EVAL_MEDIA))
        return
    rank, world_size, _, device = common.init_distributed(cfg.dist_timeout_min)
    model, processor = model_lib.load_model(model_lib.ensure_model(cfg.model), str(device),
                                            torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32)
    model.eval()
    templates = data.load_templates(cfg.prompt_template) if cfg.prompt_template else None
    metrics_by_file, sam2_cache = {}, {}
    with torch.no_grad():
        for path in cfg.data.split(","):
            metrics = evaluate_file(cfg, path, model, processor, templates, rank, world_size, device, sam2_cache)
            if metrics is not None:
                metrics_by_file[path] = metrics
    if rank == 0:
        print(format_table(metrics_by_file))
        print(f"per-row outputs and metrics JSON in {output_dir(cfg)}")
    common.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
