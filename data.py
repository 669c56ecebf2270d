"""
Data: the released row schemas (SPEC 1), prompts (SPEC 3), COCO RLE masks, media decoding (SPEC 2), the
processor call that turns rows into model inputs, SFT label masks, and rank sharding with a resumable position.

Everything that turns a row into tokens lives here so that SFT, RL and eval see the same prompt.

    python data.py --data=data/shapes/rl.json [--media_root=DIR] [--skip_bad_rows=true]  # validate, count rows

Rows that pass this check can still fail when decoded in full at run time (a truncated file past its header):
the trainers skip those as bad rows (BadRows, draw_rows) and name them.
"""
import concurrent.futures
import copy
import json
import math
import os
import re
import sys
from collections import Counter
import dataclasses
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as video_smart_resize
from transformers.video_utils import VideoMetadata

import common
import rewards

# -----------------------------------------------------------------------------
# schema vocabulary (SPEC 1 and 3)

PROBLEM_TYPES = (
    "multiple choice", "numerical", "regression", "math", "OCR", "open-ended",
    "temporal grounding", "spatial grounding", "spatial-temporal grounding", "tracking", "segmentation",
)
# answered in text (the QA group of the paper's tables) rather than in JSON
QA_TYPES = tuple(t for t in PROBLEM_TYPES if t not in rewards.JSON_TYPES)
DATA_TYPES = ("image", "video", "video-image")


def task_key(problem_type, data_type):
    """EMA-GRPO's task key (SPEC 5): the problem_type, with segmentation split by modality."""
    if problem_type == "segmentation":
        return "segmentation/video" if data_type == "video" else "segmentation/image"
    return problem_type


# -----------------------------------------------------------------------------
# prompts (SPEC 3): a template is a dict: "question" (the text around the question, where "{Question}" stands
# for the problem and, for multiple choice, its options) and one line per problem_type (segmentation split by
# modality), appended right after the question text. Two are built in: ours (short, for the tiny model) and the
# release's, character for character (`--prompt_template=release`); a JSON file overrides any of their keys.

INSTRUCTION = "Think inside <think></think>, then give the final answer inside <answer></answer>."
PROJECT_TEMPLATE = {
    "question": "{Question}\n" + INSTRUCTION + "\n",
    "multiple choice": "Answer with the option letter, e.g. <answer>B</answer>.",
    "numerical": "Answer with a number, e.g. <answer>3</answer>.",
    "regression": "Answer with a number, e.g. <answer>2.5</answer>.",
    "math": "Answer with a number or expression, e.g. <answer>12</answer>.",
    "OCR": "Answer with the exact text, e.g. <answer>CAT</answer>.",
    "open-ended": "Answer in one sentence, e.g. <answer>a red circle.</answer>.",
    "temporal grounding": 'Answer with start and end seconds, e.g. <answer>{"time": [1.5, 3.0]}</answer>.',
    "spatial grounding": 'Answer with a 0-1000 box, e.g. <answer>{"boxes": [120, 40, 380, 290]}</answer>.',
    "spatial-temporal grounding": ('Answer with the seconds and one 0-1000 box per second, e.g. '
                                   '<answer>{"time": [1, 2], "boxes": {"1": [10, 20, 90, 80], "2": [30, 20, 110, 80]}}</answer>.'),
    "tracking": ('Answer with one 0-1000 box per second, e.g. '
                 '<answer>{"boxes": {"1": [10, 20, 90, 80], "2": [30, 20, 110, 80]}}</answer>.'),
    "segmentation/image": ('Answer with a 0-1000 box, 3 points inside and 3 outside, e.g. <answer>{"boxes": [100, 100, 300, 300], '
                           '"positive_points": [[200, 200], [150, 180], [250, 220]], '
                           '"negative_points": [[50, 50], [400, 400], [600, 100]]}</answer>.'),
    "segmentation/video": ('Answer with a keyframe second, a 0-1000 box, 3 points inside and 3 outside, e.g. '
                           '<answer>{"time": 1.0, "boxes": [100, 100, 300, 300], '
                           '"positive_points": [[200, 200], [150, 180], [250, 220]], '
                           '"negative_points": [[50, 50], [400, 400], [600, 100]]}</answer>.'),
}
# The release's prompt (EasyR1/verl/utils/dataset.py and Evaluation/Eval/eval_bench.py hold the same text): data
# the released checkpoints were trained on, so kept to the character, its missing spaces after "content." and
# "tags." included.
_SEGMENTATION_POINTS = (
    "Choose informative points that help distinguish object vs. background. Prefer negatives on clear non-object "
    "pixels INSIDE the box when safe; otherwise place them just outside on obvious background. "
    "Negatives must NEVER be on the object or on its boundary.\n")
