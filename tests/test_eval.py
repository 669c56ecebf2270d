"""eval.py: every metric against hand-computed values and, per row and per file, against eval_bench's reading
(restated from the released code); SAM2 end to end on CPU at small resolution."""
import itertools
import json
import re
from collections import defaultdict

import numpy as np
import pytest

import eval as ev
import memory
from data import rle_encode


def answer(obj):
    return f"<think>.</think><answer>{json.dumps(obj)}</answer>"


def row(problem_type, solution, data_type="image", **extra):
    return {"problem": "q", "problem_type": problem_type, "data_type": data_type,
            "solution": f"<answer>{json.dumps(solution)}</answer>", "problem_id": 0, **extra}


# -----------------------------------------------------------------------------
# intervals and boxes

def test_temporal_iou():
    assert ev.temporal_iou([0, 10], [5, 15]) == pytest.approx(5 / 15)
    assert ev.temporal_iou([2, 4], [0, 10]) == pytest.approx(0.2)
    assert ev.temporal_iou([0, 10], [0, 10]) == 1.0
    assert ev.temporal_iou([0, 1], [2, 3]) == 0.0  # disjoint
    assert ev.temporal_iou([3, 3], [3, 3]) == 0.0  # empty union
    assert ev.temporal_iou([5, 2], [1, 6]) == 0.0  # reversed prediction


def test_box_iou():
    assert ev.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert ev.box_iou([0, 0, 100, 50], [0, 0, 100, 100]) == pytest.approx(0.5)
    assert ev.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert ev.box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # inverted box has no area
    assert ev.box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0


def test_temporal_grounding_metrics():
    rows = [row("temporal grounding", {"time": gt}, "video") for gt in ([5, 15], [0, 5], [0, 10], [0, 10])]
    responses = [answer({"time": [0, 10]}), answer({"time": [0, 10]}), answer({"time": [0, 8]}), "no json"]
    m = ev.compute_metrics(rows, responses)["temporal grounding"]
    # tIoUs 1/3, 1/2, 0.8 and a failed parse scoring 0
    assert m["mean_tiou"] == pytest.approx((1 / 3 + 0.5 + 0.8 + 0) / 4)
    assert (m["r@0.3"], m["r@0.5"], m["r@0.7"]) == (0.75, 0.5, 0.25)
    assert (m["rows"], m["parse_failed"]) == (4, 1)


def test_spatial_grounding_metrics_and_media_missing_counts():
    rows = [row("spatial grounding", {"boxes": [0, 0, 100, 100]}) for _ in range(4)]
    predictions = [answer({"boxes": [0, 0, 100, 50]}),  # IoU 0.5 exactly: Acc@0.5 counts it
                   answer({"boxes": [0, 0, 100, 40]}),  # 0.4
                   answer({"boxes": ["0", "0", "100", "100"]}),  # numeric strings count (SPEC 4): 1.0
                   {"response": "", "error": "media_missing"}]
    m = ev.compute_metrics(rows, predictions)
    assert m["spatial grounding"]["acc@0.5"] == 0.5
    assert m["spatial grounding"]["mean_iou"] == pytest.approx((0.5 + 0.4 + 1.0 + 0) / 4)
    assert m["all"] == {"rows": 4, "parse_failed": 0, "media_missing": 1, "too_long": 0, "sam2_failed": 0}


def test_spatial_temporal_grounding_boxes_over_common_seconds():
    gt = {"time": [1, 3], "boxes": {"1": [0, 0, 100, 100], "2": [0, 0, 100, 100], "3": [0, 0, 100, 100]}}
    pred = {"time": [2, 4], "boxes": {"2": [0, 0, 100, 100], "3": [0, 0, 100, 50], "4": [0, 0, 9, 9]}}
    m = ev.compute_metrics([row("spatial-temporal grounding", gt, "video")] * 2,
                           [answer(pred), answer({"boxes": {}})])["spatial-temporal grounding"]
    # row 1: tIoU [2,4] vs [1,3] = 1/3; seconds in both are 2 and 3: (1 + 0.5) / 2. Row 2 lacks time: 0.
    assert m["mean_tiou"] == pytest.approx(1 / 6)
    assert m["mean_box_iou"] == pytest.approx(0.75 / 2)
    assert m["parse_failed"] == 1


