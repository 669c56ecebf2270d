"""
The demo: a tiny Qwen3-VL learns six tasks of the shapes suite, one per task family, on a laptop CPU (SFT), then
EMA-GRPO improves it (RL, three seeds), with held-out evaluation after each stage. Every stage is the real command
line of its script, printed before it runs; a stage whose output already exists is skipped, so a re-run continues
where it stopped. The RL runs go side by side, each on one thread, each followed by its evaluation (`--jobs`; their
output in runs/demo/<run>.log, a bar counting their steps).

    python demo.py                               # the main job (make demo)
    python demo.py --ablation=true               # then GRPO and Dr.GRPO from the same SFT checkpoint and seeds
    python demo.py --spread_experiment=true      # then the estimators on a binary task next to a low-spread one
    python demo.py --seed=1 --out=runs/demo-seed1    # another suite, tiny model and SFT seed

Outputs: runs/demo/ (data, model, checkpoints, eval records), the figures docs/demo_*.png, markdown tables, and a
last line of key=value pairs. Segmentation is scored by the training reward's box/point accuracy
(eval --sam2=false): SAM2 has no trained weights here, so its masks would mean nothing.
"""
import concurrent.futures
import getpass
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import common
import data
import rewards
import shapes

# One task per family of the paper's ablation table, not all 14 of the suite, and spatial grounding given three
# times. Measured with an earlier 16-token model: with all 14 tasks, or these six in equal shares, the tiny model
# learned format and copying from the prompt but not to look at the image (its loss with every row's media swapped
# for another row's changed by <= 0.002): the long answers (tracking, segmentation) hold most of the loss tokens,
# and their digits are learned from priors. Reading where an object is takes the most steps, so half the rows ask
# for it from one image (grounding x3, segmentation). Multiple choice has two entries of nine: with one of eight it
# reached 0.25-0.55 after SFT, naming the right colour on ~2/3 of the rows but not stopping at the option that
# matches; that step needs rows of its own (NOTES.md, "A third layer"). Its rows are short, so the ninth entry is
# added to each step (18 rows) instead of taking the place of another task's: the others keep their rows. Its
# rationale reads every option out with yes or no (shapes.options_read_out): after "up to the match" half the SFT
# draws read on to "D" and RL made that likelier; read out, four draws answered the "yes" letter on every row that
# has one, multiple choice 0.52-0.71 after SFT (NOTES.md, "Multiple choice read out"). The comparisons that place the
# "yes" are learned on some draws only: two later ones put it on C or D whatever the colour stated (0.34 and 0.32;
# NOTES.md, "One object per shape in multiple choice"). A third entry learned them on every draw tried, and the other
# families still read on some draws only (NOTES.md, "A third multiple-choice entry"; not the default).
DEMO_TASKS = ("image_multiple_choice_readout,image_grounding,video_temporal,image_grounding,video_spatial_temporal,"
              "image_segmentation,video_tracking,image_grounding,image_multiple_choice_readout")


