"""eval.py: every metric against hand-computed values; SAM2 end to end on CPU at small resolution."""
import json

import numpy as np
import pytest

import eval as ev
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
    assert generated == [10, 11, 12]  # the row without media is not generated, and is counted
    assert first["all"]["rows"] == 4 and first["all"]["media_missing"] == 1
    assert first["all"]["note"] == ev.RANDOM_SAM2_NOTE and "segmentation/image" in first
    table = capsys.readouterr().out
    assert "spatial grounding" in table and ev.RANDOM_SAM2_NOTE in table

    shard = tmp_path / "out" / "eval" / "rank0.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text(lines[0] + "\n" + lines[1][:25])  # row 0 done; row 1's record cut short by a crash
    generated.clear()
    ev.main(args)
    assert generated == [11, 12]
    assert json.loads((tmp_path / "out" / "eval.metrics.json").read_text())["metrics"] == first


def test_prediction_mask_is_compared_at_the_annotation_size():
    pred = np.zeros((4, 6), dtype=bool)
    pred[1:3, 2:4] = True
    resized = ev.at_size(pred, (8, 12))
    assert resized.shape == (8, 12) and resized.sum() == 16 and resized[2:6, 4:8].all()
