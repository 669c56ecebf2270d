"""train_sft.py: the masked loss against a hand computation, the LR schedule, exact resume, 2 gloo ranks == one
process on the same global batch, and the HF export (from_pretrained gives the trained model's logits).

One 2-step single-process run (module fixture, in this process) is the reference for the resume, torchrun and
export tests."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TEST_MEDIA, answer, suite_rows, torchrun
from safetensors.torch import load_file
from transformers import Qwen3VLForConditionalGeneration

import common
import data
import model as model_lib
import train_sft

STEPS = 2
pytestmark = pytest.mark.usefixtures("restore_sigterm_handler")


def read_metrics(out_dir):
    """{step: merged metrics of that step} from metrics.jsonl (training and validation lines share a step)."""
    by_step = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row.pop("step"), {}).update(row)
    return by_step


def exported_weights(out_dir):
    return load_file(os.path.join(out_dir, "hf", "model.safetensors"))


@pytest.fixture(scope="module")
def sft_args(suite_dir, model_dir, tmp_path_factory):
    """Arguments for a tiny run on 10 rows (image, video and text-only; answers of different lengths, so
    micro-batches are left-padded): 2 held out, 8 rows per step in micro-batches of 2, 2 steps."""
    image, video = suite_rows()["sft.json"]
    rows = []
    for i in range(10):
        if i % 3 == 2:  # text only
            row = {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                {"role": "assistant", "content": answer(str(2 * i))}]}
        else:
            row = copy.deepcopy(video if i == 1 else image)
            row["messages"][1]["content"] = answer(str(10 ** i))
        rows.append(row)
    path = tmp_path_factory.mktemp("sft_data") / "sft.json"
    path.write_text(json.dumps(rows))
    return [f"--model={model_dir}", f"--data={path}", f"--media_root={suite_dir}", f"--max_steps={STEPS}",
            "--batch_size=8", "--micro_batch_size=2", "--val_rows=2", "--val_every=1", "--log_every=1",
            "--save_every=1", "--lr=5e-5", "--image_max_pixels=6144", "--video_max_pixels=6144", "--max_frames=8",
            "--freeze_vision=true"]


@pytest.fixture(scope="module")
def reference_run(sft_args, tmp_path_factory):
    """2 steps in one process; checkpoints at steps 1 and 2, the HF export at the end."""
    out_dir = str(tmp_path_factory.mktemp("sft_reference"))
    train_sft.main(sft_args + [f"--out_dir={out_dir}"])
    return out_dir


# -----------------------------------------------------------------------------
# the loss and the schedule


def test_sft_loss_is_the_assistant_token_mean(tiny, suite_dir):
    tiny_model, processor = tiny
    rows = data.load_rows(str(suite_dir / "sft.json"))  # an image row and a video row of different lengths
    batch = data.collate(rows, processor, TEST_MEDIA, with_answer=True)
    labels = batch["labels"]  # [B, L]
    for row, row_labels in zip(rows, labels):  # the labelled tokens are the assistant turn and its <|im_end|>
        text = processor.tokenizer.decode(row_labels[row_labels != -100])
        assert text == row["messages"][1]["content"] + "<|im_end|>"

    with torch.no_grad():
        logits = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()  # [B, L, V]
        total, count = 0.0, 0
        for b in range(labels.shape[0]):
            for t in range(1, labels.shape[1]):
                if labels[b, t] != -100:  # logits at t-1 predict the token at t
                    total -= F.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                    count += 1
        assert count == int((labels != -100).sum())
        loss = train_sft.sft_loss(tiny_model, batch, count)
        assert loss.item() == pytest.approx(total / count, rel=1e-5)

        # micro-batches normalised by the step's token count add up to the loss of the whole batch
        parts = [train_sft.sft_loss(tiny_model, data.collate([row], processor, TEST_MEDIA, with_answer=True), count)
                 for row in rows]
        assert sum(p.item() for p in parts) == pytest.approx(total / count, rel=1e-5)


def test_lr_schedule_and_length_sorted_micro_batches(suite_dir):
    cfg = train_sft.Config(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [train_sft.lr_at(step, cfg, 100) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup over 10% of the steps
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.1

    rows = data.load_rows(str(suite_dir / "sft.json"))
    image, video = rows
    long = {**image, "messages": [image["messages"][0], {"role": "assistant", "content": answer("123456")}]}
    batches = train_sft.length_sorted_micro_batches([video, long, image, video], 2)
    assert batches == [[image, long], [video, video]]  # image rows together, the shorter first


def test_media_gap_swaps_pixels_of_rows_with_the_same_grid(tiny, suite_dir):
    """media_swapped pairs rows whose media have the same grids (a lone grid and text-only rows stay out) and
    gives each the next one's pixels; the loss gap is 0 when the pixels are equal and not when they differ."""
    tiny_model, processor = tiny
    image, video = data.load_rows(str(suite_dir / "sft.json"))  # b.png and clip.mp4
    text = {**image, "source": "text", "images": [], "media_types": [],
            "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": answer("4")}]}
    items = {r["source"]: data.encode_row(r, processor, TEST_MEDIA, with_answer=True) for r in (image, video, text)}
    noisy = {**items[image["source"]], "pixel_values": items[image["source"]]["pixel_values"].flip(0)}
    rows = [{**image, "source": f"image{i}"} for i in range(3)]
    pairs = [(rows[0], items[image["source"]]), (video, items[video["source"]]), (rows[1], noisy),
             (text, items["text"]), (rows[2], items[image["source"]])]
    originals, swapped = train_sft.media_swapped(pairs)
    assert [r["source"] for r, _ in originals] == ["image0", "image1", "image2"]
    assert [r["source"] for r, _ in swapped] == ["image0", "image1", "image2"]
    for (_, own), (_, other), (_, new) in zip(originals, originals[1:] + originals[:1], swapped):
        assert new["ids"] == own["ids"] and torch.equal(new["pixel_values"], other["pixel_values"])

    cfg = train_sft.Config(micro_batch_size=1)
    pad_id = processor.tokenizer.pad_token_id
    def loss(pairs):
        return train_sft.mean_loss(train_sft.validation_losses(tiny_model, pairs, cfg, pad_id, torch.device("cpu")))
    # image2 takes image0's pixels, equal to its own: no gap; image0 takes the flipped pixels of image1: a gap
    assert loss(swapped[2:]) == loss(originals[2:])
    assert abs(loss(swapped[:1]) - loss(originals[:1])) > 1e-6


