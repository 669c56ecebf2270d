"""demo.rl_runs and the ablation table: RL runs side by side, each followed by its evaluation, one thread each,
results in the order asked, finished stages skipped on a re-run, a failed run named with its output once the others
are done, and each estimator's row built from its own seeds; every stage starts on the pinned CPU kernels and
threads. The stages here are small Python scripts standing in for train_rl.py and eval.py (same arguments, same
files), or a probe of what torch starts with."""
import json
import os
import subprocess
import sys

import pytest

import demo
import model as model_lib
import shapes

# a stand-in train_rl.py: records when it ran and its thread setting, writes a metrics line and hf/config.json;
# the seed named in FAIL exits 3 instead
FAKE_RL = r"""
import json, os, sys, time
out_dir, seed = sys.argv[1], int(sys.argv[2])
print("threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
start = time.time()
time.sleep(1.0)
if seed == int(os.environ.get("FAIL", -1)):
    print("the fake run fails here", flush=True)
    sys.exit(3)
os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 2, "start": start, "end": time.time()}) + "\n")
with open(os.path.join(out_dir, "hf", "config.json"), "w") as f:
    f.write("{}")
"""
FAKE_EVAL = r"""
import json, os, sys
out_dir, metrics_file, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(out_dir, exist_ok=True)
with open(metrics_file, "w") as f:
    json.dump({"metrics": {"tracking": {"reward_accuracy": seed / 10}}}, f)
"""


@pytest.fixture(autouse=True)
def restore_pinned_env(monkeypatch):
    """demo.main sets demo.PINNED_CPU in this process's environment; each test starts without them and leaves the
    environment as it found it (a later test's torch.compile would read ATEN_CPU_CAPABILITY). setenv first: it
    records the value or absence before it, where delenv of an absent key would record nothing to restore."""
    for key in demo.PINNED_CPU:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@pytest.fixture
def fake_stages(monkeypatch):
    def rl_command(cfg, sft_dir, rl_file, out_dir, estimator, seed):
        return [sys.executable, "-c", FAKE_RL, out_dir, str(seed)]

    def eval_command(model_dir, out_dir, data_path, cfg):
        metrics_file = os.path.join(out_dir, "eval.metrics.json")
        seed = int(os.path.dirname(model_dir).rsplit("seed", 1)[1])
        return [sys.executable, "-c", FAKE_EVAL, out_dir, metrics_file, str(seed)], metrics_file

    monkeypatch.setattr(demo, "rl_command", rl_command)
    monkeypatch.setattr(demo, "eval_command", eval_command)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the demo's own setting must not leak into its RL runs


def runs_in(tmp_path, seeds):
    return [(str(tmp_path / "rl" / f"ema_grpo-seed{seed}"), "ema_grpo", seed) for seed in seeds]


def test_runs_side_by_side_in_order_and_skip_when_done(fake_stages, tmp_path):
    cfg = demo.Config(rl_steps=2, jobs=3)
    runs = runs_in(tmp_path, [2, 0, 1])
    metrics = demo.rl_runs(cfg, "sft", "rl.json", "eval.json", runs)
    assert [m["tracking"]["reward_accuracy"] for m in metrics] == [0.2, 0.0, 0.1]  # the order asked
    spans = []
    for out_dir, _, _ in runs:
        with open(out_dir + ".log") as f:
            assert "threads 1" in f.read()  # one thread each
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            line = json.loads(f.read())
        spans.append((line["start"], line["end"]))
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all three ran at the same time

    os.remove(os.path.join(runs[1][0], "eval", "eval.metrics.json"))  # a re-run redoes only what is missing
    metrics = demo.rl_runs(cfg, "sft", "rl.json", "eval.json", runs)
    assert metrics[1]["tracking"]["reward_accuracy"] == 0.0
    for (out_dir, _, _), span in zip(runs, spans):
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            line = json.loads(f.read())
        assert (line["start"], line["end"]) == span  # no RL run ran again


def test_one_at_a_time_with_jobs_1(fake_stages, tmp_path):
    runs = runs_in(tmp_path, [0, 1])
    demo.rl_runs(demo.Config(rl_steps=2, jobs=1), "sft", "rl.json", "eval.json", runs)
    spans = []
    for out_dir, _, _ in runs:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            line = json.loads(f.read())
        spans.append((line["start"], line["end"]))
    assert spans[0][1] <= spans[1][0]


