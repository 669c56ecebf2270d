"""Faults a week-long run on a shared cluster meets (README "Faults tried"): rows that fail at run time, a
preemption in the middle of a step, checkpoint retention and export, a resume on another number of ranks, a
damaged newest checkpoint, a run that cannot learn, a used out_dir.

One 4-step RL run (module fixture, 1 prompt per generate call, no filtering) is the reference: its checkpoints of
steps 3 and 4 (keep_last=2), metrics and export are what the preempted, resumed, resharded and exported runs
must reproduce."""
import glob
import io
import json
import os
import shutil
import signal

import av
import numpy as np
import pytest
import torch
from conftest import TEST_MEDIA, answer, torchrun, REPO
from PIL import Image
from test_train_rl import REFERENCE, checkpoint_weights, exported_weights, read_metrics, rl_args  # noqa: F401

import common
import data
import eval as ev
import export
import model as model_lib
import rewards
import rollout
import train_rl
import train_sft

pytestmark = pytest.mark.usefixtures("restore_sigterm_handler")
RUN = ["--filter_groups=false", "--rollout_batch_prompts=1"]  # one reward call per step, two generate calls


@pytest.fixture(scope="module")
def reference(rl_args, tmp_path_factory):  # noqa: F811
    out_dir = tmp_path_factory.mktemp("reference")
    train_rl.main(rl_args + RUN + [f"--out_dir={out_dir}", "--max_steps=4", "--save_every=1"])
    return out_dir


def write_media_that_fails_late(folder):
    """A JPEG cut in half and an mp4 whose header promises frames it does not hold: both pass load_rows's
    header check (data.check_media_file) and fail when decoded in full."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    mp4 = folder / "full.mp4"
    with av.open(str(mp4), "w", options={"movflags": "faststart"}) as container:  # the index before the frames
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    raw = mp4.read_bytes()
    (folder / "no_frames.mp4").write_bytes(raw[:raw.index(b"mdat") + 4])


@pytest.fixture(scope="module")
def bad_rl_data(suite_dir, tmp_path_factory):
    """4 good open-ended rows, then row 4 a cut JPEG, row 5 an mp4 without frames, row 6 a prompt of more tokens
    than the tiny model's context (4096)."""
    root = tmp_path_factory.mktemp("bad_rl")
    shutil.copy(suite_dir / "media" / "a.png", root / "a.png")
    write_media_that_fails_late(root)
    rows = [{"problem": f"Describe picture {i}.", "answer": REFERENCE, "problem_type": "open-ended",
             "data_type": "image", "images": ["a.png"], "problem_id": i} for i in range(4)]
    rows.append({**rows[0], "images": ["cut.jpg"], "problem_id": 4})
    rows.append({**rows[0], "images": None, "videos": ["no_frames.mp4"], "data_type": "video", "problem_id": 5})
    rows.append({**rows[0], "problem": "Describe " + "the shapes " * 3000, "problem_id": 6})
    (root / "rl.json").write_text(json.dumps(rows))
    return root


# -----------------------------------------------------------------------------
# rows that fail at run time


def test_rows_that_fail_at_run_time_are_named_skipped_and_replaced(rl_args, bad_rl_data, model_dir, tmp_path,  # noqa: F811
                                                                   capfd):
    """3 steps of 2 prompts draw all 7 rows: the 3 bad ones are named (file, row, why) on stdout and in the
    metrics, replaced so that every step rolls out 2 prompts, and saved; the resumed run passes them over."""
    data_args = [f"--data={bad_rl_data / 'rl.json'}", f"--media_root={bad_rl_data}", f"--out_dir={tmp_path}"] + RUN
    train_rl.main(rl_args + data_args + ["--max_steps=3", "--max_bad_rows=3"])
    metrics = read_metrics(tmp_path)
    assert [metrics[step]["prompts"] for step in (1, 2, 3)] == [2.0, 2.0, 2.0]
    assert metrics[3]["bad_rows"] == 3.0
    named = "; ".join(row.get("bad_rows_new", "") for row in metrics.values())
    path = bad_rl_data / "rl.json"
    expected = [f"{path}: row 4 field 'media': corrupt image {bad_rl_data / 'cut.jpg'}: image file is truncated",
                f"{path}: row 5 field 'media': corrupt video {bad_rl_data / 'no_frames.mp4'}: no frames decoded",
                f"{path}: row 6: "]
    out = capfd.readouterr().out
    assert all(text in named and text in out for text in expected), (named, out)
    assert "+ 8 to generate exceed the model context (max_position_embeddings=4096)" in named
    _, extra = checkpoint_weights(model_dir, tmp_path / "ckpt" / "step_000003")
    assert sorted(extra["bad_rows"]) == [f"{path}: row {i}" for i in (4, 5, 6)]

    train_rl.main(rl_args + data_args + ["--max_steps=4", "--max_bad_rows=3", "--resume=true"])
    step_4 = read_metrics(tmp_path)[4]
    assert step_4["prompts"] == 2.0 and step_4["bad_rows"] == 3.0 and "bad_rows_new" not in step_4