@dataclass
class Config:
    out: str = "runs/demo"
    seed: int = 0  # the suite, the tiny model's initialisation and SFT
    tasks: str = DEMO_TASKS  # shapes generators, rows cycle through them; "all" for the whole suite
    n_sft: int = 11250  # 1,250 rows per entry of `tasks`
    n_rl: int = 3600
    n_eval: int = 5400  # 600 rows per entry of `tasks`. Measured (NOTES.md, "How many held-out rows"): at 300 per entry
    # the rows drawn moved one RL run's overall gain by 0.016; the gains' spread over RL seeds was 0.017 on 2,400
    # rows, 0.013 on 4,800 and 0.012 on 9,600 (the rest is the runs' own)
    mc_first_steps: int = 0  # SFT steps of 16 multiple-choice rows before the mixed ones; 0: none. Measured at 400
    # (NOTES.md, "A multiple-choice stage first"): it helped the suite-0 draw and cost the suite-1 and suite-2 draws
    # most of what they read (mean SFT accuracy over the three 0.327 against 0.384), so it is off
    sft_steps: int = 1700  # of 2 rows per entry of `tasks` (18), vision tower frozen (NOTES.md, "The frozen tower")
    rl_steps: int = 100
    rl_seeds: str = "0,1,2"  # RL runs of the main job (and of each estimator in the ablations), comma-separated
    jobs: int = 3  # RL runs (each with its evaluation) side by side, one thread each (why: rl_runs)
    max_new_tokens: int = 128
    ablation: bool = False  # GRPO and Dr.GRPO next to EMA-GRPO, same SFT checkpoint, seeds and budget
    spread_experiment: bool = False  # the estimators on a binary-reward task next to a low-spread dense one
    figures: str = "docs"  # where the PNGs go (the README shows them)
    position_code_rms: float = 0.5  # > 0: the tiny model's vision position table starts as model.position_code, so
    # the vision tokens say where each patch is; 0: HF's random table. Alone it read the boxes on 4 of 5 suites and the
    # clips' seconds on 2 (NOTES.md, "A position code in the vision tower"); with the clips' larger objects
    # (shapes.moving_objects) every family above blind on 4 of 5 (NOTES.md, "Larger clip objects")
    model_size: str = "S"  # model.SIZES key of the tiny model; S4 (a fourth layer) measured with the position code on
    # five suites, not the default (NOTES.md, "Where the seconds are lost")
    pin_cpu: bool = True  # every stage on PINNED_CPU's kernels and threads: another x86 machine's numbers; false:
    # torch's own choice (faster on many cores, other numbers)


FAMILIES = {  # task key -> the paper's task groups (SPEC 8's ablation table)
    "multiple choice": "QA", "numerical": "QA", "regression": "QA", "math": "QA", "OCR": "QA", "open-ended": "QA",
    "temporal grounding": "temporal", "spatial grounding": "spatial", "spatial-temporal grounding": "spatio-temporal",
    "tracking": "tracking", "segmentation/image": "segmentation", "segmentation/video": "segmentation",
}
COLUMNS = list(dict.fromkeys(FAMILIES.values())) + ["all"]
ESTIMATORS = {"grpo": "GRPO", "dr_grpo": "Dr.GRPO", "ema_grpo": "EMA-GRPO"}
PY = sys.executable
# Float drift between CPUs was the largest noise in the demo's figures: the same code and seeds drew other SFT
# checkpoints on other machines (README, "The demo", and NOTES.md), since torch's kernels, oneDNN's
# and MKL's each pick their instructions for the CPU at hand (AVX-512 or AVX2; MKL takes other paths on Intel
# and AMD) and reductions split over as many threads as there are cores. Every stage runs with these set (torch
# reads them at start-up): AVX2, which x86 CPUs of the last decade share, and 2 threads (the RL runs 1 each,
# rl_runs). Measured on an AMD EPYC (40 SFT steps of the demo; NOTES.md, "One machine's numbers on another"): torch's
# AVX2 kernels instead of its AVX-512 ones, oneDNN's likewise, and 1 thread instead of 2 each changed the losses;
# MKL's setting changed nothing there. It is pinned because MKL's reproducibility mode (CNR) is what makes its
# results equal across processors, Intel's among them. The stages keep their own torch.compile cache: inductor's
# on-disk cache does not key its kernels on ATEN_CPU_CAPABILITY, and a process at AVX2 that found kernels compiled
# for AVX-512 by an unpinned one decoded every token as 0 (the reverse corrupted memory; tests/test_rollout.py's
# compiled test, 2026-12-04). The demo's stages do not compile; a fork that adds --compile=true is covered.
PINNED_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT",
              "OMP_NUM_THREADS": "2",
              "TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(), f"torchinductor_avx2_{getpass.getuser()}")}
