"""rewards.py: hand-computed values for every branch of SPEC 4, equivalence with the release's regexes and with
rouge_score, property tests over arbitrary text, hostile JSON values, and the time bound on adversarial math."""
import json
import math
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

import rewards
from rewards import score

E = math.exp(1.0)


def tagged(answer, think="I look carefully."):
    return f"<think>{think}</think><answer>{answer}</answer>"


def parts(response, gt, problem_type, data_type="image", **kw):
    return score(response, gt, problem_type, data_type, **kw)[1]


def acc(answer, gt, problem_type, data_type="image"):
    return parts(tagged(answer), gt, problem_type, data_type)["accuracy"]


# -----------------------------------------------------------------------------
# normalisation, format, extraction (SPEC 4.1-4.3)

RELEASE_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
SPEC_FORMAT = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)
SPACES = " \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"


def test_normalize_tags_examples():
    assert rewards.normalize_tags("< think >a b</ think >\n< answer > B </answer>") == \
        "<think>a b</think><answer>B</answer>"
    assert rewards.normalize_tags("x / y and a  b") == "x/y and a  b"  # it also touches the answer text
    assert rewards.normalize_tags("<  / answer\n>") == "</answer>"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=SPACES + "<>/ab") | st.text())
def test_normalize_tags_equals_release_regex(text):
    assert rewards.normalize_tags(text) == RELEASE_TAG_SPACE.sub(r"\1", text)


def test_format_reward_examples():
    assert rewards.format_reward("<think>x</think><answer>B</answer>") == 1.0
    assert rewards.format_reward("\n <think>\nx\n</think>\n\n<answer>B</answer>\n") == 1.0
    assert rewards.format_reward("<think></think><answer></answer>") == 1.0
    assert rewards.format_reward("<think>x</think><answer>1</answer><answer>2</answer>") == 1.0  # release regex
    assert rewards.format_reward("<answer>B</answer>") == 0.0
    assert rewards.format_reward("<think>x</think><answer>B</answer> done") == 0.0
    assert rewards.format_reward("x<think>x</think><answer>B</answer>") == 0.0
    assert rewards.format_reward("<think>x<answer>B</answer>") == 0.0


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\xa0", "x", "<", ">", "/"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join) | st.text())
def test_format_reward_equals_spec_regex(text):
    assert rewards.format_reward(text) == float(SPEC_FORMAT.fullmatch(text) is not None)


def test_extract_answer():
    assert rewards.extract_answer("<think>a</think><answer>  B \n</answer>") == "B"
    assert rewards.extract_answer("<answer>x <answer>y</answer> z</answer>") == "x <answer>y"
    assert rewards.extract_answer("<answer>unclosed") is None
    assert rewards.extract_answer("no tags") is None
    assert rewards.extract_answer("<answer></answer>") == ""


# -----------------------------------------------------------------------------
# accuracy per problem_type, and the overall (SPEC 4.5, 4.6)

def test_multiple_choice_tags_and_ground_truth_wrapping():
    for gt in ("B", "<answer>B</answer>", " <answer> B </answer> "):
        assert parts(tagged("B"), gt, "multiple choice") == {
            "overall": 1.5, "format": 1.0, "accuracy": 1.0, "structure_reward": 0.5}
    spaced = "< think >hmm</ think > < answer > B </ answer >"
    assert score(spaced, "B", "multiple choice", "video")[0] == 1.5
    assert score(tagged("C"), "B", "multiple choice", "image")[0] == pytest.approx(0.6)
    assert score(tagged("b"), "B", "multiple choice", "image")[0] == 1.5
    # release: no answer tag -> accuracy on the whole response; format 0 removes the structure bonus too
    assert parts("B", "B", "multiple choice") == {
        "overall": 0.9, "format": 0.0, "accuracy": 1.0, "structure_reward": 0.0}
    # grade_answer (in the worker) accepts a bracketed letter, as the release does
    assert acc("(B)", "B", "multiple choice") == 1.0
    assert acc("B. the blue one", "B", "multiple choice") == 0.0


def test_letter_fast_path_agrees_with_grade_answer():
    for pred, gt in (("C", "B"), ("b", "B"), ("e", "E"), ("I", "i"), ("x", "y")):
        assert rewards.symbolic_equal("choice", pred, gt) == (pred.lower() == gt.lower())


