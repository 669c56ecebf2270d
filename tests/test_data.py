"""data.py: loading the three row shapes, errors that name file/row/field, media decoding, model inputs
(media tokens, video timestamps, left padding, SFT label span) and rank sharding with exact resume."""
import dataclasses
import json
import os
import re
import runpy
import sys

import numpy as np
import pytest
import torch
from conftest import TEST_MEDIA, VIDEO_FPS, VIDEO_FRAMES, torchrun

import data


def load(suite_dir, name):
    return data.load_rows(str(suite_dir / name))


# -----------------------------------------------------------------------------
# loading

def test_three_shapes_load(suite_dir):
    rl, ev, sft = load(suite_dir, "rl.json"), load(suite_dir, "eval.json"), load(suite_dir, "sft.json")
    assert [r["kind"] for r in rl + ev + sft] == ["rl"] * 4 + ["eval"] * 3 + ["sft"] * 2
    assert rl[0]["media"] == [str(suite_dir / "media" / "a.png")] and rl[0]["media_types"] == ["image"]
    assert rl[2]["media_types"] == ["video"]
    assert rl[3]["media"] == [] and rl[3]["data_type"] is None  # text-only row
    assert ev[1]["media"] == [str(suite_dir / "media" / "clip.mp4"), str(suite_dir / "media" / "b.png")]
    assert ev[1]["media_types"] == ["video", "image"]  # video-image: the video, then the additional image
    # released fields are kept untouched
    assert rl[0]["answer"] == "<answer>B</answer>" and rl[0]["options"] == ["A. red", "B. blue", "C. green"]
    assert ev[2]["segmentation_output"]["size"] == [64, 96]
    # released SFT rows have no problem_type / data_type: inferred data_type, problem_type None
    assert (sft[0]["problem_type"], sft[0]["data_type"]) == (None, "image")
    assert (sft[1]["problem_type"], sft[1]["data_type"]) == ("temporal grounding", "video")
    assert [data.ground_truth(r) for r in (rl[0], rl[1], ev[0], sft[0])] == ["B", "3", '{"boxes": [10, 20, 500, 600]}', "3"]


def test_jsonl_and_media_root(suite_dir, tmp_path):
    rows = json.loads((suite_dir / "rl.json").read_text())
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = data.load_rows(str(path), media_root=str(suite_dir))
    expected = load(suite_dir, "rl.json")
    strip = lambda r: {k: v for k, v in r.items() if k != "source"}  # noqa: E731
    assert [strip(r) for r in loaded] == [strip(r) for r in expected]
    assert loaded[1]["source"] == f"{path}: row 1"