# RL sized for 2 CPU cores: 16 prompts x 8 samples in two micro-batches (measured: 16 prompts a step beat 8 at the same
# cost), lr 5e-5 (from the SFT checkpoints of suite seeds 0, 1, 2 with RL seeds 0-2 each, the overall gain over its
# spread: 2.8x, 5.4x, 0.4x at 5e-5 against 0.0x, 18x, -0.6x at 1e-4, which took multiple choice down on seeds 0 and 2;
# 2e-4 did worse than 1e-4; NOTES.md, "The RL learning rate"), the vision tower frozen (the release trains
# it; here it would cost most of the update), at most 2 rollout batches per step when the filter drops groups (the
# release: 20), and samples drawn at temperature 0.7 (the release: 1.0). Measured from the demo's SFT checkpoint: at
# 1.0 the samples score far below the greedy answer (segmentation 0.10 against 0.23) and RL raised the sampled reward
# on every task while greedy accuracy fell on 4 of 6; at 0.7 greedy accuracy rose on all dense tasks. The update's
# log-probs are the sampling distribution's, at 0.7 (train_rl, as the release's actor; README, "The demo").
RL_ARGS = ["--prompts_per_step=16", "--group_size=8", "--micro_batch_seqs=64", "--freeze_vision=true",
           "--max_refill_tries=2", "--temperature=0.7", "--lr=5e-5",
           "--resume=true"]  # a stage cut short (its out_dir holds a partial run) continues where it stopped


def run(cmd, done_marker=None, log=None, env=None):
    """Run one stage (unless done_marker exists), its output streaming to the terminal, or to `log` (an open file)
    for a stage running side by side with others. A failed stage stops the demo; one with a log returns False
    instead, so the stages beside it can finish (rl_runs)."""
    if done_marker and os.path.exists(done_marker):
        tqdm.write(f"[demo] skip (done): {' '.join(cmd)}")
        return True
    tqdm.write(f"[demo] $ {' '.join(cmd)}" + (f"  > {log.name}" if log else ""))
    if log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
    returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT if log else None, env=env).returncode
    if returncode and not log:
        sys.exit(f"[demo] failed with exit code {returncode}: {' '.join(cmd)}")
    return not returncode


def eval_command(model_dir, out_dir, data_path, cfg):
    """Greedy held-out evaluation: (command, the metrics file it writes)."""
    name = os.path.splitext(os.path.basename(data_path))[0]
    return ([PY, "eval.py", f"--model={model_dir}", f"--data={data_path}", f"--out_dir={out_dir}", "--sam2=false",
             f"--max_new_tokens={cfg.max_new_tokens}", "--batch_size=32"],
            os.path.join(out_dir, f"{name}.metrics.json"))


def read_metrics(path):
    with open(path) as f:
        return json.load(f)["metrics"]


def rl_command(cfg, sft_dir, rl_file, out_dir, estimator, seed):
    return [PY, "train_rl.py", f"--model={sft_dir}/hf", f"--data={rl_file}", f"--out_dir={out_dir}",
            f"--max_steps={cfg.rl_steps}", f"--max_new_tokens={cfg.max_new_tokens}", f"--seed={seed}",
            f"--estimator={estimator}", *RL_ARGS]