RELEASE_TEMPLATE = {
    "question": (
        "{Question}\n"
        "Please answer this question based on the visual content."
        "Provide your thinking process between the <think> and </think> tags, and then give your final answer "
        "between the <answer> and </answer> tags."
        "At the end, you must output the final answer in the format:\n"
        "<answer><your_answer_here></answer>\n"),
    "multiple choice": (
        "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer>...</answer> tags.\n"
        "Example:\n<answer>A</answer>"),
    "numerical": (
        "Please provide only the numerical value within the <answer>...</answer> tags.\n"
        "Example:\n<answer>3.14</answer>"),
    "OCR": (
        "Please provide only the transcribed text within the <answer>...</answer> tags.\n"
        "Example:\n<answer>Hello World</answer>"),
    "open-ended": (
        "Please provide only your text answer within the <answer>...</answer> tags.\n"
        "Example:\n<answer>The capital of France is Paris.</answer>"),
    "regression": (
        "Please provide only the numerical value within the <answer>...</answer> tags.\n"
        "Example:\n<answer>42.7</answer>"),
    "math": (
        "Please provide only the final result (a number or LaTeX formula) within the <answer>...</answer> tags.\n"
        "Example:\n<answer>$$-\\dfrac{3}{2}$$</answer>"),
    "temporal grounding": (
        "Please provide only the time span in seconds as JSON within the <answer>...</answer> tags.\n"
        'Example:\n<answer>{"time": [12.3, 25.7]}</answer>'),
    "spatial grounding": (
        "Please provide only the bounding box as JSON with key 'boxes' within the <answer>...</answer> tags.\n"
        'Example:\n<answer>{"boxes": [35, 227, 437, 932]}</answer>'),
    "spatial-temporal grounding": (
        "Please provide only the time span in seconds and bounding boxes as JSON within the <answer>...</answer> "
        "tags.\n"
        "You MUST output one bounding box for every integer second within the given time span (inclusive).\n"
        "Example:\n"
        '<answer>{"time": [8.125, 13.483], "boxes": {"9": [317, 422, 582, 997], '
        '"10": [332, 175, 442, 369], "11": [340, 180, 450, 370]}}</answer>\n'
        "Note: Each key in 'boxes' must be an integer second within the span, and its value must be a 4-number "
        "bounding box [x1, y1, x2, y2]."),
    "tracking": (
        "Please track the target object throughout the video and provide one bounding box per second, "
        "ONLY up to 32 seconds, within the <answer>...</answer> tags.\n"
        "Example:\n"
        '<answer>{"boxes": {"1": [405, 230, 654, 463], "2": [435, 223, 678, 446], ..., '
        '"32": [415, 203, 691, 487]}}</answer>\n'
        "Note: Each key in 'boxes' must correspond to a second (1, 2, 3, ..., 32) and contain a 4-number bounding "
        "box [x1, y1, x2, y2]."),
    "segmentation/image": (
        "This task prepares inputs for image object segmentation with a specialized model (e.g., SAM2).\n"
        "Please provide ONE bounding box, 3 positive points (clearly INSIDE the object), and 3 negative points "
        "(clearly OUTSIDE the object) within the <answer>...</answer> tags.\n"
        + _SEGMENTATION_POINTS +
        "Example:\n"
        '<answer>{"boxes": [x1, y1, x2, y2], "positive_points": [[x,y],[x,y],[x,y]], '
        '"negative_points": [[x,y],[x,y],[x,y]]}</answer>'),
    "segmentation/video": (
        "This task prepares inputs for video object segmentation with a specialized model (e.g., SAM2).\n"
        "Please select ONE representative time (in seconds), and provide ONE bounding box, "
        "3 positive points (clearly INSIDE the object), and 3 negative points (clearly OUTSIDE the object) "
        "within the <answer>...</answer> tags.\n"
        + _SEGMENTATION_POINTS +
        "Example:\n"
        '<answer>{"time": <time_in_seconds>, "boxes": [x1, y1, x2, y2], '
        '"positive_points": [[x,y],[x,y],[x,y]], "negative_points": [[x,y],[x,y],[x,y]]}</answer>'),
}
BUILTIN_TEMPLATES = {"project": PROJECT_TEMPLATE, "release": RELEASE_TEMPLATE}
TEMPLATE_ALIASES = {"segmentation_image": "segmentation/image", "segmentation_video": "segmentation/video"}  # release


def load_templates(name):
    """A prompt template: "release" or "project" (built in), or a JSON file of keys to override in ours: "question"
    and problem_types (segmentation/image, segmentation/video, or the release's segmentation_image,
    segmentation_video). An unknown key is an error naming the file and the key."""
    if name in BUILTIN_TEMPLATES:
        return dict(BUILTIN_TEMPLATES[name])
    with open(name) as f:
        templates = json.load(f)
    if not isinstance(templates, dict):
        raise ValueError(f"{name}: a prompt template is a JSON object of key -> text, got {type(templates).__name__}")
    templates = {TEMPLATE_ALIASES.get(key, key): text for key, text in templates.items()}
    for key, text in templates.items():
        if key not in PROJECT_TEMPLATE:
            raise ValueError(f"{name}: unknown prompt template key {key!r} (known: {', '.join(PROJECT_TEMPLATE)}, "
                             f"{', '.join(TEMPLATE_ALIASES)})")
        if not isinstance(text, str):
            raise ValueError(f"{name}: prompt template key {key!r} must map to a string, got {text!r:.80}")
    if "{Question}" not in templates.get("question", "{Question}"):
        raise ValueError(f"{name}: prompt template key 'question' must contain {{Question}}")
    return {**PROJECT_TEMPLATE, **templates}


def build_prompt(row, templates=None):
    """The prompt text of an RL or eval row, as the release builds it: prompt_question put in the template's
    question text, then the problem_type's line (no separator: the release's question text ends in a newline).
    Media placeholders stay in the text (user_content places the media there)."""
    templates = templates or PROJECT_TEMPLATE
    problem_type = row["problem_type"]
    key = task_key(problem_type, row.get("data_type")) if problem_type == "segmentation" else problem_type
    return templates["question"].replace("{Question}", prompt_question(row)) + templates[key]


def prompt_question(row):
    """What stands for {Question}: the problem as it is (not stripped); for multiple choice then a line
    "Options:" and the options one a line, as the release appends them."""
    question = row["problem"]
    if row["problem_type"] == "multiple choice" and row.get("options"):
        question += "\nOptions:\n" + "\n".join(str(option) for option in row["options"])
    return question


# -----------------------------------------------------------------------------
# COCO run-length encoding (the released segmentation ground truth, SPEC 1)
# Runs are counted in column-major order, starting with a run of zeros; "counts" is COCO's compressed string:
# each count (after the first two, as a difference from the count two back) in 5-bit groups, a continuation
# bit 0x20, offset by 48 into printable ASCII.

def rle_encode(mask):
    """bool/0-1 array [H, W] -> {"size": [H, W], "counts": str} (COCO compressed RLE)."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.ravel(order="F").astype(np.int8)  # [H*W] column-major, as COCO
    change = np.flatnonzero(np.diff(flat)) + 1  # positions where the value flips
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts  # COCO runs always start with zeros
    chars = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def rle_decode(rle):
    """{"size": [H, W], "counts": str or list of ints} -> bool array [H, W]."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        s, counts, p = counts, [], 0
        while p < len(s):
            x, k, more = 0, 0, True
            while more:
                c = ord(s[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}*{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)  # [H*W]
    return flat.reshape((h, w), order="F")


# -----------------------------------------------------------------------------
# loading (SPEC 1): three row shapes, validated; a bad row names its file, index, field and value

def read_json_rows(path):
    """A JSON list or JSONL file -> list of raw dicts."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no}: not valid JSON: {e}") from None
    return rows


def refuse_playlist(path):
    """FFmpeg follows the file names inside a playlist (HLS, ffconcat, DASH) wherever they point: a media path
    must name a video file, never a list of others. Raises ValueError naming the file."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith((b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD")):
        raise ValueError(f"{path} is a playlist ({head[:16]!r}...), not a video file")


def check_media_file(path, media_type):
    """Opens the file far enough to know it is an image / a video with a video stream (cheap: headers only)."""
    if media_type == "image":
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # PIL raises many types for a bad file
            raise ValueError(f"corrupt image {path}: {e}") from None
    else:
        try:
            refuse_playlist(path)
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
        except (av.FFmpegError, ValueError) as e:
            raise ValueError(f"corrupt video {path}: {e}") from None


def inside(path, root):
    """Whether path lies under root, by its name (`..` resolved; symlinks inside root are the owner's choice)."""
    root = os.path.normpath(os.path.abspath(root))
    return os.path.normpath(os.path.abspath(path)).startswith(root + os.sep)