@pytest.mark.parametrize("average", ["token", "row"])
def test_validation_losses_per_row_give_the_training_mean(tiny, suite_dir, average):
    """The per-row validation pass: its mean over every row is the step loss training computes on the same
    micro-batches (sft_loss over labelled_counts), and the mean over a subset of its rows (val_media_gap's
    own-media rows, taken from the val_loss pass) is that subset's loss in a pass of its own."""
    tiny_model, processor = tiny
    image, video = data.load_rows(str(suite_dir / "sft.json"))
    pairs = [({**row, "source": f"{row['source']}-{i}"}, data.encode_row(row, processor, TEST_MEDIA, with_answer=True))
             for i, row in enumerate([image, video, image])]
    cfg = train_sft.Config(micro_batch_size=2, loss_average=average)
    pad_id, device = processor.tokenizer.pad_token_id, torch.device("cpu")
    losses = train_sft.validation_losses(tiny_model, pairs, cfg, pad_id, device)
    assert sorted(losses) == sorted(row["source"] for row, _ in pairs)
    batches = train_sft.micro_batches(pairs, cfg, pad_id, device)
    denominator = sum(train_sft.labelled_counts(b)[average] for b in batches)
    with torch.no_grad():
        step_loss = sum(train_sft.sft_loss(tiny_model, b, denominator, average).item() for b in batches)
    assert abs(train_sft.mean_loss(losses) - step_loss) < 1e-5
    images = [pairs[0], pairs[2]]
    alone = train_sft.mean_loss(train_sft.validation_losses(tiny_model, images, cfg, pad_id, device))
    assert abs(train_sft.mean_loss(losses, [row["source"] for row, _ in images]) - alone) < 1e-5
    assert abs(train_sft.mean_loss(losses) - alone) > 1e-4  # the video row weighs in the mean of all


