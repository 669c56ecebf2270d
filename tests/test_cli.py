"""One CLI for every script: common.parse_config with a dataclass, `--key=value` and `--key value`, `--help` from
the dataclass's comments, and no config key that torchrun's own parser would take for one of its options."""
import contextlib
import dataclasses
import io

import pytest
from torch.distributed.run import get_args_parser

import bench
import common
import data
import demo
import eval as eval_lib
import memory
import model as model_lib
import rollout
import shapes
import train_rl
import train_sft

CONFIGS = [train_rl.Config, train_sft.Config, eval_lib.Config, data.Config, model_lib.Config, shapes.Config,
           demo.Config, bench.RolloutConfig, bench.RewardsConfig, bench.MemoryConfig]
TRAINERS = {"train_rl.py": train_rl.Config, "train_sft.py": train_sft.Config, "eval.py": eval_lib.Config}


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_torchrun_passes_every_key_through(script):
    """torchrun's argparse reads an argument after the script as its own when it abbreviates two of its options
    (`--n=4` -> --nnodes or --nproc_per_node?) and stops; every key must reach the script untouched, without --."""
    parser = get_args_parser()
    keys = [f.name for f in dataclasses.fields(TRAINERS[script])]
    args = [f"--{key}=1" for key in keys] + ["--preset=release"]
    parsed = parser.parse_args(["--standalone", "--nproc_per_node", "2", script] + args)
    assert parsed.training_script == script and parsed.training_script_args == args
    assert parsed.nproc_per_node == "2"


def test_key_value_pairs_with_or_without_equals():
    for argv in (["--lr=3e-4", "--max_steps=7", "--estimator=grpo"], ["--lr", "3e-4", "--max_steps", "7",
                                                                       "--estimator", "grpo"],
                 ["--lr", "3e-4", "--max_steps=7", "--estimator", "grpo"]):
        cfg = common.parse_config(train_rl.Config, argv, train_rl.PRESETS)
        assert (cfg.lr, cfg.max_steps, cfg.estimator) == (3e-4, 7, "grpo")
    assert common.parse_config(train_rl.Config, ["--preset", "release"], train_rl.PRESETS).group_size == 8
    with pytest.raises(ValueError, match="expected --key=value or --key value"):
        common.parse_config(train_rl.Config, ["--lr", "--max_steps=7"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_help_lists_every_key_with_its_comment(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        common.parse_config(config, ["--help"])
    assert stop.value.code == 0
    text = out.getvalue()
    for field in dataclasses.fields(config):
        assert f"--{field.name}=" in text, field.name
    if config is train_rl.Config:  # a key's trailing comment and a section heading come from the source
        assert "--group_size=8" in text and "responses per prompt" in text and "# policy update (SPEC 6)" in text


@pytest.mark.parametrize("script, presets", [(train_rl, train_rl.PRESETS), (train_sft, train_sft.PRESETS),
                                             (eval_lib, eval_lib.PRESETS)])
def test_release_presets_parse(script, presets):
    cfg = common.parse_config(script.Config, ["--preset=release"], presets)
    assert cfg.bf16 and all(getattr(cfg, key) == value for key, value in presets["release"].items())


def test_release_plans_are_built_on_the_meta_device_and_fit(capsys):
    """`train_rl.py --preset=release --plan=true` and `eval.py --preset=release --plan=true` print the per-GPU
    plans of Qwen3-VL-8B (no process group, model or data) and the release presets fit 8 x 80 GB."""
    train_rl.main(["--preset=release", "--plan=true"])
    out = capsys.readouterr().out
    assert "Qwen3-VL-8B on meta: 8.77B parameters" in out and "(80 GB): headroom" in out and "(141 GB)" in out
    eval_lib.main(["--preset=release", "--plan=true"])
    out += capsys.readouterr().out
    assert "eval, Qwen3-VL-8B in bf16" in out and "DOES NOT FIT" not in out
    cfg = common.parse_config(train_rl.Config, ["--preset=release"], train_rl.PRESETS)
    assert memory.print_rl_plan(cfg) < 0.9 * 80e9
    # twice the preset's rollout batch: its decode caches outgrow 80 GB
    assert memory.print_rl_plan(dataclasses.replace(cfg, rollout_batch_prompts=2 * cfg.rollout_batch_prompts)) > 80e9


def test_kv_cache_slots_follow_the_bucketed_growth():
    """2 prompts of 4,608 tokens x 8 samples and 4,096 new tokens: the prompts once, 16 rows of 4,096 generated
    slots while the 2,048-slot cache is copied into them; 9 prompts x 1 sample: 16 groups; a length that fits the
    first generated slots never doubles. (tests/test_rollout.py holds this to what generate allocates.)"""
    assert memory.kv_cache_slots(2, 8, 4608, 4096) == 2 * 4608 + 16 * (4096 + 2048)
    assert memory.kv_cache_slots(9, 1, 100, 20) == 16 * (100 + 32 + 16)
    assert memory.kv_cache_slots(3, 4, 100, rollout.FIRST_SLOTS) == 4 * (100 + 4 * rollout.FIRST_SLOTS)
