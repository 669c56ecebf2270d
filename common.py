"""
Plumbing shared by train_sft.py, train_rl.py and eval.py: config overrides, torch.distributed, FSDP2, exact
checkpoints (DCP, atomic), HF export, and logging sinks. No task logic lives here.

Conventions the trainers rely on:
- One process (plain `python script.py`) runs the plain model; under torchrun the model is FSDP2-sharded.
- Gradients are SUMMED over ranks (shard_model turns off FSDP's averaging), so every loss is normalised by a
  global count (ema_grpo.ppo_loss num_tokens, the SFT token count) and one rank equals N ranks exactly.
- A checkpoint is step_XXXXXX/ holding DCP shards of model + optimizer, one extra_rank{r}.pt per rank, the
  model's HF config and processor (hf_config/) and manifest.json (every file's size and CRC32).
"""
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
import uuid
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

# -----------------------------------------------------------------------------
# config: one flat dataclass per script, named presets, then --key=value overrides


def _field_type(cls, name, hint):
    """(base type, accepts None) for a field annotated int/float/str/bool, optionally `| None`."""
    args = typing.get_args(hint)
    if args:  # X | None or Optional[X]
        base = [a for a in args if a is not type(None)]
        if len(base) != 1 or len(args) != 2:
            raise TypeError(f"{cls.__name__}.{name}: config fields must be int, float, str, bool or X | None, "
                            f"got {hint}")
        return base[0], True
    return hint, False


def _convert(key, text, base, nullable):
    if nullable and text.lower() == "none":
        return None
    if base is bool:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
    elif base is str:
        return text
    else:
        try:
            return base(text)
        except ValueError:
            pass
    kind = base.__name__ + (" or none" if nullable else "") + (" (true/false/1/0)" if base is bool else "")
    raise ValueError(f"config: --{key}={text}: expected {kind}")


def _check_value(key, value, base, nullable, where):
    ok = (value is None and nullable) or (type(value) is base) or (base is float and type(value) is int)
    if not ok:
        raise ValueError(f"config: {where}: {key}={value!r} is not a {base.__name__}")


def parse_config(cls, argv, presets=None, choices=None):
    """cls() with `--preset=NAME` applied first (presets: {name: {field: value}}), then overrides.

    Overrides are `--key=value` or `--key value`. Unknown keys, unknown presets, malformed arguments and values
    that do not parse as the field's type raise a ValueError naming the argument. bool fields take
    true/false/1/0; fields typed `X | None` also take "none". choices: {field: allowed values}, checked here so
    that a typo stops the run before the model loads. `--help` prints every key with its default and the
    comment beside it in the dataclass (and the comment lines between fields as headings), then exits.
    """
    presets, choices = presets or {}, choices or {}
    hints = typing.get_type_hints(cls)
    types_ = {f.name: _field_type(cls, f.name, hints[f.name]) for f in dataclasses.fields(cls)}
    preset, overrides = None, {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(config_help(cls, presets, choices))
            sys.exit(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"config: argument {arg!r}: expected --key=value or --key value")
        key, eq, text = arg[2:].partition("=")
        if not eq:  # --key value
            if not args or args[0].startswith("--"):
                raise ValueError(f"config: argument {arg!r}: expected --key=value or --key value")
            text = args.pop(0)
        if key == "preset":
            if text not in presets:
                raise ValueError(f"config: --preset={text}: unknown preset; known: {sorted(presets)}")
            preset = text
        elif key not in types_:
            raise ValueError(f"config: {arg!r}: unknown key {key!r}; known keys: {sorted(types_)}")
        else:
            overrides[key] = _convert(key, text, *types_[key])
    values = {}
    if preset is not None:
        for key, value in presets[preset].items():
            if key not in types_:
                raise ValueError(f"config: preset {preset!r}: unknown key {key!r}")
            base, nullable = types_[key]
            _check_value(key, value, base, nullable, where=f"preset {preset!r}")
            values[key] = float(value) if base is float and value is not None else value
    values.update(overrides)
    config = dataclasses.replace(cls(), **values)
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"config: --{key}={getattr(config, key)}: expected one of {', '.join(map(str, allowed))}")
    return config


