"""Student and teacher prompts: the same problem, two contexts.

The student sees an ordinary "solve step by step" header and the answer-format line; the teacher
sees the same problem plus a conciseness instruction, placed as configured:
  header  the instruction replaces the student's header (the paper's choice)
  system  the instruction is a system message; the user message is the student's
  suffix  the instruction follows the student's user message
Both prompts are rendered with the tokenizer's chat template (generation prompt appended) and
tokenised once; the response ids are appended to each unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from crisp_fast.prompts import PRESETS  # shared with crisp_fast.eval


@dataclass
class PromptTexts:
    student_header: str
    teacher_instruction: str
    answer_format: str
    placement: str


def prompt_texts(config) -> PromptTexts:
    """The texts of `config.prompts` (a PromptConfig), preset values filling the blanks."""
    preset = PRESETS[config.preset]
    return PromptTexts(
        student_header=config.student_header or preset["student_header"],
        teacher_instruction=config.teacher_instruction or preset["teacher_instruction"],
        answer_format=config.answer_format or preset["answer_format"],
        placement=config.placement,
    )


def _join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part)


def student_messages(problem: str, texts: PromptTexts) -> list[dict]:
    return [{"role": "user", "content": _join(texts.student_header, problem, texts.answer_format)}]


def teacher_messages(problem: str, texts: PromptTexts) -> list[dict]:
    if texts.placement == "header":
        return [{"role": "user", "content": _join(texts.teacher_instruction, problem, texts.answer_format)}]
    if texts.placement == "system":
        return [{"role": "system", "content": texts.teacher_instruction}] + student_messages(problem, texts)
    if texts.placement == "suffix":
        return [{"role": "user", "content": _join(texts.student_header, problem, texts.answer_format,
                                                   texts.teacher_instruction)}]
    raise ValueError(f"prompts.placement must be header, system or suffix, got {texts.placement!r}")


def render(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """Token ids of `messages` through the chat template, ready for the assistant to answer."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def build_prompts(tokenizer, problem: str, texts: PromptTexts, enable_thinking: bool | None = None):
    """(student prompt ids, teacher prompt ids) for one problem."""
    return (render(tokenizer, student_messages(problem, texts), enable_thinking),
            render(tokenizer, teacher_messages(problem, texts), enable_thinking))


def check_instruction_fits(tokenizer, texts: PromptTexts, max_prompt_tokens: int,
                           enable_thinking: bool | None = None) -> int:
    """The teacher prompt of an empty problem must fit in `max_prompt_tokens`: otherwise every
    problem would be dropped, or worse, someone would be tempted to cut the instruction. Returns
    the instruction overhead in tokens; raises ValueError naming the setting."""
    _, teacher = build_prompts(tokenizer, "", texts, enable_thinking)
    if len(teacher) >= max_prompt_tokens:
        raise ValueError(f"the teacher prompt alone (instruction, answer format and chat template, no problem) is "
                         f"{len(teacher)} tokens, which does not fit data.max_prompt_tokens={max_prompt_tokens}; raise "
                         f"data.max_prompt_tokens or shorten prompts.teacher_instruction (it is never truncated)")
    return len(teacher)
