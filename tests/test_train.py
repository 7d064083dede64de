"""Training end to end on real data: loss goes down, exact resume, fine-tuning, two processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from reference import randomize_

from segany.build import build_sam_from_config, config_from_dict
from segany.checkpoint import load_checkpoint, read_metadata
from segany.loading import load_model, save_model
from segany.train import load_config, train, trainer
from segany.train.data_stream import SampleStream
from segany.train.trainer import (
    PROGRESS_METADATA_KEY,
    InteractiveStep,
    build_training_model,
    learning_rate,
)

REPO = Path(__file__).resolve().parents[1]
TINY_HYBRID = {
    "img_size": 256,
    "encoder": {
        "type": "hybrid",
        "widths": [16, 32, 64],
        "depths": [1, 1, 1],
        "attention_blocks": 1,
        "num_heads": 2,
    },
    "decoder_mlp_dim": 256,
}
TINY_VIT = {
    "img_size": 256,
    "encoder": {
        "type": "vit",
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "global_attn_indexes": [1],
    },
    "decoder_mlp_dim": 256,
}


def write_config(folder: Path, shared_data: Path, **changes) -> Path:
    config = {
        "model": {"name": None, "config": TINY_HYBRID},
        "data": {
            "train": [
                {"root": str(shared_data / "coco-mval"), "split": "train"},
                {"root": str(shared_data / "dsb2018"), "split": "train", "weight": 0.5},
            ],
            "masks_per_image": 4,
        },
        "optim": {
            "steps": 6,
            "batch_images": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "rounds": 3,
            "precision": "fp32",
        },
        "output": str(folder / "run"),
        "log_every": 2,
        "checkpoint_every": 100,
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def probe_loss(model, config, positions=range(10_000, 10_004)) -> float:
    """Loss on a fixed batch with fixed prompts (not trained on: positions far ahead)."""
    stream = SampleStream(config, model.image_size)
    items = stream.items(positions)
    step = InteractiveStep(model, config.optim).eval()
    with torch.no_grad():
        loss, _ = step(items, torch.Generator().manual_seed(0))
    return loss.item()


def test_training_lowers_the_loss_on_real_data(tmp_path: Path, shared_data: Path) -> None:
    config = load_config(
        # auto: bf16 autocast where the CPU has it natively, fp32 where bf16 would be emulated
        write_config(tmp_path, shared_data, optim__steps=40, optim__precision="auto")
    )
    _, initial = build_training_model(config)
    before = probe_loss(initial, config)
    model_path = train(config, progress=False)
    after = probe_loss(load_model(checkpoint=model_path), config)
    assert after < 0.8 * before, (before, after)
    lines = (config.output / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20
    assert (config.output / "curves.png").stat().st_size > 1000


WARMUP = {
    "optim__geometric_warmup_steps": 2,
    "optim__embedding_scale_start": 0.5,
    "optim__embedding_scale_ramp_steps": 8,
}


@pytest.mark.parametrize("changes", [{}, WARMUP], ids=["plain", "warm-up"])
def test_resume_continues_bit_for_bit(tmp_path: Path, shared_data: Path, changes: dict) -> None:
    (tmp_path / "a").mkdir()
    straight = load_config(write_config(tmp_path / "a", shared_data, **changes))
    reference = load_model(checkpoint=train(straight, progress=False))

    (tmp_path / "b").mkdir()
    first_half = load_config(write_config(tmp_path / "b", shared_data, optim__steps=3, **changes))
    train(first_half, progress=False)
    second_half = load_config(write_config(tmp_path / "b", shared_data, **changes))
    resumed = load_model(checkpoint=train(second_half, resume=True, progress=False))
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    logged = [
        json.loads(line)["step"]
        for line in (second_half.output / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2, 3, 5]  # the stop at 3 logged its last step; nothing twice
    # The training checkpoint loads as the model it holds (embedding scale folded in).
    from_checkpoint = build_sam_from_config(config_from_dict(TINY_HYBRID))
    load_checkpoint(from_checkpoint, second_half.output / "checkpoint.pt", "custom")
    for key, value in reference.state_dict().items():
        assert torch.equal(from_checkpoint.state_dict()[key], value), key


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_at_a_step_boundary_and_saves(
    tmp_path: Path, shared_data: Path, monkeypatch, number: int
) -> None:
    config = load_config(write_config(tmp_path, shared_data, optim__steps=5))
    sent = []

    def signalling(optim, step, *rest):  # called as each step starts
        if step == 2 and not sent:
            sent.append(step)
            os.kill(os.getpid(), number)
        return learning_rate(optim, step, *rest)

    monkeypatch.setattr(trainer, "learning_rate", signalling)
    model_path = train(config, progress=False)
    assert sent == [2]
    # Step 2 (the third) finished; the checkpoint and the model say so.
    assert torch.load(config.output / "checkpoint.pt", weights_only=False)["step"] == 3
    assert json.loads(read_metadata(model_path)[PROGRESS_METADATA_KEY])["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.undo()
    train(config, resume=True, progress=False)
    assert torch.load(config.output / "checkpoint.pt", weights_only=False)["step"] == 5


@pytest.mark.parametrize("architecture", [TINY_VIT, TINY_HYBRID], ids=["vit", "hybrid"])
def test_fine_tune_with_frozen_encoder(
    tmp_path: Path, shared_data: Path, architecture: dict
) -> None:
    start = randomize_(build_sam_from_config(config_from_dict(architecture)), seed=1)
    checkpoint = save_model(start, tmp_path / "start.safetensors", config_from_dict(architecture))
    config = load_config(
        write_config(
            tmp_path,
            shared_data,
            model={
                "name": None,
                "config": architecture,
                "checkpoint": str(checkpoint),
                "freeze": "encoder",
            },
            optim__steps=3,
        )
    )
    tuned = load_model(checkpoint=train(config, progress=False))
    tuned_parameters = dict(tuned.named_parameters())
    changed = {
        key: not torch.equal(tuned_parameters[key], value)
        for key, value in start.named_parameters()
    }
    assert not any(v for k, v in changed.items() if k.startswith("image_encoder."))
    # Buffers too: a frozen encoder's BatchNorm statistics must not drift either.
    tuned_state, start_state = tuned.state_dict(), start.state_dict()
    encoder_state = [k for k in start_state if k.startswith("image_encoder.")]
    assert all(torch.equal(tuned_state[k], start_state[k]) for k in encoder_state)
    decoder = [v for k, v in changed.items() if k.startswith("mask_decoder.")]
    assert sum(decoder) >= 0.9 * len(decoder)  # all but outputs that no prompt of 3 steps used


def test_bad_config_is_one_clear_error(tmp_path: Path, shared_data: Path, capsys) -> None:
    from segany.cli import main

    path = write_config(tmp_path, shared_data, optim__stepz=3)
    assert main(["train", str(path)]) == 2
    assert "unknown key optim.stepz" in capsys.readouterr().err
    path = write_config(
        tmp_path, shared_data, data={"train": [{"root": str(tmp_path / "nowhere")}]}
    )
    assert main(["train", str(path)]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", str(write_config(tmp_path, shared_data)), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is installed with torch",
)
def test_two_processes_with_gloo(tmp_path: Path, shared_data: Path) -> None:
    config = write_config(tmp_path, shared_data, optim__steps=3, optim__batch_images=1)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "segany.cli",
            "train",
            str(config),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # only rank 0 logs (steps 1 and 2)
