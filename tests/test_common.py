"""common.py: config overrides, checkpoint round trips, HF export, logging, and FSDP2 + DCP on 2 gloo ranks."""
import atexit
import dataclasses
import json
import os
import signal
import sys
import types

import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import common
from conftest import torchrun
from ema_grpo import TaskEMA

# -----------------------------------------------------------------------------
# a tiny random Qwen3-VL and inputs with images and videos (token ids 290-293 are the vision tokens)


def tiny_model(seed=0):
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config)


def tiny_inputs(seed, image=True, video=False, batch=2):
    """Each row: [<vs> 4 image tokens <ve>] [<vs> 4 video tokens <ve>] 6 text tokens; 4x4 patches per picture."""
    gen = torch.Generator().manual_seed(seed)
    ids, types, inputs = [], [], {}
    for used, token, kind, name in ((image, 290, 1, "pixel_values"), (video, 291, 2, "pixel_values_videos")):
        if used:
            ids.append(torch.tensor([292, token, token, token, token, 293]))
            types.append(torch.tensor([0, kind, kind, kind, kind, 0]))
            inputs[name] = torch.randn(batch * 16, 96, generator=gen)  # [B*16, C*T*P*P]
            inputs["image_grid_thw" if kind == 1 else "video_grid_thw"] = torch.tensor([[1, 4, 4]] * batch)
    ids.append(torch.randint(0, 280, (6,), generator=gen))
    types.append(torch.zeros(6, dtype=torch.long))
    input_ids = torch.cat(ids).expand(batch, -1)  # [B, L]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": torch.cat(types).expand(batch, -1), **inputs}


def tiny_loss(model, inputs):
    return model(**inputs).logits.float().pow(2).mean()


# -----------------------------------------------------------------------------
# config


@dataclasses.dataclass
class Config:
    lr: float = 1e-5
    steps: int = 10
    model: str = "runs/tiny-model"
    bf16: bool = False
    max_rows: int | None = None
    resume: str | None = None


PRESETS = {"shapes": {"steps": 50, "lr": 1}, "release": {"bf16": True, "max_rows": 1000}}


def test_parse_config_types_and_presets():
    assert common.parse_config(Config, []) == Config()
    config = common.parse_config(Config, ["--lr=3e-4", "--steps=7", "--model=/x/y", "--bf16=true",
                                          "--max_rows=12", "--resume=none"])
    assert config == Config(lr=3e-4, steps=7, model="/x/y", bf16=True, max_rows=12, resume=None)
    assert type(config.lr) is float and type(config.steps) is int
    assert common.parse_config(Config, ["--bf16=0", "--max_rows=None", "--resume=runs/a"]) == Config(resume="runs/a")
    # the preset applies first, overrides win wherever they appear
    config = common.parse_config(Config, ["--steps=3", "--preset=shapes"], PRESETS)
    assert (config.steps, config.lr) == (3, 1.0) and type(config.lr) is float
    assert common.parse_config(Config, ["--preset=release"], PRESETS).max_rows == 1000


@pytest.mark.parametrize("argv, message", [
    (["--lrr=1"], "unknown key 'lrr'"),
    (["--steps=1.5"], "--steps=1.5: expected int"),
    (["--bf16=yes"], r"--bf16=yes: expected bool \(true/false/1/0\)"),
    (["--lr=fast"], "--lr=fast: expected float"),
    (["--max_rows=many"], "--max_rows=many: expected int or none"),
    (["--steps=none"], "--steps=none: expected int"),
    (["steps=3"], "expected --key=value"),
    (["--steps"], "expected --key=value"),
    (["--preset=huge"], "unknown preset"),
])
def test_parse_config_rejects(argv, message):
    with pytest.raises(ValueError, match=message):
        common.parse_config(Config, argv, PRESETS)


def test_parse_config_rejects_bad_presets():
    with pytest.raises(ValueError, match="preset 'p': unknown key 'stepz'"):
        common.parse_config(Config, ["--preset=p"], {"p": {"stepz": 1}})
    with pytest.raises(ValueError, match="preset 'p': steps='10' is not a int"):
        common.parse_config(Config, ["--preset=p"], {"p": {"steps": "10"}})


