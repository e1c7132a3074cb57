"""Configuration, data and prompts: typed YAML with overrides, clear errors for malformed
configs and data (naming key, file and line), prompt presets and placements, and a teacher
instruction that would not fit is an error, never a silent cut. Budget: ~10 s on 2 CPU cores."""
import json
import random
from pathlib import Path

import pytest

from crisp_fast.train.config import ConfigError, load_config
from crisp_fast.train.data import DataError, ProblemStream, encode_problems, read_problems
from crisp_fast.train.main import main
from crisp_fast.train.modeling import tiny_char_tokenizer
from crisp_fast.train.prompts import PRESETS, build_prompts, check_instruction_fits, prompt_texts, teacher_messages

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_overrides_apply():
    tiny = load_config(REPO / "configs/tiny.yaml", ["train.steps=2", "rollout.top_k=20", "train.lr=1e-6"])
    assert (tiny.train.steps, tiny.rollout.top_k, tiny.train.lr) == (2, 20, 1e-6)
    assert tiny.model.build["head_dim"] == 16
    paper = load_config(REPO / "configs/qwen3-8b.yaml")
    assert (paper.train.lr, paper.train.betas, paper.train.weight_decay, paper.train.grad_clip) == (1e-6, (0.9, 0.999), 0.01, 1.0)
    assert (paper.rollout.n, paper.rollout.temperature, paper.rollout.max_new_tokens) == (1, 1.0, 8192)
    assert (paper.train.prompts_per_step, paper.train.teacher_refresh_every) == (32, 50)


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("trainer.steps=3", "unknown key 'trainer'"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("train.lr=fast", "train.lr must be a number"),
    ("rollout.top_p=1.5", r"rollout.top_p must be in \(0, 1\]"),
    ("train.teacher_refresh_every=-1", "teacher_refresh_every must be >= 0"),
    ("prompts.placement=footer", "prompts.placement must be header, system or suffix"),
    ("train.betas=[0.9]", "train.betas must be two numbers"),
    ("train", "must look like section.key=value"),
])
def test_malformed_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", [override])