# -----------------------------------------------------------------------------
# whole runs


def test_training_lowers_the_loss_and_logs(reference_run):
    metrics = read_metrics(reference_run)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert metrics[STEPS]["loss"] < metrics[1]["loss"]
    assert metrics[STEPS]["val_loss"] < metrics[1]["val_loss"]
    assert 0 < metrics[1]["padding_share"] < 1  # mixed lengths in a micro-batch: left padding, and it is counted
    assert sorted(os.listdir(os.path.join(reference_run, "ckpt"))) == ["step_000001", "step_000002"]


def test_resume_is_exact(reference_run, sft_args, tmp_path):
    """Step 2 resumed from the step-1 checkpoint (model, AdamW, sampler position, RNG) equals step 2 of the
    uninterrupted run: the same logged numbers and bit-identical weights."""
    shutil.copytree(os.path.join(reference_run, "ckpt", "step_000001"), tmp_path / "ckpt" / "step_000001")
    train_sft.main(sft_args + [f"--out_dir={tmp_path}", "--resume=true"])
    full, resumed = read_metrics(reference_run), read_metrics(str(tmp_path))
    assert sorted(resumed) == [2]
    for key in ("loss", "grad_norm", "lr", "padding_share", "tokens_per_step", "epoch", "val_loss"):
        assert resumed[2][key] == pytest.approx(full[2][key], abs=1e-6, rel=0), key
    expected, got = exported_weights(reference_run), exported_weights(str(tmp_path))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_torchrun_two_ranks_equal_one_process(reference_run, sft_args, tmp_path):
    """Each rank takes 4 of the 8 rows of a step (2 micro-batches, gradient sync on the second); the token-mean
    loss and the summed gradients equal the single process's. (AdamW's first steps move a weight by about
    lr * g / |g|, so a gradient near 0 that differs in its last bits between the two sums can move a weight
    by up to ~lr differently: at lr 2e-3 one weight in 50k differed by 1.7e-5; with the three-layer model at lr 2e-4
    one in 16k differed by 1.1e-5, hence the run's lr of 5e-5, which still moves weights ~10x the tolerance.)"""
    returncode, stderr = torchrun([os.path.join(REPO, "train_sft.py")] + sft_args + [f"--out_dir={tmp_path}"])
    assert returncode == 0, stderr[-4000:]
    single, ranks = read_metrics(reference_run), read_metrics(str(tmp_path))
    assert sorted(ranks) == sorted(single)
    for step in single:
        for key in ("loss", "grad_norm", "tokens_per_step", "val_loss"):
            if key in single[step]:
                assert ranks[step][key] == pytest.approx(single[step][key], abs=1e-5), (step, key)
    expected, got = exported_weights(reference_run), exported_weights(str(tmp_path))
    # the sharded export also writes the tied lm_head (common.export_hf); it must still equal the embeddings
    embed = "model.language_model.embed_tokens.weight"
    assert torch.equal(got.pop("lm_head.weight", got[embed]), got[embed])
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name
    # the 2-rank sharded checkpoint also loads into one process
    one_process, _ = model_lib.load_model(sft_args[0].split("=", 1)[1])
    common.load_checkpoint(os.path.join(str(tmp_path), "ckpt", f"step_{STEPS:06d}"), one_process)
    for name, p in one_process.state_dict().items():
        if name in expected:  # lm_head is tied to the embeddings and not saved
            assert torch.allclose(p, expected[name], atol=1e-5), name


