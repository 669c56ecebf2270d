"""
The "shapes" suite: the embedded default data. Coloured circles, squares and triangles in small PNG images and
short mp4 clips, with every problem_type of SPEC 3 over both modalities, answers computed exactly from the
scene, written in the released schemas (SPEC 1) so the same loaders read it as the real data.

    python shapes.py --out=data/shapes --seed=0                     # 2000 SFT, 2000 RL, 300 eval rows
    python shapes.py --out=data/two --tasks=image_grounding,video_tracking   # a subset: rows alternate between them

Files: sft.json (ShareGPT rows, a templated <think> rationale and the exact <answer>), rl.json (RL rows),
eval.json (eval rows; segmentation rows carry COCO RLE masks, one per frame for video), media/<split>/*.
Coordinates are integers in 0..1000 of width/height.

No scene is in two splits: a scene (its objects, their motion, its text) belongs to the split named by a hash of
its description, and a row is drawn again until its scene belongs to the row's split. The media are a function of
the scene, so no image or clip repeats across splits, nor does a box answer, a word or a sum.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Callable, NamedTuple

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
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # OCR words are 3 random letters: 17,576 of them, a third per split
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = ("sft", "rl", "eval")


@dataclass
class Config:
    out: str = "data/shapes"  # the suite's folder: sft.json, rl.json, eval.json, media/<split>/
    seed: int = 0  # rows are a function of (seed, split, index): the same seed writes the same bytes
    n_sft: int = 2000  # rows per split
    n_rl: int = 2000
    n_eval: int = 300
    workers: int = 2  # processes rendering and encoding media
    tasks: str = "all"  # "all", or generator names separated by commas; rows cycle through them


def dumps(obj):
    return json.dumps(obj, separators=(", ", ": "))


class Example(NamedTuple):
    """One generated row before rendering: the media are drawn from `objects` (and `text`) by make_row."""
    problem: str
    answer: str
    think: str
    objects: list  # dicts: colour, shape, cx, cy, r (pixels); video objects also move (vx, vy px/s, start, end)
    options: list | None = None
    text: str | None = None  # drawn in the middle of an image (OCR, math)
    eval_fields: Callable[[], dict] | None = None  # extra eval-row fields (masks), computed for eval rows only


def split_of(example):
    """The split a scene belongs to: a hash of its objects (in a fixed order) and text, so the same scene,
    drawn for any task, always lands in the same split."""
    scene = dumps([sorted((sorted(o.items()) for o in example.objects), key=str), example.text])
    return SPLITS[int(hashlib.sha1(scene.encode()).hexdigest()[:8], 16) % len(SPLITS)]


# -----------------------------------------------------------------------------
# scenes

def random_objects(rng, count, min_r=12, max_r=22, margin=4, size=SIZE, distinct_shapes=False):
    """count objects with distinct (colour, shape), apart, inside a size x size frame; distinct_shapes: no two of
    the same shape (at most len(SHAPES)), for a question that names an object by its shape alone."""
    if distinct_shapes:
        colours, shape_ids = list(COLOURS), rng.choice(len(SHAPES), size=count, replace=False)
        pairs = [(colours[c], SHAPES[s]) for c, s in zip(rng.integers(len(COLOURS), size=count), shape_ids)]
    else:
        all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
        pairs = [all_pairs[k] for k in rng.choice(len(all_pairs), size=count, replace=False)]
    objects = []
    for colour, shape in pairs:
        for _ in range(1000):
            r = int(rng.integers(min_r, max_r + 1))
            cx, cy = (int(v) for v in rng.integers(r + margin, size - r - margin, size=2))
            new = {"colour": colour, "shape": shape, "cx": cx, "cy": cy, "r": r}
            if not any(near(new, o, 4) for o in objects):
                break
        else:
            raise RuntimeError(f"random_objects: no room for {count} objects of radius {min_r}..{max_r} in {size} px")
        objects.append(new)
    return objects


def near(a, b, gap):
    """Whether the boxes of a and b (each shape fills its box's extent) come within gap pixels of each other."""
    reach = a["r"] + b["r"] + gap
    return abs(a["cx"] - b["cx"]) <= reach and abs(a["cy"] - b["cy"]) <= reach


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
    """Four options 'A. x' in a random order (the correct one among them); returns (options, letter)."""
    others = [p for p in pool if p != correct]
    picks = [correct] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    order = rng.permutation(4)
    options = [f"{'ABCD'[i]}. {picks[j]}" for i, j in enumerate(order)]
    return options, "ABCD"[int(np.flatnonzero(order == 0)[0])]


# -----------------------------------------------------------------------------
# image tasks, each an Example
# The dense tasks (grounding, segmentation, tracking) show one object: within the demo's CPU budget (`make demo`)
# the tiny model learns to read the prompt and copy (tracking's first box) but not to pick one object among several.

def options_up_to(options, letter):
    """The rationale's second sentence: the options read in order up to the one that matches. Answering the letter
    straight after the colour asks a 2-layer model to look the colour up among the options in one step, which the
    tiny model learned only after 1,100-2,300 steps of that task alone; reading the options one by one and
    stopping at the match it learned within 400 (measured on image multiple choice alone, 16 rows a step)."""
    return ", ".join(options[:"ABCD".index(letter) + 1]) + "."


def image_multiple_choice(rng, read_options=options_up_to):
    """read_options: the rationale's second sentence from (options, letter). The question names the target by its
    shape alone, so no other object shares it: drawn with distinct (colour, shape) pairs only, 27% of scenes held a
    second object of the target's shape, its colour among the options on 21%: a question with two right answers, of
    which the label held one (NOTES.md, "Why multiple choice and spatio-temporal grounding do not move")."""
    objects = random_objects(rng, int(rng.integers(1, 4)), distinct_shapes=True)
    target = objects[0]
    options, letter = options_for(rng, target["colour"], list(COLOURS))
    return Example(f"What colour is the {target['shape']}?", letter,
                   f"The {target['shape']} is {target['colour']}. {read_options(options, letter)}", objects, options)


def options_read_out(options, letter):
    """The rationale's second sentence as a readout: every option, each followed by yes or no ("A. blue no, B. red
    yes, C. green no, D. purple no."), as the clip's seconds are read out (seconds_in_view). No stop to learn: after
    options_up_to the tiny model's greedy answers either stopped at the match or read on to "D" (half of its SFT
    draws), and RL made reading on likelier; read out, the answer copies the letter before "yes", and what is left to
    learn is the colour and the comparisons. The demo's multiple choice (demo.DEMO_TASKS); "all" keeps options_up_to
    (NOTES.md, "Multiple choice read out")."""
    return ", ".join(f"{option} {'yes' if option.startswith(letter + '.') else 'no'}" for option in options) + "."


def image_multiple_choice_readout(rng):
    """image_multiple_choice's scene, options and answer (the same draws), its options read out."""
    return image_multiple_choice(rng, options_read_out)


def image_multiple_choice_unstated(rng):
    """The same draws, the options read out with no colour stated first ("The square: A. blue no, B. red yes, ...").
    After "The square is red." each option's yes or no can be learned as a comparison with the stated colour, a
    token that also stands among the prompt's options; two draws of the tiny model learned the colour and not the
    comparisons (the "yes" on C or D whatever the colour), and RL then paid answers right against their own stated
    colour. Here each yes or no is the image read against one option, and a right answer has no rationale to
    contradict. Measured on the demo's three suites and not its default: no draw learned the comparisons any better
    (NOTES.md, "Multiple choice with no colour stated")."""
    example = image_multiple_choice(rng)
    readout = options_read_out(example.options, example.answer)
    return example._replace(think=f"The {example.objects[0]['shape']}: {readout}")


def image_numerical(rng):
    objects = random_objects(rng, int(rng.integers(1, 5)), max_r=18)
    n = len(objects)
    return Example("How many shapes are in the image?", str(n), f"I count {n} shape{'s' * (n > 1)}.", objects)


def image_regression(rng):
    objects = random_objects(rng, int(rng.integers(1, 3)), min_r=8, max_r=30)
    o = objects[0]
    box = box_of(o)
    return Example(f"What fraction of the image width does the {name(o)} span?", f"{(2 * o['r'] + 1) / SIZE:.2f}",
                   f"The {name(o)} spans x from {box[0]} to {box[2]} of 1000.", objects)


def image_ocr(rng):
    word = "".join(LETTERS[i] for i in rng.integers(len(LETTERS), size=3))
    return Example("What word is written in the image?", word, "The letters spell a word.", [], text=word)


def image_math(rng):
    a, b = (int(v) for v in rng.integers(1, 10, size=2))
    return Example("Compute the sum shown in the image.", str(a + b), f"The image shows {a} + {b}.", [],
                   text=f"{a}+{b}")


def image_caption(rng):
    objects = random_objects(rng, int(rng.integers(1, 3)))
    n = len(objects)
    return Example("Describe the image in one sentence.", caption(objects), f"I see {n} shape{'s' * (n > 1)}.",
                   objects)


def image_grounding(rng):
    o = random_objects(rng, 1)[0]
    return Example(f"Give the bounding box of the {name(o)}.", dumps({"boxes": box_of(o)}),
                   f"The {name(o)} is at the {where(o)}.", [o])


def image_segmentation(rng):
    o = random_objects(rng, 1)[0]
    positive, negative = seg_points(o)
    answer = dumps({"boxes": box_of(o), "positive_points": positive, "negative_points": negative})
    fields = lambda: {"resolution": {"width": SIZE, "height": SIZE}, "segmentation_output": data.rle_encode(mask_of(o))}
    return Example(f"Segment the {name(o)}.", answer, f"The {name(o)} is at the {where(o)}.", [o],
                   eval_fields=fields)


# -----------------------------------------------------------------------------
# video tasks: objects move in a straight line at a whole number of pixels per second, so the positions at the
# whole seconds (the answers) pin the motion down

def moving_objects(rng, count, speed=(4, 9)):
    """count objects, each with a direction and a speed (pixels per second, drawn from speed inclusive), that stay
    inside the frame and never touch each other for the whole clip. Radius 14-18 px in the 96 px frame: an object
    covers ~9% of a frame, and so of a second's 36 vision tokens; at 7-12 px (~3%) the tiny model read which seconds
    show it on 3 of 5 suites or fewer, at this size on 4 of 5 (NOTES.md, "Larger clip objects")."""
    for _ in range(1000):
        try:
            objects = random_objects(rng, count, min_r=14, max_r=18, size=VIDEO_SIZE)
        except RuntimeError:  # the first object left no room for the second: draw both again
            continue
        for o in objects:
            direction = list(DIRECTIONS)[int(rng.integers(4))]
            dx, dy = DIRECTIONS[direction]
            v = int(rng.integers(speed[0], speed[1] + 1))
            travel = v * SECONDS
            # move the start back so the whole path stays inside the frame
            lo, hi = o["r"] + 2, VIDEO_SIZE - o["r"] - 3
            if dx:
                o["cx"] = int(np.clip(o["cx"], lo + max(0, -dx) * travel, hi - max(0, dx) * travel))
            if dy:
                o["cy"] = int(np.clip(o["cy"], lo + max(0, -dy) * travel, hi - max(0, dy) * travel))
            o.update(direction=direction, vx=dx * v, vy=dy * v, start=0.0, end=float(SECONDS))
        if not any(touch(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            return objects
    raise RuntimeError(f"moving_objects: no clip of {count} objects without contact in 1000 draws")


def touch(a, b):
    """Whether two moving objects come within 2 pixels of each other at any frame (visible or not)."""
    return any(near(at(a, f / FPS), at(b, f / FPS), 2) for f in range(FPS * SECONDS))


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
    order = rng.permutation(len(DIRECTIONS))
    directions = [list(DIRECTIONS)[i] for i in order]
    options = [f"{'ABCD'[i]}. {d}" for i, d in enumerate(directions)]
    letter = "ABCD"[directions.index(o["direction"])]
    return Example(f"Which way does the {name(o)} move?", letter,
                   f"The {name(o)} moves {o['direction']}. {options_up_to(options, letter)}", objects, options)


def seconds_in_view(o):
    """The temporal rationale: each second of the clip read in turn, "0.0 s no, 1.0 s yes, ...". The model sees a
    clip as one group of vision tokens per second (two frames at 2 fps merged by the temporal patch), each after
    its timestamp; a yes/no per second is one look at one group, and the window then runs from the first "yes" to
    the end of the last. The rationale before it, "The square appears at 1.0 s.", asked for the first group
    holding the object in one step, and the tiny model answered one fixed window for every clip (temporal
    grounding under its blind level in 4 of 4 SFT runs); with this readout, 1,300 mixed SFT steps put it above
    blind in 3 of 6 runs (temporal IoU 0.77-0.91 against 0.34-0.45); in the other 3 one or two fixed readouts
    still answered 2/3 or more of the clips (NOTES.md, "The frozen tower")."""
    return ", ".join(f"{float(s)} s {'yes' if visible(o, s) else 'no'}" for s in range(SECONDS))


def video_temporal(rng):
    objects = moving_objects(rng, int(rng.integers(1, 3)), speed=(0, 3))
    o = objects[0]
    # in view for 1 or 2 whole seconds: a window boundary never splits a temporal patch (two frames, one second)
    duration = float(rng.integers(1, 3))
    o["start"] = float(rng.integers(0, SECONDS - int(duration) + 1))
    o["end"] = o["start"] + duration
    answer = dumps({"time": [o["start"], o["end"]]})
    return Example(f"When is the {name(o)} visible?", answer, f"The {name(o)}: {seconds_in_view(o)}.", objects)


def video_spatial_temporal(rng):
    objects = moving_objects(rng, 1)
    o = objects[0]
    start = int(rng.integers(0, SECONDS - 1))  # 0, 1 or 2 s
    o["start"], o["end"] = float(start), float(rng.integers(start + 1, min(start + 2, SECONDS) + 1))  # 1 or 2 s in view
    seconds = [s for s in range(SECONDS) if visible(o, s)]
    boxes = {str(s): box_of(at(o, s), VIDEO_SIZE) for s in seconds}
    answer = dumps({"time": [o["start"], o["end"]], "boxes": boxes})
    return Example(f"When and where is the {name(o)}?", answer,
                   f"The {name(o)}: {seconds_in_view(o)}; it moves {o['direction']}.", objects)


def video_tracking(rng):
    # fast enough that copying the first box to every second scores little
    o = moving_objects(rng, 1, speed=(6, 12))[0]
    first = box_of(at(o, 0), VIDEO_SIZE)
    boxes = {str(s): box_of(at(o, s), VIDEO_SIZE) for s in range(1, SECONDS)}
    problem = f"The {name(o)} starts in box {first}. Give its box at every second."
    return Example(problem, dumps({"boxes": boxes}), f"The {name(o)} moves {o['direction']}.", [o])


def video_segmentation(rng):
    o = moving_objects(rng, 1)[0]
    # the keyframe is the first second the object is in view, so it varies and can be read from the clip
    o["start"] = key_t = float(rng.integers(0, SECONDS - 1))  # 0, 1 or 2 s; in view to the end
    positive, negative = seg_points(at(o, key_t), VIDEO_SIZE)
    answer = dumps({"time": key_t, "boxes": box_of(at(o, key_t), VIDEO_SIZE), "positive_points": positive,
                    "negative_points": negative})

    def fields():
        empty = np.zeros((VIDEO_SIZE, VIDEO_SIZE), dtype=bool)
        masks = {str(f): data.rle_encode(mask_of(at(o, f / FPS), VIDEO_SIZE) if visible(o, f / FPS) else empty)
                 for f in range(FPS * SECONDS)}
        return {"resolution": {"width": VIDEO_SIZE, "height": VIDEO_SIZE}, "fps": FPS, "segmentation_output": masks}
    return Example(f"Segment the {name(o)} in the video.", answer,
                   f"The {name(o)} appears at {key_t} s and moves {o['direction']}.", [o], eval_fields=fields)


def video_caption(rng):
    o = moving_objects(rng, 1)[0]
    return Example("Describe the video in one sentence.", f"a {name(o)} moves {o['direction']}.",
                   "I see one moving shape.", [o])


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
VARIANTS = [("multiple choice", "image", image_multiple_choice_readout),
            ("multiple choice", "image", image_multiple_choice_unstated)]  # chosen by name only, never in "all"


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


def draw_example(rng_key, split, generator):
    """The first Example drawn from rng_key + [attempt] whose scene belongs to `split` (a third of draws do)."""
    for attempt in range(1000):
        example = generator(np.random.default_rng([*rng_key, attempt]))
        if split_of(example) == split:
            return example
    raise RuntimeError(f"shapes.{generator.__name__}: no scene of split {split!r} in 1000 draws")


def make_row(args):
    """One row of a split: draw its scene, render its media, return the row in that split's released schema."""
    out_dir, split, seed, index, tasks = args
    problem_type, data_type, generator = tasks[index % len(tasks)]
    example = draw_example([seed, SPLITS.index(split), index], split, generator)
    rel = os.path.join("media", split, f"{index:05d}." + ("png" if data_type == "image" else "mp4"))
    if data_type == "image":
        render(example.objects, example.text).save(os.path.join(out_dir, rel))
    else:
        write_video(os.path.join(out_dir, rel), render_clip(example.objects))
    problem_id = f"{split}-{index}"
    base = {"problem": example.problem, "problem_type": problem_type, "data_type": data_type}
    if example.options:
        base["options"] = example.options
    media_key = "images" if data_type == "image" else "videos"
    if split == "rl":
        return {**base, "answer": f"<answer>{example.answer}</answer>", media_key: [rel], "problem_id": problem_id,
                "problem_reserved_text": ""}
    if split == "eval":
        extra = example.eval_fields() if example.eval_fields else {}
        return {**base, "path": rel, "solution": f"<answer>{example.answer}</answer>", "problem_id": problem_id,
                **extra}
    placeholder = "<image>" if data_type == "image" else "<video>"
    return {"messages": [{"role": "user", "content": placeholder + data.build_prompt(base)},
                         {"role": "assistant",
                          "content": f"<think>{example.think}</think><answer>{example.answer}</answer>"}],
            media_key: [rel], "problem_type": problem_type, "data_type": data_type}


def select_tasks(names):
    """"all", or comma-separated generator names (e.g. "image_grounding,video_tracking") -> entries of TASKS.
    Rows cycle through the list, so a name given twice gets twice the rows."""
    if names == "all":
        return TASKS
    by_name = {task[2].__name__: task for task in TASKS + VARIANTS}
    names = names.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown shapes task(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def generate_suite(out_dir, seed=0, n_sft=2000, n_rl=2000, n_eval=300, workers=2, tasks="all"):
    """Write sft.json, rl.json, eval.json and their media under out_dir; returns {split: row count}.
    tasks: as select_tasks takes them."""
    chosen, jobs = select_tasks(tasks), []
    counts = {"sft": n_sft, "rl": n_rl, "eval": n_eval}
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, "media", split), exist_ok=True)
        jobs += [(out_dir, split, seed, i, chosen) for i in range(counts[split])]
    with Pool(workers) as pool:
        rows = list(tqdm(pool.imap(make_row, jobs, chunksize=16), total=len(jobs), desc="shapes suite"))
    start = 0
    for split in SPLITS:
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(rows[start:start + counts[split]], f)
        start += counts[split]
    return counts


if __name__ == "__main__":
    cfg = common.parse_config(Config, sys.argv[1:])
    counts = generate_suite(cfg.out, cfg.seed, cfg.n_sft, cfg.n_rl, cfg.n_eval, cfg.workers, cfg.tasks)
    print("wrote " + ", ".join(f"{split}: {count} rows" for split, count in counts.items()))