# -----------------------------------------------------------------------------
# checkpoints, RNG, export (single process)


def adamw_step(model, inputs, lr=1e-2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    tiny_loss(model, inputs).backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    inputs = tiny_inputs(seed=1, video=True)
    model = tiny_model()
    optimizer = adamw_step(model, inputs)
    sampler = torch.Generator().manual_seed(7)
    tracker = TaskEMA()
    tracker.update(torch.tensor([0.2, 0.9]), ["math", "OCR"])
    path = common.save_checkpoint(str(tmp_path), 5, model, optimizer,
                                  {"rng": common.rng_state({"sampler": sampler}), "position": 123,
                                   "ema": tracker.state_dict()})
    assert path == str(tmp_path / "step_000005")
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    # what a run would draw next, and its next update
    expected_draws = (torch.rand(3), torch.rand(2, generator=sampler), float(torch.randn(1)))
    tiny_loss(model, inputs).backward()
    optimizer.step()

    # a half-written later checkpoint (crash before the rename) is never picked up
    os.makedirs(tmp_path / "step_000009.tmp")
    open(tmp_path / "step_000009.tmp" / ".metadata", "w").close()
    assert common.latest_checkpoint(str(tmp_path)) == path
    assert common.latest_checkpoint(str(tmp_path / "nothing")) is None

    torch.manual_seed(999)  # scramble the global RNG: the checkpoint must restore it
    resumed = tiny_model(seed=3)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.01)
    resumed_sampler = torch.Generator()
    extra = common.load_checkpoint(path, resumed, resumed_optimizer)
    assert (extra["step"], extra["position"], extra["world_size"]) == (5, 123, 1)
    restored = TaskEMA()
    restored.load_state_dict(extra["ema"])
    assert restored.stats() == tracker.stats()
    common.set_rng_state(extra["rng"], {"sampler": resumed_sampler})
    draws = (torch.rand(3), torch.rand(2, generator=resumed_sampler), float(torch.randn(1)))
    assert torch.equal(draws[0], expected_draws[0]) and torch.equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]

    tiny_loss(resumed, inputs).backward()
    resumed_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert resumed_optimizer.state_dict()["state"][0]["step"] == 2

    weights_only = tiny_model(seed=4)  # no optimizer: e.g. exporting a checkpoint
    common.load_checkpoint(path, weights_only)
    for name, p in weights_only.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_rng_state_covers_python_and_numpy():
    import random

    import numpy as np
    state = common.rng_state()
    expected = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    common.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected


def test_export_hf_round_trip(tmp_path, model_dir):
    import model as model_lib
    tiny, processor = model_lib.load_model(model_dir)
    common.export_hf(tiny, processor, str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    loaded, loaded_processor = model_lib.load_model(str(tmp_path / "hf"))
    assert type(loaded) is type(tiny)
    text = loaded_processor.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                                add_generation_prompt=True)
    assert text == processor.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                                 add_generation_prompt=True)
    input_ids = processor.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, tiny(input_ids=input_ids).logits)
    for (name, p), q in zip(tiny.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_export_hf_crash_leaves_previous_export(tmp_path, model_dir, monkeypatch):
    """A crash while writing (here: the processor's files) leaves the previous export whole, not a folder whose
    config.json says "done" without weights; a second export replaces the first."""
    import model as model_lib
    tiny, processor = model_lib.load_model(model_dir)
    out = str(tmp_path / "hf")
    common.export_hf(tiny, processor, out)
    before = sorted(os.listdir(out))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(processor, "save_pretrained", crash)
        torch.nn.init.zeros_(tiny.lm_head.weight)
        with pytest.raises(OSError, match="disk full"):
            common.export_hf(tiny, processor, out)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["hf"]  # the partial write removed
    assert not torch.equal(model_lib.load_model(out)[0].lm_head.weight, tiny.lm_head.weight)  # the old weights
    common.export_hf(tiny, processor, out)
    assert torch.equal(model_lib.load_model(out)[0].lm_head.weight, tiny.lm_head.weight)


# -----------------------------------------------------------------------------
# logging, signals, reductions


def test_logger_writes_jsonl_and_stdout(tmp_path, capsys):
    logger = common.Logger(str(tmp_path), Config(steps=3), use_wandb=False)
    logger.log(1, {"loss": 0.5, "ema": {"math": {"std": 0.25}}, "n": 3, "grad_norm": torch.tensor(2.0)})
    logger.log(2, {"loss": float("nan")})
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5, "ema/math/std": 0.25, "n": 3, "grad_norm": 2.0},
                    {"step": 2, "loss": "nan"}]
    assert json.load(open(tmp_path / "config.json"))["steps"] == 3
    out = capsys.readouterr().out
    assert "step 1 | loss 0.5 | ema/math/std 0.25 | n 3" in out and '"steps": 3' in out


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    import wandb
    inits = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: inits.append(kwargs) or types.SimpleNamespace(
        log=lambda *a, **k: None, finish=lambda: None))
    for resume in (False, True, False):
        common.Logger(str(tmp_path), Config(), use_wandb=True, resume=resume).close()
    first, resumed, fresh = (call["id"] for call in inits)
    assert resumed == first and fresh != first and all(call["resume"] == "allow" for call in inits)