def test_past_the_bad_row_budget_the_run_stops_with_the_list(rl_args, bad_rl_data, tmp_path):  # noqa: F811
    with pytest.raises(RuntimeError, match=r"rows failed at run time, more than max_bad_rows=0") as error:
        train_rl.main(rl_args + RUN + [f"--data={bad_rl_data / 'rl.json'}", f"--media_root={bad_rl_data}",
                                       f"--out_dir={tmp_path}", "--max_steps=3", "--max_bad_rows=0"])
    assert any(f"rl.json: row {i}" in str(error.value) for i in (4, 5, 6))
    assert not (tmp_path / "hf").exists()


def test_sft_skips_a_row_that_fails_to_decode(suite_dir, model_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "<image>How many shapes?"},
                          {"role": "assistant", "content": answer(str(i))}], "images": ["a.png"]} for i in range(4)]
    rows.append({**rows[0], "images": ["cut.jpg"]})
    shutil.copy(suite_dir / "media" / "a.png", tmp_path / "a.png")
    write_media_that_fails_late(tmp_path)
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    train_sft.main([f"--model={model_dir}", f"--data={tmp_path / 'sft.json'}", f"--out_dir={tmp_path / 'run'}",
                    "--max_steps=2", "--batch_size=4", "--micro_batch_size=2", "--val_rows=0", "--log_every=1",
                    "--image_max_pixels=6144"])
    metrics = read_metrics(tmp_path / "run")
    assert metrics[2]["bad_rows"] == 1.0 and all(np.isfinite(row["loss"]) for row in metrics.values())
    assert f"{tmp_path / 'sft.json'}: row 4 field 'media': corrupt image" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "run" / "hf" / "model.safetensors")


def test_eval_scores_undecodable_and_too_long_rows_zero_and_names_them(model_dir, bad_rl_data, tmp_path):
    rows = [{"problem": "Box the circle.", "solution": '{"boxes": [0, 0, 10, 10]}', "problem_type": "spatial grounding",
             "data_type": "image", "path": path, "problem_id": i} for i, path in enumerate(["a.png", "cut.jpg"])]
    rows.append({**rows[0], "problem": "Box " + "the shapes " * 3000, "problem_id": 2})
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    ev.main([f"--model={model_dir}", f"--data={tmp_path / 'eval.json'}", f"--media_root={bad_rl_data}",
             f"--out_dir={tmp_path / 'out'}", "--max_new_tokens=8"])
    metrics = json.loads((tmp_path / "out" / "eval.metrics.json").read_text())["metrics"]
    assert (metrics["all"]["media_missing"], metrics["all"]["too_long"]) == (1, 1)
    records = ev.read_records(str(tmp_path / "out" / "eval"))
    assert "row 1 field 'media': corrupt image" in records[1]["error"] and records[1]["parts"]["iou"] == 0.0
    assert "row 2: " in records[2]["error"] and "exceed the model context" in records[2]["error"]


# -----------------------------------------------------------------------------
# preemption, retention, export