def test_tracking_ao_and_both_success_rates():
    full = [0, 0, 100, 100]
    video_a = row("tracking", {"boxes": {"1": full, "2": full}}, "video")
    video_b = row("tracking", {"boxes": {"1": full, "2": full, "3": full}}, "video")
    pred_a = answer({"boxes": {"1": full, "2": [0, 0, 100, 50]}})  # IoUs 1.0, 0.5 -> video mean 0.75
    pred_b = answer({"boxes": {"1": [0, 0, 100, 60]}})  # IoUs 0.6, missing 0, missing 0 -> 0.2
    m = ev.compute_metrics([video_a, video_b], [pred_a, pred_b])["tracking"]
    assert m["ao"] == pytest.approx((0.75 + 0.2) / 2)
    assert m["release_video_r@0.5"] == 0.5  # videos with mean IoU >= 0.5: a only
    assert m["got10k_frame_sr@0.5"] == pytest.approx(2 / 5)  # frames with IoU > 0.5: 1.0 and 0.6 (0.5 is not)


def test_tracking_parse_failure_scores_every_frame_zero():
    video = row("tracking", {"boxes": {"1": [0, 0, 10, 10], "2": [0, 0, 10, 10]}}, "video")
    m = ev.compute_metrics([video, video], [answer({"boxes": {"1": [0, 0, 10, 10], "2": [0, 0, 10, 10]}}),
                                            "<answer>{not json</answer>"])["tracking"]
    assert (m["ao"], m["got10k_frame_sr@0.5"], m["parse_failed"]) == (0.5, 0.5, 1)


# -----------------------------------------------------------------------------
# masks

def square(size, top, left, side, height=None):
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + (height or side), left:left + side] = True
    return mask


def test_mask_iou_including_empty_masks():
    a, b = square(10, 0, 0, 4), square(10, 0, 2, 4)  # 16 px each, overlap 8
    assert ev.mask_iou(a, b) == pytest.approx(8 / 24)
    empty = np.zeros((10, 10), dtype=bool)
    assert ev.mask_iou(empty, empty) == 1.0  # DAVIS: nothing to find, nothing found
    assert ev.mask_iou(empty, empty, "release") == 0.0
    assert ev.mask_iou(empty, a) == 0.0 and ev.mask_iou(a, empty) == 0.0


def test_boundary_map_of_a_square_is_the_perimeter_one_pixel_up_and_left():
    edge = ev.boundary_map(square(20, 5, 5, 5))  # rows and columns 5..9
    ring = np.zeros((20, 20), dtype=bool)
    ring[4:10, 4:10] = True
    ring[5:9, 5:9] = False  # the perimeter of rows/columns 4..9: 20 pixels
    assert edge.sum() == 20 and (edge == ring).all()
    assert not ev.boundary_map(np.ones((6, 6), dtype=bool)).any()  # DAVIS: the image border is not a boundary


def test_dilate_disk_and_square():
    dot = np.zeros((9, 9), dtype=bool)
    dot[4, 4] = True
    assert ev.dilate(dot, 1).sum() == 5  # a cross
    assert ev.dilate(dot, 2).sum() == 13  # dx^2 + dy^2 <= 4
    assert ev.dilate(dot, 2, "square").sum() == 25
    corner = np.zeros((9, 9), dtype=bool)
    corner[0, 0] = True
    assert ev.dilate(corner, 2).sum() == 6  # the quarter of the disk inside the image


def test_boundary_f_shifted_square():
    # 20x20 image: DAVIS tolerance ceil(0.008 x 28.3) = 1 pixel (a cross), the release's max(1, round(0.21)) = 1
    a = square(20, 5, 5, 5)
    assert ev.boundary_f(a, a) == 1.0
    assert ev.boundary_f(a, square(20, 5, 6, 5)) == 1.0  # a 1-pixel shift is within tolerance
    # shifted 2 right: of each 20-pixel boundary, the top and bottom rows match but for their far pixel
    # (5 + 5), the near side matches only at its two ends (2), the far side not at all: P = R = 12/20
    assert ev.boundary_f(a, square(20, 5, 7, 5)) == pytest.approx(0.6)


