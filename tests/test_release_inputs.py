"""What goes into the model under the release's settings, against the release's own rules: the prompt text and
the content parts EasyR1 and eval_bench build (restated here from the released code), and image / video sizes,
frame indices and timestamps against qwen-vl-utils itself (installed; its video reader is replaced by a stub,
since this environment has no decord, so every line of its frame arithmetic runs as released)."""
import hashlib
import itertools
import json
import sys
import types

import numpy as np
import pytest
import torch
from conftest import VIDEO_FPS, VIDEO_FRAMES
from PIL import Image
from qwen_vl_utils import vision_process
from transformers import Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

import data

# -----------------------------------------------------------------------------
# the prompt text

# sha256 of json.dumps([QUESTION_TEMPLATE, TYPE_TEMPLATE], sort_keys=True), the two constants read with
# ast.literal_eval from the release's EasyR1/verl/utils/dataset.py (eval_bench.py holds the same text)
RELEASE_TEXT_SHA256 = "27779aa1e69bf2c676467e1631fe11ec1ff48929800bad8e4de80782e100f88c"


def release_type_template():
    """data.RELEASE_TEMPLATE's per-type lines under the release's key names."""
    reverse = {ours: theirs for theirs, ours in data.TEMPLATE_ALIASES.items()}
    return {reverse.get(k, k): v for k, v in data.RELEASE_TEMPLATE.items() if k != "question"}


