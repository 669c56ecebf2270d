"""
Data: the released row schemas (SPEC 1), prompts (SPEC 3), COCO RLE masks, media decoding (SPEC 2), the
processor call that turns rows into model inputs, SFT label masks, and rank sharding with a resumable position.

Everything that turns a row into tokens lives here so that SFT, RL and eval see the same prompt.

    python data.py --data=data/shapes/rl.json [--media_root=DIR] [--skip_bad_rows=true]  # validate, count rows
"""
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
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
        except (av.FFmpegError, ValueError) as e:
            raise ValueError(f"corrupt video {path}: {e}") from None


def normalise_row(row, index, path, media_root, check_media=True):
    """Validate one raw row and return a copy with `kind`, `media`, `media_types`, `source` added.

    kind: "sft" (has messages), "eval" (has solution/path), "rl" (has answer).
    media: absolute paths in the order they appear in the prompt; media_types: "image" | "video" for each.
    SFT rows may lack problem_type / data_type (released files): data_type is inferred from the media,
    problem_type is None. A row without media is a text-only row (data_type None).
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
    if kind == "sft":
        messages = row["messages"]
        roles = [m.get("role") for m in messages] if isinstance(messages, list) and all(
            isinstance(m, dict) for m in messages) else None
        if roles != ["user", "assistant"]:
            bad("messages", f"expected a user then an assistant message, got roles {roles!r}")
        for m in messages:
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                bad("messages", f"{m['role']} content must be a non-empty string, got {m.get('content')!r}")
    else:
        if not isinstance(row.get("problem"), str) or not row["problem"].strip():
            bad("problem", f"missing or not a string: {row.get('problem')!r}")
        field = "answer" if kind == "rl" else "solution"
        value = row.get(field)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # a bare number is a fine answer
            bad(field, f"missing or not a string: {value!r}")

    # problem_type and options
    problem_type = row.get("problem_type")
    if kind == "sft" and problem_type is None:
        out["problem_type"] = None
    elif problem_type not in PROBLEM_TYPES:
        bad("problem_type", f"unknown value {problem_type!r} (known: {', '.join(PROBLEM_TYPES)})")
    if problem_type == "multiple choice" and kind != "sft":  # SFT rows carry the options inside the user text
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
        if kind == "sft":  # placeholders, when the text has any, must match the media one for one
            user = row["messages"][0]["content"]
            found = {tag: user.count(tag) for tag in ("<image>", "<video>")}
            expected = {tag: len(media) if tag == f"<{implied}>" else 0 for tag in found}
            if any(found.values()) and found != expected:
                bad("messages", f"user text has {found['<image>']} <image> and {found['<video>']} <video> "
                                f"placeholders for {len(media)} {implied or 'media'} file(s)")

    # media files exist (and open, unless told not to look inside)
    out["media"], out["media_types"] = [], []
    for field, media_type, rel in media:
        full = rel if os.path.isabs(rel) else os.path.join(media_root, rel)
        if not os.path.isfile(full):
            bad(field, f"missing file {full}")
        if check_media:
            try:
                check_media_file(full, media_type)
            except ValueError as e:
                bad(field, str(e))
        out["media"].append(os.path.abspath(full))
        out["media_types"].append(media_type)
    out["kind"] = kind
    out["source"] = where
    return out


def load_rows(path, media_root=None, skip_bad_rows=False, check_media=True):
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
            rows[index] = normalise_row(row, index, path, media_root, check_media and index % world_size == rank)
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
        return rewards.answer_text(row["messages"][1]["content"])
    return rewards.answer_text(str(row["answer"] if row["kind"] == "rl" else row["solution"]))


# -----------------------------------------------------------------------------
# media (SPEC 2): images and video frames resized within pixel bounds to multiples of 32
# (patch 16 x spatial merge 2), so the processor patchifies them as they are (do_resize=False).

FACTOR = 32


@dataclass
class MediaConfig:
    """Pixel and frame budgets (SPEC 2). The default is the released RL setting."""
    fps: float = 2.0
    max_frames: int = 128
    video_min_pixels: int = 4 * 32 * 32  # per frame
    video_max_pixels: int = 64 * 32 * 32  # per frame
    image_min_pixels: int = 3136
    image_max_pixels: int = 1048576


EVAL_MEDIA = MediaConfig(video_max_pixels=256 * 32 * 32, image_max_pixels=1024 * 32 * 32)  # SPEC 2: eval


def media_config(cfg):
    """A script's MediaConfig: its config's fields of the same names, MediaConfig's defaults for the others."""
    return MediaConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(MediaConfig) if hasattr(cfg, f.name)})