def test_sigterm_flag_and_single_process_helpers():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        flag = common.StopFlag(grace_s=0.0)
        flag.start_step()
        assert not flag.requested and not flag.drop_step()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.drop_step()  # no time to finish the step: drop it
        # a step whose rest fits in the grace is finished, then the run stops after it
        flag = common.StopFlag(grace_s=3600.0)
        flag.start_step()
        assert not flag.stop_after_step()
        flag.start_step()
        os.kill(os.getpid(), signal.SIGTERM)
        assert not flag.drop_step() and flag.finish_step and flag.stop_after_step()
        # before any step has finished its length is unknown: dropped whatever the grace
        flag = common.StopFlag(grace_s=3600.0)
        flag.start_step()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.drop_step()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert common.init_distributed()[:3] == (0, 1, 0)  # not under torchrun: one process, no group
    assert common.all_reduce({"a": 2, "b": torch.tensor(1.5)}, "mean") == {"a": 2.0, "b": 1.5}
    model = tiny_model()
    assert common.shard_model(model, mixed_precision=True) is model  # one process: the plain model


def test_kahan_adamw_follows_fp64_adamw_where_plain_bf16_adamw_stalls():
    """bf16 weights of size ~0.02 (bf16 resolution there: 1.2e-4) and 300 steps at lr 1e-5 with weight decay: each
    update is far below the resolution. KahanAdamW follows AdamW run in fp64; torch's AdamW on the bf16 weights
    barely moves them."""
    gen = torch.Generator().manual_seed(0)
    start = (torch.randn(4096, generator=gen) * 0.02).bfloat16()
    grads = [(torch.randn(4096, generator=gen) + 0.5).bfloat16() for _ in range(300)]  # a drift to follow
    runs = {}
    for name, dtype, make in (("fp64", torch.float64, torch.optim.AdamW), ("plain", torch.bfloat16, torch.optim.AdamW),
                              ("kahan", torch.bfloat16, common.KahanAdamW)):
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = make([weight], lr=1e-5, weight_decay=0.1)
        for grad in grads:
            weight.grad = grad.to(dtype)
            optimizer.step()
        runs[name] = (weight.detach().double(), optimizer.state[weight])
    reference = runs["fp64"][0]
    moved = (reference - start.double()).abs().mean()
    assert moved > 1e-3, moved  # 8 bf16 steps at 0.02
    plain, (kahan, state) = runs["plain"][0], runs["kahan"]
    assert (plain - start.double()).abs().mean() < 0.1 * moved  # stalled: most updates round away
    # the bf16 weight plus its compensation follows the fp64 run to within 4% of the distance travelled
    assert (kahan + state["compensation"].double() - reference).abs().max() < 5e-5
    assert (kahan - reference).abs().mean() < 0.05 * (plain - reference).abs().mean()
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "compensation")} == {torch.bfloat16}
    assert common.build_optimizer([torch.nn.Parameter(start)], 1e-5, 0.0, "bf16").__class__ is common.KahanAdamW