def test_release_template_is_the_release_text():
    text = json.dumps([data.RELEASE_TEMPLATE["question"], release_type_template()], sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == RELEASE_TEXT_SHA256
    assert data.load_templates("release") == data.RELEASE_TEMPLATE
    assert "visual content.Provide" in data.RELEASE_TEMPLATE["question"]  # the release's missing spaces stay


def release_rl_content(example, question_template, type_template):
    """EasyR1's RLHFDataset._build_messages (format_prompt unset), restated: the user content it builds."""
    data_type = (example.get("data_type") or "").strip().lower()
    problem_type = example.get("problem_type") or ""
    question = example["problem"]
    if problem_type == "multiple choice" and isinstance(example.get("options"), list) and example["options"]:
        question = f"{question}\nOptions:\n" + "\n".join(example["options"])
    if problem_type == "segmentation":
        key = "segmentation_video" if data_type == "video" else "segmentation_image"
    else:
        key = problem_type
    text = question_template.format(Question=question) + type_template.get(key, "")
    for field, tag in (("images", "<image>"), ("videos", "<video>")):
        if isinstance(example.get(field), list) and example[field]:
            content = []
            for i, piece in enumerate(text.split(tag)):
                if i:
                    content.append({"type": tag[1:-1]})
                if piece:
                    content.append({"type": "text", "text": piece})
            return content
    return text


def release_eval_content(example, question_template, type_template):
    """eval_bench.py's user content, restated: the media (video before image), then build_prompt_text's text."""
    data_type = (example.get("data_type") or "").strip().lower()
    problem_type = example.get("problem_type") or ""
    question = example.get("problem") or ""
    if problem_type == "multiple choice" and isinstance(example.get("options"), list) and example["options"]:
        question = f"{question}\nOptions:\n" + "\n".join(example["options"])
    if problem_type.strip().lower() == "segmentation":
        key = "segmentation_video" if data_type == "video" else "segmentation_image"
    else:
        key = problem_type if problem_type in type_template else problem_type.strip().lower()
    media = {"video": ["video"], "image": ["image"], "video-image": ["video", "image"]}[data_type]
    text = question_template.format(Question=question) + type_template.get(key, "")
    return [{"type": m} for m in media] + [{"type": "text", "text": text}]


PROBLEMS = {  # where the placeholders stand; {tag} is the media kind's placeholder
    "start": "{tag}What is shown here?",
    "middle": "Look at this picture:\n{tag}\nand answer: what colour is the {{circle}}?",
    "end": "  Count the shapes in\t{tag}",
    "several": "{tag}{tag} Compare the first with the second. {tag}\n",
    "adjacent at the end": "Which differs? {tag}{tag}",
}
PLACEHOLDERS = {"start": 1, "middle": 1, "end": 1, "several": 3, "adjacent at the end": 2}
OPTIONS = ["A. red", "B. blue <b>", "C. {green}", "D. none of these"]


def rl_rows():
    """RL rows in the released schema: every problem_type, image and video, every placeholder position."""
    rows = []
    for (where, problem), problem_type, media_type in itertools.product(PROBLEMS.items(), data.PROBLEM_TYPES,
                                                                        ("image", "video")):
        tag = f"<{media_type}>"
        files = ["media/a.png", "media/b.png", "media/a.png"] if media_type == "image" else ["media/clip.mp4"] * 3
        row = {"problem": problem.format(tag=tag), "answer": "<answer>A</answer>", "problem_type": problem_type,
               "data_type": media_type, f"{media_type}s": files[:PLACEHOLDERS[where]],
               "problem_id": len(rows), "problem_reserved_text": "q"}
        if problem_type == "multiple choice":
            row["options"] = OPTIONS
        rows.append(row)
    # a placeholder inside an option: the release splits the whole text, options included
    rows.append({"problem": "Which option shows it?", "options": ["A. this: <image>", "B. neither"],
                 "answer": "A", "problem_type": "multiple choice", "data_type": "image", "images": ["media/b.png"]})
    # the other kind's tag stays text, as the release splits on the row's own kind only
    rows.append({"problem": "<video> is not a placeholder in an image row <image>", "answer": "3",
                 "problem_type": "numerical", "data_type": "image", "images": ["media/a.png"]})
    rows.append({"problem": "What is 12 + 30?", "answer": "42", "problem_type": "math"})  # text only: a string
    return rows


def write_rows(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("template", ["release", "project"])
def test_rl_content_parts_equal_the_releases(suite_dir, tmp_path, template):
    raw = rl_rows()
    rows = data.load_rows(write_rows(tmp_path / "rl.json", raw), media_root=str(suite_dir), check_media=False)
    templates = data.load_templates(template)
    type_template = {data.TEMPLATE_ALIASES.get(k, k): v for k, v in templates.items() if k != "question"}
    type_template.update({k: templates[v] for k, v in data.TEMPLATE_ALIASES.items()})
    for example, row in zip(raw, rows):
        expected = release_rl_content(example, templates["question"], type_template)
        assert data.user_content(row, templates) == expected, example["problem"]
    # several media: each part stands where its placeholder stood, in order
    several = [r for r in rows if r["problem"].startswith("<image><image>")][0]
    assert [p["type"] for p in data.user_content(several, templates)][:3] == ["image", "image", "text"]


def test_rl_row_without_placeholder_gets_its_media_first(suite_dir, tmp_path):
    """The one difference kept on purpose: the release would give such a row no media part (its media then
    match no placeholder); ours puts them first, as eval_bench does."""
    raw = [{"problem": "How many?", "answer": "2", "problem_type": "numerical", "data_type": "video",
            "videos": ["media/clip.mp4"]}]
    row = data.load_rows(write_rows(tmp_path / "rl.json", raw), media_root=str(suite_dir))[0]
    released = release_rl_content(raw[0], data.RELEASE_TEMPLATE["question"], release_type_template())
    assert data.user_content(row, data.RELEASE_TEMPLATE) == [{"type": "video"}] + released


def test_placeholder_count_must_match_the_media(suite_dir, tmp_path):
    raw = [{"problem": "<image> and <image>", "answer": "2", "problem_type": "numerical", "data_type": "image",
            "images": ["media/a.png"]}]
    with pytest.raises(ValueError, match=r"row 0 field 'problem': has 2 <image> placeholders for 1 image"):
        data.load_rows(write_rows(tmp_path / "rl.json", raw), media_root=str(suite_dir))


def test_eval_content_parts_equal_eval_bench(suite_dir, tmp_path):
    raw = []
    for problem_type, data_type in itertools.product(data.PROBLEM_TYPES, data.DATA_TYPES):
        row = {"problem": "Where is the <image> {ball}?\n", "solution": "<answer>A</answer>",
               "problem_type": problem_type, "data_type": data_type,
               "path": "media/clip.mp4" if data_type != "image" else "media/a.png"}
        if data_type == "video-image":
            row["additional_path"] = "media/b.png"
        if problem_type == "multiple choice":
            row["options"] = OPTIONS
        if problem_type == "segmentation":
            row["segmentation_output"] = {"size": [1, 1], "counts": [1]}
        raw.append(row)
    rows = data.load_rows(write_rows(tmp_path / "eval.json", raw), media_root=str(suite_dir), check_media=False)
    for example, row in zip(raw, rows):
        expected = release_eval_content(example, data.RELEASE_TEMPLATE["question"], release_type_template())
        assert data.user_content(row, data.RELEASE_TEMPLATE) == expected


def test_sft_row_without_its_own_text_is_prompted_as_rl(suite_dir, tmp_path):
    """An SFT row of the assistant turn alone takes its prompt from the template, as the RL row it mirrors."""
    rl = {"problem": "Which is red?\n<image>", "options": OPTIONS, "answer": "A", "problem_type": "multiple choice",
          "data_type": "image", "images": ["media/a.png"]}
    sft = {k: v for k, v in rl.items() if k != "answer"}
    sft["messages"] = [{"role": "assistant", "content": "<think>red</think><answer>A</answer>"}]
    rl_row, sft_row = data.load_rows(write_rows(tmp_path / "rows.json", [rl, sft]), media_root=str(suite_dir))
    assert sft_row["kind"] == "sft"
    assert data.user_content(sft_row, data.RELEASE_TEMPLATE) == data.user_content(rl_row, data.RELEASE_TEMPLATE)
    assert data.ground_truth(sft_row) == "A"
    bad = {**sft, "problem_type": None}
    with pytest.raises(ValueError, match="problem_type"):
        data.load_rows(write_rows(tmp_path / "bad.json", [bad]), media_root=str(suite_dir))


def test_template_files_override_the_whole_prompt_with_either_key_names(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"question": "Q: {Question}\n", "segmentation_video": "keyframe, box, points",
                                "numerical": "a number"}))
    templates = data.load_templates(str(path))
    row = {"problem": "How many?", "problem_type": "numerical", "data_type": "image"}
    assert data.build_prompt(row, templates) == "Q: How many?\na number"
    row = {"problem": "Segment it.", "problem_type": "segmentation", "data_type": "video"}
    assert data.build_prompt(row, templates) == "Q: Segment it.\nkeyframe, box, points"
    row = {"problem": "Box it.", "problem_type": "spatial grounding", "data_type": "image"}  # not overridden: ours
    assert data.build_prompt(row, templates).endswith(data.PROJECT_TEMPLATE["spatial grounding"])
    path.write_text(json.dumps({"segmentation": "x"}))
    with pytest.raises(ValueError, match=r"t\.json: unknown prompt template key 'segmentation'"):
        data.load_templates(str(path))
    path.write_text(json.dumps({"question": "no slot"}))
    with pytest.raises(ValueError, match=r"t\.json: prompt template key 'question' must contain \{Question\}"):
        data.load_templates(str(path))