def test_export_loads_and_gives_the_trained_logits(reference_run, sft_args, model_dir, suite_dir):
    """The HF folder loads with from_pretrained (and load_model, processor included) and its logits equal those
    of the trained weights in the final checkpoint; training moved the weights away from the start."""
    trained, processor = model_lib.load_model(model_dir)
    start = {k: v.clone() for k, v in trained.state_dict().items()}
    common.load_checkpoint(os.path.join(reference_run, "ckpt", f"step_{STEPS:06d}"), trained)
    exported = Qwen3VLForConditionalGeneration.from_pretrained(os.path.join(reference_run, "hf"))
    reloaded, reloaded_processor = model_lib.load_model(os.path.join(reference_run, "hf"))
    assert reloaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()

    rows = data.load_rows(str(suite_dir / "sft.json"))
    batch = data.collate(rows, processor, TEST_MEDIA)
    with torch.no_grad():
        want = trained(**batch).logits  # [B, L, V]
        assert torch.equal(exported(**batch).logits, want)
        assert torch.equal(reloaded(**batch).logits, want)
    language = "model.language_model.layers.0.mlp.up_proj.weight"
    vision = "model.visual.blocks.0.attn.qkv.weight"
    assert not torch.equal(trained.state_dict()[language], start[language])
    assert torch.equal(trained.state_dict()[vision], start[vision])  # --freeze_vision=true kept it


def test_adamw_second_moment_decays_at_adam_beta2(sft_args, model_dir, tmp_path):
    """After one step AdamW holds m = (1 - beta1) g and v = (1 - beta2) g^2, so v / m^2 = (1 - beta2) / (1 -
    beta1)^2 wherever g != 0: the step-1 checkpoint of a run with --adam_beta2=0.5 gives 50 (the default 0.999 would
    give 0.1)."""
    args = [a for a in sft_args if not a.startswith("--max_steps=")]
    train_sft.main(args + ["--max_steps=1", "--adam_beta2=0.5", f"--out_dir={tmp_path}"])
    trained, _ = model_lib.load_model(model_dir)
    model_lib.freeze_vision(trained)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    common.load_checkpoint(os.path.join(str(tmp_path), "ckpt", "step_000001"), trained, optimizer)
    ratios = []
    for p in params:
        m, v = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
        moved = m.abs() > 1e-6  # [*p.shape]: away from 0, where the ratio is not rounding
        ratios.append(v[moved] / m[moved] ** 2)
    ratios = torch.cat(ratios)
    assert ratios.numel() > 1000
    assert torch.allclose(ratios, torch.full_like(ratios, 0.5 / 0.1 ** 2), rtol=1e-3)


# -----------------------------------------------------------------------------
# the release's recipe: per-row loss, several files, cutoff_len

def test_row_average_is_the_mean_of_each_rows_token_mean(tiny, suite_dir):
    """loss_average="row" (LLaMA-Factory's for VLMs): each row's token mean, then the mean over rows, by hand."""
    tiny_model, processor = tiny
    image, video = data.load_rows(str(suite_dir / "sft.json"))
    long = {**image, "source": "long", "messages": [image["messages"][0],
                                                    {"role": "assistant", "content": answer("1234567890" * 3)}]}
    rows = [image, long, video]
    batch = data.collate(rows, processor, TEST_MEDIA, with_answer=True)
    labels = batch["labels"]  # [B, L]
    with torch.no_grad():
        logits = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()  # [B, L, V]
        per_row = []
        for b in range(len(rows)):
            nll = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                   for t in range(1, labels.shape[1]) if labels[b, t] != -100]
            per_row.append(nll)
        counts = train_sft.labelled_counts(batch)
        assert counts == {"token": sum(map(len, per_row)), "row": 3.0}
        row_mean = sum(sum(x) / len(x) for x in per_row) / 3
        token_mean = sum(map(sum, per_row)) / counts["token"]
        # a random-init model gives every token an NLL near log(vocab), so the two means differ by little (4.7e-4
        # relative with three layers); they must differ by 10x the 1e-5 the checks below use to tell them apart
        assert len({len(x) for x in per_row}) == 3 and row_mean != pytest.approx(token_mean, rel=1e-4)
        assert train_sft.sft_loss(tiny_model, batch, 3.0, "row").item() == pytest.approx(row_mean, rel=1e-5)
        assert train_sft.sft_loss(tiny_model, batch, counts["token"], "token").item() == pytest.approx(token_mean,
                                                                                                       rel=1e-5)
        # one row per micro-batch (the release: 1 row per GPU), divided by the step's 3 rows: the same mean
        parts = [train_sft.sft_loss(tiny_model, data.collate([r], processor, TEST_MEDIA, with_answer=True), 3.0, "row")
                 for r in rows]
        assert sum(p.item() for p in parts) == pytest.approx(row_mean, rel=1e-5)