def test_empty_answer_tag_scores_the_whole_response():
    response = "<think>a red circle</think><answer></answer>"
    p = parts(response, "a red circle", "open-ended")
    assert p["format"] == 1.0 and p["structure_reward"] == 0.5
    assert p["accuracy"] == pytest.approx(rewards.rouge_accuracy(response, "a red circle")) and p["accuracy"] > 0


def test_numerical():
    assert acc("3.14159", "3.14", "numerical") == 1.0
    assert acc("1,000", "1000", "numerical") == 1.0
    assert acc("3.2", "3.14", "numerical") == 0.0
    assert acc("three", "3", "numerical") == 0.0
    assert acc("nan", "nan", "numerical") == 0.0
    assert acc("inf", "inf", "numerical") == 1.0  # release: float() parses it and round(inf) == inf


def release_mra(pred, gt):
    """The release's float32 torch formula, for comparison."""
    rel = torch.abs(torch.tensor(pred) - torch.tensor(gt)) / (torch.abs(torch.tensor(gt)) + 1e-8)
    return (rel < 1 - torch.arange(0.5, 0.95 + 0.025, 0.05)).float().mean().item()


def test_regression_mean_relative_accuracy():
    assert acc("8", "10", "regression") == 0.6  # rel 0.2 < 1 - t for t in 0.50..0.75; t = 0.80 is a float32 tie
    assert acc("9.5", "10", "regression") == 1.0
    assert acc("6", "10", "regression") == 0.2
    assert acc("5", "10", "regression") == 0.0
    assert acc("0", "0", "regression") == 1.0
    assert acc("1", "0", "regression") == 0.0
    assert acc("x", "10", "regression") == 0.0
    for gt in (10.0, 4.0, 0.5, 3.0, 0.0, -7.0):
        for pred in [gt * k / 20 for k in range(41)] + [gt + 0.05 * k for k in range(-5, 6)]:
            expected = release_mra(pred, gt)
            assert rewards.mean_relative_accuracy(pred, gt) == pytest.approx(expected, abs=1e-6), (pred, gt)


def test_ocr_word_error_rate():
    assert acc("the cat sit", "the cat sat", "OCR") == pytest.approx(2 / 3)
    assert acc("the cat", "the cat sat", "OCR") == pytest.approx(2 / 3)
    assert acc("the big cat sat", "the cat sat", "OCR") == pytest.approx(2 / 3)
    assert acc("a b c d e f g", "x", "OCR") == 0.0
    assert rewards.ocr_accuracy("", "the cat sat") == 0.0
    # release: tag normalisation also removes the spaces around '/' in the answer
    assert acc("a / b", "a / b", "OCR") == 0.0


def test_open_ended_rouge():
    assert acc("A red circle.", "a red circle", "open-ended") == 1.0
    # ROUGE-1 F 2/3, ROUGE-2 F 1/2 (1 of 3 reference bigrams), ROUGE-L F 2/3
    assert acc("a b", "a b c d", "open-ended") == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert acc("dogs running", "dog runs", "open-ended") == 1.0  # Porter stems
    assert acc("", "a b", "open-ended") == 0.0


ROUGE_REFERENCE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
WORDS = st.sampled_from("a the cat cats running runs ran dog dogs red x1 2 Circle.".split())


