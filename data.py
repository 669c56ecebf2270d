"""
Data: the released row schemas (SPEC 1), prompts (SPEC 3), and COCO RLE masks.

Everything that turns a row into text lives here so that SFT, RL and eval see the same prompt.
"""
import json

import numpy as np

# -----------------------------------------------------------------------------
# schema vocabulary (SPEC 1 and 3)

PROBLEM_TYPES = (
    "multiple choice", "numerical", "regression", "math", "OCR", "open-ended",
    "temporal grounding", "spatial grounding", "spatial-temporal grounding", "tracking", "segmentation",
)
DATA_TYPES = ("image", "video", "video-image")


def task_key(problem_type, data_type):
    """EMA-GRPO's task key (SPEC 5): the problem_type, with segmentation split by modality."""
    if problem_type == "segmentation":
        return "segmentation/video" if data_type == "video" else "segmentation/image"
    return problem_type


def strip_answer(text):
    """The text inside the first <answer>...</answer>, stripped; the whole stripped text when there is none."""
    start = text.find("<answer>")
    end = text.find("</answer>", start + 8) if start >= 0 else -1
    if start >= 0 and end >= 0:
        return text[start + 8:end].strip()
    return text.strip()


# -----------------------------------------------------------------------------
# prompts (SPEC 3): question, options, the think/answer instruction, one line per problem_type

INSTRUCTION = "Think inside <think></think>, then give the final answer inside <answer></answer>."
# The per-type line says exactly what the answer must contain, with one example. A released checkpoint was
# trained with its own wording: pass its templates with --prompt_template=FILE (a JSON object type -> text).
TYPE_TEMPLATES = {
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


def load_templates(path):
    """A JSON object problem_type (or segmentation/image, segmentation/video) -> type line, overriding ours."""
    with open(path) as f:
        templates = json.load(f)
    unknown = set(templates) - set(TYPE_TEMPLATES)
    if not isinstance(templates, dict) or unknown:
        raise ValueError(f"{path}: prompt template keys must be among {sorted(TYPE_TEMPLATES)}, got {sorted(unknown)}")
    return {**TYPE_TEMPLATES, **templates}


def build_prompt(row, templates=None):
    """The user text for a row (without the media placeholder): question, options, instruction, type line."""
    templates = templates or TYPE_TEMPLATES
    problem_type = row["problem_type"]
    key = task_key(problem_type, row.get("data_type", "image")) if problem_type == "segmentation" else problem_type
    lines = [row["problem"].strip()]
    if problem_type == "multiple choice" and row.get("options"):
        lines.append("Options:")
        lines.extend(str(option) for option in row["options"])
    lines.append(INSTRUCTION)
    lines.append(templates[key])
    return "\n".join(lines)


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