def write_rows(tmp_path, rows, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def good_rl():
    return {"problem": "q?", "answer": "3", "problem_type": "numerical", "data_type": "image", "images": ["a.png"]}


@pytest.fixture
def media_dir(tmp_path, suite_dir):
    (tmp_path / "a.png").write_bytes((suite_dir / "media" / "a.png").read_bytes())
    (tmp_path / "clip.mp4").write_bytes((suite_dir / "media" / "clip.mp4").read_bytes())
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage " * 8)
    (tmp_path / "list.m3u8").write_text("#EXTM3U\n#EXTINF:1.0,\n../../elsewhere/clip.mp4\n")  # FFmpeg would follow it
    return tmp_path


MALFORMED = [  # (change to a good RL row, field named in the error, text in the error)
    (lambda r: r.pop("problem"), "problem", "missing"),
    (lambda r: r.update(problem_type="counting"), "problem_type", "'counting'"),
    (lambda r: r.update(problem_type="multiple choice"), "options", "None"),
    (lambda r: r.update(images=["nowhere.png"]), "images", "missing file"),
    (lambda r: r.update(images=["bad.png"]), "images", "corrupt image"),
    (lambda r: r.update(images=None, videos=["bad.mp4"], data_type="video"), "videos", "corrupt video"),
    (lambda r: r.update(data_type="video"), "data_type", "'video'"),
    (lambda r: r.update(images="a.png"), "images", "list of paths"),
    (lambda r: r.update(images=["../a.png"]), "images", "leads out of media_root"),
    (lambda r: r.update(images=["/etc/hostname"]), "images", "leads out of media_root"),
    (lambda r: r.update(images=None, videos=["list.m3u8"], data_type="video"), "videos", "is a playlist"),
]


@pytest.mark.parametrize("change,field,text", MALFORMED)
def test_malformed_row_names_file_row_field(media_dir, change, field, text):
    rows = [good_rl(), good_rl()]
    change(rows[1])
    path = write_rows(media_dir, rows)
    with pytest.raises(ValueError) as e:
        data.load_rows(path)
    message = str(e.value)
    assert message.startswith(f"{path}: row 1 field {field!r}:") and text in message, message


def test_malformed_eval_and_sft_rows(media_dir):
    ev = {"problem": "q", "solution": "A", "problem_type": "OCR", "data_type": "video-image", "path": "clip.mp4"}
    with pytest.raises(ValueError, match=r"row 0 field 'additional_path'"):
        data.load_rows(write_rows(media_dir, [ev]))
    sft = {"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
           "images": ["a.png"]}
    with pytest.raises(ValueError, match=r"row 0 field 'messages': user text has 2 <image>"):
        data.load_rows(write_rows(media_dir, [sft]))
    sft["messages"] = [{"role": "user", "content": "<image>q"}]
    with pytest.raises(ValueError, match=r"row 0 field 'messages': expected a user then an assistant"):
        data.load_rows(write_rows(media_dir, [sft]))
    with pytest.raises(ValueError, match=r"row 0 field 'answer': missing"):
        data.load_rows(write_rows(media_dir, [{"problem": "q"}]))


def test_skip_bad_counts_and_logs(media_dir, capsys):
    rows = [good_rl() for _ in range(6)]
    rows[1]["problem_type"] = "counting"
    rows[3]["images"] = ["nowhere.png"]
    rows[4]["images"] = ["bad.png"]
    path = write_rows(media_dir, rows)
    loaded = data.load_rows(path, skip_bad_rows=True)
    assert [r["source"] for r in loaded] == [f"{path}: row {i}" for i in (0, 2, 5)]
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"skipped 3 of 6 rows of {path}: row 1 field 'problem_type': unknown value 'counting'")
    assert "row 3 field 'images': missing file" in line and "row 4 field 'images': corrupt image" in line


def _media_check_worker(path, out_dir):
    """One rank of test_media_check_is_split_over_ranks: which rows' media it opened, and what load_rows gave."""
    import common
    rank, _, _, _ = common.init_distributed()
    opened, check = [], data.check_media_file
    data.check_media_file = lambda full, media_type: opened.append(os.path.basename(full)) or check(full, media_type)
    loaded = [row["source"] for row in data.load_rows(path, skip_bad_rows=True)]
    try:
        data.load_rows(path)
        error = None
    except ValueError as e:
        error = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"opened": opened, "loaded": loaded, "error": error}, f)
    common.cleanup()


def test_media_check_is_split_over_ranks(media_dir, tmp_path):
    """2 ranks: each opens the media of every other row (half the files), and both learn of the corrupt file only
    rank 1 opened: the same rows kept with skip_bad_rows, the same error without."""
    rows = [good_rl() for _ in range(6)]
    for i, row in enumerate(rows):
        row["images"] = [f"img{i}.png"]
        (media_dir / f"img{i}.png").write_bytes((media_dir / ("bad.png" if i == 3 else "a.png")).read_bytes())
    path = write_rows(media_dir, rows)
    returncode, stderr = torchrun([os.path.abspath(__file__), path, str(tmp_path)], timeout=180)
    assert returncode == 0, stderr[-4000:]
    got = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in range(2)]
    assert got[0]["opened"] == ["img0.png", "img2.png", "img4.png"] * 2  # two load_rows calls
    assert got[1]["opened"] == ["img1.png", "img3.png", "img5.png"] * 2
    assert got[0]["loaded"] == got[1]["loaded"] == [f"{path}: row {i}" for i in (0, 1, 2, 4, 5)]
    assert got[0]["error"] == got[1]["error"] and got[0]["error"].startswith(f"{path}: row 3 field 'images': corrupt")