@settings(max_examples=200, deadline=None)
@given(st.lists(WORDS, max_size=25).map(" ".join) | st.text(), st.lists(WORDS, max_size=25).map(" ".join) | st.text())
def test_rouge_equals_rouge_score(pred, ref):
    s = ROUGE_REFERENCE.score(ref, pred)
    assert rewards.rouge_accuracy(pred, ref) == (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3


def test_math(monkeypatch):
    assert acc("\\frac{1}{2}", "0.5", "math") == 1.0
    assert acc("13", "12", "math") == 0.0
    assert acc("+5", "5", "math") == 0.0  # math-verify's verdict (release)
    # the fast path agrees with math-verify and does not need the worker
    for pred, gt in (("12", "12.0"), ("-0", "0"), ("012", "12"), ("3.50", "3.5")):
        assert rewards.symbolic_equal("math", pred, gt)
    monkeypatch.setattr(rewards, "symbolic_equal", lambda *a: pytest.fail("fast path missed"))
    for pred, gt in (("12", "12.0"), ("-0", "0"), ("012", "12"), ("3.50", "3.5")):
        assert acc(pred, gt, "math") == 1.0


def test_temporal_grounding():
    p = parts(tagged('{"time": [1, 3]}'), '{"time": [2, 4]}', "temporal grounding", "video")
    assert p["accuracy"] == pytest.approx(1 / 3) and p["structure_reward"] == 0.5
    assert p["overall"] == pytest.approx(0.9 / 3 + 0.1 + 0.5)
    assert acc('{"time": ["1", "3"]}', '{"time": [1, 3]}', "temporal grounding") == 1.0  # numeric strings count
    assert acc('{"time": [3, 1]}', '{"time": [1, 3]}', "temporal grounding") == 0.0
    assert acc('{"time": [2, 2]}', '{"time": [2, 2]}', "temporal grounding") == 0.0  # empty union
    p = parts(tagged('{"time": [1, 2, 3]}'), '{"time": [1, 3]}', "temporal grounding", "video")
    assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.0


def test_spatial_grounding():
    p = parts(tagged('{"boxes": [0, 0, 10, 10]}'), '<answer>{"boxes": [5, 5, 15, 15]}</answer>', "spatial grounding")
    assert p["accuracy"] == pytest.approx(25 / 175) and p["structure_reward"] == 0.5
    p = parts(tagged('{"boxes": [0, 0, 10]}'), '{"boxes": [0, 0, 10, 10]}', "spatial grounding")
    assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.0
    assert acc('{"boxes": ["0", "0", "10", "10"]}', '{"boxes": [0, 0, 10, 10]}', "spatial grounding") == 1.0


def test_spatial_temporal_grounding():
    pred = {"time": [0, 2], "boxes": {"0": [0, 0, 10, 10], "1": [0, 0, 10, 10]}}
    gt = {"time": [0, 4], "boxes": {"0": [0, 0, 10, 10], "2": [0, 0, 5, 5]}}
    p = parts(tagged(json.dumps(pred)), json.dumps(gt), "spatial-temporal grounding", "video")
    # tIoU 1/2; box IoU over the shared second "0" is 1 -> 0.75. Structure: shape 0.25 + 0.25 x 1/2 of gt seconds
    assert p["accuracy"] == pytest.approx(0.75) and p["structure_reward"] == pytest.approx(0.375)
    # a time list of the wrong length loses the shape part but keeps the overlap part
    pred["time"] = [0]
    p = parts(tagged(json.dumps(pred)), json.dumps(gt), "spatial-temporal grounding", "video")
    assert p["accuracy"] == pytest.approx(0.5) and p["structure_reward"] == pytest.approx(0.125)


def test_tracking():
    gt = {"boxes": {"1": [0, 0, 10, 10], "2": [0, 0, 10, 10]}}
    p = parts(tagged('{"boxes": {"1": [0, 0, 10, 10], "7": [1, 1, 2, 2]}}'), json.dumps(gt), "tracking", "video")
    assert p["accuracy"] == pytest.approx(0.5) and p["structure_reward"] == pytest.approx(0.25 + 0.25 * 0.5)
    p = parts(tagged('{"boxes": {"1": [0, 0, 10, 10], "2": "bad"}}'), json.dumps(gt), "tracking", "video")
    assert p["accuracy"] == pytest.approx(0.5) and p["structure_reward"] == pytest.approx(0.25)  # overlap only
    p = parts(tagged('{"boxes": {}}'), '{"boxes": {}}', "tracking", "video")
    assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.25


def seg(box, pos, neg, time=None):
    obj = {"boxes": box, "positive_points": pos, "negative_points": neg}
    if time is not None:
        obj["time"] = time
    return json.dumps(obj)


POS = [[100, 100], [150, 120], [200, 180]]
NEG = [[10, 10], [900, 900], [500, 50]]


def test_point_matching_is_optimal_one_to_one():
    assert rewards.point_set_similarity([[200, 0], [0, 0], [100, 0]], [[0, 0], [100, 0], [200, 0]]) == 1.0
    # best assignment 10->20, 0->0, 300->200 (sum 110); matching in order would cost 10 + 20 + 100
    sim = rewards.point_set_similarity([[10, 0], [0, 0], [300, 0]], [[0, 0], [20, 0], [200, 0]])
    assert sim == pytest.approx(math.exp(-(110 / 3) ** 2 / (2 * 50 ** 2)))
    assert rewards.point_set_similarity([[0, 0], [1, 1]], [[0, 0], [1, 1]]) == 0.0
    assert rewards.point_set_similarity([[0, 0], [1, 1], [2, "a"]], [[0, 0], [1, 1], [2, 2]]) == 0.0


def test_segmentation_image():
    shifted = [[x + 30, y + 40] for x, y in NEG]  # every negative point 50 away
    p = parts(tagged(seg([0, 0, 10, 10], POS[::-1], shifted)), seg([0, 0, 10, 10], POS, NEG), "segmentation")
    assert p["accuracy"] == pytest.approx(0.5 + 0.25 + 0.25 * math.exp(-0.5)) and p["structure_reward"] == 0.5
    for bad_pos in (POS[:2], POS + [[1, 1]], [[1, 2, 3]] + POS[1:], [["a", 1]] + POS[1:]):
        p = parts(tagged(seg([0, 0, 10, 10], bad_pos, NEG)), seg([0, 0, 10, 10], POS, NEG), "segmentation")
        assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.0


def test_segmentation_video():
    gt = seg([0, 0, 10, 10], POS, NEG, time=1)
    p = parts(tagged(seg([0, 0, 10, 10], POS, NEG, time=3)), gt, "segmentation", "video")
    assert p["accuracy"] == pytest.approx(0.3 + 0.3 / E + 0.2 + 0.2) and p["structure_reward"] == 0.5
    p = parts(tagged(seg([0, 0, 10, 10], POS, NEG, time="3")), gt, "segmentation", "video")
    assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.0  # the keyframe must be a JSON number
    p = parts(tagged(seg([0, 0, 10, 10], POS, NEG)), gt, "segmentation", "video")
    assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.0
    p = parts(tagged(seg([0, 0, 10, 10], POS, NEG, time=1)), gt, "segmentation", "video-image")
    assert p["accuracy"] == 0.0 and p["structure_reward"] == 0.0


def test_structure_needs_format_and_a_tag():
    answer = '{"boxes": [0, 0, 10, 10]}'
    assert parts(f"<answer>{answer}</answer>", answer, "spatial grounding") == {
        "overall": 0.9, "format": 0.0, "accuracy": 1.0, "structure_reward": 0.0}
    assert parts(answer, answer, "spatial grounding")["structure_reward"] == 0.0
    assert parts(tagged(""), answer, "spatial grounding")["structure_reward"] == 0.0
    assert parts(tagged("x"), "x", "counting")["structure_reward"] == 0.5  # release: unknown types get the bonus
    assert parts(tagged("x"), "x", "counting")["accuracy"] == 0.0


def test_format_weight():
    overall, p = score("B", "B", "multiple choice", "image", format_weight=0.5)
    assert overall == 0.5 and p["overall"] == 0.5
    assert rewards.compute_score([{"response": tagged("C"), "ground_truth": "B", "problem_type": "multiple choice",
                                   "data_type": "image"}], format_weight=0.3)[0]["overall"] == pytest.approx(0.8)


# -----------------------------------------------------------------------------
# the batch interface

def test_compute_score_interface():
    items = [{"response": tagged("B"), "ground_truth": "<answer>B</answer>", "problem_type": "multiple choice",
              "data_type": "image", "problem": "q", "problem_id": 1},
             {"response": None, "ground_truth": "3", "problem_type": "numerical", "data_type": "image"}]
    results = rewards.compute_score(items)
    assert results == [{"overall": 1.5, "format": 1.0, "accuracy": 1.0, "structure_reward": 0.5},
                       {"overall": 0.0, "format": 0.0, "accuracy": 0.0, "structure_reward": 0.0}]
    with pytest.raises(TypeError, match="list of dicts"):
        rewards.compute_score(items[0])
    with pytest.raises(TypeError, match="item 0: field 'response'"):
        rewards.compute_score([{**items[0], "response": 5}])


# -----------------------------------------------------------------------------
# unbreakable: hostile JSON values, arbitrary text, adversarial math

HOSTILE_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e308", "1" + "0" * 400, "1" + "0" * 5000, '"abc"',
                   '"12"', "null", "true", "[1]", "{}", "-5"]


