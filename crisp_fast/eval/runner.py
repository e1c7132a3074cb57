"""Generate responses with the shared rollout engines (`crisp_fast.generation`) and grade them.

    from crisp_fast.eval.runner import EvalConfig, evaluate, quick_eval
    rows = evaluate(model, tokenizer, problems, EvalConfig(samples=8))      # per-sample rows
    accuracy, mean_tokens = quick_eval(model, tokenizer, problems[:16])     # from the trainer

The defaults are the paper's protocol: 8 samples per problem at temperature 0.6, top-p 0.95,
top-k 20, up to 30,000 new tokens. A response's length is its number of generated token ids
(thinking + answer + the EOS when it was drawn), as the paper counts it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from crisp_fast.eval.grader import DEFAULT_TIMEOUT_S, GradeResult, grade_many, grade_response
from crisp_fast.eval.problems import Problem
from crisp_fast.prompts import student_template

# The student's ordinary prompt ("solve step by step" + the answer-format line the grader reads).
# `{problem}` is replaced verbatim (no str.format: templates contain LaTeX braces).
PROMPT_TEMPLATES = {
    # the trainer's student prompt, so that before/after numbers measure the training
    "default": student_template("v1"),
    "answer-line": (
        "Solve the following math problem step by step. The last line of your response should be "
        "of the form Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\n"
        "{problem}\n\nRemember to put your answer on its own line after \"Answer:\"."
    ),
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "plain": "{problem}",
}


@dataclass
class EvalConfig:
    """How to generate. `prompt_template` is a name in PROMPT_TEMPLATES or a text holding
    `{problem}`; `problems_per_call` problems go to the engine at once (the progress bar's step);
    `grade_workers` > 1 grades in that many processes at once (worth it on many-core machines)."""

    samples: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 30000
    prompt_template: str = "default"
    chat_template: bool = True
    seed: int | None = 0
    problems_per_call: int = 16
    grade_timeout_s: int = DEFAULT_TIMEOUT_S
    grade_workers: int = 1

    def __post_init__(self):
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not isinstance(self.problems_per_call, int) or self.problems_per_call < 1:
            raise ValueError(f"problems_per_call must be an integer >= 1, got {self.problems_per_call!r}")
        resolve_template(self.prompt_template)  # fail now, not after loading a model

    def sampling(self, seed: int | None):
        from crisp_fast.generation import SamplingConfig

        return SamplingConfig(n=self.samples, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=seed)


def resolve_template(template: str) -> str:
    """A preset's text, a file's text (`@path`), or the template itself; it must hold {problem}."""
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if template.startswith("@"):
        try:
            with open(template[1:], encoding="utf-8") as handle:
                template = handle.read()
        except OSError as error:
            raise ValueError(f"prompt template file {template[1:]}: cannot read: {error.strerror or error}") from error
    if "{problem}" not in template:
        raise ValueError(f"prompt template must be one of {sorted(PROMPT_TEMPLATES)}, @FILE, or a text containing "
                         f"{{problem}}; got {template[:60]!r}")
    return template


def build_prompt_ids(tokenizer, problem_text: str, template: str, chat_template: bool = True) -> list[int]:
    """The prompt's token ids: the user message through the tokenizer's chat template (with the
    assistant turn opened) when it has one and `chat_template` is on, else the bare text."""
    message = resolve_template(template).replace("{problem}", problem_text)
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(message)["input_ids"])


def sample_row(problem: Problem, sample_index: int, response: str, token_ids: list[int], finish_reason: str,
               grade: GradeResult | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> dict:
    """One graded sample, as written to samples.jsonl (graded here unless `grade` is given)."""
    if grade is None:
        grade = grade_response(response, problem.answers, timeout_s)
    return {
        "problem_id": problem.problem_id,
        "sample_index": sample_index,
        "subset": problem.subset,
        "level": problem.level,
        "answer": problem.answer if len(problem.answers) == 1 else problem.answers,
        "response": response,
        "tokens": len(token_ids),
        "finish_reason": finish_reason,
        **grade.as_dict(),
    }


def evaluate(model, tokenizer, problems: list[Problem], config: EvalConfig = EvalConfig(), *,
             engine=None, progress: bool = True, on_rows=None, prompt_ids: list[list[int]] | None = None,
             grader=None) -> list[dict]:
    """Generate `config.samples` responses per problem and grade them; one row per sample, in
    problem order then sample order. `engine` defaults to the shared HF engine around `model`.
    `on_rows(rows)` is called after each engine call with its graded rows (e.g. to write them
    out as they come: a long run that dies keeps what it finished). `prompt_ids` (one per
    problem) replaces the template (the trainer passes its own prompts); `grader(responses,
    problems) -> list[bool]` replaces the math grader (a task with its own checker)."""
    from tqdm.auto import tqdm

    if engine is None:
        from crisp_fast.generation import make_engine

        engine = make_engine("hf", model, tokenizer)
    if prompt_ids is not None and len(prompt_ids) != len(problems):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} prompts for {len(problems)} problems")
    prompts = prompt_ids if prompt_ids is not None else [
        build_prompt_ids(tokenizer, p.problem, config.prompt_template, config.chat_template) for p in problems]
    rows: list[dict] = []
    with tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress) as bar:
        for start in range(0, len(problems), config.problems_per_call):
            chunk = list(range(start, min(start + config.problems_per_call, len(problems))))
            # a different seed per call: reproducible runs without repeating the same random draws
            seed = None if config.seed is None else config.seed + start
            generations = engine.generate([prompts[i] for i in chunk], config.sampling(seed))
            generations = sorted(generations, key=lambda g: (g.prompt_index, g.sample_index))
            responses = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generations]
            references = [problems[chunk[g.prompt_index]].answers for g in generations]
            if grader is None:
                grades = grade_many(zip(responses, references), config.grade_timeout_s, config.grade_workers)
            else:
                verdicts = grader(responses, [problems[chunk[g.prompt_index]] for g in generations])
                grades = [GradeResult(bool(v), None, None, False, False) for v in verdicts]
            new_rows = [sample_row(problems[chunk[generation.prompt_index]], generation.sample_index, response,
                                   list(generation.token_ids), generation.finish_reason, grade)
                        for generation, response, grade in zip(generations, responses, grades)]
            rows.extend(new_rows)
            if on_rows is not None:
                on_rows(new_rows)
            bar.update(len(chunk))
    return rows


def quick_eval(model, tokenizer, problems: list[Problem], *, samples: int = 1, max_new_tokens: int = 2048,
               temperature: float = 0.6, top_p: float = 0.95, top_k: int = 20, prompt_template: str = "default",
               seed: int | None = 0, engine=None) -> tuple[float, float]:
    """(accuracy, mean response tokens) on a small set, for the trainer to call every K steps.
    Accuracy is mean@samples in [0, 1]. The model's train/eval mode is left as it was."""
    if not problems:
        raise ValueError("quick_eval needs at least one problem")
    from crisp_fast.eval.report import summarize

    config = EvalConfig(samples=samples, temperature=temperature, top_p=top_p, top_k=top_k,
                        max_new_tokens=max_new_tokens, prompt_template=prompt_template, seed=seed,
                        problems_per_call=len(problems))
    summary = summarize(evaluate(model, tokenizer, problems, config, engine=engine, progress=False))
    return summary["accuracy"], summary["mean_tokens"]


def load_model(model_path: str, engine_name: str = "hf", dtype: str = "auto", device: str | None = None,
               max_model_len: int | None = None, gpu_memory_utilization: float = 0.85, *,
               trust_remote_code: bool = False):
    """(model or a stand-in, tokenizer, engine) for `model_path` (a local folder or a hub name).
    `trust_remote_code` is passed to every loader: a repository's own Python runs only when asked."""
    import torch
    from transformers import AutoTokenizer

    from crisp_fast.generation import make_engine

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if engine_name == "vllm":
        # vLLM loads the weights itself; the engine only needs the EOS ids from the generation config
        from types import SimpleNamespace

        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        except OSError:
            generation_config = None
        stand_in = SimpleNamespace(generation_config=generation_config, name_or_path=model_path)
        engine = make_engine("vllm", stand_in, tokenizer, model_path=model_path, sleep=False,
                             gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                             dtype="bfloat16" if dtype == "auto" else dtype, trust_remote_code=trust_remote_code)
        return stand_in, tokenizer, engine
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, tokenizer, make_engine("hf", model, tokenizer)


def config_dict(config: EvalConfig) -> dict:
    values = asdict(config)
    values["prompt_template_text"] = resolve_template(config.prompt_template)
    return values


def model_label(model_path: str) -> str:
    return os.path.basename(os.path.normpath(model_path)) or model_path


__all__ = ["EvalConfig", "PROMPT_TEMPLATES", "evaluate", "quick_eval", "build_prompt_ids", "resolve_template",
           "sample_row", "load_model", "config_dict", "model_label"]