def test_release_preset_is_one_row_per_gpu_per_step():
    cfg = common.parse_config(train_sft.Config, ["--preset=release"], train_sft.PRESETS)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.loss_average) == (0, 1, "row")  # 0: world_size x 1 rows
    assert (cfg.cutoff_len, cfg.image_max_pixels, cfg.video_max_pixels, cfg.max_frames) == (16384, 802816, 100352, 128)
    assert (cfg.sizing, cfg.prompt_template, cfg.freeze_vision) == ("easyr1", "release", True)


def test_several_data_files_train_together(suite_dir, tmp_path):
    image, video = suite_rows()["sft.json"]
    (tmp_path / "image.json").write_text(json.dumps([image] * 3))
    (tmp_path / "video.json").write_text(json.dumps([video] * 2))
    cfg = train_sft.Config(data=f"{tmp_path / 'image.json'},{tmp_path / 'video.json'}", media_root=str(suite_dir),
                           val_rows=1)
    train, val = train_sft.load_split(cfg, rank=0, world_size=1)
    assert len(train) == 4 and len(val) == 1
    assert sorted(r["data_type"] for r in train + val) == ["image"] * 3 + ["video"] * 2


def test_cutoff_lengths_follow_llama_factory():
    # answer under half the budget: kept whole, the prompt takes the rest
    assert data.cutoff_lengths(prompt_len=100, answer_len=20, cutoff_len=64) == (44, 20)
    # prompt under half: kept whole, the answer takes the rest
    assert data.cutoff_lengths(prompt_len=20, answer_len=100, cutoff_len=64) == (20, 44)
    # both over half: cut in proportion, int(64 * 60 / 160) = 24 for the answer
    assert data.cutoff_lengths(prompt_len=100, answer_len=60, cutoff_len=64) == (40, 24)


def test_cutoff_cuts_counts_and_never_cuts_media(tiny, suite_dir, tmp_path):
    _, processor = tiny
    image, video = data.load_rows(str(suite_dir / "sft.json"))
    text = {**image, "media": [], "media_types": [], "data_type": None, "source": "text",
            "messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": answer("7" * 40)}]}
    full = data.encode_row(text, processor, TEST_MEDIA, with_answer=True)
    prompt_len = full["labels"].index(next(t for t in full["labels"] if t != -100))
    budget = 2 * prompt_len + 5  # the answer is longer than half of it and the prompt shorter
    assert len(full["ids"]) - prompt_len > budget / 2
    cut = data.encode_row(text, processor, TEST_MEDIA, with_answer=True, cutoff_len=budget)
    # so the prompt stays whole and the answer keeps its head
    assert cut["ids"] == full["ids"][:budget] and cut["labels"] == full["labels"][:budget]
    assert cut["cut"] == len(full["ids"]) - budget
    short = {**text, "source": "short", "messages": [text["messages"][0], {"role": "assistant", "content": "7"}]}
    stats = {}
    data.collate([text, short], processor, TEST_MEDIA, with_answer=True, cutoff_len=budget, stats=stats)
    assert stats == {"truncated_rows": 1, "truncated_tokens": cut["cut"]}
    # a budget that would cut into the video's tokens fails, naming the row, as LLaMA-Factory's run would fail
    with pytest.raises(ValueError, match=r"sft\.json: row 1: cutoff_len=20 would cut into the prompt's media"):
        data.encode_row(video, processor, TEST_MEDIA, with_answer=True, cutoff_len=20)