def hostile_answers(value):
    pair, box = f"[{value}, {value}]", f"[{value}, 0, {value}, 10]"
    pts = f"[[{value}, 1], [2, {value}], [3, 3]]"
    return [f'{{"time": {pair}}}', f'{{"boxes": {box}}}', f'{{"time": {pair}, "boxes": {{"1": {box}}}}}',
            f'{{"boxes": {{"1": {box}, "2": {box}}}}}',
            f'{{"boxes": {box}, "positive_points": {pts}, "negative_points": {pts}, "time": {value}}}', value]


def test_hostile_json_values_score_in_range():
    gts = {"temporal grounding": '{"time": [1, 5]}', "spatial grounding": '{"boxes": [0, 0, 10, 10]}',
           "spatial-temporal grounding": '{"time": [1, 2], "boxes": {"1": [0, 0, 10, 10]}}',
           "tracking": '{"boxes": {"1": [0, 0, 10, 10]}}', "segmentation": seg([0, 0, 10, 10], POS, NEG, time=1),
           "regression": "10", "numerical": "10"}
    for value in HOSTILE_NUMBERS:
        for answer in hostile_answers(value):
            for problem_type, gt in gts.items():
                for data_type in ("image", "video"):
                    for response in (tagged(answer), answer):
                        # ... and the hostile value on the ground-truth side too
                        for a, g in ((response, gt), (tagged(gt), answer)):
                            overall, p = score(a, g, problem_type, data_type)
                            assert 0.0 <= overall <= 1.5 and all(0.0 <= v <= 1.5 for v in p.values()), (a, g)
                            assert 0.0 <= p["accuracy"] <= 1.0