def media_file(rel, media_type, media_root, check_media=True, allow_outside_root=False):
    """A row's media path made absolute and checked: under media_root (unless allow_outside_root), present, and
    (check_media) opening as an image / a video with a video stream. ValueError saying what is wrong."""
    full = rel if os.path.isabs(rel) else os.path.join(media_root, rel)
    if not allow_outside_root and not inside(full, media_root):
        raise ValueError(f"{rel} leads out of media_root {media_root} (allow_media_outside_root=true allows it)")
    if not os.path.isfile(full):
        raise ValueError(f"missing file {full}")
    if check_media:
        check_media_file(full, media_type)
    return os.path.abspath(full)


def normalise_row(row, index, path, media_root, check_media=True, allow_outside_root=False):
    """Validate one raw row and return a copy with `kind`, `media`, `media_types`, `source` added.

    kind: "sft" (has messages), "eval" (has solution/path), "rl" (has answer).
    media: absolute paths in the order they appear in the prompt; media_types: "image" | "video" for each.
    SFT rows may lack problem_type / data_type (released files): data_type is inferred from the media,
    problem_type is None. A row without media is a text-only row (data_type None). An SFT row whose messages
    hold only the assistant turn has no user text of its own: it carries problem / problem_type (/ options) as an
    RL row does, and its prompt is built from the template (user_content).
    Placeholders: an RL (or such SFT) row's problem (and options) hold either no <image> / <video> of its media's
    kind or one per file (the release splits the prompt there); SFT user text likewise, of both kinds.
    A media path that leads out of media_root (`..`, an absolute path elsewhere) is malformed unless
    allow_outside_root.
    """
    where = f"{path}: row {index}"

    def bad(field, what):
        raise ValueError(f"{where} field {field!r}: {what}")

    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    out = dict(row)
    if "messages" in row:
        kind = "sft"
    elif "solution" in row or "path" in row:
        kind = "eval"
    elif "answer" in row:
        kind = "rl"
    else:
        bad("answer", "missing (a row needs 'answer' (RL), 'solution' + 'path' (eval) or 'messages' (SFT))")

    # text fields
    # RL and eval rows, and SFT rows of the assistant turn alone: the prompt is built from problem by a template
    templated = kind != "sft" or (isinstance(row["messages"], list) and len(row["messages"]) == 1)
    if kind == "sft":
        messages = row["messages"]
        roles = [m.get("role") for m in messages] if isinstance(messages, list) and all(
            isinstance(m, dict) for m in messages) else None
        if roles not in (["user", "assistant"], ["assistant"]):
            bad("messages", f"expected a user then an assistant message (or the assistant alone), got roles {roles!r}")
        for m in messages:
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                bad("messages", f"{m['role']} content must be a non-empty string, got {m.get('content')!r}")
    if templated and (not isinstance(row.get("problem"), str) or not row["problem"].strip()):
        bad("problem", f"missing or not a string: {row.get('problem')!r}")
    if kind != "sft":
        field = "answer" if kind == "rl" else "solution"
        value = row.get(field)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # a bare number is a fine answer
            bad(field, f"missing or not a string: {value!r}")

    # problem_type and options
    problem_type = row.get("problem_type")
    if kind == "sft" and not templated and problem_type is None:
        out["problem_type"] = None
    elif problem_type not in PROBLEM_TYPES:
        bad("problem_type", f"unknown value {problem_type!r} (known: {', '.join(PROBLEM_TYPES)})")
    if problem_type == "multiple choice" and templated:  # SFT user text holds its own options
        options = row.get("options")
        if not isinstance(options, list) or len(options) < 2:
            bad("options", f"multiple choice needs a list of at least 2 options, got {options!r}")
    if kind == "eval" and problem_type == "segmentation" and not row.get("segmentation_output"):
        bad("segmentation_output", "segmentation eval rows need ground-truth masks")

    # media: which field holds which kind, then data_type must agree
    if kind == "eval":
        data_type = row.get("data_type")
        if data_type not in DATA_TYPES:
            bad("data_type", f"unknown value {data_type!r} (known: {', '.join(DATA_TYPES)})")
        fields = [("path", "video" if data_type == "video-image" else data_type)]
        if data_type == "video-image":  # SPEC 1: the video, then an additional image
            fields.append(("additional_path", "image"))
        media = []
        for field, media_type in fields:
            if not isinstance(row.get(field), str) or not row[field]:
                bad(field, f"missing or empty: {row.get(field)!r}")
            media.append((field, media_type, row[field]))
    else:
        present = [f for f in ("images", "videos") if row.get(f)]
        if len(present) == 2:
            bad("videos", "a row has images or videos, not both")
        media = []
        for field in present:
            if not isinstance(row[field], list) or not all(isinstance(x, str) and x for x in row[field]):
                bad(field, f"must be a list of paths, got {row[field]!r}")
            media += [(field, field[:-1], x) for x in row[field]]
        implied = media[0][1] if media else None
        data_type = row.get("data_type", implied if kind == "sft" else None)
        if data_type != implied:
            bad("data_type", f"{data_type!r} does not match the media: {present[0] if present else 'no images or videos'}")
        out["data_type"] = data_type
        if not templated:  # placeholders, when the text has any, must match the media one for one
            user = row["messages"][0]["content"]
            found = {tag: user.count(tag) for tag in ("<image>", "<video>")}
            expected = {tag: len(media) if tag == f"<{implied}>" else 0 for tag in found}
            if any(found.values()) and found != expected:
                bad("messages", f"user text has {found['<image>']} <image> and {found['<video>']} <video> "
                                f"placeholders for {len(media)} {implied or 'media'} file(s)")
        elif media:  # the release splits the whole prompt on the tag of the row's media kind
            tag = f"<{implied}>"
            found = prompt_question(row).count(tag)
            if found and found != len(media):
                bad("problem", f"has {found} {tag} placeholders for {len(media)} {implied} file(s)")

    # media files exist (and open, unless told not to look inside)
    out["media"], out["media_types"] = [], []
    for field, media_type, rel in media:
        try:
            out["media"].append(media_file(rel, media_type, media_root, check_media, allow_outside_root))
        except ValueError as e:
            bad(field, str(e))
        out["media_types"].append(media_type)
    out["kind"] = kind
    out["source"] = where
    return out