def signal_on_call(monkeypatch, module, name, call):
    """module.name sends this process SIGTERM during its call-th call; returns the list counting the calls."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_preemption_mid_step_checkpoints_the_step_before_and_resumes_exactly(rl_args, reference, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    """A step longer than the grace (--stop_grace_s=0): SIGTERM during step 3's first generate call. The run
    stops at the next boundary (step 3's second generate call never runs), checkpoints step 2's state (no
    periodic checkpoint exists) and exits; resumed, it reproduces the uninterrupted run's steps 3 and 4
    exactly. keep_last=1 then keeps the newest checkpoint and the one resumed from."""
    calls = signal_on_call(monkeypatch, rollout, "generate", 5)
    train_rl.main(rl_args + RUN + [f"--out_dir={tmp_path}", "--max_steps=4", "--save_every=100", "--stop_grace_s=0"])
    assert len(calls) == 5 and sorted(read_metrics(tmp_path)) == [1, 2]
    assert os.listdir(tmp_path / "ckpt") == ["step_000002"] and not (tmp_path / "hf").exists()
    monkeypatch.undo()

    train_rl.main(rl_args + RUN + [f"--out_dir={tmp_path}", "--max_steps=4", "--save_every=1", "--keep_last=1",
                                   "--resume=true"])
    full, resumed = read_metrics(reference), read_metrics(tmp_path)
    for step in (3, 4):
        for key, value in full[step].items():
            if not key.startswith(("sec/", "reward_counters/")):
                assert resumed[step][key] == pytest.approx(value, abs=1e-6, rel=0), (step, key)
    expected, got = exported_weights(reference), exported_weights(tmp_path)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_000002", "step_000004"]  # resumed-from kept
    assert sorted(os.listdir(reference / "ckpt")) == ["step_000003", "step_000004"]  # keep_last=2


def test_preemption_with_time_to_finish_the_step(rl_args, reference, tmp_path, monkeypatch):  # noqa: F811
    """SIGTERM during step 2's first generate call with a grace that the rest of step 2 fits in (step 1 took
    less than 1e9 s): step 2 is finished, as in the uninterrupted run, checkpointed, and the run exits."""
    calls = signal_on_call(monkeypatch, rollout, "generate", 3)
    train_rl.main(rl_args + RUN + [f"--out_dir={tmp_path}", "--max_steps=4", "--save_every=100",
                                   "--stop_grace_s=1e9"])
    assert len(calls) == 4 and sorted(read_metrics(tmp_path)) == [1, 2]
    assert os.listdir(tmp_path / "ckpt") == ["step_000002"]
    full, ours = read_metrics(reference)[2], read_metrics(tmp_path)[2]
    assert all(ours[key] == pytest.approx(value, abs=1e-6, rel=0) for key, value in full.items()
               if not key.startswith(("sec/", "reward_counters/")))


def test_export_any_checkpoint_round_trip(reference, model_dir, suite_dir, tmp_path):
    """export.py on a mid-run checkpoint and on a ckpt folder (its newest): the HF folder loads and gives the
    logits of the checkpoint's weights; --dtype=bf16 gives those weights in bf16."""
    export.main([f"--ckpt={reference / 'ckpt' / 'step_000003'}", f"--out={tmp_path / 'hf3'}"])
    export.main([f"--ckpt={reference / 'ckpt'}", "--dtype=bf16", f"--out={tmp_path / 'hf4-bf16'}"])
    rows = data.load_rows(str(suite_dir / "rl.json"))
    _, processor = model_lib.load_model(model_dir)
    batch = data.collate(rows, processor, TEST_MEDIA)
    from_checkpoint, _ = model_lib.load_model(model_dir)
    common.load_checkpoint(str(reference / "ckpt" / "step_000003"), from_checkpoint)
    exported, _ = model_lib.load_model(str(tmp_path / "hf3"))
    with torch.no_grad():
        assert torch.equal(exported(**batch).logits, from_checkpoint(**batch).logits)
    final = exported_weights(reference)  # the end-of-run export is step 4
    bf16, _ = model_lib.load_model(str(tmp_path / "hf4-bf16"), dtype=torch.bfloat16)
    for name, p in bf16.state_dict().items():
        if name in final:
            assert p.dtype == torch.bfloat16 and torch.equal(p, final[name].to(torch.bfloat16)), name


