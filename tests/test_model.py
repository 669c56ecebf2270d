"""model.py: the tiny Qwen3-VL round-trips through save_pretrained / from_pretrained like a real checkpoint,
is deterministic for a seed, and its tokenizer and chat template behave like Qwen's."""
import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TEST_MEDIA
from safetensors.torch import load_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

import data
import memory
import model as model_lib
import rollout
import shapes


def test_save_load_round_trip_identical_logits(suite_dir, tiny, tmp_path):
    tiny_model, processor = tiny
    rows = [data.load_rows(str(suite_dir / "rl.json"))[i] for i in (0, 2)]  # image + text, video
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = model_lib.load_model(str(tmp_path))
    for row in rows:
        batch = data.collate([row], processor, TEST_MEDIA)
        batch2 = data.collate([row], reprocessor, TEST_MEDIA)
        assert batch.keys() == batch2.keys() and all(torch.equal(batch[k], batch2[k]) for k in batch)
        with torch.no_grad():
            assert torch.equal(tiny_model(**batch).logits, reloaded.eval()(**batch2).logits)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_build_is_deterministic_for_a_seed(suite_dir, model_dir, tmp_path):
    again = model_lib.build_tiny_model(str(tmp_path / "again"), str(suite_dir), seed=0)
    other = model_lib.build_tiny_model(str(tmp_path / "other"), str(suite_dir), seed=1)
    first, second, third = weights(model_dir), weights(again), weights(other)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)
    assert filecmp.cmp(os.path.join(model_dir, "tokenizer.json"), os.path.join(again, "tokenizer.json"), shallow=False)
    # the vision tower with deepstack is part of the checkpoint
    assert any("visual.deepstack" in k for k in first) and any(k.startswith("model.visual.blocks") for k in first)


def test_tokenizer_reads_the_training_splits_only(suite_dir, tmp_path):
    """Held-out text must not shape the merges: with eval.json replaced by rows full of a word the training
    splits never hold, the tokenizer is the same file; with that word added to sft.json, it is not."""
    word = "zyxwq " * 400
    for name, change in (("eval.json", "same"), ("sft.json", "differs")):
        copy = tmp_path / change
        shutil.copytree(suite_dir, copy)
        with open(copy / name) as f:
            rows = json.load(f)
        if name == "eval.json":
            rows[0]["problem"] = word
        else:
            rows[0]["messages"] = [{"role": "user", "content": word}, rows[0]["messages"][1]]
        with open(copy / name, "w") as f:
            json.dump(rows, f)
        tokenizer = model_lib.train_tokenizer(model_lib.corpus_from_suite(str(copy)))
        assert (len(tokenizer.tokenize("zyxwq")) == 1) == (change == "differs")
    with pytest.raises(FileNotFoundError, match="sft.json or rl.json"):
        model_lib.corpus_from_suite(str(tmp_path / "empty"))


def test_tokenizer_digits_and_tags(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    ids = tok("x = 12345", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-5:] == list("12345")  # one digit per token
    text = "<think>two plus 3</think><answer>5</answer>"
    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(tag) in ids  # each tag is one token
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags survive, <|im_end|> goes
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"


def test_chat_template_renders_qwen_format(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "<think>.</think><answer>a</answer>"},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And now?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>.</think><answer>a</answer><|im_end|>\n"
                    "<|im_start|>user\n<|video_pad|>And now?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_cpu_vision_tower_equals_hf(suite_dir, model_dir):
    """load_model's CPU vision tower (patch-embedding backward as a matmul, one attention call per chunk length)
    gives HF's logits exactly and its gradients up to float rounding, on a batch mixing image and video chunks."""
    fast, processor = model_lib.load_model(model_dir)
    assert type(fast.model.visual.patch_embed) is model_lib.CPUPatchEmbed
    hf = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa")
    rows = data.load_rows(str(suite_dir / "sft.json")) + data.load_rows(str(suite_dir / "rl.json"))[:3]
    batch = data.collate(rows, processor, TEST_MEDIA)
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    outputs = []
    for m in (fast, hf):
        logits = m(**batch).logits  # [B, L, V]
        (logits.float() ** 2).mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (fast_logits, fast_grads), (hf_logits, hf_grads) = outputs
    assert torch.equal(fast_logits, hf_logits)
    for name, grad in hf_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-7), name
    assert hf_grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0