# -----------------------------------------------------------------------------
# media sizes, frame indices and timestamps against qwen-vl-utils and the Qwen3-VL processor

def qwen3_vl_processor(tokenizer):
    """A processor with Qwen3-VL-8B-Instruct's image and video settings (its preprocessor_config.json and
    video_preprocessor_config.json: patch 16, merge 2, images 65,536..16,777,216 pixels, videos 4,096..25,165,824
    pixels over all frames), around the tiny tokenizer: no weights are needed to size media."""
    mean_std = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 65536, "longest_edge": 16777216}, **mean_std)
    video = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 4096, "longest_edge": 25165824}, **mean_std)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=tokenizer.chat_template)


IMAGE_SIZES = [(w, h) for w in (20, 50, 128, 239, 300, 500, 1000, 1601, 2600, 4000)
               for h in (20, 30, 128, 333, 1000, 2000)]


def easyr1_process_image_size(width, height, min_pixels, max_pixels):
    """EasyR1's process_image (and LLaMA-Factory's _preprocess_image) on sizes alone, restated."""
    if width * height > max_pixels:
        factor = (max_pixels / (width * height)) ** 0.5
        width, height = int(width * factor), int(height * factor)
    if width * height < min_pixels:
        factor = (min_pixels / (width * height)) ** 0.5
        width, height = int(width * factor), int(height * factor)
    return width, height