def test_a_failed_run_is_named_with_its_output_after_the_others_finish(fake_stages, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAIL", "1")
    runs = runs_in(tmp_path, [0, 1, 2])
    with pytest.raises(SystemExit, match="1 of 3 RL runs failed"):
        demo.rl_runs(demo.Config(rl_steps=2, jobs=2), "sft", "rl.json", "eval.json", runs)
    out = capsys.readouterr().out
    assert f"the last lines of {runs[1][0]}.log" in out and "the fake run fails here" in out
    for out_dir in (runs[0][0], runs[2][0]):  # the others ran to the end, evaluation included
        assert os.path.exists(os.path.join(out_dir, "eval", "eval.metrics.json"))
    assert not os.path.exists(os.path.join(runs[1][0], "eval"))  # no evaluation after a failed run


def test_ablation_groups_each_estimators_seeds(monkeypatch, capsys):
    """The ablation's rows: each baseline's mean over its own seeds' runs (rl_runs returns them in the order asked)."""
    asked = []

    def rl_runs(cfg, sft_dir, rl_file, eval_file, runs):
        asked.extend((estimator, seed) for _, estimator, seed in runs)
        return [{task: {"reward_accuracy": (i + 1) / 100} for task in demo.FAMILIES} for i in range(len(runs))]

    monkeypatch.setattr(demo, "rl_runs", rl_runs)
    ema = [{c: 0.5 + s / 10 for c in demo.COLUMNS} for s in range(3)]
    demo.ablation(demo.Config(), "sft", "data", "eval.json", {c: 0.4 for c in demo.COLUMNS}, [0, 1, 2], ema)
    assert asked == [("grpo", 0), ("grpo", 1), ("grpo", 2), ("dr_grpo", 0), ("dr_grpo", 1), ("dr_grpo", 2)]
    lines = {line.split(" |")[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert lines["| +GRPO (mean of 3)"].count("0.020") == len(demo.COLUMNS)  # runs 1, 2, 3 of 100
    assert lines["| +Dr.GRPO (mean of 3)"].count("0.050") == len(demo.COLUMNS)  # runs 4, 5, 6
    assert lines["| +EMA-GRPO (mean of 3)"].count("0.600") == len(demo.COLUMNS)
    assert lines["| EMA-GRPO std over seeds"].count("0.100") == len(demo.COLUMNS)


# -----------------------------------------------------------------------------
# SFT in two stages: the multiple-choice rows alone, then every row from that checkpoint

class StopAtMixedSFT(Exception):
    pass


def sft_stages(monkeypatch, tmp_path, rows, argv=()):
    """demo.main's SFT commands up to the mixed SFT stage (the stages are recorded, not run)."""
    return [c for c in stages_to_mixed_sft(monkeypatch, tmp_path, rows, argv) if c[1] == "train_sft.py"]


def stages_to_mixed_sft(monkeypatch, tmp_path, rows, argv=()):
    """demo.main's commands up to the mixed SFT stage (the stages are recorded, not run)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "sft.json").write_text(json.dumps(rows))
    commands = []

    def run(cmd, done_marker=None, log=None, env=None):
        commands.append(cmd)
        if cmd[1] == "train_sft.py" and f"--data={data_dir}/sft.json" in cmd:
            raise StopAtMixedSFT

    monkeypatch.setattr(demo, "run", run)
    with pytest.raises(StopAtMixedSFT):
        demo.main([f"--out={tmp_path}", *argv])
    return commands


def arg(cmd, key):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{key}="))


ROWS = [{"problem_id": i, "problem_type": t} for i, t in
        enumerate(["multiple choice", "spatial grounding", "multiple choice", "tracking", "multiple choice"])]


def test_multiple_choice_stage_trains_on_its_rows_and_starts_the_mixed_one(monkeypatch, tmp_path):
    first, mixed = sft_stages(monkeypatch, tmp_path, ROWS, ["--mc_first_steps=400"])
    with open(arg(first, "data")) as f:
        assert [r["problem_id"] for r in json.load(f)] == [0, 2, 4]
    assert arg(first, "model") == os.path.join(str(tmp_path), "tiny-model")
    assert arg(first, "max_steps") == "400"
    assert arg(mixed, "model") == os.path.join(arg(first, "out_dir"), "hf")


def test_without_the_stage_the_mixed_sft_starts_from_the_tiny_model(monkeypatch, tmp_path):
    (mixed,) = sft_stages(monkeypatch, tmp_path, ROWS, ["--mc_first_steps=0"])
    assert arg(mixed, "model") == os.path.join(str(tmp_path), "tiny-model")


@pytest.mark.parametrize("tasks, rows", [(demo.DEMO_TASKS, 18), ("image_grounding,video_tracking", 4),
                                         ("all", 2 * len(shapes.TASKS))])
def test_a_mixed_sft_step_holds_two_rows_per_entry_of_the_tasks(monkeypatch, tmp_path, tasks, rows):
    (mixed,) = sft_stages(monkeypatch, tmp_path, ROWS, [f"--tasks={tasks}"])
    assert (arg(mixed, "batch_size"), arg(mixed, "micro_batch_size")) == (str(rows), str(rows // 2))


@pytest.mark.parametrize("argv, size, rms", [((), "S", "0.5"), (("--position_code_rms=0",), "S", "0.0"),
                                             (("--model_size=S4",), "S4", "0.5")])
def test_the_tiny_model_is_built_at_the_size_and_position_code_asked(monkeypatch, tmp_path, argv, size, rms):
    (build,) = [c for c in stages_to_mixed_sft(monkeypatch, tmp_path, ROWS, argv) if c[1] == "model.py"]
    assert (arg(build, "size"), arg(build, "position_code_rms")) == (size, rms)
    assert size in model_lib.SIZES


def test_a_suite_without_multiple_choice_names_the_flag(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="mc_first_steps=0"):
        sft_stages(monkeypatch, tmp_path, [r for r in ROWS if r["problem_type"] != "multiple choice"],
                   ["--mc_first_steps=400"])


class StopAtSuite(Exception):
    pass


PROBE = ("import os, torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), "
         "os.environ.get('TORCHINDUCTOR_CACHE_DIR') == torch._inductor.runtime.cache_dir_utils.cache_dir())")


def probe(env=None):
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def first_stage_sees(monkeypatch, tmp_path, argv):
    """(CPU capability, threads, whether inductor caches in the pinned directory) that torch starts with in the demo's
    first stage (a probe runs in its place)."""
    for key in demo.PINNED_CPU:
        monkeypatch.delenv(key, raising=False)  # what an earlier demo.main set
    seen = []

    def run(cmd, done_marker=None, log=None, env=None):
        seen.append(probe(env))
        raise StopAtSuite

    monkeypatch.setattr(demo, "run", run)
    with pytest.raises(StopAtSuite):
        demo.main([f"--out={tmp_path}", *argv])
    return seen[0]


def test_stages_start_on_the_pinned_kernels_and_threads(monkeypatch, tmp_path):
    assert first_stage_sees(monkeypatch, tmp_path, []) == ["AVX2", "2", "True"]  # and a compile cache of its own
    # unpinned: what torch starts with here anyway (a fresh process; this one may have started under other settings)
    assert first_stage_sees(monkeypatch, tmp_path, ["--pin_cpu=false"]) == probe()


def test_a_resumed_runs_metrics_are_read_once_per_step(tmp_path):
    """common.Logger appends on resume: a run logging steps 1-4 (validation lines at 2 and 4, as train_sft.py
    writes them) that resumes from its step-2 checkpoint and logs 3-5 again reads as 1, 2, 2 (val), 3, 4, 4 (val),
    5, the re-run steps' values the later ones (what the figures and the spread table average)."""
    import common

    def log_steps(steps, resume, tag):
        logger = common.Logger(str(tmp_path), {"tag": tag}, use_wandb=False, resume=resume)
        for step in steps:
            logger.log(step, {"loss": float(step), "run": tag})
            if step % 2 == 0:
                logger.log(step, {"val_loss": float(step), "run": tag})
        logger.close()

    log_steps(range(1, 5), False, "first")
    log_steps(range(3, 6), True, "resumed")
    rows = demo.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], "val_loss" in r) for r in rows] == [(1, False), (2, False), (2, True), (3, False),
                                                             (4, False), (4, True), (5, False)]
    assert [r["run"] for r in rows] == ["first"] * 3 + ["resumed"] * 4
