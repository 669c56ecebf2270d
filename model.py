"""
The tiny Qwen3-VL: built offline from a config, saved and loaded exactly like a real checkpoint.

    python model.py --out=runs/tiny-model --data=data/shapes     # build from the suite's text
    python model.py --out=runs/tiny-model --data=data/shapes --size=L

A real checkpoint (e.g. a local Qwen3-VL-8B-Instruct directory) goes through the same `load_model` path.
The tokenizer is a byte-level BPE trained on the suite's training text with `tokenizers`: Qwen's special tokens,
digits one per token (as Qwen's own tokenizer does, so numbers are spelled digit by digit), a Qwen-style chat
template. Nothing here downloads anything.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig,
                          PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_qwen3_vl
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

import common
import data

DEFAULT_MODEL_DIR = "runs/tiny-model"
DEFAULT_DATA_DIR = "data/shapes"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Reasoning tags are added tokens but not "special": decoding with skip_special_tokens keeps them, and the
# reward needs to see them (SPEC 4).
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen's chat format. Media come as `{"type": "image"}` / `{"type": "video"}` content parts and become a bare
# pad token; the processor expands it (per-frame timestamps and vision start/end for video).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|video_pad|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# S is the demo's model; L (4x the parameters) for experiments with more CPU time. S has three layers with a
# narrower MLP (256) rather than two with 384, at about the same cost a step: on the demo's suites of seeds 0-2 the
# two-layer model read the images in 1 of 3 SFT draws, the three-layer one in 3 of 3 (NOTES.md, "A third layer")
SIZES = {
    "S": dict(hidden=128, layers=3, heads=4, kv_heads=2, mlp=256, vis_depth=2, vis_hidden=64, vis_mlp=128),
    "L": dict(hidden=256, layers=4, heads=8, kv_heads=4, mlp=768, vis_depth=4, vis_hidden=128, vis_mlp=256),
    # S4: S with a fourth layer, its MLPs narrowed to 128 (0.68M parameters; an SFT step ~14% dearer, an RL step ~3%).
    # With the position code, on five demo suites: the clips' seconds read on 2 of 5 draws, not the default (NOTES.md,
    # "Where the seconds are lost")
    "S4": dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=128, vis_depth=2, vis_hidden=64, vis_mlp=128),
}
HEAD_DIM = 32
MROPE_SECTION = [6, 5, 5]  # t, h, w frequency split; sums to HEAD_DIM / 2 as Qwen3-VL requires
# No 2x2 merge (Qwen3-VL merges 2x2). Measured once in a throwaway experiment on spatial grounding alone (600 SFT
# steps of 16 rows): with 64 tokens per 128 px image the model began to read where the object is (box IoU 0.21),
# with 16 tokens it stayed blind (IoU 0.09, every answer "middle centre").
PATCH, MERGE, TEMPORAL_PATCH = 16, 1, 2


# -----------------------------------------------------------------------------
# tokenizer

TOKENIZER_SPLITS = ("sft.json", "rl.json")  # the training splits: held-out text shapes no merge, and the model
# (its tokenizer, so its SFT) does not change with the number of eval rows


def corpus_from_suite(data_dir):
    """Every string of the suite's training splits: prompts, answers, rationales, and the timestamps."""
    texts = list(data.PROJECT_TEMPLATE.values())
    texts += [f"<{t / 2:.1f} seconds>" for t in range(0, 256)]  # video frame timestamps the processor writes
    paths = [os.path.join(data_dir, name) for name in TOKENIZER_SPLITS if os.path.exists(os.path.join(data_dir, name))]
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no {' or '.join(TOKENIZER_SPLITS)} to train the tokenizer on")
    for path in paths:
        with open(path) as f:
            rows = json.load(f)
        for row in rows:
            if "messages" in row:
                texts += [m["content"] for m in row["messages"]]
            else:
                texts += [data.build_prompt(row), row.get("answer") or row.get("solution") or ""]
    return texts