def test_damaged_newest_checkpoint_is_named_and_the_previous_one_loads(reference, model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference / "ckpt", ckpt)
    shard = sorted(glob.glob(str(ckpt / "step_000004" / "*.distcp")))[0]
    with open(shard, "r+b") as f:  # one flipped block in the middle of a shard: same size, other bytes
        f.seek(os.path.getsize(shard) // 2)
        block = f.read(4096)
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))
    tiny, _ = model_lib.load_model(model_dir)
    path, extra = common.resume_checkpoint(str(ckpt), tiny, torch.optim.AdamW(tiny.parameters()))
    assert path == str(ckpt / "step_000003") and extra["step"] == 3
    out = capsys.readouterr().out
    assert f"DAMAGED CHECKPOINT {ckpt / 'step_000004'}" in out and f"{shard}: CRC32" in out and "(corrupted)" in out
    assert os.path.isdir(ckpt / "step_000004.damaged")
    expected, _ = checkpoint_weights(model_dir, reference / "ckpt" / "step_000003")
    assert all(torch.equal(p, expected[name]) for name, p in tiny.state_dict().items())

    extra_file = ckpt / "step_000003" / "extra_rank0.pt"  # a truncated file: its size gives it away
    extra_file.write_bytes(extra_file.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="none of its 1 checkpoints is intact"):
        common.resume_checkpoint(str(ckpt), tiny, None)
    assert f"{extra_file}: 100 bytes where the manifest says" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# a resume on another number of ranks


def test_resume_on_another_number_of_ranks(rl_args, reference, model_dir, tmp_path):  # noqa: F811
    """From the reference's 1-rank step 3: on 2 ranks (1 -> 2) and, from that run's step 4, on 1 rank again
    (2 -> 1), against 1 rank throughout. Greedy sampling (temperature 0), so that the ranks' reseeded generators
    cannot matter: the same prompts (the rank-independent data position), responses, rewards and task EMA, and
    the same AdamW step from the resharded moments (all responses of a group agree: zero advantages, so the
    weights move by the moments alone)."""
    greedy = rl_args + RUN + ["--temperature=0", "--ppo_updates=1", "--save_every=1", "--keep_last=0", "--resume=true"]
    runs = {name: tmp_path / name for name in ("one", "two", "back")}
    for name in ("one", "two"):
        shutil.copytree(reference / "ckpt" / "step_000003", runs[name] / "ckpt" / "step_000003")
    train_rl.main(greedy + [f"--out_dir={runs['one']}", "--max_steps=5"])
    returncode, stderr = torchrun([os.path.join(REPO, "train_rl.py")] + greedy + [f"--out_dir={runs['two']}",
                                                                                 "--max_steps=4"])
    assert returncode == 0, stderr[-4000:]
    shutil.copytree(runs["two"] / "ckpt" / "step_000004", runs["back"] / "ckpt" / "step_000004")
    train_rl.main(greedy + [f"--out_dir={runs['back']}", "--max_steps=5"])

    one, two, back = (read_metrics(runs[name]) for name in ("one", "two", "back"))
    for step, other in [(4, two), (5, back)]:
        for key in ("prompts", "reward/all/overall", "ema/open-ended/std", "loss", "grad_norm", "response_length"):
            assert other[step][key] == pytest.approx(one[step][key], abs=1e-6), (step, key)
    expected = {step: checkpoint_weights(model_dir, runs["one"] / "ckpt" / f"step_00000{step}")[0] for step in (4, 5)}
    for name, step in (("two", 4), ("back", 5)):
        got, _ = checkpoint_weights(model_dir, runs[name] / "ckpt" / f"step_00000{step}")
        assert all(torch.allclose(got[key], expected[step][key], atol=1e-6) for key in got), name
    assert any(not torch.equal(expected[5][key], expected[4][key]) for key in expected[5])  # AdamW moved them
    extras = {name: checkpoint_weights(model_dir, runs[name] / "ckpt" / f"step_00000{4 if name == 'two' else 5}")[1]
              for name in runs}
    assert extras["two"]["world_size"] == 2 and extras["back"]["world_size"] == 1
    assert extras["one"]["sampler"]["global"] == extras["back"]["sampler"]["global"]  # the same rows, step after step
    one_4 = checkpoint_weights(model_dir, runs["one"] / "ckpt" / "step_000004")[1]
    assert extras["two"]["sampler"]["global"] == one_4["sampler"]["global"]
    for name, reference_extra in (("two", one_4), ("back", extras["one"])):
        moments = extras[name]["ema"]["moments"]
        assert moments.keys() == reference_extra["ema"]["moments"].keys()
        for task, values in reference_extra["ema"]["moments"].items():
            assert moments[task] == pytest.approx(values, abs=1e-9), (name, task)