def test_check_cli_skip_bad_rows(media_dir, monkeypatch, capsys):
    """`python data.py --data=F --skip_bad_rows=false` stops at the first bad row (it used to skip anyway);
    true skips and counts; a media path out of media_root passes only with --allow_media_outside_root=true."""
    rows = [good_rl(), {**good_rl(), "images": ["nowhere.png"]}, {**good_rl(), "images": [str(media_dir / "a.png")]}]
    (media_dir / "sub").mkdir()
    (media_dir / "sub" / "a.png").write_bytes((media_dir / "a.png").read_bytes())
    path = write_rows(media_dir / "sub", rows)

    def cli(*args):
        monkeypatch.setattr(sys, "argv", ["data.py", f"--data={path}", *args])
        runpy.run_path(data.__file__, run_name="__main__")
    with pytest.raises(ValueError, match=r"row 1 field 'images': missing file"):
        cli("--skip_bad_rows=false")
    cli("--skip_bad_rows=true")
    assert "skipped 2 of 3 rows" in capsys.readouterr().out  # row 2's absolute path leads out of sub/
    cli("--skip_bad_rows=true", "--allow_media_outside_root=true")
    assert "skipped 1 of 3 rows" in capsys.readouterr().out


def test_check_cli_counts(suite_dir, capsys):
    counts = data.check_file(str(suite_dir / "eval.json"))
    assert counts == {("eval", "spatial grounding", "image"): 1, ("eval", "multiple choice", "video-image"): 1,
                      ("eval", "segmentation", "image"): 1}
    assert "3 rows, 4 media files" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# media

def test_fit_size():
    assert data.fit_size(64, 96, 32 * 32, 64 * 96) == (64, 96)  # already fits
    assert data.fit_size(150, 40, 32 * 32, 64 * 96) == (160, 32)  # rounded to multiples of 32
    assert data.fit_size(1000, 2000, 1024, 40000) == (128, 256)  # shrunk by sqrt(50): 141 x 283, floored
    assert data.fit_size(10, 10, 64 * 64, 10 ** 6) == (64, 64)  # grown by exactly 6.4 (no float fuzz)
    h, w = data.fit_size(480, 640, 3136, 1048576)
    assert (h, w) == (480, 640)
    h, w = data.fit_size(3000, 4000, 3136, 1048576)
    assert h % 32 == w % 32 == 0 and h * w <= 1048576 and abs(w / h - 4 / 3) < 0.05


def test_load_image_bounds(suite_dir, media_dir):
    image = data.load_image(str(suite_dir / "media" / "b.png"), 32 * 32, 64 * 96)
    assert image.mode == "RGB" and image.size == (32, 160)  # PIL size is (w, h)
    with pytest.raises(ValueError, match=r"corrupt image .*bad\.png"):
        data.load_image(str(media_dir / "bad.png"))


def test_sample_frame_indices():
    # 24 frames at 8 fps, 2 fps wanted: t = 0, 0.5, ..., 2.5 s -> every 4th frame
    assert data.sample_frame_indices(24, 8.0, 2.0, 128) == [0, 4, 8, 12, 16, 20]
    # capped at 4: uniform pick among those 6
    assert data.sample_frame_indices(24, 8.0, 2.0, 4) == [0, 8, 12, 20]
    # odd count padded by repeating the last (temporal patch 2): t = 0, 0.5, 1.0 s of a 1.5 s clip
    assert data.sample_frame_indices(12, 8.0, 2.0, 128) == [0, 4, 8, 8]
    # wanting more than the source has gives every frame once (then padded)
    assert data.sample_frame_indices(5, 2.0, 4.0, 128) == [0, 1, 2, 3, 4, 4]