def fit_size(height, width, min_pixels, max_pixels):
    """(h, w) with the aspect ratio kept, both multiples of 32, and h*w within [min_pixels, max_pixels]."""
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    # the 1e-6 keeps float fuzz (10 * 6.4 = 64.00000000000001) from costing a whole 32-pixel step
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(FACTOR, math.floor(height / scale / FACTOR + 1e-6) * FACTOR)
        w = max(FACTOR, math.floor(width / scale / FACTOR + 1e-6) * FACTOR)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / FACTOR - 1e-6) * FACTOR
        w = math.ceil(width * scale / FACTOR - 1e-6) * FACTOR
    return h, w


def load_image(path, min_pixels=MediaConfig.image_min_pixels, max_pixels=MediaConfig.image_max_pixels):
    """RGB PIL image resized by fit_size; a corrupt file raises ValueError naming it."""
    try:
        with Image.open(path) as f:
            image = f.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for a bad file
        raise ValueError(f"corrupt image {path}: {e}") from None
    h, w = fit_size(image.height, image.width, min_pixels, max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.BICUBIC)
    return image


def sample_frame_indices(total_frames, source_fps, fps, max_frames):
    """Source frame indices nearest to t = 0, 1/fps, 2/fps, ... (all frames when fps >= source fps);
    uniformly subsampled to max_frames; padded to an even count (temporal patch 2) by repeating the last."""
    duration = total_frames / source_fps
    times = np.arange(math.ceil(duration * fps - 1e-9)) / fps  # [n] seconds
    indices = np.unique(np.minimum(np.round(times * source_fps), total_frames - 1).astype(int))
    if len(indices) > max_frames:
        indices = indices[np.linspace(0, len(indices) - 1, max_frames).round().astype(int)]
    indices = indices.tolist()
    if len(indices) % 2:
        indices.append(indices[-1])
    return indices


def load_video(path, fps=MediaConfig.fps, max_frames=MediaConfig.max_frames,
               min_pixels=MediaConfig.video_min_pixels, max_pixels=MediaConfig.video_max_pixels):
    """Decode with PyAV -> (frames uint8 [T, H, W, 3], VideoMetadata). T is even; the metadata carries the source
    fps and source frame indices so the processor writes each frame pair's timestamp (SPEC 2)."""
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise ValueError("unknown frame rate")
            source_fps = float(rate)
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        if not total:
            raise ValueError("no frames")
        wanted = sample_frame_indices(total, source_fps, fps, max_frames)
        wanted_set, picked, size = set(wanted), {}, None
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i > wanted[-1]:
                    break
                if i in wanted_set:
                    size = size or fit_size(frame.height, frame.width, min_pixels, max_pixels)
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
    """The user turn as chat content parts. RL / eval rows: the media parts, then build_prompt's text.
    SFT rows: their user text, each <image> / <video> placeholder replaced by the next media part (media first
    when the text has none)."""
    media_parts = [{"type": t} for t in row["media_types"]]
    if row["kind"] != "sft":
        return media_parts + [{"type": "text", "text": build_prompt(row, templates)}]
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


