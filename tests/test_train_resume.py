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
        if (killed / "checkpoints/step_00000002/manifest.json").exists():
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


# ------------------------------------------------------------------------ kill-and-corrupt matrix
MATRIX = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.resume=auto",
          "rollout.max_new_tokens=6", "rollout.n=1", "train.teacher_refresh_every=2"]


def _flip_bytes(path, count=32):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for index in range(middle, min(middle + count, len(data))):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_checkpoints_and_torn_metrics_resume_from_what_is_sound(tmp_path, seed, capfd):
    """Each damage to the latest checkpoint (step 2) is named and the run falls back to step 1;
    each resumed run ends with the metrics of an uninterrupted one. Damage to every checkpoint,
    or to one named explicitly, is a clear error. ~20 s on 2 busy CPU cores."""
    import shutil

    from crisp_fast.train.checkpoint import CheckpointError

    data = write_problems(tmp_path / "problems.jsonl", count=6, seed=seed)
    train(tiny_config(data, tmp_path / "reference", MATRIX))
    expected = comparable(tmp_path / "reference/metrics.jsonl")
    base = tmp_path / "base"
    train(tiny_config(data, base, MATRIX + ["train.steps=2"]))
    assert [p.name for p in ckpt.complete_checkpoints(base / "checkpoints")] == ["step_00000001", "step_00000002"]
    latest = base / "checkpoints/step_00000002"
    names = {p.name for p in latest.iterdir()}
    # the trainer's own state is JSON and safetensors; only DCP's files are torch's
    assert names == {".metadata", "__0_0.distcp", "trainer_rank0.json", "rng_rank0.safetensors", "manifest.json"}
    capfd.readouterr()

    def resumed(name, damage, expect_messages):
        run = tmp_path / name
        shutil.copytree(base, run)
        damage(run)
        train(tiny_config(data, run, MATRIX))
        err = capfd.readouterr().err
        for message in expect_messages:
            assert message in err, (name, err)
        assert comparable(run / "metrics.jsonl") == expected, name
        return err

    step2 = "checkpoints/step_00000002"
    fallback = "falling back to the previous checkpoint"
    resumed("truncated", lambda run: _truncate(run / step2 / "trainer_rank0.json"),
            [f"{step2}: trainer_rank0.json is", "truncated", fallback, "step_00000002"])
    resumed("flipped", lambda run: _flip_bytes(run / step2 / "__0_0.distcp"),
            ["__0_0.distcp does not match its sha256", fallback])
    resumed("flipped_metadata", lambda run: _flip_bytes(run / step2 / ".metadata", 4),
            [".metadata does not match its sha256", fallback])
    resumed("no_manifest", lambda run: (run / step2 / "manifest.json").unlink(), ["no manifest.json", fallback])
    resumed("missing_file", lambda run: (run / step2 / "rng_rank0.safetensors").unlink(),
            ["rng_rank0.safetensors is missing", fallback])

    def half_saved(run):  # a kill mid-save leaves a .partial folder; it is never loaded
        shutil.copytree(run / step2, run / "checkpoints/step_00000003.partial")
        _flip_bytes(run / "checkpoints/step_00000003.partial/__0_0.distcp")

    resumed("partial", half_saved, ["ignoring", "step_00000003.partial"])

    def torn(run):
        with (run / "metrics.jsonl").open("a") as handle:
            handle.write('{"step": 3, "loss": 0.12')  # killed mid-append
    err = resumed("torn", torn, ["metrics.jsonl:3: dropped a torn last line"])
    assert fallback not in err

    # every checkpoint damaged: an error, never a silent fresh start over the old run's files
    run = tmp_path / "all_bad"
    shutil.copytree(base, run)
    for path in ckpt.checkpoint_dirs(run / "checkpoints"):
        _flip_bytes(path / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*all 2 failed verification"):
        train(tiny_config(data, run, MATRIX))
    # a checkpoint named explicitly is loaded or refused, with no fallback
    with pytest.raises(CheckpointError, match=r"step_00000002: __0_0.distcp does not match"):
        train(tiny_config(data, run, MATRIX + [f"checkpoint.resume={run / step2}"]))
    # a bad line that is not the last is not a torn append: an error naming file:line
    run = tmp_path / "bad_middle"
    shutil.copytree(base, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("{oops\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a metrics line"):
        train(tiny_config(data, run, MATRIX))


def test_no_pickle_of_ours_is_ever_loaded():
    """The trainer's checkpoint state is JSON and safetensors; a torch.load that unpickles
    arbitrary objects (weights_only off: it runs code from a crafted file) appears nowhere in
    the package, the tests or the benchmarks."""
    unsafe = "weights_only=" + "False"
    for root in ("crisp_fast", "tests", "benchmarks"):
        for path in (REPO / root).rglob("*.py"):
            assert unsafe not in path.read_text(), path