def load_rows(path, media_root=None, skip_bad_rows=False, check_media=True, allow_outside_root=False):
    """Rows of a JSON list / JSONL file in any of the three released shapes, validated and normalised.

    media_root defaults to the file's directory. A bad row raises ValueError naming file, row, field, value (the
    first bad row of the file); with skip_bad_rows=True bad rows are dropped and counted in one printed line.
    check_media=True also opens every media file's header (check_media_file), the rows split over ranks (rank r
    opens those of rows r, r + W, ...; collective: every rank calls load_rows) with a progress bar on rank 0.
    check_media=False only checks that media files exist (for very large files; decoding still fails at run
    time, naming the row).
    """
    media_root = os.path.dirname(os.path.abspath(path)) if media_root is None else media_root
    raw = read_json_rows(path)
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of rows (or JSONL), got {type(raw).__name__}")
    rank, world_size = common._rank(), common._world_size()
    rows, errors = {}, {}  # by row index
    bar = tqdm(raw, desc=f"checking media of {os.path.basename(path)} ({world_size} rank(s))", unit="row",
               disable=not check_media or rank != 0, dynamic_ncols=True)
    for index, row in enumerate(bar):
        try:
            rows[index] = normalise_row(row, index, path, media_root, check_media and index % world_size == rank,
                                        allow_outside_root)
        except ValueError as e:
            errors[index] = str(e)
    if check_media:  # every rank learns what the others found in their share
        errors.update(common.all_gather_list(errors.items()))
    if errors and not skip_bad_rows:
        raise ValueError(errors[min(errors)])
    if errors:
        shown = [errors[i].removeprefix(f"{path}: ") for i in sorted(errors)[:3]]
        print(f"skipped {len(errors)} of {len(raw)} rows of {path}: {', '.join(shown)}"
              + (", ..." if len(errors) > 3 else ""))
    return [row for index, row in rows.items() if index not in errors]


def ground_truth(row):
    """The bare answer text: RL `answer`, eval `solution`, SFT the assistant's <answer> (tags stripped)."""
    if row["kind"] == "sft":
        return rewards.answer_text(row["messages"][-1]["content"])
    return rewards.answer_text(str(row["answer"] if row["kind"] == "rl" else row["solution"]))


# -----------------------------------------------------------------------------
# media (SPEC 2): images and video frames resized within pixel bounds to multiples of 32
# (patch 16 x spatial merge 2). Two ways, MediaConfig.sizing:
# - "fit" (ours, the shapes preset): one resize into the budget, and the processor patchifies the result as it
#   is (do_resize=False). Nothing is upscaled past image_min_pixels.
# - "easyr1" / "qwen_vl_utils" (the release presets): the release's own steps. Images: EasyR1's process_image
#   (RL; LLaMA-Factory's SFT step is the same arithmetic) or qwen-vl-utils' fetch_image (eval), then the
#   checkpoint's processor resizes again (do_resize=True, as every release stage calls it), which for Qwen3-VL
#   lifts any image under its 65,536-pixel floor (a 128 px image becomes 256 px: 4x the vision tokens). Videos:
#   qwen-vl-utils' fetch_video frame count, indices and per-frame size, then the processor's video resize (what
#   vLLM does; the identity within the RL budgets).

FACTOR = 32
SIZINGS = ("fit", "easyr1", "qwen_vl_utils")


@dataclass
class MediaConfig:
    """Pixel and frame budgets (SPEC 2) and the sizing rule. The default is the released RL setting's budgets."""
    fps: float = 2.0
    max_frames: int = 128
    video_min_pixels: int = 4 * 32 * 32  # per frame
    video_max_pixels: int = 64 * 32 * 32  # per frame
    image_min_pixels: int = 3136
    image_max_pixels: int = 1048576
    sizing: str = "fit"  # fit | easyr1 | qwen_vl_utils (see above)

    def __post_init__(self):
        if self.sizing not in SIZINGS:
            raise ValueError(f"media sizing must be one of {SIZINGS}, got {self.sizing!r}")


EVAL_MEDIA = MediaConfig(video_max_pixels=256 * 32 * 32, image_max_pixels=1024 * 32 * 32)  # SPEC 2: eval


def media_config(cfg, base=MediaConfig()):
    """A script's MediaConfig: its config's fields of the same names, base's values for the others."""
    return dataclasses.replace(base, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(MediaConfig)
                                        if hasattr(cfg, f.name)})


def fit_size(height, width, min_pixels, max_pixels, fuzz=1e-6):
    """(h, w) with the aspect ratio kept, both multiples of 32, and h*w within [min_pixels, max_pixels].

    With fuzz=0 this is qwen-vl-utils' smart_resize to the bit (and the Qwen2-VL processor's, but for sides under
    16 px), except that a side the release would floor to 0 (aspect ratio near 200) stays 32. fuzz=1e-6 (ours)
    keeps float noise (10 * 6.4 = 64.00000000000001) from costing a whole 32-pixel step."""
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(FACTOR, math.floor(height / scale / FACTOR + fuzz) * FACTOR)
        w = max(FACTOR, math.floor(width / scale / FACTOR + fuzz) * FACTOR)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / FACTOR - fuzz) * FACTOR
        w = math.ceil(width * scale / FACTOR - fuzz) * FACTOR
    return h, w


def scale_into(height, width, min_pixels, max_pixels):
    """EasyR1's process_image (and LLaMA-Factory's _preprocess_image): scaled down to max_pixels, then up to
    min_pixels, each side truncated to an int (so not multiples of 32, and possibly a few pixels under min)."""
    if height * width > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        height, width = int(height * scale), int(width * scale)
    if height * width < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        height, width = int(height * scale), int(width * scale)
    return height, width


def load_image(path, min_pixels=MediaConfig.image_min_pixels, max_pixels=MediaConfig.image_max_pixels,
               sizing="fit"):
    """RGB PIL image sized by the sizing rule (module comment); a corrupt file raises ValueError naming it."""
    try:
        with Image.open(path) as f:
            f.load()
            image = f.copy()
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for a bad file
        raise ValueError(f"corrupt image {path}: {e}") from None
    if sizing == "easyr1":  # resized in the file's own mode (a palette image: nearest), then RGB (alpha dropped)
        h, w = scale_into(image.height, image.width, min_pixels, max_pixels)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h))
        return image.convert("RGB")
    if sizing == "qwen_vl_utils":  # transparent pixels over white, then bicubic to the smart_resize size
        if image.mode == "RGBA":
            white = Image.new("RGB", image.size, (255, 255, 255))
            white.paste(image, mask=image.split()[3])
            image = white
        image = image.convert("RGB")
        h, w = fit_size(image.height, image.width, min_pixels, max_pixels, fuzz=0.0)
        return image.resize((w, h), Image.BICUBIC)
    image = image.convert("RGB")
    h, w = fit_size(image.height, image.width, min_pixels, max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.BICUBIC)
    return image


def sample_frame_indices(total_frames, source_fps, fps, max_frames):
    """Ours ("fit"): source frame indices nearest to t = 0, 1/fps, 2/fps, ... (all frames when fps >= source
    fps); uniformly subsampled to max_frames; padded to an even count (temporal patch 2) by repeating the last."""
    duration = total_frames / source_fps
    times = np.arange(math.ceil(duration * fps - 1e-9)) / fps  # [n] seconds
    indices = np.unique(np.minimum(np.round(times * source_fps), total_frames - 1).astype(int))
    if len(indices) > max_frames:
        indices = indices[np.linspace(0, len(indices) - 1, max_frames).round().astype(int)]
    indices = indices.tolist()
    if len(indices) % 2:
        indices.append(indices[-1])
    return indices


