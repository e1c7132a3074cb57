"""Student and teacher prompts: the same problem, two contexts.

Two modes (`prompts.template`):

chat (default)  messages through the tokenizer's chat template (generation prompt appended).
  The student sees an ordinary "solve step by step" header and the answer-format line; the
  teacher sees the same problem plus a conciseness instruction, placed as configured:
    header  the instruction replaces the student's header (the paper's choice)
    system  the instruction is a system message; the user message is the student's
    suffix  the instruction follows the student's user message
raw             two format strings over the problem record's fields (`prompts.student_template`,
  `prompts.teacher_template`, e.g. "Add: {problem}\\n" / "Add concisely: {problem}\\n"), tokenised
  as plain text (the tokenizer's own special tokens, e.g. a BOS, as `tokenizer(text)` adds them;
  no chat template), for base models and tokenizers without a chat template.

In both modes `prompts.teacher_context` (e.g. "Reference solution: {solution}") is privileged
context only the teacher sees: chat mode puts it after the problem in the teacher's message, raw
mode puts it verbatim before the teacher's template. Each prompt is tokenised once; the response
ids are appended to each unchanged.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

from crisp_fast.prompts import PRESETS  # shared with crisp_fast.eval


class PromptError(ValueError):
    """A prompt that cannot be built from a record (e.g. a template names a missing field)."""


@dataclass
class PromptTexts:
    student_header: str
    teacher_instruction: str
    answer_format: str
    placement: str
    template: str = "chat"
    student_template: str = ""
    teacher_template: str = ""
    teacher_context: str = ""
    problem_field: str = "problem"  # chat mode: the record field holding the problem text


def prompt_texts(config, problem_field: str = "problem") -> PromptTexts:
    """The texts of `config.prompts` (a PromptConfig), preset values filling the chat-mode blanks."""
    preset = PRESETS[config.preset]
    return PromptTexts(
        student_header=config.student_header or preset["student_header"],
        teacher_instruction=config.teacher_instruction or preset["teacher_instruction"],
        answer_format=config.answer_format or preset["answer_format"],
        placement=config.placement,
        template=getattr(config, "template", "chat"),
        student_template=getattr(config, "student_template", ""),
        teacher_template=getattr(config, "teacher_template", ""),
        teacher_context=getattr(config, "teacher_context", ""),
        problem_field=problem_field,
    )


def template_fields(template: str) -> list[str]:
    """The `{field}` names in a format string, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def fill(template: str, record: dict, what: str) -> str:
    """`template` with each `{field}` replaced by the record's value (numbers as text)."""
    if not template:
        return ""
    missing = [name for name in template_fields(template) if name not in record]
    if missing:
        raise PromptError(f"{what} names the field {{{missing[0]}}}, which the problem record does not have "
                          f"(its fields: {', '.join(map(str, record)) or 'none'})")
    return template.format_map({key: "" if value is None else value for key, value in record.items()})


def _as_record(problem, texts: PromptTexts) -> dict:
    return problem if isinstance(problem, dict) else {texts.problem_field: problem}


def _problem_text(record: dict, texts: PromptTexts) -> str:
    if texts.problem_field not in record:
        raise PromptError(f"no field {texts.problem_field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                          f"set data.field")
    value = record[texts.problem_field]
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"{texts.problem_field!r} must be a non-empty string, got {value!r}")
    return value


def _join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part)


def _student_messages(text: str, texts: PromptTexts) -> list[dict]:
    return [{"role": "user", "content": _join(texts.student_header, text, texts.answer_format)}]


def _teacher_messages(text: str, context: str, texts: PromptTexts) -> list[dict]:
    if texts.placement == "header":
        return [{"role": "user", "content": _join(texts.teacher_instruction, text, context, texts.answer_format)}]
    if texts.placement == "system":
        return [{"role": "system", "content": texts.teacher_instruction},
                {"role": "user", "content": _join(texts.student_header, text, context, texts.answer_format)}]
    if texts.placement == "suffix":
        return [{"role": "user", "content": _join(texts.student_header, text, context, texts.answer_format,
                                                   texts.teacher_instruction)}]
    raise ValueError(f"prompts.placement must be header, system or suffix, got {texts.placement!r}")


def student_messages(problem, texts: PromptTexts) -> list[dict]:
    return _student_messages(_problem_text(_as_record(problem, texts), texts), texts)


def teacher_messages(problem, texts: PromptTexts) -> list[dict]:
    record = _as_record(problem, texts)
    return _teacher_messages(_problem_text(record, texts), fill(texts.teacher_context, record, "prompts.teacher_context"),
                             texts)


def raw_texts(problem, texts: PromptTexts) -> tuple[str, str]:
    """(student text, teacher text) of raw mode."""
    record = _as_record(problem, texts)
    student = fill(texts.student_template, record, "prompts.student_template")
    teacher = fill(texts.teacher_context, record, "prompts.teacher_context") + \
        fill(texts.teacher_template, record, "prompts.teacher_template")
    return student, teacher


def render(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """Token ids of `messages` through the chat template, ready for the assistant to answer."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_text(tokenizer, text: str) -> list[int]:
    """Raw mode: the text as the tokenizer encodes it on its own (its BOS, if it adds one)."""
    return [int(i) for i in tokenizer(text)["input_ids"]]


def build_prompts(tokenizer, problem, texts: PromptTexts, enable_thinking: bool | None = None):
    """(student prompt ids, teacher prompt ids) for one problem: its text (chat mode) or its
    record (a dict of fields; both modes)."""
    if texts.template == "raw":
        student, teacher = raw_texts(problem, texts)
        return encode_text(tokenizer, student), encode_text(tokenizer, teacher)
    return (render(tokenizer, student_messages(problem, texts), enable_thinking),
            render(tokenizer, teacher_messages(problem, texts), enable_thinking))


def check_tokenizer(tokenizer, texts: PromptTexts, name: str) -> None:
    """Chat mode needs a chat template; say what to do when there is none."""
    if texts.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {name!r} has no chat template, which prompts.template=chat needs; use "
                         f"prompts.template=raw with prompts.student_template and prompts.teacher_template "
                         f"(e.g. \"Add: {{problem}}\\n\" and \"Add concisely: {{problem}}\\n\")")


class _Blank(dict):
    def __missing__(self, key):
        return ""


def check_instruction_fits(tokenizer, texts: PromptTexts, max_prompt_tokens: int,
                           enable_thinking: bool | None = None) -> int:
    """The teacher prompt of an empty problem must fit in `max_prompt_tokens`: otherwise every
    problem would be dropped, or worse, someone would be tempted to cut the instruction. Returns
    the instruction overhead in tokens; raises ValueError naming the setting."""
    if texts.template == "raw":
        blank = _Blank()
        teacher = encode_text(tokenizer, texts.teacher_context.format_map(blank) + texts.teacher_template.format_map(blank))
        setting = "prompts.teacher_template"
    else:
        messages = _teacher_messages("", texts.teacher_context.format_map(_Blank()), texts)
        teacher = render(tokenizer, messages, enable_thinking)
        setting = "prompts.teacher_instruction"
    if len(teacher) >= max_prompt_tokens:
        raise ValueError(f"the teacher prompt alone (instruction, answer format and template, no problem) is "
                         f"{len(teacher)} tokens, which does not fit data.max_prompt_tokens={max_prompt_tokens}; raise "
                         f"data.max_prompt_tokens or shorten {setting} (it is never truncated)")
    return len(teacher)