def test_boundary_f_disk_vs_release_square():
    a, b = np.zeros((20, 20), dtype=bool), np.zeros((20, 20), dtype=bool)
    a[5, 5], b[6, 6] = True, True  # boundaries {4,5}x{4,5} and {5,6}x{5,6}
    assert ev.boundary_f(a, b) == pytest.approx(0.75)  # (6,6) and (4,4) are a diagonal step away: no cross match
    assert ev.boundary_f(a, b, "release") == 1.0  # the square reaches diagonals
    empty = np.zeros((20, 20), dtype=bool)
    assert ev.boundary_f(empty, empty) == 1.0
    assert ev.boundary_f(empty, a) == 0.0 and ev.boundary_f(a, empty) == 0.0


def test_giou_and_ciou_differ():
    rows = [row("segmentation", {}) for _ in range(2)]
    gt_small, gt_big = square(10, 0, 0, 5, height=2), square(10, 0, 0, 10, height=9)  # 10 and 90 px
    parts = [{**dict.fromkeys(ev.FAILURES, False), **ev.image_mask_parts(gt_small, gt_small)},  # IoU 1
             {**dict.fromkeys(ev.FAILURES, False), **ev.image_mask_parts(np.zeros((10, 10), bool), gt_big)}]  # 0
    m = ev.aggregate(rows, parts)["segmentation/image"]
    assert m["giou"] == 0.5  # mean of 1 and 0
    assert m["ciou"] == pytest.approx(10 / 100)  # (10 + 0) / (10 + 90)


def test_j_and_f_average_per_video_then_over_videos():
    rows = [row("segmentation", {}, "video") for _ in range(2)]
    a = square(20, 5, 5, 5)
    far = square(20, 12, 12, 5)
    video_1 = ev.video_mask_parts({0: a, 1: far}, {0: a, 1: a})  # frame 0 perfect, frame 1 J = F = 0
    video_2 = ev.video_mask_parts({}, {3: np.zeros((20, 20), bool)})  # missing frame = empty; GT empty: 1
    assert video_1 == {"j": [1.0, 0.0], "f": [1.0, 0.0]} and video_2 == {"j": [1.0], "f": [1.0]}
    ok = dict.fromkeys(ev.FAILURES, False)
    m = ev.aggregate(rows, [{**ok, **video_1}, {**ok, **video_2}])["segmentation/video"]
    assert m["j"] == m["f"] == m["j&f"] == 0.75  # per video 0.5 and 1; pooled frames would give 2/3


# -----------------------------------------------------------------------------
# SAM2 end to end on CPU (random weights, 256 pixels: plumbing, not mask quality)

SEG_IMAGE = {"boxes": [250, 250, 750, 750], "positive_points": [[500, 500], [400, 450], [600, 550]],
             "negative_points": [[50, 50], [950, 950], [50, 950]]}


@pytest.fixture(scope="module")
def sam2():
    return ev.build_sam2(image_size=256)