# -----------------------------------------------------------------------------
# a run that cannot learn; a used out_dir; option typos


def test_reward_model_settings_reach_the_client(monkeypatch):
    cfg = common.parse_config(train_rl.Config, ["--reward_model_url=http://rm/pooling", "--reward_model_timeout=7",
                                                "--reward_model_retries=0", "--reward_model_breaker=4",
                                                "--reward_model_cooldown=9", "--math_batch_timeout=11", "--group_size=1"])
    seen = {}
    monkeypatch.setattr(rewards, "compute_score", lambda items, weight, **kwargs: seen.update(kwargs) or [
        {"overall": 1.0, "accuracy": 1.0, "format": 1.0, "structure_reward": 0.0}])
    row = {"source": "f: row 0", "kind": "rl", "answer": "a", "problem": "q", "problem_type": "open-ended",
           "data_type": "image"}
    train_rl.score_groups([{"row": row, "texts": ["x"]}], cfg)
    assert seen == {"reward_model_url": "http://rm/pooling", "reward_model_timeout": 7.0, "reward_model_retries": 0,
                    "reward_model_breaker": 4, "reward_model_cooldown": 9.0, "math_batch_timeout": 11.0}


def test_a_run_that_cannot_learn_stops_without_an_export(rl_args, tmp_path, monkeypatch, capfd):  # noqa: F811
    def broken(*args, **kwargs):
        raise ChildProcessError("the symbolic-check worker did not start")
    monkeypatch.setattr(rewards, "compute_score", broken)
    with pytest.raises(RuntimeError, match="step 2: 2 steps in a row took no update"):
        train_rl.main(rl_args + [f"--out_dir={tmp_path}", "--max_steps=5", "--max_skipped_steps=2"])
    assert not (tmp_path / "hf").exists() and sorted(read_metrics(tmp_path)) == [1, 2]
    assert "reward_errors 1" in capfd.readouterr().out


def test_a_nan_weight_stops_sft_without_an_export(suite_dir, model_dir, tmp_path):
    tiny, processor = model_lib.load_model(model_dir)
    with torch.no_grad():
        tiny.model.language_model.norm.weight[0] = float("nan")
    tiny.save_pretrained(tmp_path / "nan")
    processor.save_pretrained(tmp_path / "nan")
    with pytest.raises(RuntimeError, match="step 2: 2 non-finite steps in a row; stopping without an export"):
        train_sft.main([f"--model={tmp_path / 'nan'}", f"--data={suite_dir / 'sft.json'}", f"--out_dir={tmp_path / 'run'}",
                        "--max_steps=4", "--batch_size=2", "--micro_batch_size=2", "--val_rows=0", "--max_skipped_steps=2",
                        "--image_max_pixels=6144", "--video_max_pixels=6144", "--max_frames=8"])
    assert not (tmp_path / "run" / "hf").exists()


def test_a_used_out_dir_is_refused_and_option_typos_stop_at_parse_time(rl_args, reference, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"already holds a run \(ckpt, hf, metrics.jsonl.*--resume=true.*--overwrite"):
        train_rl.main(rl_args + [f"--out_dir={reference}"])
    (tmp_path / "ckpt" / "step_000001").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("not the run's")
    common.prepare_out_dir(str(tmp_path), resume=True, overwrite=False)  # continuing it is fine
    common.prepare_out_dir(str(tmp_path), resume=False, overwrite=True)
    assert os.listdir(tmp_path) == ["notes.txt"]
    for typo, message in (("--estimator=grp", "--estimator=grp: expected one of ema_grpo, grpo, dr_grpo"),
                          ("--kl_kind=k3", "--kl_kind=k3: expected one of low_var_kl, k1")):
        with pytest.raises(ValueError, match=message):
            train_rl.main(rl_args + [f"--out_dir={tmp_path / 'typo'}", typo])
    assert not (tmp_path / "typo").exists()