def test_nan_and_inf_inside_answers():
    inf_box = "[-Infinity, -Infinity, Infinity, Infinity]"
    assert acc(f'{{"boxes": {inf_box}}}', f'{{"boxes": {inf_box}}}', "spatial grounding") == 0.0
    assert acc('{"time": [NaN, 3]}', '{"time": [1, 3]}', "temporal grounding") == 0.0
    # a NaN keyframe earns nothing for time, the box and the points still count (the release returns NaN)
    p = parts(tagged(seg([0, 0, 10, 10], POS, NEG, time=float("nan"))), seg([0, 0, 10, 10], POS, NEG, time=1),
              "segmentation", "video")
    assert p["accuracy"] == pytest.approx(0.7) and p["structure_reward"] == 0.5
    assert acc('{"boxes": [0, 0, 1e308, 1e308]}', '{"boxes": [0, 0, 1e308, 1e308]}', "spatial grounding") == 0.0


FAST_KINDS = [("numerical", "image"), ("regression", "video"), ("OCR", "image"), ("open-ended", "video"),
              ("temporal grounding", "video"), ("spatial grounding", "image"), ("spatial-temporal grounding", "video"),
              ("tracking", "video"), ("segmentation", "image"), ("segmentation", "video")]
JSONISH = st.lists(st.sampled_from(['{"', '"time"', '"boxes"', '"positive_points"', '"negative_points"', ":", ",",
                                    "[", "]", "{", "}", "1", "-2.5", "NaN", "1e999", '"1"', " ", "null"]),
                   max_size=30).map("".join)
ARBITRARY = st.text() | JSONISH | st.tuples(st.text(max_size=30), JSONISH).map(lambda t: tagged(t[1], t[0]))


def check_in_range(response, gt, problem_type, data_type):
    overall, p = score(response, gt, problem_type, data_type, math_timeout=2.0)
    assert 0.0 <= overall <= 1.5 and 0.0 <= p["accuracy"] <= 1.0 and p["format"] in (0.0, 1.0)
    assert 0.0 <= p["structure_reward"] <= 0.5


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARBITRARY, ARBITRARY, st.sampled_from(FAST_KINDS))
def test_arbitrary_text_never_raises(response, gt, kind):
    check_in_range(response, gt, *kind)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ARBITRARY, st.sampled_from(["B", "12", "\\frac{1}{2}", "x^2"]), st.sampled_from(["multiple choice", "math"]))
def test_arbitrary_text_never_raises_symbolic(response, gt, problem_type):
    check_in_range(response, gt, problem_type, "image")


