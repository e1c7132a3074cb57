"""Prompts as users write them: raw-text templates over the problem record's fields for a
tokenizer without a chat template, privileged teacher-only context in both modes, the tokenizer
taken from the model's own folder, and clear errors (an unknown field names the field and the
record's keys; a tokenizer larger than the embedding fails before training). ~30 s on 2 cores."""
import json
import random

import pytest

from crisp_fast.train import Trainer, train
from crisp_fast.train.config import ConfigError
from crisp_fast.train.data import DataError
from crisp_fast.train.modeling import tiny_char_tokenizer
from crisp_fast.train.prompts import PromptTexts, build_prompts, teacher_messages
from crisp_fast.train.tiny import tiny_config

RAW = ["prompts.template=raw", "prompts.student_header=", "prompts.teacher_instruction=", "prompts.answer_format=",
       'prompts.student_template="Add: {problem}\\n"', 'prompts.teacher_template="Add concisely: {problem}\\n"']


def model_folder(path, *, chat_template: bool, vocab_shortfall: int = 0):
    """A tiny Qwen3 saved with the character tokenizer (optionally without its chat template)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_char_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config = AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                                  vocab_size=len(tokenizer) - vocab_shortfall, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def addition_problems(path, count, rng):
    with path.open("w") as handle:
        for _ in range(count):
            numbers = [rng.randint(1, 99) for _ in range(rng.randint(2, 4))]
            handle.write(json.dumps({"problem": " ".join(map(str, numbers)), "answer": sum(numbers),
                                     "solution": "+".join(map(str, numbers))}) + "\n")
    return path


def test_raw_templates_on_a_tokenizer_without_chat_template(tmp_path, seed):
    rng = random.Random(seed)
    folder = model_folder(tmp_path / "model", chat_template=False)
    data = addition_problems(tmp_path / "problems.jsonl", 6, rng)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    overrides = [f"model.source={folder}", "model.tokenizer=", "log.samples_every=1",
                 'prompts.teacher_context="Hint: {solution}\\n"', *RAW]
    trainer = Trainer(tiny_config(data, tmp_path / "out", overrides))
    assert getattr(trainer.tokenizer, "chat_template", None) is None  # the model's own folder's tokenizer
    reference = tiny_char_tokenizer()  # independent: the same characters, encoded directly
    for pair in trainer.stream.items:
        record = records[pair.problem_index]
        assert pair.student_ids == reference(f"Add: {record['problem']}\n")["input_ids"]
        assert pair.teacher_ids == reference(f"Hint: {record['solution']}\nAdd concisely: {record['problem']}\n")["input_ids"]
    result = trainer.run()
    assert [row["step"] for row in result.history] == [1, 2]
    for row in result.history:
        assert 0 <= row["accuracy"] <= 1 and row["loss_backend"] == "torch"
    samples = [json.loads(line) for line in (tmp_path / "out/samples/step_00000002.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].startswith("Add: ") and "Hint" not in s["prompt"] for s in samples)
    # checkpoint.every = 0 still saves the end
    assert (tmp_path / "out/checkpoints/step_00000002/manifest.json").is_file()


def test_chat_mode_teacher_context_is_the_teachers_only():
    tokenizer = tiny_char_tokenizer()
    record = {"problem": "What is 6*7?", "solution": "6*7 = 42"}
    for placement in ("header", "system", "suffix"):
        texts = PromptTexts("Solve.", "Be brief.", "End: A=x", placement, teacher_context="Reference: {solution}")
        student, teacher = (tokenizer.decode(ids) for ids in build_prompts(tokenizer, record, texts))
        assert "Reference: 6*7 = 42" in teacher and "6*7 = 42" not in student
        assert "What is 6*7?" in student and "What is 6*7?" in teacher
        user = [m for m in teacher_messages(record, texts) if m["role"] == "user"][0]["content"]
        assert user.index("What is 6*7?") < user.index("Reference:")


def test_prompt_errors_are_clear(tmp_path, seed):
    rng = random.Random(seed)
    data = addition_problems(tmp_path / "problems.jsonl", 3, rng)
    out = tmp_path / "out"
    # an unknown field: the field, the record's keys and file:line
    bad = [*RAW[:-2], 'prompts.student_template="Add: {question}\\n"', 'prompts.teacher_template="Short: {problem}\\n"']
    with pytest.raises(DataError, match=r"problems.jsonl:1: prompts.student_template names the field \{question\}, "
                                        r"which the problem record does not have \(its fields: problem, answer, solution\)"):
        Trainer(tiny_config(data, out, bad))
    with pytest.raises(DataError, match=r"problems.jsonl:1: prompts.teacher_context names the field \{notes\}"):
        Trainer(tiny_config(data, out, ["prompts.teacher_context=See {notes}"]))
    # templates are checked as format strings when the config is read
    with pytest.raises(ConfigError, match="prompts.student_template is not a valid format string"):
        tiny_config(data, out, [*RAW[:-2], "prompts.student_template=Add: {problem", RAW[-1]])
    with pytest.raises(ConfigError, match=r"prompts.teacher_template: \{0\} must name a field"):
        tiny_config(data, out, [*RAW[:-1], "prompts.teacher_template=Short: {0}"])
    with pytest.raises(ConfigError, match="prompts.template=raw needs prompts.student_template"):
        tiny_config(data, out, RAW[:4])
    with pytest.raises(ConfigError, match="prompts.student_header is a chat-mode text"):
        tiny_config(data, out, ["prompts.template=raw", *RAW[4:]])
    with pytest.raises(ConfigError, match="prompts.student_template is used with prompts.template=raw only"):
        tiny_config(data, out, [RAW[4]])
    # chat mode on a tokenizer with no chat template says what to do
    folder = model_folder(tmp_path / "model", chat_template=False)
    with pytest.raises(ValueError, match="has no chat template.*prompts.template=raw"):
        Trainer(tiny_config(data, out, [f"model.source={folder}", "model.tokenizer="]))


def test_tokenizer_larger_than_the_embedding_fails_before_training(tmp_path, seed):
    data = addition_problems(tmp_path / "problems.jsonl", 2, random.Random(seed))
    folder = model_folder(tmp_path / "model", chat_template=True, vocab_shortfall=5)
    size = len(tiny_char_tokenizer())
    with pytest.raises(ValueError, match=f"has {size} tokens but the model's embedding has {size - 5} rows"):
        train(tiny_config(data, tmp_path / "out", [f"model.source={folder}", "model.tokenizer="]))
    assert not (tmp_path / "out/metrics.jsonl").exists()