def test_position_code_makes_where_a_patch_is_readable_from_the_vision_tokens(tiny, suite_dir, tmp_path):
    """build_tiny_model(position_code_rms=0.5) changes the vision position table alone, to position_code; with it a
    vision token's row and column are a near-linear readout of the tokens the language model reads (least squares
    fitted on 3/4 of the tokens of 32 shapes images, R^2 on the rest); with HF's random table (the default) not."""
    default, processor = tiny
    coded, _ = model_lib.load_model(model_lib.build_tiny_model(str(tmp_path / "m"), str(suite_dir), seed=0,
                                                               position_code_rms=0.5))
    table = coded.model.visual.pos_embed.weight  # [256, vis_hidden]
    assert torch.equal(table, model_lib.position_code(16, table.shape[1], 0.5))
    assert abs(table.pow(2).mean().sqrt().item() - 0.5) < 1e-6
    default_weights = default.state_dict()
    differ = [n for n, p in coded.state_dict().items() if not torch.equal(p, default_weights[n])]
    assert differ == ["model.visual.pos_embed.weight"]
    rng = np.random.default_rng(0)
    images = [shapes.render(shapes.random_objects(rng, 2)) for _ in range(32)]
    inputs = processor.image_processor(images=images, do_resize=False, return_tensors="pt")
    grid = inputs["image_grid_thw"]  # [32, 3]
    assert grid.tolist() == [[1, 8, 8]] * 32
    where = torch.arange(64)
    rows, cols = (where // 8).repeat(32).double(), (where % 8).repeat(32).double()  # [2048] each

    def r_squared(features, target):  # features [N, D]
        x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
        fit = x.shape[0] * 3 // 4
        solution = torch.linalg.lstsq(x[:fit], target[:fit]).solution
        residual = target[fit:] - x[fit:] @ solution
        return 1 - (residual ** 2).sum().item() / ((target[fit:] - target[fit:].mean()) ** 2).sum().item()

    scores = {}
    for name, m in (("code", coded), ("random", default)):
        with torch.no_grad():
            tokens = torch.cat(m.model.get_image_features(inputs["pixel_values"], grid).pooler_output)  # [2048, H]
        scores[name] = (r_squared(tokens, rows), r_squared(tokens, cols))
    assert min(scores["code"]) > 0.7 and max(scores["random"]) < 0.2, scores


def test_a_negative_position_code_rms_is_refused_before_anything_is_built(suite_dir, tmp_path):
    for rms in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="position_code_rms"):
            model_lib.build_tiny_model(str(tmp_path / "m"), str(suite_dir), position_code_rms=rms)
    assert not (tmp_path / "m").exists()


def test_freeze_vision_leaves_trainable_what_llama_factory_leaves(tiny):
    """LLaMA-Factory's freeze_vision_tower + freeze_multi_modal_projector on Qwen3-VL (the release's SFT) freezes
    names containing visual.patch_embed, visual.blocks or visual.merger: on Qwen3-VL-8B's architecture the vision
    position embedding and the three deepstack mergers stay trainable, and the whole language model."""
    with torch.device("meta"):
        big = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**memory.QWEN3_VL_8B))
    model_lib.freeze_vision(big)
    trainable = [name for name, p in big.named_parameters() if p.requires_grad and ".visual." in name]
    assert trainable == ["model.visual.pos_embed.weight"] + [
        f"model.visual.deepstack_merger_list.{i}.{layer}.{kind}"
        for i in range(3) for layer in ("norm", "linear_fc1", "linear_fc2") for kind in ("weight", "bias")]
    frozen = [name for name, p in big.named_parameters() if not p.requires_grad]
    assert all(name.startswith(("model.visual.patch_embed.", "model.visual.blocks.", "model.visual.merger."))
               for name in frozen) and any(".merger." in name for name in frozen)
    assert all(p.requires_grad for name, p in big.named_parameters() if not name.startswith("model.visual."))


def test_generation_stops_at_either_eos_of_the_generation_config(tiny, suite_dir):
    """As Qwen3-VL-Instruct's generation_config: <|im_end|> and <|endoftext|> both end a response, in
    train_rl.py and eval.py alike (model.stop_token_ids)."""
    tiny_model, processor = tiny
    tok = processor.tokenizer
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    stop = model_lib.stop_token_ids(tiny_model, tok)
    assert stop == sorted([tok.convert_tokens_to_ids("<|im_end|>"), end_of_text])
    batch = data.collate([data.load_rows(str(suite_dir / "rl.json"))[3]], processor, TEST_MEDIA)

    def end_of_text_at_step_3(module, args, logits):  # logits [B, L, V]: the 3rd new token is <|endoftext|>
        calls.append(1)
        if len(calls) == 3:
            logits[:, -1, end_of_text] = 1e4
        return logits
    for eos, length, reason in ((stop, 3, "stop"), ([stop[1]], 6, "length")):
        calls = []
        hook = tiny_model.lm_head.register_forward_hook(end_of_text_at_step_3)
        try:
            out = rollout.generate(tiny_model, batch, max_new_tokens=6, temperature=0, eos_token_ids=eos)
        finally:
            hook.remove()
        assert out["response_mask"].sum().item() == length and out["finish_reasons"] == [reason]
