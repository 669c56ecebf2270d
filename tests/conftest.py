"""Shared fixtures: a minimal suite (two PNGs, one mp4, the three row shapes) and a tiny model built from it
once per session. Independent of shapes.py on purpose: these fixtures test data.py and model.py alone."""
import json
import os
import signal
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import model as model_lib  # noqa: E402

VIDEO_FPS, VIDEO_FRAMES = 8, 24  # a 3 s clip; frame i is a flat colour with red = 10 * i
# small budgets so a test batch stays a few hundred tokens
TEST_MEDIA = data.MediaConfig(fps=2.0, max_frames=8, video_min_pixels=32 * 32, video_max_pixels=64 * 96,
                              image_min_pixels=32 * 32, image_max_pixels=64 * 96)


def write_video(path, frames=VIDEO_FRAMES, fps=VIDEO_FPS, height=64, width=96):
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)  # built into every FFmpeg, unlike libx264
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.zeros((height, width, 3), dtype=np.uint8)
            rgb[..., 0] = 10 * i
            rgb[..., 2] = 100
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def answer(text):
    return f"<think>I look at the picture and count.</think><answer>{text}</answer>"


def suite_rows():
    """A few rows of each released shape, covering image, video, video-image and a text-only row."""
    rl = [
        {"problem": "What colour is the circle?", "options": ["A. red", "B. blue", "C. green"],
         "answer": "<answer>B</answer>", "problem_type": "multiple choice", "data_type": "image",
         "images": ["media/a.png"], "problem_id": 0},
        {"problem": "How many shapes are there?", "answer": "3", "problem_type": "numerical", "data_type": "image",
         "images": ["media/b.png"], "problem_id": 1},
        {"problem": "When is the square visible?", "answer": '{"time": [0.5, 2.0]}',
         "problem_type": "temporal grounding", "data_type": "video", "videos": ["media/clip.mp4"], "problem_id": 2},
        {"problem": "What is 12 + 30?", "answer": "42", "problem_type": "math", "problem_id": 3},
    ]
    eval_rows = [
        {"problem": "Box the red circle.", "solution": '<answer>{"boxes": [10, 20, 500, 600]}</answer>',
         "problem_type": "spatial grounding", "data_type": "image", "path": "media/a.png", "problem_id": 10},
        {"problem": "Which shape in the image appears in the video?", "options": ["A. circle", "B. square"],
         "solution": "<answer>A</answer>", "problem_type": "multiple choice", "data_type": "video-image",
         "path": "media/clip.mp4", "additional_path": "media/b.png", "problem_id": 11},
        {"problem": "Segment the circle.", "solution": '<answer>{"boxes": [0, 0, 10, 10]}</answer>',
         "problem_type": "segmentation", "data_type": "image", "path": "media/a.png", "problem_id": 12,
         "resolution": {"width": 96, "height": 64},
         "segmentation_output": data.rle_encode(np.eye(64, 96, dtype=bool))},
    ]
    sft = [
        # released style: placeholder in the user text, no problem_type / data_type
        {"messages": [{"role": "user", "content": "<image>How many shapes are there? 0123456789"},
                      {"role": "assistant", "content": answer("3")}], "images": ["media/b.png"]},
        # our suite's style: the same prompt build_prompt writes, plus problem_type and data_type
        {"messages": [{"role": "user", "content": "<video>" + data.build_prompt(rl[2])},
                      {"role": "assistant", "content": answer('{"time": [0.5, 2.0]}')}],
         "videos": ["media/clip.mp4"], "problem_type": "temporal grounding", "data_type": "video"},
    ]
    return {"rl.json": rl, "eval.json": eval_rows, "sft.json": sft}


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    os.makedirs(root / "media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "media" / "a.png")
    Image.fromarray(rng.integers(0, 255, (150, 40, 3), dtype=np.uint8)).save(root / "media" / "b.png")
    write_video(str(root / "media" / "clip.mp4"))
    for name, rows in suite_rows().items():
        with open(root / name, "w") as f:
            json.dump(rows, f)
    return root


@pytest.fixture(scope="session")
def model_dir(suite_dir, tmp_path_factory):
    return model_lib.build_tiny_model(str(tmp_path_factory.mktemp("model")), str(suite_dir), seed=0)


@pytest.fixture(scope="session")
def tiny(model_dir):
    """(model, processor) loaded once; tests must not modify the model."""
    tiny_model, processor = model_lib.load_model(model_dir)
    return tiny_model.eval(), processor


# -----------------------------------------------------------------------------
# trainer tests: main() installs a SIGTERM flag; 2-rank runs under torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def restore_sigterm_handler():
    """main() installs its SIGTERM flag in this process; give pytest its own handler back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def torchrun(args, timeout=300):
    """(returncode, stderr) of `torchrun --nproc_per_node 2 ARGS` on CPU; on a timeout the launcher AND its ranks
    are killed (subprocess.run would kill only the launcher and leave hung ranks spinning)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + args
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.path.join(REPO, "tests")}  # project and conftest
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        err += f"\ntimed out after {timeout} s"
    return proc.returncode, err