# qwen-vl-utils' video constants (vision_process.py): at least 4 frames, an even count; a frame at most 768
# merged tokens and at most its share (x 2) of 0.9 x a 128,000-token context (MODEL_SEQ_LEN's default)
QWEN_MIN_FRAMES = 4
QWEN_FRAME_MAX_PIXELS = 768 * FACTOR * FACTOR
QWEN_TOTAL_PIXELS = 128000 * FACTOR * FACTOR * 0.9


def qwen_frame_indices(total_frames, source_fps, fps, max_frames):
    """The release's ("easyr1" / "qwen_vl_utils"), qwen-vl-utils' smart_nframes: duration x fps frames, clamped to
    [4, max_frames] and to the clip, floored to an even count, spread from the first frame to the last
    (torch.linspace, rounded half to even). A 1-frame clip, which qwen-vl-utils refuses, gives its frame twice."""
    target = total_frames / source_fps * fps
    low, high = math.ceil(QWEN_MIN_FRAMES / 2) * 2, math.floor(max_frames / 2) * 2
    n = math.floor(min(min(max(target, low), high), total_frames) / 2) * 2
    if n < 2:
        return [0, 0]
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def qwen_frame_max_pixels(n_frames, min_pixels, max_pixels):
    """qwen-vl-utils' per-frame pixel ceiling for a clip of n_frames: max_pixels, capped as fetch_video caps it."""
    cap = max(min(QWEN_FRAME_MAX_PIXELS, QWEN_TOTAL_PIXELS / n_frames * 2), int(min_pixels * 1.05))
    return min(max_pixels, cap)


def frame_indices(total_frames, source_fps, fps, max_frames, sizing="fit"):
    """The source frame indices a clip is sampled at under a sizing rule (the media comment above)."""
    if sizing == "fit":
        return sample_frame_indices(total_frames, source_fps, fps, max_frames)
    return qwen_frame_indices(total_frames, source_fps, fps, max_frames)


def frame_size(height, width, n_frames, min_pixels, max_pixels, sizing="fit"):
    """(h, w) of every frame of an n_frames clip under a sizing rule."""
    if sizing == "fit":
        return fit_size(height, width, min_pixels, max_pixels)
    return fit_size(height, width, min_pixels, qwen_frame_max_pixels(n_frames, min_pixels, max_pixels), fuzz=0.0)


def load_video(path, fps=MediaConfig.fps, max_frames=MediaConfig.max_frames,
               min_pixels=MediaConfig.video_min_pixels, max_pixels=MediaConfig.video_max_pixels, sizing="fit"):
    """Decode with PyAV -> (frames uint8 [T, H, W, 3], VideoMetadata). T is even; the metadata carries the source
    fps and source frame indices so the processor writes each frame pair's timestamp (SPEC 2). Frames are
    resampled by FFmpeg (bicubic) while decoding; qwen-vl-utils resizes with torchvision (bicubic, antialiased):
    the same sizes, slightly different pixel values."""
    try:
        refuse_playlist(path)
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise ValueError("unknown frame rate")
            source_fps = float(rate)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if not total:
            raise ValueError("no frames")
        wanted = frame_indices(total, source_fps, fps, max_frames, sizing)
        wanted_set, picked, size = set(wanted), {}, None
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i > wanted[-1]:
                    break
                if i in wanted_set:
                    size = size or frame_size(frame.height, frame.width, len(wanted), min_pixels, max_pixels, sizing)
                    picked[i] = frame.to_ndarray(width=size[1], height=size[0], format="rgb24",
                                                 interpolation="BICUBIC")  # [H, W, 3]
    except (av.FFmpegError, ValueError, IndexError) as e:  # IndexError: no video stream
        raise ValueError(f"corrupt video {path}: {e}") from None
    indices = [i for i in wanted if i in picked]  # a truncated file may hold fewer frames than it claims
    if not indices:
        raise ValueError(f"corrupt video {path}: no frames decoded")
    if len(indices) % 2:
        indices.append(indices[-1])
    frames = np.stack([picked[i] for i in indices])  # [T, H, W, 3]
    metadata = VideoMetadata(total_num_frames=total, fps=source_fps, frames_indices=indices,
                             duration=total / source_fps, width=int(frames.shape[2]), height=int(frames.shape[1]))
    return frames, metadata


# -----------------------------------------------------------------------------
# model inputs: one prompt path for SFT, RL and eval; left padding; SFT labels on the assistant turn only