def test_load_video_frames_and_metadata(suite_dir, media_dir):
    frames, meta = data.load_video(str(suite_dir / "media" / "clip.mp4"), fps=2.0, max_frames=128,
                                   min_pixels=32 * 32, max_pixels=32 * 96)
    assert frames.dtype == np.uint8 and frames.shape == (6, 32, 64, 3)  # per-frame cap 3072: 64x96 / sqrt(2) -> 32x64
    assert meta.frames_indices == [0, 4, 8, 12, 16, 20] and meta.fps == VIDEO_FPS
    assert meta.total_num_frames == VIDEO_FRAMES and meta.duration == VIDEO_FRAMES / VIDEO_FPS
    # the decoded frame really is the source frame of that index (red = 10 * index)
    red = frames[..., 0].reshape(6, -1).mean(1)
    assert np.allclose(red, 10 * np.array(meta.frames_indices), atol=6), red
    with pytest.raises(ValueError, match=r"corrupt video .*bad\.mp4"):
        data.load_video(str(media_dir / "bad.mp4"))


# -----------------------------------------------------------------------------
# model inputs

def test_collate_image_video_text_rows(suite_dir, tiny):
    tiny_model, processor = tiny
    rl, ev = load(suite_dir, "rl.json"), load(suite_dir, "eval.json")
    rows = [rl[0], rl[2], rl[3], ev[1]]  # image, video, text only, video + image
    batch = data.collate(rows, processor, TEST_MEDIA)
    assert set(batch) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                          "pixel_values_videos", "video_grid_thw"}
    B, L = batch["input_ids"].shape
    assert B == 4 and batch["attention_mask"].shape == batch["mm_token_type_ids"].shape == (B, L)
    merge = processor.image_processor.merge_size ** 2  # patches per placeholder token
    image_grid, video_grid = batch["image_grid_thw"], batch["video_grid_thw"]
    assert image_grid.tolist() == [[1, 4, 6], [1, 10, 2]]  # a.png 64x96; b.png 150x40 -> 160x32
    assert video_grid.tolist() == [[3, 4, 6], [3, 4, 6]]  # 6 frames (2 fps of 3 s) of 64x96
    assert batch["pixel_values"].shape[0] == image_grid.prod(-1).sum()
    assert batch["pixel_values_videos"].shape[0] == video_grid.prod(-1).sum()
    types, ids = batch["mm_token_type_ids"], batch["input_ids"]
    assert torch.equal(types == 1, ids == processor.image_token_id)
    assert torch.equal(types == 2, ids == processor.video_token_id)
    per_row = [((types[i] == 1).sum().item(), (types[i] == 2).sum().item()) for i in range(B)]
    assert per_row == [(24 // merge, 0), (0, 72 // merge), (0, 0), (20 // merge, 72 // merge)]  # grid t*h*w / merge
    assert (types[3] == 2).nonzero().max() < (types[3] == 1).nonzero().min()  # video-image: video first
    with torch.no_grad():
        logits = tiny_model(**batch).logits
    assert logits.shape[:2] == (B, L) and torch.isfinite(logits).all()
    text_only = data.collate([rl[3]], processor, TEST_MEDIA)
    assert set(text_only) == {"input_ids", "attention_mask", "mm_token_type_ids"}


def test_video_timestamps_match_sampled_frames(suite_dir, tiny):
    _, processor = tiny
    video_row = load(suite_dir, "rl.json")[2]
    batch = data.collate([video_row], processor, TEST_MEDIA)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    stamps = [float(s) for s in re.findall(r"<([\d.]+) seconds>", text)]
    # 2 fps over a 3 s clip at 8 fps: frames 0, 4, ..., 20; capped at 8 -> all 6 kept; pairs averaged
    _, meta = data.load_video(video_row["media"][0], TEST_MEDIA.fps, TEST_MEDIA.max_frames)
    times = np.array(meta.frames_indices) / VIDEO_FPS
    expected = [float(f"{t:.1f}") for t in (times[0::2] + times[1::2]) / 2]
    assert meta.frames_indices == [0, 4, 8, 12, 16, 20] and stamps == expected == [0.2, 1.2, 2.2]
    assert len(stamps) == batch["video_grid_thw"][0, 0]


def test_left_padding(suite_dir, tiny):
    _, processor = tiny
    rl = load(suite_dir, "rl.json")
    batch = data.collate([rl[3], rl[0]], processor, TEST_MEDIA)  # short text row, longer image row
    mask, ids = batch["attention_mask"], batch["input_ids"]
    n_pad = (mask[0] == 0).sum().item()
    assert n_pad > 0 and mask[1].all()
    assert mask[0, :n_pad].eq(0).all() and mask[0, n_pad:].eq(1).all()  # pads only on the left
    assert ids[0, :n_pad].eq(processor.tokenizer.pad_token_id).all()
    alone = data.collate([rl[3]], processor, TEST_MEDIA)["input_ids"][0]
    assert torch.equal(ids[0, n_pad:], alone)  # padding does not change the tokens
    assert processor.tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")


def test_sft_labels_cover_exactly_the_assistant_turn(suite_dir, tiny):
    tiny_model, processor = tiny
    sft = load(suite_dir, "sft.json")
    batch = data.collate(sft, processor, TEST_MEDIA, with_answer=True)
    prompts = data.collate(sft, processor, TEST_MEDIA)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = processor.tokenizer
    for i, row in enumerate(sft):
        labelled = labels[i] != -100
        span = labelled.nonzero().flatten()
        assert torch.equal(span, torch.arange(span[0], span[-1] + 1))  # one contiguous span
        assert span[-1] == ids.shape[1] - 2  # only the newline after <|im_end|> follows it
        assert torch.equal(labels[i][labelled], ids[i][labelled])
        assert tok.decode(ids[i][labelled]) == row["messages"][1]["content"] + "<|im_end|>"
        assert batch["mm_token_type_ids"][i][labelled].eq(0).all() and mask[i][labelled].all()
        # the tokens before the span are exactly the generation prompt (what RL and eval see)
        prompt = prompts["input_ids"][i][prompts["attention_mask"][i].bool()]
        assert torch.equal(ids[i][mask[i].bool()][:len(prompt)], prompt)
        assert span[0] == (mask[i] == 0).sum() + len(prompt)
    # placeholders became media parts: no literal "<image>" left, the image sits where the placeholder was
    first = tok.decode(prompts["input_ids"][0], skip_special_tokens=False)
    assert "<image>" not in first and "<|vision_end|>How many shapes are there?" in first
    with torch.no_grad():
        loss = tiny_model(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="with_answer needs an SFT row"):
        data.collate(load(suite_dir, "rl.json")[:1], processor, TEST_MEDIA, with_answer=True)


@pytest.mark.parametrize("media_cfg", [
    TEST_MEDIA, data.MediaConfig(image_max_pixels=32 * 64, max_frames=4, video_max_pixels=32 * 64),
    dataclasses.replace(TEST_MEDIA, sizing="easyr1"), dataclasses.replace(data.EVAL_MEDIA, sizing="qwen_vl_utils")])
def test_prompt_length_from_headers_equals_the_encoded_prompt(suite_dir, tiny, media_cfg):
    """prompt_length (media headers only, no decoding) == the token count encode_row gives, for image, video,
    video + image and text rows, at budgets that keep and that shrink the media, under each sizing rule."""
    _, processor = tiny
    rows = data.load_rows(str(suite_dir / "rl.json")) + data.load_rows(str(suite_dir / "eval.json"))
    assert {r["data_type"] for r in rows} == {"image", "video", "video-image", None}
    for row in rows:
        assert data.prompt_length(row, processor, media_cfg) == len(data.encode_row(row, processor, media_cfg)["ids"])


def test_collate_error_names_row(suite_dir, tiny, tmp_path):
    _, processor = tiny
    row = dict(load(suite_dir, "rl.json")[0])
    bad = tmp_path / "gone.png"
    bad.write_bytes(b"not an image")
    row["media"] = [str(bad)]
    with pytest.raises(ValueError, match=r"rl\.json: row 0 field 'media': corrupt image .*gone\.png"):
        data.collate([row], processor, TEST_MEDIA)


# -----------------------------------------------------------------------------
# sharding

@pytest.mark.parametrize("num_rows", [10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("strata", [False, True])
def test_sampler_covers_every_row_once_per_epoch(num_rows, world_size, strata):
    labels = ["image" if i % 3 else "video" for i in range(num_rows)] if strata else None
    samplers = [data.ShardedSampler(num_rows, rank, world_size, seed=5, strata=labels) for rank in range(world_size)]
    for epoch in range(3):
        shards = [s.epoch_indices(epoch) for s in samplers]
        seen = [i for shard in shards for i in shard]
        assert sorted(seen) == list(range(num_rows))  # every row exactly once, across ranks
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # the stream runs through epochs: each rank draws its epoch-0 shard, then its epoch-1 shard, ...
    for s in samplers:
        drawn = s.next_batch(2 * len(s))
        assert drawn == sum((s.epoch_indices(e) for e in range(3)), [])[:len(drawn)] and s.epoch >= 1
    # over all ranks, a round of one row each is the next world_size rows one process draws, epoch after epoch
    fresh = [data.ShardedSampler(num_rows, rank, world_size, seed=5, strata=labels) for rank in range(world_size)]
    rounds = [s.next_batch(1)[0] for _ in range(3 * num_rows) for s in fresh]
    assert rounds == data.ShardedSampler(num_rows, seed=5, strata=labels).next_batch(3 * num_rows * world_size)
    assert data.ShardedSampler(num_rows, seed=5).epoch_indices(0) != data.ShardedSampler(num_rows, seed=5).epoch_indices(1)
    assert data.ShardedSampler(num_rows, shuffle=False).epoch_indices(3) == list(range(num_rows))


def test_sampler_strata_interleave():
    labels = ["video"] * 20 + ["image"] * 60
    order = data.ShardedSampler(80, seed=0, strata=labels).epoch_indices(0)
    for start in range(0, 80, 8):  # every window of 8 holds 2 videos (the overall 1:3 mix), give or take one
        n_video = sum(labels[i] == "video" for i in order[start:start + 8])
        assert 1 <= n_video <= 3


def test_sampler_resumes_exactly():
    a = data.ShardedSampler(11, rank=1, world_size=2, seed=3)
    a.next_batch(4)
    a.next_batch(4)  # mid epoch 1 (rank 1 takes the odd stream positions)
    state = a.state_dict()
    assert (state["start"], state["drawn"], a.epoch) == (0, 8, 1)
    expected = a.next_batch(9)
    b = data.ShardedSampler(11, rank=1, world_size=2, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert b.next_batch(9) == expected
    with pytest.raises(ValueError, match="world_size"):
        data.ShardedSampler(11, rank=1, world_size=3, seed=3).load_state_dict(state)


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 3)])
def test_sampler_resumes_on_another_number_of_ranks(before, after):
    """W ranks draw 3 rounds (crossing an epoch of 7 rows); from their rank-independent position, W' ranks
    draw the rows that one process would have drawn next, round after round."""
    def rounds(samplers, n):
        return [s.next_batch(1)[0] for _ in range(n) for s in samplers]

    old = [data.ShardedSampler(7, r, before, seed=1) for r in range(before)]
    rounds(old, 3)
    consumed = old[0].state_dict()["start"] + min(s.state_dict()["drawn"] for s in old) * before
    one = data.ShardedSampler(7, seed=1)
    one.next_batch(consumed)
    new = [data.ShardedSampler(7, r, after, seed=1) for r in range(after)]
    for r, s in enumerate(new):
        s.load_state_dict({**old[0].state_dict(), "global": {"consumed": consumed}})
    assert rounds(new, 5) == one.next_batch(5 * after)


if __name__ == "__main__":
    _media_check_worker(*sys.argv[1:])