def test_sam2_image_rows(sam2, tmp_path):
    from PIL import Image
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[12:36, 16:48] = 255
    Image.fromarray(image).save(tmp_path / "square.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    gt = np.zeros((48, 64), dtype=bool)
    gt[12:36, 16:48] = True
    seg = lambda path: row("segmentation", SEG_IMAGE, path=path, segmentation_output=rle_encode(gt))
    mask = ev.sam2_image_mask(sam2, image, ev.segmentation_answer(SEG_IMAGE, video=False))
    assert mask.shape == (48, 64) and mask.dtype == bool

    rows = [seg("square.png"), seg("square.png"), seg("absent.png"), seg("broken.png")]
    m = ev.compute_metrics(rows, [answer(SEG_IMAGE), "<answer>{}</answer>", answer(SEG_IMAGE), answer(SEG_IMAGE)],
                           media_root=str(tmp_path), sam2=sam2)
    assert m["all"] == {"rows": 4, "parse_failed": 1, "media_missing": 2, "too_long": 0, "sam2_failed": 0,
                        "note": ev.RANDOM_SAM2_NOTE}
    seg_m = m["segmentation/image"]
    assert 0.0 <= seg_m["giou"] <= 0.25 and 0.0 <= seg_m["ciou"] <= 0.25  # three of four rows score 0

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    failing = {**sam2, "image": type("Broken", (), {"set_image": broken})()}
    m = ev.compute_metrics(rows[:1], [answer(SEG_IMAGE)], media_root=str(tmp_path), sam2=failing)
    assert (m["all"]["sam2_failed"], m["segmentation/image"]["giou"]) == (1, 0.0)


def write_video(path, frames, fps):
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_sam2_video_row(sam2, tmp_path):
    frames, gts = [], {}
    for i in range(6):
        frame = np.zeros((48, 64, 3), dtype=np.uint8)
        frame[12:36, 4 + 4 * i:28 + 4 * i] = 255
        frames.append(frame)
        gts[i] = frame[..., 0] > 0
    write_video(tmp_path / "clip.mp4", frames, fps=4)
    (tmp_path / "frames").mkdir()
    n, fps = ev.write_frames(str(tmp_path / "clip.mp4"), str(tmp_path / "frames"))
    assert (n, fps) == (6, 4.0)
    (tmp_path / "copy").mkdir()
    assert ev.write_frames(str(tmp_path / "frames"), str(tmp_path / "copy")) == (6, None)  # a frame folder

    gt_rles = {str(i): rle_encode(gts[i]) for i in (0, 2, 4)} | {"9": rle_encode(np.zeros((48, 64), bool))}
    video_row = row("segmentation", SEG_IMAGE, "video", path="clip.mp4", fps=4, segmentation_output=gt_rles)
    masks = ev.sam2_video_masks(sam2, str(tmp_path / "frames"), key_frame=2,
                                answer=ev.segmentation_answer({**SEG_IMAGE, "time": 0.5}, video=True))
    assert sorted(masks) == list(range(6)) and all(m.shape == (48, 64) and m.dtype == bool for m in masks.values())

    parts = [ev.score_row(video_row, answer({**SEG_IMAGE, "time": 0.5}), str(tmp_path), sam2),
             ev.score_row(video_row, answer(SEG_IMAGE), str(tmp_path), sam2)]  # no keyframe: a failed parse
    assert len(parts[0]["j"]) == len(parts[0]["f"]) == 4 and not any(parts[0][flag] for flag in ev.FAILURES)
    # frame 9 is past the video: an empty prediction, against an empty annotation: 1 by DAVIS's rule
    assert (parts[0]["j"][3], parts[0]["f"][3]) == (1.0, 1.0)
    m = ev.aggregate([video_row] * 2, parts)["segmentation/video"]
    assert (m["rows"], m["parse_failed"]) == (2, 1) and 0.0 <= m["j&f"] <= 0.5


# -----------------------------------------------------------------------------
# the driver: generation, records, resume

def test_resumed_evaluation_skips_finished_rows_and_gives_the_same_metrics(suite_dir, model_dir, tmp_path,
                                                                            monkeypatch, capsys):
    with open(suite_dir / "eval.json") as f:
        rows = json.load(f)
    rows.append({**rows[0], "path": "media/absent.png", "problem_id": 13})
    with open(tmp_path / "eval.json", "w") as f:
        json.dump(rows, f)
    args = [f"--model={model_dir}", f"--data={tmp_path / 'eval.json'}", f"--media_root={suite_dir}",
            f"--out_dir={tmp_path / 'out'}", "--max_new_tokens=8", "--batch_size=2", "--sam2_image_size=256"]
    generated = []
    real = ev.generate_batch

    def counting(model, processor, batch, *rest):
        generated.extend(row["problem_id"] for row in batch)
        return real(model, processor, batch, *rest)
    monkeypatch.setattr(ev, "generate_batch", counting)

    ev.main(args)
    first = json.loads((tmp_path / "out" / "eval.metrics.json").read_text())["metrics"]
    assert generated == [11, 12, 10]  # longest prompt first; the row without media is not generated, and is counted
    assert first["all"]["rows"] == 4 and first["all"]["media_missing"] == 1
    assert first["all"]["note"] == ev.RANDOM_SAM2_NOTE and "segmentation/image" in first
    table = capsys.readouterr().out
    assert "spatial grounding" in table and ev.RANDOM_SAM2_NOTE in table

    shard = tmp_path / "out" / "eval" / "rank0.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text(lines[0] + "\n" + lines[1][:25])  # row 11 done; row 12's record cut short by a crash
    generated.clear()
    ev.main(args)
    assert generated == [12, 10]
    assert json.loads((tmp_path / "out" / "eval.metrics.json").read_text())["metrics"] == first


def test_ranks_get_equal_tokens_not_equal_rows():
    """A file of 4 long video rows then 12 short image rows on 2 ranks: dealing rows round-robin gives one rank
    twice the other's tokens; assign_rows gives every row to one rank and loads within one row of each other."""
    costs = {i: 20000 if i < 4 else 1500 for i in range(16)}
    costs.update({1: 30000, 5: 2500})
    shares = [ev.assign_rows(costs, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(16))
    loads = [sum(costs[i] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(costs.values())
    round_robin = [sum(costs[i] for i in range(rank, 16, 2)) for rank in range(2)]
    assert abs(round_robin[0] - round_robin[1]) > 2 * abs(loads[0] - loads[1])
    assert all(costs[a] >= costs[b] for share in shares for a, b in zip(share, share[1:]))  # longest first


def test_token_batches_keep_the_kv_cache_within_batch_tokens():
    lengths = {0: 900, 1: 800, 2: 300, 3: 200, 4: None, 5: 100, 6: 100}  # 4: media missing, never generated
    order = sorted(lengths, key=lambda i: -(lengths[i] or 0))
    batches = ev.token_batches(order, lengths, batch_size=3, batch_tokens=4000, max_new_tokens=100)
    assert sorted(i for b in batches for i in b) == sorted(lengths)
    for batch in batches:
        rows = [i for i in batch if lengths[i] is not None]
        assert len(batch) <= 3
        assert len(batch) == 1 or memory.kv_cache_slots(len(rows), 1, max(lengths[i] for i in rows), 100) <= 4000
    assert batches == [[0, 1], [2, 3, 5], [6, 4]]  # a third row would make 4 rows (powers of 2) of 900 + 192 slots
    assert ev.token_batches(order, lengths, 3, 0, 100) == [order[:3], order[3:6], order[6:]]  # no cap


def test_prediction_mask_is_compared_at_the_annotation_size():
    pred = np.zeros((4, 6), dtype=bool)
    pred[1:3, 2:4] = True
    resized = ev.at_size(pred, (8, 12))
    assert resized.shape == (8, 12) and resized.sum() == 16 and resized[2:6, 4:8].all()


# -----------------------------------------------------------------------------
# answers read as the release's Evaluation/Eval/eval_bench.py reads them

def release_extract(text):
    """eval_bench's extract_answer, restated: the first <answer>...</answer> of the raw text, stripped."""
    match = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
    return match.group(1).strip() if match else text.strip()


def release_eval_accuracy(response, ground_truth, problem_type):
    """eval_bench's accuracy_only, restated for the types scored as it scores them: (accuracy, components). Its
    box IoU crashes on every valid pair (it unpacks min(x2, X2) into two names): here it is the IoU it means."""
    from mathruler.grader import grade_answer
    from math_verify import parse, verify
    from rouge_score import rouge_scorer
    ans = release_extract(response) or response.strip()
    gt = release_extract(ground_truth) or ground_truth

    def numbers(x, n):
        try:
            return isinstance(x, list) and len(x) == n and [float(v) for v in x]
        except (TypeError, ValueError):
            return False

    def iou_1d(a, b):
        a, b = numbers(a, 2), numbers(b, 2)
        if not a or not b:
            return 0.0
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        union = max(a[1], b[1]) - min(a[0], b[0])
        return inter / union if union > 1e-12 else 0.0

    def iou_2d(a, b):
        a, b = numbers(a, 4), numbers(b, 4)
        if not a or not b:
            return 0.0
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
        return inter / union if union > 1e-12 else 0.0

    def load(s):
        try:
            return json.loads(s)
        except ValueError:
            return None
    if problem_type == "numerical":
        try:
            return float(round(float(ans.replace(",", "")), 2) == round(float(gt.replace(",", "")), 2)), {}
        except ValueError:
            return 0.0, {}
    if problem_type == "OCR":
        ref, hyp = gt.split(), ans.split()
        d = [[i + j if not i * j else 0 for j in range(len(hyp) + 1)] for i in range(len(ref) + 1)]
        for i, j in itertools.product(range(1, len(ref) + 1), range(1, len(hyp) + 1)):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]))
        return max(0.0, min(1.0, 1.0 - d[-1][-1] / max(1, len(ref)))), {}
    if problem_type == "open-ended":
        s = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(gt, ans)
        return (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3, {}
    if problem_type == "math":
        try:
            return float(bool(verify(parse(gt), parse(ans)))), {}
        except Exception:  # noqa: BLE001  (eval_bench: grade_answer when math-verify raises)
            return float(grade_answer(ans, gt)), {}
    pred, truth = load(ans), load(gt)
    if problem_type == "temporal grounding":
        tiou = iou_1d(pred.get("time") if isinstance(pred, dict) else None, truth["time"])
        return tiou, {"tiou": tiou}
    if problem_type == "spatial grounding":
        iou = iou_2d(pred.get("boxes") if isinstance(pred, dict) else None, truth["boxes"])
        return iou, {"iou": iou}
    if problem_type == "spatial-temporal grounding":
        if not isinstance(pred, dict):
            return 0.0, {"tiou": 0.0, "miou_inter": 0.0}
        tiou = iou_1d(pred.get("time"), truth["time"])
        boxes = pred.get("boxes") if isinstance(pred.get("boxes"), dict) else {}
        common = [k for k in boxes if k in truth["boxes"]]
        miou = sum(iou_2d(boxes[k], truth["boxes"][k]) for k in common) / len(common) if common else 0.0
        return 0.5 * tiou + 0.5 * miou, {"tiou": tiou, "miou_inter": miou}
    if problem_type == "tracking":
        boxes = pred.get("boxes") if isinstance(pred, dict) and isinstance(pred.get("boxes"), dict) else {}
        miou = sum(iou_2d(boxes.get(k, []), box) for k, box in truth["boxes"].items()) / len(truth["boxes"])
        return miou, {"miou_gt": miou}
    raise ValueError(problem_type)


def release_file_metrics(rows, responses):
    """eval_bench's accumulate_metrics + finalize_metrics, restated: per type "acc" and per component mean and
    R@0.3/0.5/0.7 (>=)."""
    sums = defaultdict(list)
    for r, response in zip(rows, responses):
        acc, components = release_eval_accuracy(response, r["solution"], r["problem_type"])
        sums[f"{r['problem_type']}/acc"].append(acc)
        for name, value in components.items():
            sums[f"{r['problem_type']}/{name}/mean"].append(value)
            for t in (0.3, 0.5, 0.7):
                sums[f"{r['problem_type']}/{name}/R@{t}"].append(float(value >= t))
    return {key: sum(values) / len(values) for key, values in sums.items()}


GT_BOXES = {"3": [100, 100, 300, 300], "4": [120, 100, 320, 300], "5": [140, 100, 340, 300]}
EVAL_CASES = {  # problem_type: (ground truth, responses of every quality)
    "numerical": ("1,234.5", ["<answer>1234.5</answer>", "< answer >1234.5</ answer >", "1,234.50", "<answer>12",
                              "<think>1234.5</think><answer></answer>", "<answer>1234.504</answer>x<answer>9</answer>"]),
    "OCR": ("in / out", ["<answer>in / out</answer>", "<answer>in/out</answer>", "< answer >in / out< / answer >",
                         "in / out", "<answer>\n in / out \n</answer>", "<answer>out / in</answer>"]),
    "open-ended": ("a red circle on the left", ["<answer>a red circle</answer>", "<answer >red circles, left</answer >",
                                                "The circle is red.", "<answer>a/red circle</answer>"]),
    "math": ("\\frac{1}{2}", ["<answer>0.5</answer>", "<answer>$\\frac{1}{2}$</answer>", "< answer >1/2</answer>",
                              "<answer>2</answer>"]),
    "temporal grounding": ('{"time": [2.0, 6.0]}', [
        '<answer>{"time": [3, 6]}</answer>', '<answer>{"time": ["2", "5"]}</answer>', '{"time": [1, 4]}',
        '< answer >{"time": [2, 6]}< / answer >', '<answer>{"time": [2, 6</answer>', '<answer>{"time": 4}</answer>',
        '<answer>{"time": [7, 9]}</answer>']),
    "spatial grounding": ('{"boxes": [100, 100, 300, 300]}', [
        '<answer>{"boxes": [100, 100, 300, 300]}</answer>', '<answer>{"boxes": [150, 100, 300, 300]}</answer>',
        '< answer >{"boxes": [100, 100, 300, 300]}</answer>', '<answer>{"boxes": [1, 2, 3]}</answer>',
        '<answer>[100, 100, 300, 300]</answer>', '<answer>{"boxes": ["100", "100", "200", "300"]}</answer>']),
    "spatial-temporal grounding": (json.dumps({"time": [3.0, 5.5], "boxes": GT_BOXES}), [
        answer({"time": [3, 5], "boxes": GT_BOXES}),
        answer({"time": [3, 5], "boxes": {"3": [100, 100, 200, 300], "9": [0, 0, 1, 1]}}),
        answer({"time": "3-5", "boxes": GT_BOXES}),  # a malformed span: the boxes still score
        answer({"time": [3, 5], "boxes": [100, 100, 300, 300]}),  # boxes not a map: the span still scores
        answer({"boxes": {"4": [120, 100, 320, 300], "5": "none"}}),
        '< answer >' + json.dumps({"time": [3, 5], "boxes": GT_BOXES}) + '</answer>', "<answer>[]</answer>"]),
    "tracking": (json.dumps({"boxes": GT_BOXES}), [
        answer({"boxes": GT_BOXES}), answer({"boxes": {"3": [100, 100, 300, 300]}}),
        answer({"boxes": [GT_BOXES["3"]]}), json.dumps({"boxes": GT_BOXES}), "<answer>{}</answer>"]),
}


def eval_case_rows():
    rows, responses = [], []
    for problem_type, (truth, cases) in EVAL_CASES.items():
        data_type = "video" if "temporal" in problem_type or problem_type == "tracking" else "image"
        for response in cases:
            rows.append({"problem": "q", "problem_type": problem_type, "data_type": data_type,
                         "solution": f"<answer>{truth}</answer>", "problem_id": len(rows)})
            responses.append(response)
    return rows, responses


def test_rows_score_as_eval_bench_scores_them():
    """Per row: the answer from the raw response (no tag normalisation) and eval_bench's values to the bit,
    spatial-temporal grounding's span and boxes each on its own."""
    for r, response in zip(*eval_case_rows()):
        acc, components = release_eval_accuracy(response, r["solution"], r["problem_type"])
        parts = ev.score_row(r, response)
        if r["problem_type"] in ev.QA_TYPES:
            assert parts["accuracy"] == acc, (r["problem_type"], response)
        elif r["problem_type"] == "spatial-temporal grounding":
            assert (parts["tiou"], parts["box_iou"]) == (components["tiou"], components["miou_inter"]), response
        elif r["problem_type"] == "tracking":
            assert ev.mean(parts["frame_ious"]) == components["miou_gt"], response
        else:
            assert parts["tiou" if "temporal" in r["problem_type"] else "iou"] == acc, response


def test_files_score_as_eval_bench_scores_them():
    rows, responses = eval_case_rows()
    ours, theirs = ev.compute_metrics(rows, responses), release_file_metrics(rows, responses)
    pairs = [("temporal grounding", "mean_tiou", "tiou/mean"), ("spatial grounding", "mean_iou", "iou/mean"),
             ("spatial grounding", "acc@0.5", "iou/R@0.5"), ("spatial-temporal grounding", "mean_tiou", "tiou/mean"),
             ("spatial-temporal grounding", "mean_box_iou", "miou_inter/mean"), ("tracking", "ao", "miou_gt/mean"),
             ("tracking", "release_video_r@0.5", "miou_gt/R@0.5")]
    pairs += [("temporal grounding", f"r@{t}", f"tiou/R@{t}") for t in ev.RECALL_THRESHOLDS]
    pairs += [(t, "accuracy", "acc") for t in ("numerical", "OCR", "open-ended", "math")]
    for task, ours_key, their_key in pairs:
        assert ours[task][ours_key] == theirs[f"{task}/{their_key}"], (task, ours_key)
    # what the old reading got wrong: an exact "in / out" scores 1, a "< answer >" tag reads as untagged text
    assert ev.score_row(rows[6], "<answer>in / out</answer>")["accuracy"] == 1.0
    assert ev.score_row(rows[0], "< answer >1234.5</ answer >") == {**dict.fromkeys(ev.FAILURES, False),
                                                                    "parse_failed": True, "accuracy": 0.0}


def test_documented_differences_from_eval_bench():
    mc = {**row("multiple choice", None), "solution": "<answer>B</answer>", "options": ["A. a", "B. b"]}
    assert ev.score_row(mc, "Because of the colour")["accuracy"] == 0.0  # eval_bench reads "B" from "Because"
    assert ev.score_row(mc, "<answer>(B)</answer>")["accuracy"] == 1.0  # grade_answer, as training scores it
    zero = {**row("regression", None), "solution": "<answer>0</answer>"}
    assert ev.score_row(zero, "<answer>0</answer>")["accuracy"] == 1.0  # eval_bench: a 0 ground truth scores 0