def last_step(metrics_path):
    """The step of a run's last metrics line (0 before the first or while a line is half written)."""
    try:
        with open(metrics_path, "rb") as f:
            f.seek(max(0, os.path.getsize(metrics_path) - 8192))
            return int(json.loads(f.read().decode(errors="replace").strip().splitlines()[-1])["step"])
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def rl_runs(cfg, sft_dir, rl_file, eval_file, runs):
    """RL runs [(out_dir, estimator, seed)] from the SFT checkpoint, each followed by its held-out evaluation, up
    to cfg.jobs of them side by side, each process on one thread; returns each run's eval metrics per task.

    Why side by side: the tiny model's RL step is too small for a second thread to help. Measured on 2 cores
    (12 steps from the demo's SFT checkpoint): one run at 2 threads 3.7 s a step; two runs at 1 thread side by
    side 3.7 s a step each; three side by side 5.9 s a step each, so three runs take 1.5x one run's time, not 3x.
    Each run's output goes to <out_dir>.log (its tail is printed if it fails); a bar counts the RL steps."""
    chains = []
    for out_dir, estimator, seed in runs:
        eval_cmd, metrics_file = eval_command(os.path.join(out_dir, "hf"), os.path.join(out_dir, "eval"), eval_file,
                                              cfg)
        chains.append((out_dir, [(rl_command(cfg, sft_dir, rl_file, out_dir, estimator, seed),
                                  os.path.join(out_dir, "hf", "config.json")), (eval_cmd, metrics_file)]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the thread count torch starts with

    def run_chain(out_dir, stages):
        os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
        with open(f"{out_dir}.log", "a") as log:
            for cmd, done_marker in stages:
                if not run(cmd, done_marker, log, env):
                    return " ".join(cmd)
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.jobs) as pool, \
            tqdm(total=cfg.rl_steps * len(chains), desc=f"rl: {len(chains)} runs, {cfg.jobs} at a time",
                 dynamic_ncols=True) as bar:
        futures = [pool.submit(run_chain, out_dir, stages) for out_dir, stages in chains]
        running = True
        while running:
            running = bool(concurrent.futures.wait(futures, timeout=5).not_done)
            bar.n = sum(min(last_step(os.path.join(out_dir, "metrics.jsonl")), cfg.rl_steps) for out_dir, _ in chains)
            bar.refresh()
    failed = [(out_dir, f.result()) for (out_dir, _), f in zip(chains, futures) if f.result()]
    for out_dir, cmd in failed:
        with open(f"{out_dir}.log", errors="replace") as log:
            print(f"[demo] failed: {cmd}\n[demo] the last lines of {out_dir}.log:\n" + "".join(log.readlines()[-30:]),
                  flush=True)
    if failed:
        sys.exit(f"[demo] {len(failed)} of {len(chains)} RL runs failed (above)")
    return [read_metrics(stages[-1][1]) for _, stages in chains]


def family_means(task_values):
    """{task: value} -> {family: mean over its tasks}, and "all" over every task (each task weighs the same)."""
    by_family = {}
    for task, value in task_values.items():
        if task in FAMILIES:
            by_family.setdefault(FAMILIES[task], []).append(value)
    out = {family: sum(v) / len(v) for family, v in by_family.items()}
    tasks = [value for task, value in task_values.items() if task in FAMILIES]
    out["all"] = sum(tasks) / len(tasks)
    return out


def accuracy(metrics, key="reward_accuracy"):
    return family_means({task: values[key] for task, values in metrics.items() if task in FAMILIES})


def over_seeds(runs):
    """[{column: value}] of several seeds -> {"mean", "std" (sample), "min", "max"}: each {column: value}."""
    columns = runs[0].keys()
    return {"mean": {c: statistics.mean(r[c] for r in runs) for c in columns},
            "std": {c: statistics.stdev(r[c] for r in runs) if len(runs) > 1 else 0.0 for c in columns},
            "min": {c: min(r[c] for r in runs) for c in columns},
            "max": {c: max(r[c] for r in runs) for c in columns}}


# -----------------------------------------------------------------------------
# the blind baseline: what an answer that never looks at the media scores

def blind_baselines(data_dir, candidates=100, sample=300):
    """{task key: held-out accuracy} of the best answer that ignores the media: one fixed answer per task, the
    best of `candidates` training answers on `sample` other training rows; for tracking also the first box of the
    prompt copied to every second, whichever scores higher on the training rows."""
    with open(os.path.join(data_dir, "sft.json")) as f:
        sft = json.load(f)
    with open(os.path.join(data_dir, "eval.json")) as f:
        held_out = json.load(f)
    train, test = {}, {}
    for row in sft:
        answer = rewards.answer_text(row["messages"][1]["content"])
        train.setdefault((row["problem_type"], row["data_type"]), []).append((row["messages"][0]["content"], answer))
    for row in held_out:
        test.setdefault((row["problem_type"], row["data_type"]), []).append(
            (row["problem"], rewards.answer_text(row["solution"])))
    rng = np.random.default_rng(0)

    def score(guess, rows):  # guess: question -> answer
        return statistics.mean(rewards.score(f"<think></think><answer>{guess(q)}</answer>", gt, pt, dt)[1]["accuracy"]
                               for q, gt in rows)

    def copy_first_box(question):
        box = json.loads(re.search(r"starts in box (\[[^\]]*\])", question).group(1))
        return json.dumps({"boxes": {str(s): box for s in range(1, shapes.SECONDS)}})

    out = {}
    for (pt, dt), rows in test.items():
        pool = train[(pt, dt)]
        n_try = min(candidates, len(pool) // 2)  # a small suite: half the rows propose, half score
        picks = [pool[i] for i in rng.choice(len(pool), min(len(pool), n_try + sample), replace=False)]
        tried, scored_on = (picks[:n_try], picks[n_try:]) if n_try else (picks, picks)
        guesses = [lambda q, a=answer: a for _, answer in tried]
        if pt == "tracking":
            guesses.append(copy_first_box)
        scores = {i: score(g, scored_on) for i, g in enumerate(guesses)}
        best = guesses[max(scores, key=scores.get)]
        out[data.task_key(pt, dt)] = score(best, rows)
    return out


# -----------------------------------------------------------------------------
# report: figures and markdown tables

def read_jsonl(path):
    """A metrics file's lines, each step's once: a resumed run appends the steps after its checkpoint again
    (common.Logger), so a line whose step is below the last one's drops the earlier lines from that step on."""
    rows = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if rows and row["step"] < rows[-1]["step"]:  # a resume: the later lines win
                rows = [r for r in rows if r["step"] < row["step"]]
            rows.append(row)
    return rows


def series(rows, key):
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def smooth(values, k=10):
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def family_curve(rows, family, part="accuracy"):
    """(steps, the sampled reward part averaged over the family's tasks) of one RL run."""
    keys = [f"reward/{task}/{part}" for task, f in FAMILIES.items() if f == family]
    steps, values = [], []
    for r in rows:
        present = [r[k] for k in keys if isinstance(r.get(k), (int, float))]
        if present:
            steps.append(r["step"])
            values.append(sum(present) / len(present))
    return steps, values


def plot_band(ax, runs, label):
    """runs: [(steps, values)] of several seeds -> the smoothed mean over seeds and a min..max band."""
    length = min(len(values) for _, values in runs)
    steps = runs[0][0][:length]
    curves = np.array([smooth(values[:length]) for _, values in runs])  # [seeds, steps]
    line, = ax.plot(steps, curves.mean(0), label=label)
    ax.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)


def figures(sft_dir, rl_dirs, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    sft = read_jsonl(os.path.join(sft_dir, "metrics.jsonl"))
    rls = [read_jsonl(os.path.join(d, "metrics.jsonl")) for d in rl_dirs]

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(*series(sft, "loss"), label="train")
    ax.plot(*series(sft, "val_loss"), "o-", label="held-out")
    ax.set(xlabel="optimizer step", ylabel="loss (assistant tokens)", title="SFT loss and media-swap gap", yscale="log")
    ax.legend(loc="upper left")
    gap = ax.twinx()  # held-out loss with swapped media minus with their own: how much the answers read the media
    gap.plot(*series(sft, "val_media_gap"), "s--", color="tab:green", label="media-swap gap")
    gap.set_ylabel("media-swap gap")
    gap.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "demo_sft_loss.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for family in COLUMNS[:-1]:
        plot_band(ax, [family_curve(rl, family) for rl in rls], family)
    ax.set(xlabel="RL step", ylabel="sampled accuracy, smoothed",
           title=f"RL (EMA-GRPO): mean of {len(rls)} seeds, band min..max")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "demo_rl_reward.png"), dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    rl = rls[0]
    for key in sorted({k[len("ema/"):-len("/std")] for r in rl for k in r if k.startswith("ema/") and k.endswith("/std")}):
        axes[0].plot(*series(rl, f"ema/{key}/std"), label=key)
    axes[0].set(xlabel="RL step", ylabel="EMA std of reward", title="EMA-GRPO task std (first seed)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].plot(*series(rl, "response_length"))
    axes[1].set(xlabel="RL step", ylabel="tokens", title="mean response length (first seed)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "demo_rl_ema_length.png"), dpi=110)
    plt.close("all")


def table(rows, columns, title):
    """rows: {name: {column: value}} -> a printed table (markdown, so it pastes into the README)."""
    lines = [f"### {title}", "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:+.3f}" if name.startswith("gain") else f"{values[c]:.3f}"
                                                  if c in values else "-" for c in columns) + " |")
    print("\n".join(lines) + "\n", flush=True)


def seed_rows(label, runs, sft):
    """Table rows for one estimator's seeds: mean, std, min, max, and the gain of the mean over SFT."""
    stats = over_seeds(runs)
    n = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
    return {f"{label}, mean of {n}": stats["mean"], f"{label}, std over seeds": stats["std"],
            f"{label}, min": stats["min"], f"{label}, max": stats["max"],
            f"gain of {label} over SFT": {c: stats["mean"][c] - sft[c] for c in sft}}


# -----------------------------------------------------------------------------
# the main job, then the ablations

def main(argv):
    cfg = common.parse_config(Config, argv)
    if cfg.pin_cpu:
        os.environ.update(PINNED_CPU)  # every stage below inherits them
    t_start = time.time()
    data_dir, model_dir = os.path.join(cfg.out, "data"), os.path.join(cfg.out, "tiny-model")
    sft_dir = os.path.join(cfg.out, "sft")
    eval_file = os.path.join(data_dir, "eval.json")
    seeds = [int(s) for s in cfg.rl_seeds.split(",")]
    minutes = {}

    # --- data and the tiny model
    t0 = time.time()
    run([PY, "shapes.py", f"--out={data_dir}", f"--seed={cfg.seed}", f"--n_sft={cfg.n_sft}",
         f"--n_rl={cfg.n_rl}", f"--n_eval={cfg.n_eval}", f"--tasks={cfg.tasks}"], eval_file)
    run([PY, "model.py", f"--out={model_dir}", f"--data={data_dir}", f"--seed={cfg.seed}",
         f"--position_code_rms={cfg.position_code_rms}", f"--size={cfg.model_size}"],
        os.path.join(model_dir, "config.json"))
    minutes["suite"] = (time.time() - t0) / 60

    # --- SFT (multiple choice alone first if asked, then every task), then evaluation
    t0 = time.time()
    sft_start = model_dir
    if cfg.mc_first_steps:
        mc_file, mc_dir = os.path.join(data_dir, "sft_mc.json"), os.path.join(cfg.out, "sft-mc")
        with open(os.path.join(data_dir, "sft.json")) as f:
            mc_rows = [row for row in json.load(f) if row["problem_type"] == "multiple choice"]
        if not mc_rows:
            raise ValueError(f"--mc_first_steps={cfg.mc_first_steps}, but {data_dir}/sft.json has no multiple-choice "
                             f"row (--tasks={cfg.tasks}); pass --mc_first_steps=0")
        with open(mc_file, "w") as f:
            json.dump(mc_rows, f)
        run([PY, "train_sft.py", f"--model={model_dir}", f"--data={mc_file}", f"--out_dir={mc_dir}",
             f"--max_steps={cfg.mc_first_steps}", "--batch_size=16", "--freeze_vision=true", "--val_every=100",
             "--save_every=200", f"--seed={cfg.seed}", "--resume=true"], os.path.join(mc_dir, "hf", "config.json"))
        sft_start = os.path.join(mc_dir, "hf")
    entries = len(shapes.select_tasks(cfg.tasks))  # two rows of each a step, on average: one micro-batch each
    run([PY, "train_sft.py", f"--model={sft_start}", f"--data={data_dir}/sft.json", f"--out_dir={sft_dir}",
         f"--max_steps={cfg.sft_steps}", f"--batch_size={2 * entries}", f"--micro_batch_size={entries}",
         "--freeze_vision=true", "--val_every=100", "--save_every=250", f"--seed={cfg.seed}", "--resume=true"],
        os.path.join(sft_dir, "hf", "config.json"))
    minutes["sft"] = (time.time() - t0) / 60
    t0 = time.time()
    cmd, metrics_file = eval_command(os.path.join(sft_dir, "hf"), os.path.join(cfg.out, "eval-sft"), eval_file, cfg)
    run(cmd, metrics_file)
    sft_metrics = read_metrics(metrics_file)
    minutes["eval"] = (time.time() - t0) / 60

    # --- RL (EMA-GRPO) with each seed, then evaluation
    t0 = time.time()
    rl_metrics = rl_runs(cfg, sft_dir, os.path.join(data_dir, "rl.json"), eval_file,
                         [(os.path.join(cfg.out, f"rl-ema_grpo-seed{seed}"), "ema_grpo", seed) for seed in seeds])
    minutes["rl_and_eval"] = (time.time() - t0) / 60

    # --- report: figures, per-task and per-family tables, the summary line
    figures(sft_dir, [os.path.join(cfg.out, f"rl-ema_grpo-seed{seed}") for seed in seeds], cfg.figures)
    tasks = [t for t in sft_metrics if t in FAMILIES]
    blind = blind_baselines(data_dir)
    for key, title in (("format_rate", "format rate"), ("reward", "mean reward (max 1.5)"),
                       ("reward_accuracy", "accuracy (the reward's accuracy term, 0..1)")):
        rows = {task: {"after SFT": sft_metrics[task][key],
                       **{f"RL seed {s}": m[task][key] for s, m in zip(seeds, rl_metrics)}} for task in tasks}
        if key == "reward_accuracy":
            rows = {task: {"blind": blind[task], **values} for task, values in rows.items()}
        table(rows, list(next(iter(rows.values()))), f"{title}, held-out, per task")
    sft_family = accuracy(sft_metrics)
    rl_family = [accuracy(m) for m in rl_metrics]
    table({"blind (no media)": family_means(blind), "after SFT": sft_family,
           **seed_rows("after RL (EMA-GRPO)", rl_family, sft_family)}, COLUMNS, "accuracy per task family, held-out")

    if cfg.ablation:
        t0 = time.time()
        ablation(cfg, sft_dir, data_dir, eval_file, sft_family, seeds, rl_family)
        minutes["ablation"] = (time.time() - t0) / 60
    if cfg.spread_experiment:
        t0 = time.time()
        spread_experiment(cfg, sft_dir, data_dir, sft_metrics, seeds)
        minutes["spread_experiment"] = (time.time() - t0) / 60

    stats = over_seeds(rl_family)
    # the SFT checkpoint's last media-swap gap (train_sft.py): ~0 for a draw that answers from the text alone
    media_gap = [r["val_media_gap"] for r in read_jsonl(os.path.join(sft_dir, "metrics.jsonl")) if "val_media_gap" in r]
    gain = stats["mean"]["all"] - sft_family["all"]
    up = sum(stats["mean"][c] > sft_family[c] for c in COLUMNS[:-1])
    above_blind = sum(sft_family[c] > family_means(blind)[c] for c in COLUMNS[:-1])
    print(f"demo minutes={(time.time() - t_start) / 60:.1f} "
          + " ".join(f"{k}_minutes={v:.1f}" for k, v in minutes.items())
          + f" sft_format_rate={accuracy(sft_metrics, 'format_rate')['all']:.3f}"
          f" blind_accuracy={family_means(blind)['all']:.3f} sft_accuracy={sft_family['all']:.3f}"
          f" sft_families_above_blind={above_blind}/{len(COLUMNS) - 1} sft_multiple_choice={sft_family['QA']:.3f}"
          f" sft_media_gap={media_gap[-1] if media_gap else float('nan'):.3f}"
          f" rl_accuracy={stats['mean']['all']:.3f} rl_gain={gain:+.3f} rl_gain_std={stats['std']['all']:.3f}"
          f" rl_gain_range={stats['min']['all'] - sft_family['all']:+.3f}..{stats['max']['all'] - sft_family['all']:+.3f}"
          f" rl_families_up={up}/{len(COLUMNS) - 1}", flush=True)


def ablation(cfg, sft_dir, data_dir, eval_file, sft_family, seeds, ema_family):
    """GRPO and Dr.GRPO from the same SFT checkpoint with the main job's seeds and budget; EMA-GRPO is the main job."""
    baselines = [e for e in ESTIMATORS if e != "ema_grpo"]
    runs = [(os.path.join(cfg.out, "ablation", f"{e}-seed{seed}"), e, seed) for e in baselines for seed in seeds]
    held_out = iter(rl_runs(cfg, sft_dir, os.path.join(data_dir, "rl.json"), eval_file, runs))  # in runs' order
    families = {"ema_grpo": ema_family, **{e: [accuracy(next(held_out)) for _ in seeds] for e in baselines}}
    rows = {"SFT": sft_family}
    for estimator, label in ESTIMATORS.items():
        stats = over_seeds(families[estimator])
        rows[f"+{label} (mean of {len(seeds)})"] = stats["mean"]
        rows[f"{label} std over seeds"] = stats["std"]
    table(rows, COLUMNS, "ablation: accuracy per task family, held-out")


# The designed experiment (SPEC 5): a binary reward (multiple choice: 0 or 1, a group's spread is large) next to a
# dense one whose samples agree closely (segmentation: box IoU and six points averaged, a small spread within a
# group). GRPO divides each group by its own spread, so both tasks get advantages of the same size; Dr.GRPO divides
# by nothing, so the dense task's advantages are a small fraction of the binary one's; EMA-GRPO divides by each
# task's running spread over all its samples, so its dense-task advantages lie between the two.
SPREAD_TASKS = ("multiple choice", "segmentation")


def spread_experiment(cfg, sft_dir, data_dir, sft_metrics, seeds):
    """Each estimator x seed from the SFT checkpoint on the RL rows of SPREAD_TASKS only; per task: the advantage
    size it gave, the sampled accuracy during RL, and the held-out accuracy after."""
    files = {}
    for split in ("rl", "eval"):
        with open(os.path.join(data_dir, f"{split}.json")) as f:
            rows = [row for row in json.load(f) if row["problem_type"] in SPREAD_TASKS]
        files[split] = os.path.join(data_dir, f"{split}-spread.json")  # next to the media its paths point into
        with open(files[split], "w") as f:
            json.dump(rows, f)
    tasks = sorted({data.task_key(r["problem_type"], r["data_type"]) for r in rows})
    runs = [(os.path.join(cfg.out, "spread", f"{e}-seed{seed}"), e, seed) for e in ESTIMATORS for seed in seeds]
    logs, held_out = {}, {}
    for (out_dir, estimator, _), metrics in zip(runs, rl_runs(cfg, sft_dir, files["rl"], files["eval"], runs)):
        logs.setdefault(estimator, []).append(read_jsonl(os.path.join(out_dir, "metrics.jsonl")))
        held_out.setdefault(estimator, []).append({t: metrics[t]["reward_accuracy"] for t in tasks})

    rows, third = {}, cfg.rl_steps // 3
    for estimator, label in ESTIMATORS.items():
        def mean_of(key, steps=slice(None)):  # over seeds, then over the logged steps (nan: never logged, e.g.
            # a task with no kept group: its advantages are logged only for groups the update used)
            values = [series(log, key)[1][steps] for log in logs[estimator]]
            return statistics.mean(statistics.mean(v) for v in values) if all(values) else float("nan")
        for task in tasks:
            accuracy_key = f"reward/{task}/accuracy"
            gains = [run[task] - sft_metrics[task]["reward_accuracy"] for run in held_out[estimator]]
            rows[f"{label}: {task}"] = {
                "group std": mean_of(f"advantage/{task}/group_std"), "EMA std": mean_of(f"ema/{task}/std"),
                "mean abs advantage": mean_of(f"advantage/{task}/abs"),
                "sampled acc, first third": mean_of(accuracy_key, slice(0, third)),
                "sampled acc, last third": mean_of(accuracy_key, slice(-third, None)),
                "held-out gain, mean": statistics.mean(gains),
                "held-out gain, std": statistics.stdev(gains) if len(gains) > 1 else 0.0}
    table(rows, list(next(iter(rows.values()))),
          f"estimators on a binary task next to a low-spread one ({len(seeds)} seeds, {cfg.rl_steps} steps each)")
    spread_figure(logs, tasks, cfg.figures)


def spread_figure(logs, tasks, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2))
    for ax, task in zip(axes, tasks):
        for estimator, label in ESTIMATORS.items():
            plot_band(ax, [series(log, f"reward/{task}/accuracy") for log in logs[estimator]], label)
        ax.set(xlabel="RL step", ylabel="sampled accuracy, smoothed", title=task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "demo_spread.png"), dpi=110)
    plt.close("all")


if __name__ == "__main__":
    main(sys.argv[1:])