_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def config_help(cls, presets=None, choices=None):
    """The --help text: the dataclass's fields in order, each `--key=default  comment`, read from its source."""
    defaults = dataclasses.asdict(cls())
    lines = ["options: --key=value or --key value" + (f"; presets (--preset=NAME): {sorted(presets)}" if presets else "")]
    try:
        source = inspect.getsource(cls).splitlines()[1:]
    except (OSError, TypeError):  # no source (e.g. built in a REPL): keys and defaults only
        source = [f"    {key}: ..." for key in defaults]
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            lines.append("  " + stripped)
        elif (m := _FIELD_LINE.match(line)) and m.group(1) in defaults:
            option = f"    --{m.group(1)}={defaults[m.group(1)]}"
            allowed = f" (one of: {', '.join(map(str, choices[m.group(1)]))})" if m.group(1) in (choices or {}) else ""
            lines.append(f"{option:<44} {m.group(2) or ''}{allowed}".rstrip())
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# torch.distributed


def init_distributed(timeout_min=30.0):
    """(rank, world_size, local_rank, device) from torchrun's env vars: nccl on CUDA, gloo on CPU.

    timeout_min: how long a collective may wait for the slowest rank before the job is killed (NCCL's watchdog;
    its default is 10 minutes, shorter than one rollout of long responses can take on the slowest rank).
    Without torchrun: a single process, no process group, cuda:0 if there is a GPU else cpu.
    """
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    timeout = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, world_size, local_rank, device


def cleanup():
    """The last call of a torchrun rank: destroy the process group and end the process, skipping the interpreter's
    finalization. Why: gloo's worker thread can still be releasing the last collective's work (a tensor that
    Python created, e.g. all_gather_object's) when the main thread returns; releasing it takes the GIL, and a
    thread that takes the GIL while the interpreter finalizes is ended by pthread_exit, whose unwinding through a
    noexcept destructor calls std::terminate: SIGABRT and a non-zero exit after every output was written (about 1
    run in 10 on 2 CPU cores; torch's open issue pytorch/pytorch#190489). Callers close their files first (the
    loggers' close()); stdout and stderr are flushed here. One process (no process group): nothing to do."""
    if dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0():
    """Rank 0 prints (a single process is rank 0)."""
    return _rank() == 0


def _world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Every rank waits here for the others (e.g. while rank 0 builds a file they all read). No-op alone."""
    if _world_size() > 1:
        dist.barrier()


def all_gather_list(items):
    """Every rank's python list, concatenated in rank order (the same list on every rank). Collective."""
    if _world_size() == 1:
        return list(items)
    gathered = [None] * _world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for rank_items in gathered for item in rank_items]


def all_reduce(value, op="sum"):
    """Reduce a number, a 0-d tensor, or a flat dict of numbers over ranks; returns python floats in the same shape.

    op: "sum", "mean", "max" or "min". Every rank must pass the same dict keys. No-op in one process.
    """
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                 "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    keys = sorted(value) if isinstance(value, dict) else None
    numbers = [float(value[k]) for k in keys] if keys is not None else [float(value)]
    if _world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(numbers, dtype=torch.float64, device=device)  # [K]
        dist.all_reduce(t, op=reduce_op)
        if op == "mean":
            t /= _world_size()
        numbers = t.tolist()
    return dict(zip(keys, numbers)) if keys is not None else numbers[0]


# -----------------------------------------------------------------------------
# FSDP2