def train_tokenizer(texts, vocab_size=1024):
    """Byte-level BPE; digits split one per token; Qwen special tokens; returns a PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=4096, padding_side="left",
    )
    fast.add_tokens(TAG_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# -----------------------------------------------------------------------------
# model

def tiny_config(tokenizer, size="S"):
    if size not in SIZES:
        raise ValueError(f"model size {size!r}: expected one of {sorted(SIZES)}")
    s = SIZES[size]
    vocab = (len(tokenizer) + 63) // 64 * 64  # round up: spare rows are harmless and keep matmuls aligned
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=HEAD_DIM,
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=MROPE_SECTION,
                                 mrope_interleaved=True),
            pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None,
        ),
        vision_config=dict(
            depth=s["vis_depth"], hidden_size=s["vis_hidden"], intermediate_size=s["vis_mlp"], num_heads=4,
            patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
            out_hidden_size=s["hidden"], num_position_embeddings=256, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer):
    # data.py sizes media itself (SPEC 2 budgets) and calls the processor with do_resize=False: these bounds only
    # apply to callers that hand the processor unsized media (for video: pixels over all frames of a clip).
    image_processor = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
                                            size={"shortest_edge": 32 * 32, "longest_edge": 256 * 32 * 32})
    video_processor = Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH,
                                            size={"shortest_edge": 32 * 32, "longest_edge": 64 * 32 * 32 * 32},
                                            cap_pixels_per_frame=False)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)


def position_code(side, dim, rms):
    """[side * side, dim]: a start for the vision tower's position table. Entry (row, column) of the side x side
    grid, which HF interpolates bilinearly onto each image's and frame's patch grid, holds sin and cos of
    (row / (side - 1)) * k * pi / 2 for k = 1 .. dim / 4 in the first half of the channels and the same of the column
    in the second, scaled to root mean square rms. The k = 1 terms turn a quarter circle across the image, so a
    coordinate is close to a linear readout of the vision tokens.

    Why: HF's random table (std 0.02, against patch embeddings that vary by ~0.26 between patches) leaves the tiny
    model's vision tokens with no position a linear map finds (R^2 0.02 for a token's row; 0.9 with this code at rms
    0.5; tests/test_model.py); a trained tower's features carry it. Measured on five demo draws at rms 0.5: spatial
    grounding read on 4 of 5 and temporal grounding (which no table reaches) on 2 of 5 (NOTES.md, "A position code in
    the vision tower"); with the clips' objects drawn larger as well, every family above blind on 4 of 5: the demo's
    default."""
    u = torch.arange(side) / (side - 1)  # [side] fraction across the image
    angles = u[:, None] * (math.pi * torch.arange(1, dim // 4 + 1) / 2)  # [side, dim/4]
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # [side, dim/2]
    table = torch.cat([code[:, None, :].expand(side, side, -1), code[None, :, :].expand(side, side, -1)], dim=2)
    table = table.reshape(side * side, dim)  # row-major, as HF indexes its table
    return table * rms / table.pow(2).mean().sqrt()


def build_tiny_model(out_dir, data_dir=DEFAULT_DATA_DIR, seed=0, size="S", position_code_rms=0.0):
    """Train the tokenizer on the suite's text, build a random-init Qwen3-VL, save both with save_pretrained.
    position_code_rms > 0: the vision position table starts as position_code at that RMS instead of HF's init."""
    if not position_code_rms >= 0:  # a negative (or NaN) value would build the default table without a word
        raise ValueError(f"position_code_rms={position_code_rms}: expected 0 (HF's random table) or a positive RMS")
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus_from_suite(data_dir))
    processor = build_processor(tokenizer)
    model = Qwen3VLForConditionalGeneration(tiny_config(tokenizer, size))
    if position_code_rms > 0:
        table = model.model.visual.pos_embed.weight  # [num_position_embeddings, vis_hidden]
        with torch.no_grad():
            table.copy_(position_code(math.isqrt(table.shape[0]), table.shape[1], position_code_rms))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # as Qwen3-VL-Instruct's generation_config.json: a response ends at <|im_end|> or <|endoftext|>
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built tiny Qwen3-VL ({size}): {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)} -> {out_dir}")
    return out_dir


def ensure_model(path, data_dir=DEFAULT_DATA_DIR):
    """The default tiny model is built on first use (from the suite, generated first if missing)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if os.path.normpath(path) != os.path.normpath(DEFAULT_MODEL_DIR):
        raise FileNotFoundError(f"{path}: no config.json; pass a model directory saved with save_pretrained")
    if not os.path.exists(os.path.join(data_dir, "sft.json")):
        import shapes
        shapes.generate_suite(data_dir, seed=0)
    return build_tiny_model(path, data_dir)


def stop_token_ids(model, tokenizer):
    """The token ids that end a response, for train_rl.py and eval.py alike: the checkpoint's generation_config
    EOS ids (Qwen3-VL-Instruct: <|im_end|> and <|endoftext|>, where the release's vLLM stops too) and the
    tokenizer's EOS (<|im_end|>, the end of a chat turn)."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(ids | {tokenizer.eos_token_id} - {None})


# LLaMA-Factory's freeze_vision_tower + freeze_multi_modal_projector for Qwen3-VL (model_utils/visual.py): a
# parameter whose name contains one of these is frozen. The vision position embedding and the deepstack mergers
# match none of them, so the released SFT trained them.
FROZEN_VISION_PARTS = ("visual.patch_embed", "visual.blocks", "visual.merger")


def freeze_vision(model):
    """Freeze the vision tower and its projector as the release's SFT did (FROZEN_VISION_PARTS)."""
    for name, param in model.named_parameters():
        if any(part in name for part in FROZEN_VISION_PARTS):
            param.requires_grad_(False)


# -----------------------------------------------------------------------------
# the vision tower on CPU: HF's arithmetic in fewer, larger calls (same outputs, tested against HF's)

class _PatchEmbedFunction(torch.autograd.Function):
    """HF's patch embedding (a Conv3d whose stride is its kernel, over pre-cut patches) with the backward of the
    matmul it is: oneDNN's Conv3d weight gradient took 13% of a demo SFT step on 2 CPU cores."""

    @staticmethod
    def forward(ctx, patches, weight, bias):  # patches [N, C, T, P, P], weight [D, C, T, P, P], bias [D]
        ctx.save_for_backward(patches, weight)
        return F.conv3d(patches, weight, bias, stride=weight.shape[2:])  # [N, D, 1, 1, 1]

    @staticmethod
    def backward(ctx, grad):  # grad [N, D, 1, 1, 1]
        patches, weight = ctx.saved_tensors
        grad = grad.flatten(1)  # [N, D]
        grad_patches = (grad @ weight.flatten(1)).view_as(patches) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ patches.flatten(1)).view_as(weight) if ctx.needs_input_grad[1] else None
        return grad_patches, grad_weight, grad.sum(0) if ctx.needs_input_grad[2] else None


