"""Checkpoints: SIGKILL during training and a crash in the middle of a checkpoint save both
leave a resumable run whose later metrics equal those of an uninterrupted run (the same numbers:
rollout seeds depend only on (seed, step, rank); data position, optimizer, teacher snapshot and
RNG state come back). Also: HF export loads with from_pretrained. Marked slow: ~100 s on 2 busy CPU cores (a
subprocess and three short runs)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crisp_fast.train import Trainer, train
from crisp_fast.train import checkpoint as ckpt
from crisp_fast.train.tiny import tiny_config, write_problems

REPO = Path(__file__).resolve().parents[1]
TIMING = {"rollout_seconds", "train_seconds", "step_seconds", "tokens_per_second", "train_tokens_per_second",
          "peak_memory_bytes"}
OVERRIDES = ["train.steps=4", "checkpoint.every=1", "checkpoint.resume=auto", "train.teacher_refresh_every=2",
             "rollout.max_new_tokens=6", "rollout.n=1"]


def comparable(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def config_for(tmp_path, name, data, extra=()):
    return tiny_config(data, tmp_path / name, OVERRIDES + list(extra))


@pytest.mark.slow
def test_kill_during_training_and_during_save_then_resume(tmp_path, seed):
    data = write_problems(tmp_path / "problems.jsonl", count=6, seed=seed)
    reference = train(config_for(tmp_path, "reference", data, ["checkpoint.export_hf=true"]))
    expected = comparable(tmp_path / "reference/metrics.jsonl")
    assert [row["step"] for row in expected] == [1, 2, 3, 4]
    assert reference.teacher_refreshes == [2, 4]

    # --- SIGKILL a real training process once it has finished (and checkpointed) step 2
    killed = tmp_path / "killed"
    script = ("import sys; from crisp_fast.train import train; from crisp_fast.train.tiny import tiny_config; "
              f"train(tiny_config({str(data)!r}, {str(killed)!r}, {OVERRIDES!r}))")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (killed / "checkpoints/step_00000002/meta.json").exists():
            break
        time.sleep(0.05)
    assert process.poll() is None, "the training process ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    latest = ckpt.complete_checkpoints(killed / "checkpoints")[-1]
    assert int(latest.name.split("_")[1]) in (2, 3)
    resumed = Trainer(config_for(tmp_path, "killed", data))
    result = resumed.run()
    assert comparable(killed / "metrics.jsonl") == expected
    assert result.teacher_refreshes == [2, 4]

    # --- crash in the middle of saving step 3's checkpoint (after the shards, before the commit)
    crashed = tmp_path / "crashed"
    original_replace = ckpt.os.replace

    def crash_on_step_3(source, target):
        if str(target).endswith("step_00000003"):
            raise KeyboardInterrupt("killed mid-save")
        return original_replace(source, target)

    ckpt.os.replace = crash_on_step_3
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config_for(tmp_path, "crashed", data))
    finally:
        ckpt.os.replace = original_replace
    assert (crashed / "checkpoints/step_00000003.partial").is_dir()
    assert [p.name for p in ckpt.complete_checkpoints(crashed / "checkpoints")][-1] == "step_00000002"
    train(config_for(tmp_path, "crashed", data))
    assert comparable(crashed / "metrics.jsonl") == expected

    # --- the exported model loads with plain transformers and holds the trained weights
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "reference/hf")
    for (name, theirs), ours in zip(exported.named_parameters(), reference.model.parameters()):
        assert torch.equal(theirs, ours.detach()), name