def test_bad_config_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("train: {steps: [\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert main(["--config", str(tmp_path / "list.yaml")]) == 2


def test_malformed_data_errors_name_file_and_line(tmp_path, seed):
    good = json.dumps({"problem": "1+1?"})
    cases = {
        "not_json": ([good, "{oops"], r"not_json.jsonl:2: not valid JSON"),
        "no_field": ([good, good, json.dumps({"question": "x"})], r"no_field.jsonl:3: no field 'problem'"),
        "empty_text": ([json.dumps({"problem": "  "})], r"empty_text.jsonl:1: 'problem' must be a non-empty string"),
        "not_object": ([json.dumps([1, 2])], r"not_object.jsonl:1: expected a JSON object"),
        "nothing": ([""], r"nothing.jsonl: no problems found"),
    }
    for name, (lines, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=message):
            read_problems(path)
    with pytest.raises(DataError, match="does not exist"):
        read_problems(tmp_path / "absent.jsonl")
    (tmp_path / "custom.jsonl").write_text("\n" + json.dumps({"q": "2+2?"}) + "\n\n")
    assert read_problems(tmp_path / "custom.jsonl", field="q") == ["2+2?"]


def test_long_prompts_are_skipped_and_counted(seed):
    tokenizer = tiny_char_tokenizer()
    texts = prompt_texts(load_config(REPO / "configs/tiny.yaml").prompts)
    problems = ["x" * random.randint(1, 300) for _ in range(20)]
    limit = 400
    pairs, skipped = encode_problems(problems, lambda p: build_prompts(tokenizer, p, texts), limit)
    assert len(pairs) + skipped == 20
    for pair in pairs:
        assert max(len(pair.student_ids), len(pair.teacher_ids)) <= limit
        assert pair.student_ids == build_prompts(tokenizer, problems[pair.problem_index], texts)[0]
    expected_skips = sum(max(map(len, build_prompts(tokenizer, p, texts))) > limit for p in problems)
    assert skipped == expected_skips


def test_instruction_that_does_not_fit_is_an_error():
    tokenizer = tiny_char_tokenizer()
    texts = prompt_texts(load_config(REPO / "configs/tiny.yaml").prompts)
    overhead = check_instruction_fits(tokenizer, texts, 10_000)
    with pytest.raises(ValueError, match="never truncated"):
        check_instruction_fits(tokenizer, texts, overhead)


@pytest.mark.parametrize("placement", ["header", "system", "suffix"])
@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_prompt_presets_and_placements(preset, placement):
    config = load_config(REPO / "configs/tiny.yaml", [f"prompts.preset={preset}", f"prompts.placement={placement}"])
    texts = prompt_texts(config.prompts)
    assert texts.teacher_instruction == PRESETS[preset]["teacher_instruction"]
    tokenizer = tiny_char_tokenizer()
    student, teacher = build_prompts(tokenizer, "What is 6*7?", texts)
    student_text, teacher_text = tokenizer.decode(student), tokenizer.decode(teacher)
    assert "What is 6*7?" in student_text and "What is 6*7?" in teacher_text
    assert texts.teacher_instruction in teacher_text and texts.teacher_instruction not in student_text
    assert (texts.student_header in teacher_text) == (placement != "header")
    assert student_text.endswith("<|im_start|>assistant\n") and teacher_text.endswith("<|im_start|>assistant\n")
    roles = [m["role"] for m in teacher_messages("p", texts)]
    assert roles == (["system", "user"] if placement == "system" else ["user"])


def test_problem_stream_is_resumable(seed):
    items = list(range(7))
    first = ProblemStream(items, seed=seed)
    taken = first.take(10)
    resumed = ProblemStream(items, seed=seed, position=4)
    assert resumed.take(6) == taken[4:]
    assert sorted(taken[:7]) == items  # each epoch is a permutation
    with pytest.raises(DataError, match="no usable problems"):
        ProblemStream([])


# ------------------------------------------------------------------ every numeric key, in range
def _keys_of_type(kind):
    import dataclasses
    from typing import get_type_hints

    from crisp_fast.train.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        hints = get_type_hints(Config)
        if not dataclasses.is_dataclass(hints[section.name]):
            continue
        for name, annotation in get_type_hints(hints[section.name]).items():
            if annotation is kind:
                keys.append(f"{section.name}.{name}")
    return keys


@pytest.mark.parametrize("key", _keys_of_type(float))
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(REPO / "configs/tiny.yaml", [f"{key}={value}"])


@pytest.mark.parametrize("key", _keys_of_type(int))
def test_every_integer_key_rejects_negative_values(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/tiny.yaml", [f"{key}=-1"])


@pytest.mark.parametrize("override,message", [
    ("train.betas=[0.9, .inf]", "train.betas must be two numbers"),
    ("train.betas=[0.9, yes]", "train.betas must be two numbers"),
    ("rollout.vllm_gpu_memory_utilization=1.5", r"must be in \(0, 1\]"),
    ("train.lr_schedule=step", "train.lr_schedule must be constant, linear or cosine"),
    ("eval.every=5", "eval.every > 0 needs eval.data"),
    ("eval.best_metric=loss", "eval.best_metric must be one of accuracy, mean_tokens, penalized_accuracy, none"),
    ("prompts.template=jinja", "prompts.template must be chat or raw"),
    ("train.loss_workspace_mb=-1", r"train.loss_workspace_mb must be a finite number >= 0"),
])
def test_new_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/tiny.yaml", [override])


def test_string_keys_are_taken_literally(tmp_path, monkeypatch, capsys):
    config = load_config(REPO / "configs/tiny.yaml", ["out=010", "model.source=yes", "data.path=run #1",
                                                      'prompts.teacher_context="Hint: {solution}\\n"'])
    assert (config.out, config.model.source, config.data.path) == ("010", "yes", "run #1")
    assert config.prompts.teacher_context == "Hint: {solution}\n"
    monkeypatch.chdir(tmp_path)
    code = main(["--config", str(REPO / "configs/tiny.yaml"), "--out", "010", f"data.path={REPO / 'configs/tiny_problems.jsonl'}",
                 "train.steps=3", "rollout.max_new_tokens=4", "checkpoint.every=0", "checkpoint.export_hf=false",
                 "log.tensorboard=off", "log.progress=false", "log.print_every=2", "model.activation_checkpointing=off"])
    assert code == 0
    assert (tmp_path / "010/metrics.jsonl").is_file() and not (tmp_path / "8").exists()
    printed = capsys.readouterr().out
    # progress off: a line every print_every steps, and the last
    assert "crisp: step 2/3 " in printed and "crisp: step 3/3 " in printed and "crisp: step 1/3 " not in printed
    rows = [json.loads(line) for line in (tmp_path / "010/metrics.jsonl").read_text().splitlines()]
    assert all(row["loss_backend"] in ("native", "torch") for row in rows)
    assert [p.name for p in (tmp_path / "010/checkpoints").iterdir()] == ["step_00000003"]  # every=0: the end


def test_data_decode_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps({"problem": "1+1?"}).encode() + b"\n" + b'{"problem": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 17\)"):
        read_problems(path)
    from crisp_fast.eval.problems import DataError as EvalDataError, read_jsonl

    with pytest.raises(EvalDataError, match=r"bytes.jsonl:2: not UTF-8 text"):
        list(read_jsonl(str(path)))


def test_auto_backend_on_cpu_warns_when_the_native_one_is_missing(monkeypatch):
    import torch

    import crisp_fast.loss as loss
    from crisp_fast.train.runtime import resolve_loss_backend

    monkeypatch.setattr(loss, "_native_usable", lambda: False)
    with pytest.warns(UserWarning, match="native C\\+\\+ loss backend is not available"):
        assert resolve_loss_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(ValueError, match="train.loss_backend='triton' cannot run here"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        resolve_loss_backend("triton", torch.device("cpu"), torch.float32)