def user_content(row, templates=None):
    """The user turn's chat content, as the release builds it for each row shape.

    RL rows (and SFT rows of the assistant turn alone), EasyR1's rule: the whole prompt text (build_prompt) is
    split on the placeholder of the row's media kind (<image> or <video>) and the next media part goes at each
    split, empty text pieces dropped; a prompt without one gets its media first (the release would give it
    none); a text-only row is the plain prompt string. Eval rows, eval_bench's rule: the media (video before
    image), then the prompt text. SFT rows: their user text, each <image> / <video> replaced by the next media
    part (media first when the text has none), as LLaMA-Factory does."""
    media_parts = [{"type": t} for t in row["media_types"]]
    if row["kind"] == "eval":
        return media_parts + [{"type": "text", "text": build_prompt(row, templates)}]
    if row["kind"] == "rl" or row["messages"][0]["role"] == "assistant":
        text = build_prompt(row, templates)
        if not media_parts:
            return text
        pieces = text.split(f"<{row['media_types'][0]}>")
        if len(pieces) == 1:
            return media_parts + [{"type": "text", "text": text}]
        if len(pieces) - 1 != len(media_parts):  # only a template's own text can add placeholders after load_rows
            raise ValueError(f"{row['source']}: the prompt has {len(pieces) - 1} placeholders for "
                             f"{len(media_parts)} media file(s)")
        parts = []
        for i, piece in enumerate(pieces):
            if i:
                parts.append(media_parts[i - 1])
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts
    pieces = re.split(r"(<image>|<video>)", row["messages"][0]["content"])
    if len(pieces) == 1:
        return media_parts + [{"type": "text", "text": pieces[0]}]
    parts, next_media = [], iter(media_parts)
    for piece in pieces:
        if piece in ("<image>", "<video>"):
            parts.append(next(next_media))
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def prompt_text(row, processor, templates=None):
    """The chat-formatted prompt string ending in the assistant header, media still as one pad token each."""
    messages = [{"role": "user", "content": user_content(row, templates)}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_row(row, processor, media_cfg=None, templates=None, with_answer=False, cutoff_len=0):
    """One row through the processor: {"ids", "types", "labels": lists, "cut": tokens cut by cutoff_len, media
    tensors}. Deterministic (no augmentation), so a trainer may keep the results in a dict and reuse them
    (collate's `cache`). cutoff_len > 0 (SFT rows) cuts a longer row as LLaMA-Factory does (cutoff_lengths)."""
    media_cfg = media_cfg or MediaConfig()
    tokenizer = processor.tokenizer
    images, videos, video_metadata = [], [], []
    for media_type, path in zip(row["media_types"], row["media"]):
        try:
            if media_type == "image":
                images.append(load_image(path, media_cfg.image_min_pixels, media_cfg.image_max_pixels,
                                         media_cfg.sizing))
            else:
                frames, metadata = load_video(path, media_cfg.fps, media_cfg.max_frames, media_cfg.video_min_pixels,
                                              media_cfg.video_max_pixels, media_cfg.sizing)
                videos.append(frames)
                video_metadata.append(metadata)
        except (OSError, ValueError) as e:
            raise ValueError(f"{row['source']} field 'media': {e}") from None
    media_kwargs = {}
    if images:
        media_kwargs["images"] = images
    if videos:
        # cap_pixels_per_frame=False: the video resize of transformers 4.57, which the release ran
        media_kwargs.update(videos=videos, video_metadata=video_metadata, do_sample_frames=False,
                            cap_pixels_per_frame=False)
    # "fit" media are already multiples of 32 within the budget: the processor must not resize them again; the
    # release's sizings end with the processor's own resize, as every release stage calls it
    encoded = processor(text=[prompt_text(row, processor, templates)], do_resize=media_cfg.sizing != "fit",
                        **media_kwargs)
    ids, types = list(encoded["input_ids"][0]), list(encoded["mm_token_type_ids"][0])
    labels = [-100] * len(ids)
    cut = 0
    if with_answer:
        if row["kind"] != "sft":
            raise ValueError(f"{row['source']}: with_answer needs an SFT row (messages), got a {row['kind']} row")
        # tokenised apart from the prompt so the prompt tokens are exactly those generation sees
        answer = tokenizer(row["messages"][-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        prompt_len = len(ids)
        ids += answer + newline
        types += [0] * (len(answer) + len(newline))
        labels += answer + [-100] * len(newline)
        if cutoff_len and len(ids) > cutoff_len:
            keep_prompt, keep_answer = cutoff_lengths(prompt_len, len(ids) - prompt_len, cutoff_len)
            if any(types[keep_prompt:prompt_len]):
                raise ValueError(f"{row['source']}: cutoff_len={cutoff_len} would cut into the prompt's media "
                                 f"tokens ({prompt_len} prompt + {len(ids) - prompt_len} answer tokens); "
                                 f"LLaMA-Factory fails there too: raise cutoff_len or lower the media budgets")
            keep = list(range(keep_prompt)) + list(range(prompt_len, prompt_len + keep_answer))
            cut = len(ids) - len(keep)
            ids, types, labels = [ids[i] for i in keep], [types[i] for i in keep], [labels[i] for i in keep]
    out = {"ids": ids, "types": types, "labels": labels, "cut": cut}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in encoded:
            out[key] = torch.as_tensor(encoded[key])
    return out


def prompt_length(row, processor, media_cfg=None, templates=None):
    """The prompt's length in tokens as encode_row makes it, from the media files' headers, without decoding
    them (eval.py balances ranks and sizes batches with it): the chat text, each image's placeholders at the size
    load_image gives it (and the processor's resize after, for the release's sizings), and per frame pair of a
    video its placeholders at load_video's size and frame count (likewise) plus its timestamp and vision
    start/end tokens (one timestamp's length stands for all)."""
    media_cfg = media_cfg or MediaConfig()
    tokenizer = processor.tokenizer
    length = len(tokenizer(prompt_text(row, processor, templates), add_special_tokens=False)["input_ids"])
    for media_type, path in zip(row["media_types"], row["media"]):
        length -= 1  # the one placeholder prompt_text writes for it
        if media_type == "image":
            config = processor.image_processor
            with Image.open(path) as image:
                height, width = image.height, image.width
            if media_cfg.sizing == "easyr1":
                h, w = scale_into(height, width, media_cfg.image_min_pixels, media_cfg.image_max_pixels)
            else:
                h, w = fit_size(height, width, media_cfg.image_min_pixels, media_cfg.image_max_pixels,
                                fuzz=1e-6 if media_cfg.sizing == "fit" else 0.0)
            patches = h * w // config.patch_size ** 2 if media_cfg.sizing == "fit" else \
                config.get_number_of_image_patches(h, w, {})
            length += patches // config.merge_size ** 2
            continue
        config = processor.video_processor
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate)
            total = stream.frames or round(float(stream.duration * stream.time_base) * fps)
            height, width = stream.height, stream.width
        frames = len(frame_indices(total, fps, media_cfg.fps, media_cfg.max_frames, media_cfg.sizing))
        h, w = frame_size(height, width, frames, media_cfg.video_min_pixels, media_cfg.video_max_pixels,
                          media_cfg.sizing)
        factor = config.patch_size * config.merge_size
        if media_cfg.sizing != "fit":  # the processor's video resize (cap_pixels_per_frame=False, as encode_row)
            h, w = video_smart_resize(frames, h, w, config.temporal_patch_size, factor, config.size["shortest_edge"],
                                      config.size["longest_edge"])
        stamp = len(tokenizer("<0.0 seconds><|vision_start|><|vision_end|>", add_special_tokens=False)["input_ids"])
        length += frames // config.temporal_patch_size * (h * w // factor ** 2 + stamp)
    return length


def cutoff_lengths(prompt_len, answer_len, cutoff_len):
    """(prompt tokens kept, answer tokens kept) of an SFT row longer than cutoff_len, LLaMA-Factory's rule
    (infer_seqlen): an answer under half the budget is kept whole and the prompt cut to the rest; else a prompt
    under half is kept whole and the answer cut; else both shrink in proportion. Each keeps its head."""
    if 2 * answer_len < cutoff_len:
        max_answer = cutoff_len
    elif 2 * prompt_len < cutoff_len:
        max_answer = cutoff_len - prompt_len
    else:
        max_answer = int(cutoff_len * (answer_len / (prompt_len + answer_len)))
    keep_answer = min(max_answer, answer_len)
    return min(max(cutoff_len - keep_answer, 0), prompt_len), keep_answer


def collate(rows, processor, media_cfg=None, templates=None, with_answer=False, cache=None, cutoff_len=0,
            stats=None):
    """Rows -> dict of tensors for Qwen3VLForConditionalGeneration.forward, left-padded.

    input_ids / attention_mask / mm_token_type_ids [B, L]; pixel_values [N_patches, C*2*16*16] + image_grid_thw
    [N_images, 3] and pixel_values_videos + video_grid_thw when the batch has media of that kind (each row's
    media in row order, as the processor lays out a batch).
    with_answer (SFT rows): the assistant turn follows the prompt, and labels [B, L] (unshifted, as HF takes
    them) hold input_ids on the assistant content and its closing <|im_end|>, -100 elsewhere.
    cache: a dict kept by the caller; rows already encoded (by their "source") skip media decode and the
    processor, which dominate a tiny model's step on CPU.
    cutoff_len (with_answer): rows longer are cut (encode_row); stats, a dict, then counts "truncated_rows" and
    "truncated_tokens" of this batch, so a trainer can log them.
    """
    encoded = [encode_cached(row, processor, media_cfg, templates, with_answer, cache, cutoff_len) for row in rows]
    if stats is not None:
        count_truncated(encoded, stats)
    return pad_batch(encoded, processor.tokenizer.pad_token_id, with_answer)


def encode_cached(row, processor, media_cfg=None, templates=None, with_answer=False, cache=None, cutoff_len=0):
    """encode_row, looked up in (and stored into) `cache` by the row's source when a cache is given."""
    key = (row["source"], with_answer)
    if cache is not None and key in cache:
        return cache[key]
    item = encode_row(row, processor, media_cfg, templates, with_answer, cutoff_len)
    if cache is not None:
        cache[key] = item
    return item


def count_truncated(encoded, stats):
    """Add the rows cut by cutoff_len (encode_row's "cut") and their tokens cut to stats, for a trainer's log."""
    stats["truncated_rows"] = stats.get("truncated_rows", 0) + sum(e["cut"] > 0 for e in encoded)
    stats["truncated_tokens"] = stats.get("truncated_tokens", 0) + sum(e["cut"] for e in encoded)


def pad_batch(encoded, pad_id, with_answer=False):
    """encode_row's items -> collate's left-padded batch of tensors."""
    length = max(len(e["ids"]) for e in encoded)
    batch = {
        "input_ids": left_pad([e["ids"] for e in encoded], length, pad_id),  # [B, L]
        "attention_mask": left_pad([[1] * len(e["ids"]) for e in encoded], length, 0),  # [B, L]
        "mm_token_type_ids": left_pad([e["types"] for e in encoded], length, 0),  # [B, L]
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [e[key] for e in encoded if key in e]
        if parts:
            batch[key] = torch.cat(parts)
    if with_answer:
        batch["labels"] = left_pad([e["labels"] for e in encoded], length, -100)  # [B, L]
    return batch


def left_pad(sequences, length, value):
    out = torch.full((len(sequences), length), value, dtype=torch.long)  # [B, L]
    for i, seq in enumerate(sequences):
        if seq:
            out[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
    return out


# -----------------------------------------------------------------------------
# rank sharding with an exact resume position

class ShardedSampler:
    """Row indices for one rank from one stream: the permutations of epochs 0, 1, 2, ... one after the other,
    each deterministic in (seed, epoch) (identity when shuffle=False). Rank r takes stream positions
    start + r, start + r + W, start + r + 2W, ...: across ranks every row comes exactly once per epoch, nothing is
    padded or dropped, shards of an epoch differ by at most one row, and batches run on across epoch boundaries.
    Over all ranks a step's rows are the next stream positions whatever the number of ranks, so a resume on another
    number of ranks continues the same stream from `start` = the positions consumed by all ranks together
    (checkpoint_state). With strata (a label per row, e.g. data_type) each permutation interleaves the strata
    evenly, so every stretch of a shard holds each stratum in its overall proportion (image/video mix).
    state_dict() / load_state_dict(): (start, drawn) for an exact resume on the same number of ranks.
    """

    def __init__(self, num_rows, rank=0, world_size=1, seed=0, shuffle=True, strata=None):
        if num_rows < world_size:
            raise ValueError(f"{num_rows} rows cannot feed {world_size} ranks")
        if strata is not None and len(strata) != num_rows:
            raise ValueError(f"strata has {len(strata)} labels for {num_rows} rows")
        self.num_rows, self.rank, self.world_size = num_rows, rank, world_size
        self.seed, self.shuffle, self.strata = seed, shuffle, strata
        self.start, self.drawn = 0, 0  # the stream position this sharding began at; rows this rank drew since
        self._order_epoch, self._order = None, None

    def permutation(self, epoch):
        """All rows in the order epoch `epoch` takes them (over all ranks)."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.strata is None:
                order = rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)
            else:
                labels = np.asarray(self.strata)
                members, slots = [], []
                for label in sorted(set(labels.tolist())):
                    idx = np.flatnonzero(labels == label)
                    idx = rng.permutation(idx) if self.shuffle else idx
                    jitter = rng.random(len(idx)) if self.shuffle else np.full(len(idx), 0.5)
                    members.append(idx)
                    slots.append((np.arange(len(idx)) + jitter) / len(idx))  # evenly spread over [0, 1)
                order = np.concatenate(members)[np.argsort(np.concatenate(slots), kind="stable")]
            self._order_epoch, self._order = epoch, order.tolist()
        return self._order

    def _position(self, k):
        """The stream position of this rank's k-th row since `start`."""
        return self.start + self.rank + k * self.world_size

    def epoch_indices(self, epoch):
        """This rank's row indices in an epoch, in order (from `start` on)."""
        first = max(epoch * self.num_rows, self._position(0))
        first += (self._position(0) - first) % self.world_size  # the next position of this rank's residue
        return [self.permutation(epoch)[p - epoch * self.num_rows]
                for p in range(first, (epoch + 1) * self.num_rows, self.world_size)]

    @property
    def epoch(self):
        """The epoch of the next row this rank draws."""
        return self._position(self.drawn) // self.num_rows

    def __len__(self):
        return len(range(self.rank, self.num_rows, self.world_size))

    def __iter__(self):
        return self

    def __next__(self):
        epoch, i = divmod(self._position(self.drawn), self.num_rows)
        self.drawn += 1
        return self.permutation(epoch)[i]

    def next_batch(self, batch_size):
        return [next(self) for _ in range(batch_size)]

    def state_dict(self):
        return {"start": self.start, "drawn": self.drawn, "seed": self.seed, "num_rows": self.num_rows,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state):
        for key in ("seed", "num_rows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}")
        if (state["rank"], state["world_size"]) == (self.rank, self.world_size):
            self.start, self.drawn = state["start"], state["drawn"]
        elif "global" in state:  # another number of ranks: go on from where all ranks together stopped
            self.start, self.drawn = state["global"]["consumed"], 0
        else:
            raise ValueError(f"sampler state of rank {state['rank']} with world_size={state['world_size']} has no "
                             f"rank-independent position; this sampler is rank {self.rank} of {self.world_size}")


def checkpoint_state(state, bad_rows):
    """A trainer's checkpoint extra from its local `state` (collective): its "sampler" state_dict gains "global"
    {consumed}, the stream positions consumed over all ranks (rank-independent: a resume on another number of
    ranks starts there), and "bad_rows" holds the bad rows found so far. Ranks that drew different numbers of rows
    (bad rows replaced) resume from the one furthest behind: no row is skipped, a few may come twice."""
    sampler = state["sampler"]
    drawn = min(s["drawn"] for s in common.all_gather_list([sampler]))
    consumed = sampler["start"] + drawn * sampler["world_size"]
    return {**state, "sampler": {**sampler, "global": {"consumed": consumed}}, "bad_rows": dict(bad_rows.errors)}


# -----------------------------------------------------------------------------
# rows that fail at run time: named, counted, skipped and replaced from the sampler

def check_length(row, item, context, new_tokens=0):
    """A row whose tokens (encode_row's item) plus new_tokens to generate exceed the model context is a bad row:
    ValueError naming it (the check rollout.generate would otherwise make for "row 0" of a batch)."""
    n = len(item["ids"])
    if n + new_tokens > context:
        raise ValueError(f"{row['source']}: {n} tokens" + (f" + {new_tokens} to generate" if new_tokens else "")
                         + f" exceed the model context (max_position_embeddings={context})")
    return item


class BadRows:
    """Rows that fail where they are encoded at run time (media that passed load_rows's header check but do not
    decode, a prompt longer than the context). Each is named by its error (file, row, why) and counted once per
    run; the trainers skip it and draw a replacement. budget: how many a run may skip before it stops with the
    list (None: any number, --skip_bad_rows=true). `errors` goes into checkpoints, so a resumed run passes over
    known bad rows without decoding them again."""

    def __init__(self, budget=None):
        self.budget = budget
        self.errors = {}  # source -> message, every rank's (merged by report)
        self.new = []  # (source, message) recorded on this rank since the last report

    def record(self, row, error):
        if row["source"] not in self.errors:
            self.errors[row["source"]] = str(error)
            self.new.append((row["source"], str(error)))

    def report(self):
        """Collective, once a step: every rank's rows recorded since the last call (the same list on every rank,
        printed by rank 0), merged into every rank's `errors`. Past the budget every rank raises with the list."""
        new = common.all_gather_list(self.new)
        self.new = []
        self.errors.update(new)
        if new and common.is_rank0():
            print("bad rows skipped and replaced:\n  " + "\n  ".join(message for _, message in new), flush=True)
        if self.budget is not None and len(self.errors) > self.budget:
            raise RuntimeError(f"{len(self.errors)} rows failed at run time, more than max_bad_rows={self.budget} "
                               f"(--skip_bad_rows=true skips any number):\n  " + "\n  ".join(self.errors.values()))
        return [message for _, message in new]


def draw_rows(rows, sampler, n, encode, bad_rows):
    """n (row, encode(row)) pairs from the sampler. A row whose encode raises ValueError (the error names it) is
    recorded in bad_rows and replaced by the sampler's next row, so a batch keeps its size; a row known to be bad
    is passed over without being decoded again. Works the same inline or in a prefetch thread that owns the
    sampler; bad_rows.report, a collective, stays on the main thread."""
    out, failed_in_a_row = [], 0
    while len(out) < n:
        row = rows[next(sampler)]
        if row["source"] not in bad_rows.errors:
            try:
                out.append((row, encode(row)))
                failed_in_a_row = 0
                continue
            except ValueError as e:
                bad_rows.record(row, e)
        failed_in_a_row += 1
        if failed_in_a_row > sampler.num_rows:
            raise RuntimeError(f"the last {sampler.num_rows} rows this rank drew all failed, e.g. "
                               f"{next(reversed(bad_rows.errors.values()))}")
    return out


class Prefetcher:
    """Encoded rows (media decode and the processor) prepared ahead on a background thread: ahead(rows) starts on
    the rows the sampler draws next while the trainer works on this batch; prefetcher(row) returns a row's encoded
    item, waiting for it if it was sent ahead. All encoding runs on that one thread, in order (the processor is
    not thread-safe), and a row whose encoding raises raises where it is asked for, as without prefetching."""

    def __init__(self, encode_row):
        self.encode_row = encode_row
        # one intra-op thread for the worker's own torch ops: with the process's default (every core) its OpenMP
        # team competed with the training thread's. Measured, SFT on 2 cores, 2 threads: 0.45 s a step with the
        # default, 0.37 with 1, 0.39 without a prefetch thread (cached rows, alternating runs)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch",
                                                            initializer=torch.set_num_threads, initargs=(1,))
        self.pending = {}  # row source -> Future of its item

    def ahead(self, rows):
        pending, self.pending = self.pending, {}
        for row in rows:
            self.pending[row["source"]] = pending.pop(row["source"], None) or self.worker.submit(self.encode_row, row)
        for future in pending.values():  # sent ahead but not drawn after all
            future.cancel()

    def __call__(self, row):
        future = self.pending.pop(row["source"], None) or self.worker.submit(self.encode_row, row)
        return future.result()


def draw_batch(rows, sampler, n, prefetcher, bad_rows):
    """draw_rows' n (row, encoded row) pairs, then the n rows after them sent ahead: the sampler draws those next
    (the next step, or an RL refill). A copy of the sampler tells which (shallow: drawing rebinds its
    attributes, it mutates nothing), so a checkpoint's sampler state is that of a run without prefetching."""
    batch = draw_rows(rows, sampler, n, prefetcher, bad_rows)
    prefetcher.ahead([rows[i] for i in copy.copy(sampler).next_batch(n)])
    return batch


# -----------------------------------------------------------------------------
# CLI: validate a data file


@dataclass
class Config:
    data: str = "data/shapes/rl.json"  # a JSON list or JSONL file in any of the three released shapes
    media_root: str | None = None  # folder the media paths are relative to; None: the data file's folder
    skip_bad_rows: bool = False  # count and drop malformed rows instead of stopping at the first
    allow_media_outside_root: bool = False  # accept media paths that lead out of media_root (.., absolute)


def check_file(path, media_root=None, skip_bad_rows=False, allow_outside_root=False):
    """Validate a file and print its row counts per kind / problem_type / data_type."""
    rows = load_rows(path, media_root=media_root, skip_bad_rows=skip_bad_rows, allow_outside_root=allow_outside_root)
    counts = Counter((row["kind"], row["problem_type"], row["data_type"]) for row in rows)
    print(f"{path}: {len(rows)} rows, {sum(len(row['media']) for row in rows)} media files")
    for (kind, problem_type, data_type), n in sorted(counts.items(), key=lambda kv: tuple(map(str, kv[0]))):
        print(f"  {n:6d}  {kind:4s}  {str(problem_type):27s}  {data_type}")
    return counts


if __name__ == "__main__":
    cfg = common.parse_config(Config, sys.argv[1:])
    check_file(cfg.data, cfg.media_root, cfg.skip_bad_rows, cfg.allow_media_outside_root)