@pytest.mark.parametrize("stage", ["rl", "sft", "eval"])
def test_image_sizes_equal_the_releases(stage):
    """The size after the release's pre-step and the processor's smart_resize (Qwen3-VL: factor 32, at least
    65,536 pixels). RL: EasyR1 3,136..1,048,576; SFT: LLaMA-Factory 1,024..802,816; eval: fetch_image
    4,096..1,048,576 (qwen-vl-utils itself)."""
    budgets = {"rl": (3136, 1048576), "sft": (1024, 802816), "eval": (4096, 1048576)}[stage]
    for width, height in IMAGE_SIZES:
        if max(width, height) / min(width, height) > 200:
            continue  # the processor refuses these in the release and here alike
        if stage == "eval":
            ref_h, ref_w = vision_process.smart_resize(height, width, 32, *budgets)
            ours = data.fit_size(height, width, *budgets, fuzz=0.0)
        else:
            ref_w, ref_h = easyr1_process_image_size(width, height, *budgets)
            ours = data.scale_into(height, width, *budgets)
        assert ours == (ref_h, ref_w), (stage, width, height)
        final = smart_resize(ref_h, ref_w, 32, 65536, 16777216)
        assert final[0] * final[1] >= 65536  # the floor lifts small images (128 px -> 256 px)


def test_eval_images_equal_fetch_image_to_the_pixel(tmp_path):
    rng = np.random.default_rng(0)
    for (width, height), mode in zip([(300, 50), (20, 20), (1601, 1000), (239, 239)], ["RGB", "RGBA", "RGB", "P"]):
        pixels = rng.integers(0, 256, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA" if mode == "RGBA" else "RGB")
        image = image.convert("P") if mode == "P" else image
        path = str(tmp_path / f"{width}x{height}.png")
        image.save(path)
        released = vision_process.fetch_image({"image": path, "max_pixels": 1048576}, image_patch_size=16)
        ours = data.load_image(path, 4096, 1048576, "qwen_vl_utils")
        assert ours.size == released.size and np.array_equal(np.array(ours), np.array(released)), (width, height)


def test_image_through_the_processor_gets_the_release_grid(tiny, tmp_path):
    """A 128 x 128 image: 128 x 128 in ours; 256 x 256 after the release's RL steps (EasyR1 keeps it, the
    Qwen3-VL processor lifts it to its 65,536-pixel floor), so 8 x 8 merged tokens become 16 x 16."""
    _, tiny_processor = tiny
    processor = qwen3_vl_processor(tiny_processor.tokenizer)
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "i.png")
    rows = data.load_rows(write_rows(tmp_path / "rl.json", [
        {"problem": "<image>What?", "answer": "1", "problem_type": "numerical", "data_type": "image",
         "images": ["i.png"]}]))
    grid = {sizing: data.collate(rows, processor, data.MediaConfig(sizing=sizing))["image_grid_thw"].tolist()
            for sizing in ("fit", "easyr1")}
    assert grid == {"fit": [[1, 8, 8]], "easyr1": [[1, 16, 16]]}


class FakeVideoReader:
    """decord.VideoReader's surface that qwen-vl-utils uses, for a clip of n frames at fps, frames blank."""
    clips = {}

    def __init__(self, path):
        self.frames, self.fps, self.height, self.width = self.clips[path]

    def __len__(self):
        return self.frames

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, indices):
        batch = np.zeros((len(indices), self.height, self.width, 3), np.uint8)
        return types.SimpleNamespace(asnumpy=lambda: batch)


@pytest.fixture
def qwen_video(monkeypatch):
    """qwen_vl_utils.fetch_video with its decord reader on FakeVideoReader and its final resize recording the
    size instead of resizing: (frames_indices, metadata fps, (h, w)) of a clip (frames, fps, height, width)."""
    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=FakeVideoReader))
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "decord")
    sizes = []

    def record_resize(video, size, **kwargs):
        sizes.append(tuple(size))
        return video
    monkeypatch.setattr(vision_process.transforms.functional, "resize", record_resize)

    def fetch(clip, **budget):
        FakeVideoReader.clips["clip"] = clip
        _, metadata = vision_process.fetch_video({"video": "clip", "fps": 2.0, "max_frames": 128, **budget},
                                                 image_patch_size=16, return_video_metadata=True)
        return metadata["frames_indices"], metadata["fps"], sizes[-1]
    return fetch


CLIPS = [  # (frames, source fps, height, width): 0.5 s to 300 s, integer and NTSC rates, odd sizes
    (1, 30.0, 48, 64), (2, 30.0, 240, 320), (3, 25.0, 240, 320), (15, 30.0, 480, 640), (33, 29.97, 180, 320),
    (90, 30.0, 240, 320), (32, 8.0, 720, 1280), (7, 1.0, 240, 320), (300, 30.0, 360, 480), (301, 29.97, 90, 160),
    (2500, 25.0, 36, 64), (9000, 30.0, 128, 224), (1441, 24.0, 1080, 1920), (61, 60.0, 17, 3000)]


