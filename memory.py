"""
The per-GPU memory plan of a train_rl.py config at real scale: Qwen3-VL-8B built on the meta device (no weights,
no memory), its parameters counted, and the big terms of a rollout and an update written out with their
arithmetic. `python train_rl.py --preset=release --plan=true` prints it.
"""
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

QWEN3_VL_8B = dict(  # public config facts of Qwen/Qwen3-VL-8B-Instruct
    text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                                          mrope_interleaved=True), tie_word_embeddings=False),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    tie_word_embeddings=False,
)


def print_plan(cfg, gpus=8, gpu_gb=80):
    """Build the 8B architecture on meta, count parameters, and print the per-GPU memory plan of cfg (a
    train_rl.Config). Returns the parameter count."""
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**QWEN3_VL_8B))
    n = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    text = QWEN3_VL_8B["text_config"]
    gb = 1024 ** 3
    # FSDP2 shards fp32 master weights, fp32 grads and fp32 AdamW moments over the GPUs
    weights, grads, adam = 4 * n / gpus / gb, 4 * n / gpus / gb, 8 * n / gpus / gb
    # rollout gathers the bf16 weights once for the whole phase (rollout.gathered_params)
    gathered = 2 * n / gb
    # KV cache: 2 (k, v) x layers x kv_heads x head_dim x bf16 per token
    kv_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2
    rollout_rows = cfg.rollout_batch_prompts * cfg.group_size  # responses in one generate call on one GPU
    # the longest RL prompt (SPEC 2): max_frames / temporal patch 2 frame pairs, each video_max_pixels / 32^2
    # tokens after the 2x2 merge, plus ~512 text tokens
    prompt_tokens = cfg.max_frames // 2 * cfg.video_max_pixels // (32 * 32) + 512
    kv = kv_per_token * rollout_rows * (prompt_tokens + cfg.max_new_tokens) / gb
    # training activations with checkpointing: one hidden state per layer per token kept, bf16
    seq = prompt_tokens + cfg.max_new_tokens
    acts = 2 * text["hidden_size"] * text["num_hidden_layers"] * seq * cfg.micro_batch_prompts / gb
    logits = 4 * text["vocab_size"] * cfg.max_new_tokens * cfg.micro_batch_prompts / gb  # fp32 response logits
    print(f"Qwen3-VL-8B on meta: {n / 1e9:.2f}B parameters ({n_vision / 1e9:.2f}B vision)")
    print(f"per GPU ({gpus} x {gpu_gb} GB, FSDP2): fp32 weights {weights:.1f} GB + grads {grads:.1f} GB + "
          f"AdamW {adam:.1f} GB = {weights + grads + adam:.1f} GB sharded state")
    print(f"rollout: gathered bf16 weights {gathered:.1f} GB + KV cache {kv:.1f} GB for {rollout_rows} responses "
          f"of {prompt_tokens}+{cfg.max_new_tokens} tokens ({kv_per_token / 1024:.0f} KiB per token)")
    print(f"update: activations with checkpointing {acts:.1f} GB + response logits {logits:.1f} GB per "
          f"micro-batch of {cfg.micro_batch_prompts} sequence(s) of {seq} tokens")
    peak = weights + grads + adam + max(gathered + kv, acts + logits)
    print(f"peak ~{peak:.1f} GB of {gpu_gb} GB (before allocator overhead and vision activations)")
    return n