def shard_model(model, mixed_precision, full_model=None):
    """FSDP2 for Qwen3VLForConditionalGeneration: each text decoder layer is a unit, the root holds the rest.

    No-op in a single process (the plain model runs). mixed_precision: bf16 parameters in compute, fp32 gradient
    reduction; the sharded weights stay in their own dtype (fp32 masters, or bf16 with --param_dtype=bf16).
    A model built on the meta device (model.load_model(weights=False) on every rank) is sharded as it is, then
    filled from full_model, the loaded model on rank 0 (None on the others): each weight is broadcast from rank 0
    into every rank's shard, so only rank 0 ever reads or holds the whole model (8 ranks loading it would hold 8
    full copies in host memory: 35 GB each in fp32 at 8B).
    The root unit (embeddings, vision tower, lm_head, final norm) stays gathered after forward (FSDP2's own choice
    for the root, made explicit): rollout.token_logprobs applies lm_head after the forward returns.
    The vision tower is NOT its own unit (unlike torchtitan's habit): HF calls it once for images and again for
    videos, so ranks with different modality mixes would issue different numbers of all-gathers and hang. In the
    root unit it is gathered with the embeddings on every forward, and a rank whose batch used no vision
    parameters reduce-scatters zeros for them (set_reduce_scatter_unused_params). tests/test_common.py runs a rank
    with images + videos beside a text-only rank.
    Only `forward` is called on the sharded model (rollout and training call model(**inputs)); any other method
    called on it from outside would need torch.distributed.fsdp.register_fsdp_forward_method.
    Every rank must run the same number of forwards, since each gathers the layers. The rollout's decode loop
    runs the layers inside one unshard() of every FSDP module (rollout.gathered_params), so ranks may decode
    different numbers of steps.
    """
    if _world_size() == 1:
        return model
    # gradients are reduced in fp32 whatever the weights' dtype (bf16 weights keep bf16 sharded gradients)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else None,
                                     reduce_dtype=torch.float32)
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again first thing in backward: keep them gathered
        fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=False)
    model.set_reduce_scatter_unused_params(True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # sum, not mean, over ranks: the losses are already normalised by global counts (module docstring)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    if any(p.is_meta for p in model.parameters()):
        fill_from_rank0(model, full_model)
    return model


def fill_from_rank0(model, full_model):
    """Materialise a model sharded on the meta device with rank 0's weights and buffers (full_model on rank 0,
    None elsewhere). Buffers outside the state dict (the rotary inv_freq) are copied and broadcast too."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model.to_empty(device=device)
    full_state = full_model.state_dict() if full_model is not None else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if full_model is not None:
                buffer.copy_(full_model.get_buffer(name))
            dist.broadcast(buffer, src=0)


PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class KahanAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights, in the manner of the release's adamw_bf16 (EasyR1's AnyPrecisionAdamW): the
    moments are bf16, and each update is added with Kahan summation, a bf16 buffer per weight keeping what
    rounding the weight to bf16 lost, added back at the next step.

    Why: at lr 2e-6 an update is about 1e-4 of the weight, below bf16's resolution (2^-8 relative), so a plain
    bf16 AdamW leaves most weights unchanged; with the compensation the weight tracks the fp32 trajectory
    (tests/test_common.py). The arithmetic runs in fp32, one parameter at a time; weight decay is decoupled (as
    torch's AdamW) and compensated like the rest of the update. State: 3 x 2 bytes per parameter, against 8 for
    fp32 AdamW moments, and the weights themselves are 2 bytes instead of 4 (memory.py).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                 compensation=torch.zeros_like(p))
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                weight = p.float()
                denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                # AdamW's change to the weight, plus what rounding lost at earlier steps
                delta = (exp_avg / (1 - beta1 ** step)).div_(denom).add_(weight, alpha=group["weight_decay"])
                delta = delta.mul_(-group["lr"]).add_(state["compensation"].float())
                p.copy_(weight + delta)
                state["compensation"].copy_(delta.sub_(p.float() - weight))  # what this rounding lost


def build_optimizer(params, lr, weight_decay, param_dtype):
    """torch's AdamW (fp32 moments) for fp32 weights; KahanAdamW for bf16 weights (--param_dtype=bf16)."""
    if param_dtype == "bf16":
        return KahanAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def autocast(bf16, device):
    """bf16 compute on GPU when asked (the trainers' forwards); CPU always runs fp32."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def set_grad_sync(model, sync):
    """Gradient accumulation: False on all but the last micro-batch skips the reduce-scatter. No-op unsharded."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def clip_grad_norm(model, max_norm):
    """Clip the total gradient norm (over all ranks' shards) to max_norm; returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


# -----------------------------------------------------------------------------
# RNG state (exact resume)


def rng_state(generators=None):
    """Python, numpy, torch (and this rank's CUDA) RNG states plus named torch.Generators, as plain objects."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generators=None):
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


# -----------------------------------------------------------------------------
# checkpoints: DCP shards + per-rank extra state + the model's HF config, with a manifest of every file's size
# and CRC32; written to .tmp and renamed when complete

_STEP_DIR = re.compile(r"step_(\d+)")
MANIFEST = "manifest.json"
HF_CONFIG = "hf_config"  # the model's config and processor: any checkpoint exports on its own (export.py)


def save_checkpoint(ckpt_dir, step, model, optimizer, extra, processor=None, keep_last=0, protect=None):
    """Write ckpt_dir/step_XXXXXX (collective). extra: plain data of this rank (sampler position, rng_state(),
    TaskEMA state, config); saved per rank with "step" and "world_size" added. processor: saved with the model's
    config under hf_config/. The manifest (sizes and CRC32s) is written before the rename that commits the
    directory. keep_last > 0: then delete all but the newest keep_last complete checkpoints, never `protect`
    (the one this run resumed from). Returns the path.
    """
    path = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = path + ".tmp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if processor is not None:
            for part in (model.config, model.generation_config, processor):
                part.save_pretrained(os.path.join(tmp, HF_CONFIG))
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save({**extra, "step": step, "world_size": _world_size()}, os.path.join(tmp, f"extra_rank{rank}.pt"))
    barrier()
    write_manifest(tmp)
    if rank == 0:  # the rename is the commit point: complete_checkpoints never sees a partial directory
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        for old in complete_checkpoints(ckpt_dir)[keep_last:] if keep_last else []:
            if protect is None or os.path.abspath(old) != os.path.abspath(protect):
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def save_run(ckpt_dir, step, model, optimizer, processor, extra, cfg, resumed_from):
    """A trainer's checkpoint: save_checkpoint with the run's config added to extra, cfg.keep_last checkpoints
    kept, and the one the run resumed from never deleted. Collective."""
    return save_checkpoint(ckpt_dir, step, model, optimizer, {**extra, "config": dataclasses.asdict(cfg)}, processor,
                           keep_last=cfg.keep_last, protect=resumed_from)


def save_dropped_step(ckpt_dir, step, saved_step, model, optimizer, processor, extra, cfg, resumed_from):
    """After a preemption dropped step `step + 1` (StopFlag): checkpoint the state from before it (extra, as
    save_run takes it) unless that state is already the newest checkpoint (saved_step == step). Collective."""
    if saved_step != step:
        save_run(ckpt_dir, step, model, optimizer, processor, extra, cfg, resumed_from)
    if _rank() == 0:
        where = f"checkpoint of step {step} in {ckpt_dir}" if step else "nothing trained yet, no checkpoint"
        print(f"SIGTERM: step {step + 1} dropped; {where}; exiting", flush=True)


def complete_checkpoints(ckpt_dir):
    """The committed step_XXXXXX directories of ckpt_dir, newest first (.tmp and .damaged ones are not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = [int(m.group(1)) for name in os.listdir(ckpt_dir) if (m := _STEP_DIR.fullmatch(name))
             and os.path.isfile(os.path.join(ckpt_dir, name, ".metadata"))]
    return [os.path.join(ckpt_dir, f"step_{step:06d}") for step in sorted(steps, reverse=True)]


def latest_checkpoint(ckpt_dir):
    """The newest complete step_XXXXXX directory in ckpt_dir, or None."""
    return next(iter(complete_checkpoints(ckpt_dir)), None)


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _checkpoint_files(path):
    names = [os.path.relpath(os.path.join(root, name), path) for root, _, files in os.walk(path) for name in files]
    return sorted(name for name in names if name != MANIFEST)


def write_manifest(path):
    """path/manifest.json: every file's size and CRC32 (collective: each rank reads a share of the files).

    CRC32 rather than a cryptographic hash: it catches what happens to files by accident (a truncated write, a
    flipped block) at about twice sha256's speed (README, "Faults tried"), and the checkpoint write sits inside
    the preemption grace."""
    mine = [(name, {"size": os.path.getsize(os.path.join(path, name)), "crc32": _crc32(os.path.join(path, name))})
            for name in _checkpoint_files(path)[_rank()::_world_size()]]
    entries = dict(all_gather_list(mine))
    if _rank() == 0:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump({"files": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())


def verify_checkpoint(path):
    """What is wrong with a checkpoint against its manifest, one line per file (missing, truncated, corrupted);
    [] when intact. Collective: each rank reads a share, every rank gets the whole list."""
    manifest = os.path.join(path, MANIFEST)
    try:
        with open(manifest) as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{manifest}: missing or unreadable ({e!r})"]
    problems = []
    for name in sorted(entries)[_rank()::_world_size()]:
        full, want = os.path.join(path, name), entries[name]
        if not os.path.isfile(full):
            problems.append(f"{full}: missing")
        elif (size := os.path.getsize(full)) != want["size"]:
            problems.append(f"{full}: {size} bytes where the manifest says {want['size']} (truncated)")
        elif (crc := _crc32(full)) != want["crc32"]:
            problems.append(f"{full}: CRC32 {crc} where the manifest says {want['crc32']} (corrupted)")
    return all_gather_list(problems)


def resume_checkpoint(ckpt_dir, model, optimizer):
    """Load the newest intact checkpoint of ckpt_dir in place: (path, extra), or (None, None) when it has none.

    A checkpoint that fails verify_checkpoint is reported loudly (stdout and stderr, naming its bad files),
    renamed to step_XXXXXX.damaged (kept for a look, never loaded or pruned), and the previous one is tried.
    Checkpoints present but none intact raise. Collective."""
    candidates = complete_checkpoints(ckpt_dir)
    for path in candidates:
        problems = verify_checkpoint(path)
        if not problems:
            return path, load_checkpoint(path, model, optimizer)
        if _rank() == 0:
            message = (f"DAMAGED CHECKPOINT {path}: not loaded, moved to {path}.damaged; trying the previous one\n  "
                       + "\n  ".join(problems))
            print(message, flush=True)
            print(message, file=sys.stderr, flush=True)
            shutil.rmtree(path + ".damaged", ignore_errors=True)
            os.rename(path, path + ".damaged")
        barrier()
    if candidates:
        raise RuntimeError(f"{ckpt_dir}: none of its {len(candidates)} checkpoints is intact (see the lines above)")
    return None, None


def load_checkpoint(path, model, optimizer=None):
    """Load model (+ optimizer) in place from a checkpoint, at any sharding (DCP reshards); returns this rank's
    extra dict. On another number of ranks than wrote it, every rank gets rank 0's extra with "resharded": True:
    its rank-independent parts (step, task EMA, data position, config) hold, its per-rank RNG states do not."""
    rank0 = os.path.join(path, "extra_rank0.pt")
    if not os.path.isfile(rank0):
        raise FileNotFoundError(f"{rank0}: missing; {path} is not a checkpoint written by save_checkpoint")
    mine = os.path.join(path, f"extra_rank{_rank()}.pt")
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_state, "optim": optim_state} if optimizer is not None else {"model": model_state}
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        extra = torch.load(mine if os.path.isfile(mine) else rank0, weights_only=True)
        if extra["world_size"] != _world_size():
            extra = {**torch.load(rank0, weights_only=True), "resharded": True}
    except (OSError, EOFError, RuntimeError, ValueError) as e:  # e.g. a checkpoint from before manifests
        raise RuntimeError(f"{path}: cannot load: {e!r}") from e
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return extra


def restore_rng(extra, seed, generators=None):
    """The RNG states of a checkpoint's extra (rng_state()). Resharded (resumed on another number of ranks), each
    rank's states are derived from (seed, step, rank) instead: sampling goes on deterministically, but not as
    the original ranks would have sampled (a resume on the same number of ranks stays exact)."""
    if not extra.get("resharded"):
        set_rng_state(extra["rng"], generators)
        return
    derived = int(np.random.SeedSequence([seed, extra["step"], _rank()]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    for g in (generators or {}).values():
        g.manual_seed(derived)


def export_checkpoint(path, out_dir, dtype=None):
    """Any checkpoint -> an HF folder (safetensors, config, processor) for eval.py, serving or from_pretrained.
    One process: the model is built on the meta device from the checkpoint's hf_config/ and filled by DCP
    (from any number of ranks). dtype None: bf16 when the run computed in bf16 (its config's bf16), else fp32."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    hf = os.path.join(path, HF_CONFIG)
    if not os.path.isdir(hf):
        raise FileNotFoundError(f"{hf}: missing; {path} holds no model config to export from")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(hf))
    model.to_empty(device="cpu")  # every saved tensor is overwritten below; rotary buffers are not saved
    extra = load_checkpoint(path, model)
    dtype = dtype or (torch.bfloat16 if extra.get("config", {}).get("bf16") else torch.float32)
    model.to(dtype)
    model.generation_config = GenerationConfig.from_pretrained(hf)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(hf).save_pretrained(out_dir)
    print(f"exported {path} ({str(dtype).removeprefix('torch.')}) -> {out_dir}")
    return out_dir


def export_hf(model, processor, out_dir):
    """Gather the full weights to rank 0's CPU and write an HF folder (safetensors, config, processor) that
    from_pretrained, eval.py and other tools load. Collective."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        # written beside out_dir, then renamed into place: a crash mid-write leaves no folder holding a config.json
        # without its weights (demo.py, like a user, takes out_dir/config.json to mean "exported")
        tmp = f"{out_dir.rstrip(os.sep)}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(tmp, state_dict=state)  # transformers drops FSDP's class-name prefix itself
            processor.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        print(f"exported {out_dir}")
    barrier()


# -----------------------------------------------------------------------------
# logging and signals


def _flatten(metrics, prefix=""):
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value.item() if isinstance(value, torch.Tensor) else value
    return flat


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Logger:
    """Rank 0 writes each step to stdout, out_dir/metrics.jsonl (one flushed line per step; appended on resume,
    so a re-run step appears twice and the later line wins) and wandb (offline unless WANDB_MODE is set; a
    resumed run continues the wandb run whose id out_dir/wandb_run_id keeps). Nested metric dicts are flattened
    to "a/b" keys. stdout_keys: key prefixes printed to stdout (None: all); the file and wandb always get every
    key. Other ranks do nothing."""

    def __init__(self, out_dir, config, use_wandb, stdout_keys=None, resume=False):
        self.enabled = _rank() == 0
        self.wandb = None
        self.stdout_keys = stdout_keys
        if not self.enabled:
            return
        config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        print("config: " + json.dumps(config), flush=True)
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        if use_wandb:
            import wandb
            id_path = os.path.join(out_dir, "wandb_run_id")
            if resume and os.path.isfile(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                with open(id_path, "w") as f:
                    f.write(run_id)
            self.wandb = wandb.init(project="onethinker", name=os.path.basename(os.path.abspath(out_dir)),
                                    dir=out_dir, config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                                    id=run_id, resume="allow")

    def log(self, step, metrics):
        if not self.enabled:
            return
        flat = _flatten(metrics)
        shown = {k: v for k, v in flat.items() if self.stdout_keys is None or k.startswith(tuple(self.stdout_keys))}
        print(f"step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()), flush=True)
        # json has no NaN/inf literal that every reader accepts: write them as strings
        row = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self):
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class StopFlag:
    """SIGTERM (torchrun or the scheduler: a preemption) sets a flag instead of killing the process; the trainers
    ask at the boundaries between the phases of a step whether to stop (collective: every rank decides alike).

    grace_s: the seconds the run has from SIGTERM to a committed checkpoint (the scheduler's grace minus a
    margin). A step in progress is finished when its expected rest (the last step's duration minus the time
    already spent in this one) plus a checkpoint write (the longest gap so far between the end of one step and
    the start of the next, which is where checkpoints are written) fits in what is left of the grace; otherwise
    it is dropped at the next boundary and the state from before it is checkpointed, so the resumed run redoes
    it exactly. Before the first step has finished its duration is unknown: the step is dropped."""

    def __init__(self, grace_s=math.inf):
        self.grace_s, self.signal_at = grace_s, None
        self.step_start, self.step_end, self.step_s, self.save_s = time.monotonic(), None, math.inf, 0.0
        self.finish_step = None  # decided at the first boundary after SIGTERM: True finish the step, False drop it
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal_at is None:
            self.signal_at = time.monotonic()

    @property
    def requested(self):
        return self.signal_at is not None

    def start_step(self):
        self.step_start = time.monotonic()
        if self.step_end is not None:
            self.save_s = max(self.save_s, self.step_start - self.step_end)

    def drop_step(self):
        """At a boundary inside a step (collective): True when the step in progress must be dropped now."""
        if self.finish_step is None:
            now = time.monotonic()
            rest = max(0.0, self.step_s - (now - self.step_start)) + self.save_s
            late = self.requested and now - self.signal_at + rest > self.grace_s
            votes = all_reduce({"stop": float(self.requested), "late": float(late)}, "max")
            if votes["stop"]:
                self.finish_step = not votes["late"]
        return self.finish_step is False

    def stop_after_step(self):
        """At the end of a step, before its checkpoint (collective): True when some rank got SIGTERM: checkpoint,
        then exit."""
        self.step_end = time.monotonic()
        self.step_s = self.step_end - self.step_start
        return all_reduce(float(self.requested), "max") > 0


# files a run writes into its out_dir: their presence means the out_dir holds a run
RUN_FILES = ("ckpt", "hf", "metrics.jsonl", "samples.jsonl", "config.json", "wandb", "wandb_run_id")


def prepare_out_dir(out_dir, resume, overwrite):
    """Refuse to start a fresh run in an out_dir holding another run's files (the two runs' checkpoints and
    metrics would mix) unless resume (continue it) or overwrite (those files are deleted first). Collective."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not found or resume:
        return
    if not overwrite:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(found)}): pass --resume=true to continue it "
                         f"or --overwrite=true to delete it and start over")
    barrier()  # every rank has looked before rank 0 deletes
    if _rank() == 0:
        for name in found:
            full = os.path.join(out_dir, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    barrier()