@pytest.mark.parametrize("stage", ["rl", "eval"])
def test_video_frames_and_sizes_equal_qwen_vl_utils(qwen_video, stage):
    """RL (EasyR1's process_video: 4,096..65,536 pixels a frame) and eval (eval_bench: at most 262,144, and
    qwen-vl-utils' default minimum 131,072): the same frame indices and frame size as fetch_video."""
    min_pixels, max_pixels = (4096, 65536) if stage == "rl" else (128 * 32 * 32, 256 * 32 * 32)
    budget = {"min_pixels": min_pixels, "max_pixels": max_pixels} if stage == "rl" else {"max_pixels": max_pixels}
    for frames, fps, height, width in CLIPS:
        ours = data.frame_indices(frames, fps, 2.0, 128, "qwen_vl_utils")
        if frames == 1:  # qwen-vl-utils refuses a 1-frame clip; ours shows its frame twice
            with pytest.raises(ValueError, match="nframes should in interval"):
                vision_process.smart_nframes({"fps": 2.0, "max_frames": 128}, frames, fps)
            assert ours == [0, 0]
            continue
        indices, source_fps, size = qwen_video((frames, fps, height, width), **budget)
        assert ours == indices and source_fps == fps, (frames, fps)
        # where qwen-vl-utils floors a side to 0 (aspect ratio near 200: torchvision then fails), ours keeps 32
        size = tuple(side or data.FACTOR for side in size)
        assert data.frame_size(height, width, len(ours), min_pixels, max_pixels, "qwen_vl_utils") == size


def test_decoded_video_and_timestamps_equal_the_release(qwen_video, tiny, suite_dir):
    """A real file through data.load_video ("easyr1") and the processor: fetch_video's frame indices (for the
    frame count and rate PyAV reads) and the same "<t seconds>" text as the release's metadata gives."""
    _, tiny_processor = tiny
    processor = qwen3_vl_processor(tiny_processor.tokenizer)
    # the suite's clip: 24 frames at 8 fps, 96 x 64; fetch_video takes 6 frames from 0 to 23
    frames, metadata = data.load_video(str(suite_dir / "media" / "clip.mp4"), 2.0, 128, 4096, 65536, "easyr1")
    indices, fps, (height, width) = qwen_video((VIDEO_FRAMES, float(VIDEO_FPS), 64, 96), min_pixels=4096,
                                               max_pixels=65536)
    assert metadata.frames_indices == indices and metadata.fps == fps
    assert frames.shape == (len(indices), height, width, 3)

    def prompt(meta):
        text = processor(text=["<|video_pad|>"], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                         do_resize=True, cap_pixels_per_frame=False)["input_ids"][0]
        return processor.tokenizer.decode([t for t in text if t != processor.tokenizer.convert_tokens_to_ids(
            "<|video_pad|>")])
    released = VideoMetadata(total_num_frames=VIDEO_FRAMES, fps=fps, frames_indices=indices)
    assert prompt(metadata) == prompt(released)
    # each pair of frames is stamped with the mean of its two source times, one decimal (HF's Qwen3-VL rule)
    stamps = [f"<{(indices[k] + indices[k + 1]) / 2 / fps:.1f} seconds>" for k in range(0, len(indices), 2)]
    assert prompt(metadata) == "".join(s + "<|vision_start|><|vision_end|>" for s in stamps)


def test_release_sizing_runs_on_the_tiny_model(suite_dir, tiny):
    """The tiny model's processor (patch 16, no merge) takes the release's sizing too: its own floor (32 x 32)
    leaves the test media as EasyR1 sized them."""
    tiny_model, processor = tiny
    rows = data.load_rows(str(suite_dir / "rl.json"))
    batch = data.collate(rows, processor, data.MediaConfig(sizing="easyr1", max_frames=8))
    with torch.no_grad():
        assert torch.isfinite(tiny_model(**batch).logits).all()
    assert batch["image_grid_thw"].tolist()[0] == [1, 64 // 16, 96 // 16]  # a.png, 96 x 64, as it is