# -----------------------------------------------------------------------------
# 2 gloo ranks under torchrun: the model filled from rank 0, FSDP2 forward/backward + AdamW step, DCP save, HF
# export; reload in one process


def rank_inputs(rank):
    return tiny_inputs(seed=rank, image=rank == 0, video=rank == 0)


def _worker(out_dir):
    """Rank 0 has images and videos (the vision tower runs twice), rank 1 text only (it never runs)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    rank, _, _, _ = common.init_distributed()
    with torch.device("meta"):  # every rank builds the model without weights; rank 0's copy fills the shards
        skeleton = tiny_model()
    model = common.shard_model(skeleton, mixed_precision=False, full_model=tiny_model() if rank == 0 else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    # the loss of the global batch is the sum of the per-rank losses: gradients are summed over ranks
    tiny_loss(model, rank_inputs(rank)).backward()
    grad_norm = common.clip_grad_norm(model, 0.05)
    optimizer.step()
    common.save_checkpoint(out_dir, 1, model, optimizer, {"rank": rank, "grad_norm": grad_norm})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    common.export_hf(model, tokenizer, os.path.join(out_dir, "hf"))

    # the mixed-precision path runs too: bf16 compute, fp32 sharded master weights and gradients
    mixed = common.shard_model(tiny_model(), mixed_precision=True)
    logits = mixed(**rank_inputs(rank)).logits
    logits.float().pow(2).mean().backward()
    param = next(mixed.parameters())
    summary = common.all_reduce({"bf16_logits": logits.dtype == torch.bfloat16,
                                 "fp32_master": param.dtype == torch.float32,
                                 "fp32_grads": param.grad.dtype == torch.float32}, "min")
    if rank == 0:
        with open(os.path.join(out_dir, "mixed.json"), "w") as f:
            json.dump(summary, f)
    # written at the interpreter's finalization, which common.cleanup ends the process before
    atexit.register(lambda: open(os.path.join(out_dir, f"finalized{rank}"), "w").close())
    common.cleanup()


def test_torchrun_fsdp_checkpoint_matches_single_process(tmp_path):
    returncode, stderr = torchrun([os.path.abspath(__file__), str(tmp_path)])
    assert returncode == 0, stderr[-4000:]
    assert not list(tmp_path.glob("finalized*"))  # each rank ended inside common.cleanup (its docstring says why)
    assert json.load(open(tmp_path / "mixed.json")) == {"bf16_logits": 1.0, "fp32_master": 1.0, "fp32_grads": 1.0}

    # the same global batch in one process
    reference = tiny_model()
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    for rank in range(2):
        tiny_loss(reference, rank_inputs(rank)).backward()
    reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05).item()
    reference_optimizer.step()

    path = common.latest_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "step_000001")
    loaded = tiny_model(seed=5)
    loaded_optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.01)
    with pytest.raises(FileNotFoundError, match="extra_rank0.pt"):
        common.load_checkpoint(str(tmp_path / "hf"), loaded, loaded_optimizer)
    extra = common.load_checkpoint(path, loaded, loaded_optimizer)  # one process reads the 2-rank shards
    assert (extra["rank"], extra["world_size"]) == (0, 2)
    assert extra["grad_norm"] == pytest.approx(reference_norm, rel=1e-5)
    for (name, p), q in zip(reference.named_parameters(), loaded.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    reference_state = reference_optimizer.state_dict()["state"]
    for i, state in loaded_optimizer.state_dict()["state"].items():
        assert torch.allclose(state["exp_avg"], reference_state[i]["exp_avg"], atol=1e-7)
        assert torch.allclose(state["exp_avg_sq"], reference_state[i]["exp_avg_sq"], atol=1e-9)

    exported = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    inputs = tiny_inputs(seed=9, video=True)
    with torch.no_grad():
        assert torch.allclose(exported(**inputs).logits, loaded(**inputs).logits, atol=1e-6)


if __name__ == "__main__":
    _worker(sys.argv[1])