ADVERSARIAL = [("2^(9^(9^9))", "2", "math"), ("9**9**9**9", "B", "multiple choice"),
               ("\\frac{" * 5000 + "1" + "}{2}" * 5000, "1", "math"), ("1+" * 3000 + "1", "3001", "math"),
               ("(" * 3000 + "1" + ")" * 3000, "1", "math")]


def test_adversarial_math_is_time_bounded():
    rewards.symbolic_equal("math", "1", "2")  # worker started outside the bound
    timeout = 0.5
    start = time.monotonic()
    for answer, gt, problem_type in ADVERSARIAL:
        overall, p = score(tagged(answer), gt, problem_type, "image", math_timeout=timeout)
        assert 0.0 <= overall <= 1.5
    # each item costs at most the timeout plus a worker restart; 60 s is far above that and far below a hang
    assert time.monotonic() - start < 60
    assert rewards.pop_counters().get("symbolic_timeouts", 0) >= 1
    # the worker was restarted and still answers correctly
    assert acc("\\frac{2}{4}", "0.5", "math") == 1.0


def test_a_batch_of_adversarial_math_is_bounded_as_a_whole():
    """math_batch_timeout: once the batch's time for symbolic checks is spent, the rest score 0 without asking
    the worker (counted), instead of each costing math_timeout plus a worker restart."""
    rewards.symbolic_equal("math", "1", "2")  # worker started outside the bound
    rewards.pop_counters()
    items = [{"response": tagged(f"2^(9^(9^{9 + i}))"), "ground_truth": "1", "problem_type": "math",
              "data_type": "image"} for i in range(4)]
    results = rewards.compute_score(items, math_timeout=5.0, math_batch_timeout=0.5)
    assert [r["accuracy"] for r in results] == [0.0] * 4
    assert rewards.pop_counters() == {"symbolic_timeouts": 1, "symbolic_skipped": 3}
    assert acc("\\frac{3}{4}", "0.75", "math") == 1.0  # the restarted worker still answers


def test_the_worker_survives_a_sigterm_to_the_process_group():
    """A preemption signals the trainer's whole process group; the worker (its own session) must live on: a
    worker killed in the middle of a request would score that right answer 0 in the step being checkpointed."""
    script = "\n".join([
        "import os, signal, time",
        "import rewards",
        "signal.signal(signal.SIGTERM, lambda *args: None)  # the trainer's flag",
        "assert rewards.symbolic_equal('math', '\\\\frac{1}{2}', '0.5')",
        "worker = rewards._worker",
        "os.killpg(0, signal.SIGTERM)",
        "time.sleep(1.0)  # let the signal reach every process of the group",
        "print(worker.poll(), rewards._worker is worker, rewards.symbolic_equal('math', '\\\\frac{2}{4}', '0.5'))"])
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.abspath(rewards.__file__)),
                          start_new_session=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "None True True", proc.stdout + proc.stderr[-2000:]


def test_adversarial_math_from_a_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(
        score(tagged("99**99**99**99"), "B", "multiple choice", "image", math_timeout=0.5)[0]))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and results == [pytest.approx(0.6)]


def test_worker_recovers_from_a_crash_and_a_fork():
    assert rewards.symbolic_equal("math", "\\frac{3}{6}", "0.5")
    rewards._worker.kill()  # as if it crashed between requests
    rewards._worker.wait()
    assert rewards.symbolic_equal("math", "\\frac{4}{8}", "0.5")
    parent_worker = rewards._worker.pid
    pid = os.fork()
    if pid == 0:  # a forked process (a data-loader worker, say) starts its own and leaves the parent's alone
        ok = rewards.symbolic_equal("math", "\\frac{5}{10}", "0.5") and rewards._worker.pid != parent_worker
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert rewards._worker.poll() is None and rewards.symbolic_equal("math", "\\frac{6}{12}", "0.5")


def test_a_worker_that_cannot_start_is_an_error_not_a_zero(monkeypatch):
    monkeypatch.setattr(rewards, "_worker", None)
    monkeypatch.setattr(rewards, "_worker_ready", False)
    monkeypatch.setattr(rewards.sys, "executable", "/bin/false")
    with pytest.raises(ChildProcessError, match="did not start"):
        score(tagged("\\frac{7}{14}"), "0.5", "math", "image")
