"""
The "shapes" suite: the embedded default data. Coloured circles, squares and triangles in small PNG images and
short mp4 clips, with every problem_type of SPEC 3 over both modalities, answers computed exactly from the
scene, written in the released schemas (SPEC 1) so the same loaders read it as the real data.

    python shapes.py --out=data/shapes --seed=0                     # ~2000 SFT, 2000 RL, 300 eval rows
    python shapes.py --out=data/two --tasks=image_grounding,video_tracking   # a subset: rows alternate between them

Files: sft.json (ShareGPT rows, a templated <think> rationale and the exact <answer>), rl.json (RL rows),
eval.json (eval rows; segmentation rows carry COCO RLE masks, one per frame for video), media/<split>/*.
Splits come from different derived seeds. Coordinates are integers in 0..1000 of width/height.
"""
import json
import math
import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import common
import data

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30),
           "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
SIZE = 128  # image side in pixels: 64 vision tokens for the tiny model (patch 16, no merge)
VIDEO_SIZE = 96  # frame side: 36 tokens per pair of frames, so a 4 s clip at 2 fps costs 144 vision tokens
FPS, SECONDS = 8, 4  # clips: 32 frames; the model samples them at 2 fps
WORDS = ("CAT", "DOG", "SUN", "BOX", "RED", "MAP", "CUP", "HAT", "PEN", "KEY", "BUS", "FOX", "OWL", "JAM", "ZIP")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = {"sft": 1, "rl": 2, "eval": 3}  # split -> seed offset: the splits never share a scene


def dumps(obj):
    return json.dumps(obj, separators=(", ", ": "))


# -----------------------------------------------------------------------------
# scenes

def random_objects(rng, count, min_r=12, max_r=22, margin=4, size=SIZE):
    """count objects with distinct (colour, shape), not overlapping, inside a size x size frame."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    objects = []
    for k in chosen:
        colour, shape = pairs[k]
        for _ in range(100):
            r = int(rng.integers(min_r, max_r + 1))
            cx, cy = (int(v) for v in rng.integers(r + margin, size - r - margin, size=2))
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 4 for o in objects):
                break
        objects.append({"colour": colour, "shape": shape, "cx": cx, "cy": cy, "r": r})
    return objects


def draw_object(draw, o, fill):
    x1, y1, x2, y2 = o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"]
    if o["shape"] == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif o["shape"] == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    else:
        draw.polygon([(o["cx"], y1), (x1, y2), (x2, y2)], fill=fill)


def render(objects, text=None, size=SIZE):
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_object(draw, o, COLOURS[o["colour"]])
    if text:
        font = ImageFont.load_default(size=36)
        x1, y1, x2, y2 = draw.textbbox((0, 0), text, font=font)
        draw.text(((size - (x2 - x1)) // 2 - x1, (size - (y2 - y1)) // 2 - y1), text, fill=(20, 20, 20), font=font)
    return image


def mask_of(o, size=SIZE):
    image = Image.new("L", (size, size), 0)
    draw_object(ImageDraw.Draw(image), o, 255)
    return np.asarray(image) > 0  # [H, W]


def box_of(o, size=SIZE):
    """[x1, y1, x2, y2] in 0..1000 of the object's pixel extent (inclusive drawing bounds)."""
    r = o["r"]
    return [round(1000 * (o["cx"] - r) / size), round(1000 * (o["cy"] - r) / size),
            round(1000 * (o["cx"] + r + 1) / size), round(1000 * (o["cy"] + r + 1) / size)]