def encode_row(row, processor, media_cfg=None, templates=None, with_answer=False):
    """One row through the processor: {"ids", "types", "labels": lists, media tensors}. Deterministic (no
    augmentation), so a trainer may keep the results in a dict and reuse them (collate's `cache`)."""
    media_cfg = media_cfg or MediaConfig()
    tokenizer = processor.tokenizer
    images, videos, video_metadata = [], [], []
    for media_type, path in zip(row["media_types"], row["media"]):
        try:
            if media_type == "image":
                images.append(load_image(path, media_cfg.image_min_pixels, media_cfg.image_max_pixels))
            else:
                frames, metadata = load_video(path, media_cfg.fps, media_cfg.max_frames,
                                              media_cfg.video_min_pixels, media_cfg.video_max_pixels)
                videos.append(frames)
                video_metadata.append(metadata)
        except (OSError, ValueError) as e:
            raise ValueError(f"{row['source']} field 'media': {e}") from None
    media_kwargs = {}
    if images:
        media_kwargs["images"] = images
    if videos:
        media_kwargs.update(videos=videos, video_metadata=video_metadata, do_sample_frames=False)
    # our media are already sized to multiples of 32 within the budget: the processor must not resize again
    encoded = processor(text=[prompt_text(row, processor, templates)], do_resize=False, **media_kwargs)
    ids, types = list(encoded["input_ids"][0]), list(encoded["mm_token_type_ids"][0])
    labels = [-100] * len(ids)
    if with_answer:
        if row["kind"] != "sft":
            raise ValueError(f"{row['source']}: with_answer needs an SFT row (messages), got a {row['kind']} row")
        # tokenised apart from the prompt so the prompt tokens are exactly those generation sees
        answer = tokenizer(row["messages"][1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        ids += answer + newline
        types += [0] * (len(answer) + len(newline))
        labels += answer + [-100] * len(newline)
    out = {"ids": ids, "types": types, "labels": labels}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in encoded:
            out[key] = torch.as_tensor(encoded[key])
    return out


def collate(rows, processor, media_cfg=None, templates=None, with_answer=False, cache=None):
    """Rows -> dict of tensors for Qwen3VLForConditionalGeneration.forward, left-padded.

    input_ids / attention_mask / mm_token_type_ids [B, L]; pixel_values [N_patches, C*2*16*16] + image_grid_thw
    [N_images, 3] and pixel_values_videos + video_grid_thw when the batch has media of that kind (each row's
    media in row order, as the processor lays out a batch).
    with_answer (SFT rows): the assistant turn follows the prompt, and labels [B, L] (unshifted, as HF takes
    them) hold input_ids on the assistant content and its closing <|im_end|>, -100 elsewhere.
    cache: a dict kept by the caller; rows already encoded (by their "source") skip media decode and the
    processor, which dominate a tiny model's step on CPU.
    """
    encoded = [encode_cached(row, processor, media_cfg, templates, with_answer, cache) for row in rows]
    return pad_batch(encoded, processor.tokenizer.pad_token_id, with_answer)


def encode_cached(row, processor, media_cfg=None, templates=None, with_answer=False, cache=None):
    """encode_row, looked up in (and stored into) `cache` by the row's source when a cache is given."""
    key = (row["source"], with_answer)
    if cache is not None and key in cache:
        return cache[key]
    item = encode_row(row, processor, media_cfg, templates, with_answer)
    if cache is not None:
        cache[key] = item
    return item


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
    """Row indices for one rank, epoch after epoch, deterministic in (seed, epoch).

    Each epoch is a permutation of all rows (identity when shuffle=False); rank r takes positions r, r + W,
    r + 2W, ... of it, so across ranks every row comes exactly once per epoch. Nothing is padded or dropped:
    shards differ by at most one row, and batches run on across the epoch boundary, so every rank still yields
    a full batch every step. With strata (a label per row, e.g. data_type) the permutation interleaves the
    strata evenly, so every stretch of a shard holds each stratum in its overall proportion (image/video mix).
    state_dict() / load_state_dict() hold (epoch, position) for an exact resume.
    """

    def __init__(self, num_rows, rank=0, world_size=1, seed=0, shuffle=True, strata=None):
        if num_rows < world_size:
            raise ValueError(f"{num_rows} rows cannot feed {world_size} ranks")
        if strata is not None and len(strata) != num_rows:
            raise ValueError(f"strata has {len(strata)} labels for {num_rows} rows")
        self.num_rows, self.rank, self.world_size = num_rows, rank, world_size
        self.seed, self.shuffle, self.strata = seed, shuffle, strata
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    def epoch_indices(self, epoch):
        """This rank's row indices for an epoch, in order."""
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
        return order[self.rank::self.world_size].tolist()

    def __len__(self):
        return len(range(self.rank, self.num_rows, self.world_size))

    def __iter__(self):
        return self

    def __next__(self):
        if self._order_epoch != self.epoch:
            self._order_epoch, self._order = self.epoch, self.epoch_indices(self.epoch)
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            return next(self)
        self.position += 1
        return self._order[self.position - 1]

    def next_batch(self, batch_size):
        return [next(self) for _ in range(batch_size)]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": self.num_rows,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state):
        for key in ("seed", "num_rows", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler has {getattr(self, key)!r}")
        self.epoch, self.position = state["epoch"], state["position"]


# -----------------------------------------------------------------------------
# CLI: validate a data file


@dataclass
class Config:
    data: str = "data/shapes/rl.json"  # a JSON list or JSONL file in any of the three released shapes
    media_root: str | None = None  # folder the media paths are relative to; None: the data file's folder
    skip_bad_rows: bool = False  # count and drop malformed rows instead of stopping at the first


def check_file(path, media_root=None, skip_bad_rows=False):
    """Validate a file and print its row counts per kind / problem_type / data_type."""
    rows = load_rows(path, media_root=media_root, skip_bad_rows=skip_bad_rows)
    counts = Counter((row["kind"], row["problem_type"], row["data_type"]) for row in rows)
    print(f"{path}: {len(rows)} rows, {sum(len(row['media']) for row in rows)} media files")
    for (kind, problem_type, data_type), n in sorted(counts.items(), key=lambda kv: tuple(map(str, kv[0]))):
        print(f"  {n:6d}  {kind:4s}  {str(problem_type):27s}  {data_type}")
    return counts


if __name__ == "__main__":
    cfg = common.parse_config(Config, sys.argv[1:])
    check_file(cfg.data, cfg.media_root, cfg.skip_bad_rows)
