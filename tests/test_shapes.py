"""The shapes suite: every task in every split, answers valid for their schema and true to the pixels."""
import hashlib
import json
import os

import numpy as np
import pytest

import data
import rewards
import shapes

N = len(shapes.TASKS)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    shapes.generate_suite(out, seed=0, n_sft=N, n_rl=N, n_eval=N, workers=1)
    return out


def load(out, split):
    with open(os.path.join(out, f"{split}.json")) as f:
        return json.load(f)


def test_every_task_in_every_split_and_the_loader_accepts_them(suite):
    expected = {(t, d) for t, d, _ in shapes.TASKS}
    assert {t for t, _ in expected} == set(data.PROBLEM_TYPES)
    for split in ("sft", "rl", "eval"):
        rows = data.load_rows(os.path.join(suite, f"{split}.json"))  # validates schema and media
        assert {(r["problem_type"], r["data_type"]) for r in rows} == expected


def test_answers_are_valid_for_their_schema_and_score_full_reward(suite):
    for row in data.load_rows(os.path.join(suite, "eval.json")):
        gt = data.ground_truth(row)
        pt, dt = row["problem_type"], row["data_type"]
        response = f"<think>x</think><answer>{gt}</answer>"
        overall, parts = rewards.score(response, gt, pt, dt)
        assert parts["format"] == 1.0 and parts["accuracy"] == pytest.approx(1.0), (pt, dt, gt, parts)
        assert overall == pytest.approx(1.5), (pt, dt)  # full accuracy, format and structure bonus
        answer = rewards.parse_json_answer(gt) if pt not in data.QA_TYPES else None
        boxes = []
        if answer is not None:
            if isinstance(answer.get("boxes"), dict):
                boxes = list(answer["boxes"].values())
                if pt == "tracking":
                    assert list(answer["boxes"]) == [str(s) for s in range(1, shapes.SECONDS)]
            elif "boxes" in answer:
                boxes = [answer["boxes"]]
            if "time" in answer and isinstance(answer["time"], list):
                s, e = answer["time"]
                assert 0 <= s < e <= shapes.SECONDS
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000


def test_segmentation_masks_match_the_box_and_points(suite):
    rows = [r for r in load(suite, "eval") if r["problem_type"] == "segmentation"]
    assert {r["data_type"] for r in rows} == {"image", "video"}
    for row in rows:
        answer = json.loads(rewards.answer_text(row["solution"]))
        if row["data_type"] == "image":
            mask = data.rle_decode(row["segmentation_output"])
        else:
            assert len(row["segmentation_output"]) == shapes.FPS * shapes.SECONDS
            mask = data.rle_decode(row["segmentation_output"][str(int(answer["time"] * row["fps"]))])
        assert mask.shape == (row["resolution"]["height"], row["resolution"]["width"])
        size = mask.shape[0]
        ys, xs = np.nonzero(mask)
        pixel_box = [round(1000 * xs.min() / size), round(1000 * ys.min() / size),
                     round(1000 * (xs.max() + 1) / size), round(1000 * (ys.max() + 1) / size)]
        assert np.abs(np.array(pixel_box) - np.array(answer["boxes"])).max() <= 1000 / size + 1
        to_pixel = lambda p: (min(size - 1, p[1] * size // 1000), min(size - 1, p[0] * size // 1000))
        assert all(mask[to_pixel(p)] for p in answer["positive_points"])
        assert not any(mask[to_pixel(p)] for p in answer["negative_points"])


def test_deterministic_and_splits_disjoint(suite, tmp_path):
    again = str(tmp_path)
    shapes.generate_suite(again, seed=0, n_sft=N, n_rl=N, n_eval=N, workers=2)
    for split in ("sft", "rl", "eval"):
        assert load(suite, split) == load(again, split)
    digests = {}
    for split in ("sft", "rl", "eval"):
        for name in sorted(os.listdir(os.path.join(suite, "media", split))):
            if name.endswith(".png"):
                with open(os.path.join(suite, "media", split, name), "rb") as f:
                    digests.setdefault(hashlib.sha1(f.read()).hexdigest(), set()).add(split)
    # OCR/math images may coincide by chance (few words and sums); scenes with shapes never do
    shared = [d for d, splits in digests.items() if len(splits) > 1]
    assert len(shared) <= 2


def test_task_subset_cycles_through_the_chosen_tasks_only(tmp_path):
    shapes.generate_suite(str(tmp_path), seed=0, n_sft=4, n_rl=2, n_eval=2, workers=1,
                          tasks="image_grounding,video_tracking")
    sft = load(str(tmp_path), "sft")
    assert [(r["problem_type"], r["data_type"]) for r in sft] == [("spatial grounding", "image"),
                                                                   ("tracking", "video")] * 2
    assert {r["problem_type"] for r in load(str(tmp_path), "eval")} == {"spatial grounding", "tracking"}
    with pytest.raises(ValueError, match="image_groundng"):
        shapes.generate_suite(str(tmp_path), n_sft=1, n_rl=1, n_eval=1, workers=1, tasks="image_groundng")