class CPUPatchEmbed(hf_qwen3_vl.Qwen3VLVisionPatchEmbed):
    def forward(self, hidden_states):  # [N, C*T*P*P] -> [N, D]
        patches = hidden_states.view(-1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        weight = self.proj.weight
        return _PatchEmbedFunction.apply(patches.to(weight.dtype), weight, self.proj.bias).view(-1, self.embed_dim)


class CPUVisionAttention(hf_qwen3_vl.Qwen3VLVisionAttention):
    """HF's vision attention, whose sdpa/eager path calls attention once per chunk (an image, or one frame pair of a
    video: 8-32 calls per layer in a demo micro-batch), with one call per chunk length on the stacked chunks."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = hf_qwen3_vl.apply_rotary_pos_emb_vision(q, k, *position_embeddings)  # [S, H, d] each
        attention = hf_qwen3_vl.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                      hf_qwen3_vl.eager_attention_forward)
        starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        out = q.new_empty(q.shape)  # [S, H, d]
        for length in sorted(set(lengths)):
            rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths) if n == length])  # [m*L]
            stack = lambda x: x[rows].view(-1, length, *x.shape[1:]).transpose(1, 2)  # [m, H, L, d]
            chunk_out = attention(self, stack(q), stack(k), stack(v), attention_mask=None, scaling=self.scaling,
                                  dropout=0.0, is_causal=False, **kwargs)[0]  # [m, L, H, d]
            out[rows] = chunk_out.reshape(-1, *chunk_out.shape[2:])
        return self.proj(out.reshape(seq_length, -1))


def use_cpu_vision(model):
    """Swap the vision tower's patch embedding and attention for the CPU versions above (same weights)."""
    visual = model.model.visual
    if visual.config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"use_cpu_vision: attention {visual.config._attn_implementation!r}: sdpa or eager only")
    visual.patch_embed.__class__ = CPUPatchEmbed
    for block in visual.blocks:
        block.attn.__class__ = CPUVisionAttention
    return model


def load_model(path, device="cpu", dtype=torch.float32, attn_implementation=None, weights=True):
    """(model, processor) from a local directory, the model on `device` in `dtype`.

    Attention: flash-attn when it is installed, the device is a GPU and the weights are bf16 or fp16 (flash-attn
    refuses fp32 inputs), else sdpa. weights=False: the architecture on the meta device, no weights read (FSDP
    ranks build this; common.shard_model fills it from rank 0's loaded copy). On CPU the vision tower runs
    use_cpu_vision's versions (same weights and outputs).
    """
    if attn_implementation is None:
        attn_implementation = "sdpa"
        if device != "cpu" and torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
            try:
                import flash_attn  # noqa: F401  (optional dependency)
                attn_implementation = "flash_attention_2"
            except ImportError:
                pass
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    if not weights:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype,
                                                            attn_implementation=attn_implementation)
        if os.path.isfile(os.path.join(path, "generation_config.json")):  # stop_token_ids reads its EOS ids
            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if device == "cpu":
        use_cpu_vision(model)
    if not weights:
        return model, processor
    return model.to(device), processor


def load_model_to_shard(path, device, dtype, rank, world_size):
    """(model, full_model, processor) for common.shard_model(model, ..., full_model=full_model). One process: the
    loaded model and None. Under torchrun: every rank's model is built on the meta device, and rank 0 alone also
    loads the weights (full_model), which shard_model broadcasts into every rank's shards."""
    model, processor = load_model(path, device, dtype, weights=world_size == 1)
    full_model = load_model(path, device, dtype)[0] if world_size > 1 and rank == 0 else None
    return model, full_model, processor


@dataclass
class Config:
    out: str = DEFAULT_MODEL_DIR  # where the model and processor are saved
    data: str = DEFAULT_DATA_DIR  # the suite folder whose text trains the tokenizer
    seed: int = 0
    size: str = "S"  # S | L (SIZES)
    position_code_rms: float = 0.0  # > 0: the vision position table starts as position_code (the demo passes 0.5)


if __name__ == "__main__":
    cfg = common.parse_config(Config, sys.argv[1:])
    build_tiny_model(cfg.out, cfg.data, cfg.seed, cfg.size, cfg.position_code_rms)
