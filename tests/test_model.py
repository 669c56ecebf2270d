"""model.py: the tiny Qwen3-VL round-trips through save_pretrained / from_pretrained like a real checkpoint,
is deterministic for a seed, and its tokenizer and chat template behave like Qwen's."""
import filecmp
import os

import torch
from conftest import TEST_MEDIA
from safetensors.torch import load_file

import data
import model as model_lib


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