def seg_points(o, size=SIZE):
    """3 points inside the shape and 3 outside its box, in 0..1000: a fixed rule the model can learn."""
    cx, cy, r = o["cx"], o["cy"], o["r"]
    inside = [(cx, cy + r // 3), (cx - r // 3, cy + r // 2), (cx + r // 3, cy + r // 2)]  # inside all 3 shapes
    outside = [(cx - r - 8, cy), (cx + r + 8, cy), (cx, cy - r - 8)]
    scale = lambda p: [min(1000, max(0, round(1000 * p[0] / size))), min(1000, max(0, round(1000 * p[1] / size)))]
    return [scale(p) for p in inside], [scale(p) for p in outside]


def where(o, size=SIZE):
    vertical = "top" if o["cy"] < size / 3 else "bottom" if o["cy"] > 2 * size / 3 else "middle"
    horizontal = "left" if o["cx"] < size / 3 else "right" if o["cx"] > 2 * size / 3 else "centre"
    return f"{vertical} {horizontal}"


def name(o):
    return f"{o['colour']} {o['shape']}"


def caption(objects):
    ordered = sorted(objects, key=lambda o: o["cx"])
    names = [f"a {name(o)}" for o in ordered]
    return (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + "."


def options_for(rng, correct, pool):
    """Four options 'A. x' with the correct one at a random letter; returns (options, letter)."""
    others = [p for p in pool if p != correct]
    picks = [correct] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    order = rng.permutation(4)
    options = [f"{'ABCD'[i]}. {picks[j]}" for i, j in enumerate(order)]
    return options, "ABCD"[int(np.flatnonzero(order == 0)[0])]


# -----------------------------------------------------------------------------
# image tasks: each returns (problem, answer text, think, options, image, extra eval fields)
# The dense tasks (grounding, segmentation, tracking) show one object: within the demo's CPU budget (`make demo`)
# the tiny model learns to read the prompt and copy (tracking's first box) but not to pick one object among several.

def image_multiple_choice(rng):
    objects = random_objects(rng, int(rng.integers(1, 4)))
    target = objects[0]
    options, letter = options_for(rng, target["colour"], list(COLOURS))
    return (f"What colour is the {target['shape']}?", letter, f"The {target['shape']} is {target['colour']}.",
            options, render(objects), {})


def image_numerical(rng):
    objects = random_objects(rng, int(rng.integers(1, 5)), max_r=18)
    n = len(objects)
    return "How many shapes are in the image?", str(n), f"I count {n} shape{'s' * (n > 1)}.", None, render(objects), {}


def image_regression(rng):
    objects = random_objects(rng, int(rng.integers(1, 3)), min_r=8, max_r=30)
    o = objects[0]
    width = (2 * o["r"] + 1) / SIZE
    box = box_of(o)
    return (f"What fraction of the image width does the {name(o)} span?", f"{width:.2f}",
            f"The {name(o)} spans x from {box[0]} to {box[2]} of 1000.", None, render(objects), {})


def image_ocr(rng):
    word = WORDS[int(rng.integers(len(WORDS)))]
    return "What word is written in the image?", word, "The letters spell a word.", None, render([], word), {}


def image_math(rng):
    a, b = (int(v) for v in rng.integers(1, 10, size=2))
    return ("Compute the sum shown in the image.", str(a + b), f"The image shows {a} + {b}.", None,
            render([], f"{a}+{b}"), {})


def image_caption(rng):
    objects = random_objects(rng, int(rng.integers(1, 3)))
    n = len(objects)
    return ("Describe the image in one sentence.", caption(objects), f"I see {n} shape{'s' * (n > 1)}.", None,
            render(objects), {})


def image_grounding(rng):
    objects = random_objects(rng, 1)
    o = objects[0]
    return (f"Give the bounding box of the {name(o)}.", dumps({"boxes": box_of(o)}),
            f"The {name(o)} is at the {where(o)}.", None, render(objects), {})


def image_segmentation(rng):
    objects = random_objects(rng, 1)
    o = objects[0]
    positive, negative = seg_points(o)
    answer = dumps({"boxes": box_of(o), "positive_points": positive, "negative_points": negative})
    extra = {"resolution": {"width": SIZE, "height": SIZE}, "segmentation_output": data.rle_encode(mask_of(o))}
    return f"Segment the {name(o)}.", answer, f"The {name(o)} is at the {where(o)}.", None, render(objects), extra


# -----------------------------------------------------------------------------
# video tasks: objects move linearly; each returns (problem, answer, think, options, frames, extra)

def moving_objects(rng, count, speed=(4, 9)):
    """Objects with a direction and speed (pixels per second) that stay inside the frame for the whole clip."""
    objects = random_objects(rng, count, min_r=7, max_r=12, size=VIDEO_SIZE)
    for o in objects:
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        dx, dy = DIRECTIONS[direction]
        v = float(rng.uniform(*speed))
        travel = v * SECONDS
        # move the start back so the whole path stays inside the frame
        lo, hi = o["r"] + 2, VIDEO_SIZE - o["r"] - 3
        if dx:
            o["cx"] = int(np.clip(o["cx"], lo + max(0, -dx) * travel, hi - max(0, dx) * travel))
        if dy:
            o["cy"] = int(np.clip(o["cy"], lo + max(0, -dy) * travel, hi - max(0, dy) * travel))
        o.update(direction=direction, vx=dx * v, vy=dy * v, start=0.0, end=float(SECONDS))
    return objects


def at(o, t):
    """The object at time t seconds (its position rounded to pixels)."""
    return {**o, "cx": int(round(o["cx"] + o["vx"] * t)), "cy": int(round(o["cy"] + o["vy"] * t))}


def visible(o, t):
    return o["start"] <= t < o["end"]


def render_clip(objects):
    frames = []
    for f in range(FPS * SECONDS):
        t = f / FPS
        frames.append(np.asarray(render([at(o, t) for o in objects if visible(o, t)], size=VIDEO_SIZE)))
    return np.stack(frames)  # [T, H, W, 3]


def video_multiple_choice(rng):
    objects = moving_objects(rng, int(rng.integers(1, 3)))
    o = objects[0]
    options = ["A. left", "B. right", "C. up", "D. down"]
    letter = "ABCD"[list(DIRECTIONS).index(o["direction"])]
    return (f"Which way does the {name(o)} move?", letter, f"The {name(o)} moves {o['direction']}.", options,
            render_clip(objects), {})


def video_temporal(rng):
    objects = moving_objects(rng, int(rng.integers(1, 3)), speed=(0, 3))
    o = objects[0]
    # visible on a half-second grid (the model sees frames at 2 fps)
    o["start"] = float(rng.integers(0, 4)) / 2  # 0.0 .. 1.5
    o["end"] = o["start"] + float(rng.integers(3, 2 * SECONDS - 2 * o["start"] + 1)) / 2
    o["end"] = min(o["end"], float(SECONDS))
    answer = dumps({"time": [o["start"], o["end"]]})
    return (f"When is the {name(o)} visible?", answer, f"The {name(o)} appears at {o['start']} s.", None,
            render_clip(objects), {})


def video_spatial_temporal(rng):
    objects = moving_objects(rng, 1)
    o = objects[0]
    o["start"] = float(rng.integers(0, 2))  # 0 or 1 s
    o["end"] = float(rng.integers(o["start"] + 2, SECONDS + 1))
    seconds = [s for s in range(int(o["start"]), SECONDS) if visible(o, s)]
    boxes = {str(s): box_of(at(o, s), VIDEO_SIZE) for s in seconds}
    answer = dumps({"time": [o["start"], o["end"]], "boxes": boxes})
    return (f"When and where is the {name(o)}?", answer, f"The {name(o)} moves {o['direction']}.", None,
            render_clip(objects), {})


def video_tracking(rng):
    objects = moving_objects(rng, 1)
    o = objects[0]
    first = box_of(at(o, 0), VIDEO_SIZE)
    boxes = {str(s): box_of(at(o, s), VIDEO_SIZE) for s in range(1, SECONDS)}
    problem = f"The {name(o)} starts in box {first}. Give its box at every second."
    return problem, dumps({"boxes": boxes}), f"The {name(o)} moves {o['direction']}.", None, render_clip(objects), {}


def video_segmentation(rng):
    objects = moving_objects(rng, 1)
    o = objects[0]
    key_t = 2.0  # the keyframe: the middle of the clip
    positive, negative = seg_points(at(o, key_t), VIDEO_SIZE)
    answer = dumps({"time": key_t, "boxes": box_of(at(o, key_t), VIDEO_SIZE), "positive_points": positive,
                    "negative_points": negative})
    masks = {str(f): data.rle_encode(mask_of(at(o, f / FPS), VIDEO_SIZE)) for f in range(FPS * SECONDS)}
    extra = {"resolution": {"width": VIDEO_SIZE, "height": VIDEO_SIZE}, "fps": FPS, "segmentation_output": masks}
    return (f"Segment the {name(o)} in the video.", answer, f"The {name(o)} moves {o['direction']}.", None,
            render_clip(objects), extra)


def video_caption(rng):
    objects = moving_objects(rng, 1)
    o = objects[0]
    return ("Describe the video in one sentence.", f"a {name(o)} moves {o['direction']}.",
            "I see one moving shape.", None, render_clip(objects), {})


# (problem_type, data_type, generator): rows cycle through this list, so every task gets the same share
TASKS = [
    ("multiple choice", "image", image_multiple_choice),
    ("numerical", "image", image_numerical),
    ("regression", "image", image_regression),
    ("OCR", "image", image_ocr),
    ("math", "image", image_math),
    ("open-ended", "image", image_caption),
    ("spatial grounding", "image", image_grounding),
    ("segmentation", "image", image_segmentation),
    ("multiple choice", "video", video_multiple_choice),
    ("temporal grounding", "video", video_temporal),
    ("spatial-temporal grounding", "video", video_spatial_temporal),
    ("tracking", "video", video_tracking),
    ("segmentation", "video", video_segmentation),
    ("open-ended", "video", video_caption),
]


# -----------------------------------------------------------------------------
# writing rows

def write_video(path, frames):
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)  # in every FFmpeg build, unlike libx264
        stream.width, stream.height, stream.pix_fmt = VIDEO_SIZE, VIDEO_SIZE, "yuv420p"
        stream.options = {"qscale": "3"}  # near-lossless: colours must survive the codec
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_row(args):
    """One row of a split: render its media, return the row in that split's released schema."""
    out_dir, split, seed, index, tasks = args
    problem_type, data_type, generator = tasks[index % len(tasks)]
    rng = np.random.default_rng([seed, SPLITS[split], index])
    problem, answer, think, options, media, extra = generator(rng)
    rel = os.path.join("media", split, f"{index:05d}." + ("png" if data_type == "image" else "mp4"))
    if data_type == "image":
        media.save(os.path.join(out_dir, rel))
    else:
        write_video(os.path.join(out_dir, rel), media)
    problem_id = f"{split}-{index}"
    base = {"problem": problem, "problem_type": problem_type, "data_type": data_type}
    if options:
        base["options"] = options
    media_key = "images" if data_type == "image" else "videos"
    if split == "rl":
        return {**base, "answer": f"<answer>{answer}</answer>", media_key: [rel], "problem_id": problem_id,
                "problem_reserved_text": ""}
    if split == "eval":
        return {**base, "path": rel, "solution": f"<answer>{answer}</answer>", "problem_id": problem_id, **extra}
    placeholder = "<image>" if data_type == "image" else "<video>"
    return {"messages": [{"role": "user", "content": placeholder + data.build_prompt(base)},
                         {"role": "assistant", "content": f"<think>{think}</think><answer>{answer}</answer>"}],
            media_key: [rel], "problem_type": problem_type, "data_type": data_type}


def select_tasks(names):
    """"all", or comma-separated generator names (e.g. "image_grounding,video_tracking") -> entries of TASKS.
    Rows cycle through the list, so a name given twice gets twice the rows."""
    if names == "all":
        return TASKS
    by_name = {task[2].__name__: task for task in TASKS}
    names = names.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown shapes task(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def generate_suite(out_dir, seed=0, n_sft=2000, n_rl=2000, n_eval=300, workers=2, tasks="all"):
    """Write sft.json, rl.json, eval.json and their media under out_dir; returns {split: row count}.
    tasks: as select_tasks takes them."""
    chosen, jobs = select_tasks(tasks), []
    for split, count in (("sft", n_sft), ("rl", n_rl), ("eval", n_eval)):
        os.makedirs(os.path.join(out_dir, "media", split), exist_ok=True)
        jobs += [(out_dir, split, seed, i, chosen) for i in range(count)]
    with Pool(workers) as pool:
        rows = list(tqdm(pool.imap(make_row, jobs, chunksize=16), total=len(jobs), desc="shapes suite"))
    counts, start = {}, 0
    for split, count in (("sft", n_sft), ("rl", n_rl), ("eval", n_eval)):
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(rows[start:start + count], f)
        counts[split], start = count, start + count
    return counts


@dataclass
class Config:
    out: str = "data/shapes"  # the suite folder: sft.json, rl.json, eval.json, media/
    seed: int = 0  # the suite's seed; each split derives its own
    n_sft: int = 2000
    n_rl: int = 2000
    n_eval: int = 300
    workers: int = 2  # processes rendering media
    tasks: str = "all"  # "all" or generator names, comma-separated (select_tasks)


if __name__ == "__main__":
    cfg = common.parse_config(Config, sys.argv[1:])
    counts = generate_suite(cfg.out, cfg.seed, cfg.n_sft, cfg.n_rl, cfg.n_eval, cfg.workers, cfg.tasks)
    print("wrote " + ", ".join(f"{split}: {count} rows" for split, count in counts.items()))
