"""
Any training checkpoint (train_sft.py or train_rl.py, written by any number of ranks) -> an HF folder that eval.py,
from_pretrained and a server load: to evaluate in the middle of a run, or to keep a step other than the last.

    python export.py --ckpt=runs/rl/ckpt/step_000050 --out=runs/rl/hf-50
    python export.py --ckpt=runs/rl/ckpt                     # its newest intact checkpoint -> runs/rl/hf-step_XXXXXX
    python export.py --ckpt=runs/rl/ckpt/step_000050 --dtype=fp32   # the fp32 master weights as they are
    python eval.py --model=runs/rl/hf-50

One process on CPU. The checkpoint is checked against its manifest first; the model is built on the meta device
from the config the checkpoint carries (hf_config/) and filled from its DCP shards. dtype auto writes bf16 for a
run that computed in bf16 (the release presets) and fp32 otherwise. Memory: the model once in fp32 (4 bytes a
parameter: 35 GB for the 8.77B parameters that `python train_rl.py --preset=release --plan=true` counts).
"""
import os
import sys
from dataclasses import dataclass

import torch

import common

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Config:
    ckpt: str = "runs/rl/ckpt"  # a step_XXXXXX checkpoint, or a ckpt folder (then its newest intact checkpoint)
    out: str | None = None  # None: hf-step_XXXXXX beside the ckpt folder
    dtype: str = "auto"  # bf16 for a run that computed in bf16, else fp32


def pick_checkpoint(path):
    """path itself when it is an intact checkpoint, the newest intact one when it is a ckpt folder; a damaged
    checkpoint raises, naming its files."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        for candidate in common.complete_checkpoints(path):
            if not common.verify_checkpoint(candidate):
                return candidate
        raise FileNotFoundError(f"{path}: no intact checkpoint (a step_XXXXXX folder or a ckpt folder holding some)")
    if problems := common.verify_checkpoint(path):
        raise ValueError(f"{path} is damaged:\n  " + "\n  ".join(problems))
    return path


def main(argv):
    cfg = common.parse_config(Config, argv, choices={"dtype": tuple(DTYPES)})
    path = pick_checkpoint(cfg.ckpt)
    out = cfg.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))),
                                  "hf-" + os.path.basename(path))
    common.export_checkpoint(path, out, DTYPES[cfg.dtype])


if __name__ == "__main__":
    main(sys.argv[1:])
