"""Periodic validation on held-out problems, and the best checkpoint.

Every `eval.every` steps (and after the last step) the student answers `eval.samples` samples of
each problem in `eval.data`, built with the trainer's own student prompt, through the eval
module's runner (`crisp_fast.eval.runner.evaluate`: the same generation and grading as
`crisp-fast eval`, the same seed every time). The step's metrics gain

    eval_accuracy     mean@k accuracy (mean over problems of the fraction of k samples correct)
    eval_mean_tokens  mean response length in tokens (EOS included when drawn)
    eval_score        the value of `eval.best_metric` (higher is better):
                        accuracy            eval_accuracy
                        mean_tokens         - eval_mean_tokens
                        penalized_accuracy  eval_accuracy - eval.length_penalty * eval_mean_tokens / max_new_tokens

When the score beats every earlier one, the state is saved as a full checkpoint in OUT/best/
(one kept; `checkpoint.resume=OUT/best/step_X --export-only` exports it). Under torchrun each
rank answers its share of the problems.
"""
from __future__ import annotations

from crisp_fast.eval.problems import Problem
from crisp_fast.eval.runner import EvalConfig, evaluate
from crisp_fast.train.data import DataError, check_problem_field, encode_problems, has_answers, read_records
from crisp_fast.train.fsdp import all_reduce_sum


def score(metric: str, accuracy: float, mean_tokens: float, length_penalty: float, max_new_tokens: int) -> float | None:
    if metric == "accuracy":
        return accuracy
    if metric == "mean_tokens":
        return -mean_tokens
    if metric == "penalized_accuracy":
        return accuracy - length_penalty * mean_tokens / max_new_tokens
    return None


class Validator:
    def __init__(self, config, encode, grader, rank: int, world: int, device):
        v = config.eval
        self.config, self.rank, self.device = config, rank, device
        self.max_new_tokens = v.max_new_tokens or config.rollout.max_new_tokens
        records = read_records(v.data, config.data.format)
        if v.limit:
            records = records[:v.limit]
        if config.prompts.template == "chat":
            check_problem_field(records, config.data.field)
        if grader is None and not has_answers(records, config.data.answer_field):
            raise DataError(f"{v.data}: validation needs an answer on every problem (field "
                            f"{config.data.answer_field!r}, data.answer_field)")
        if len(records) < world:
            raise DataError(f"{v.data}: {len(records)} problems cannot be shared by {world} ranks")
        pairs, skipped = encode_problems([r for _, r in records], encode, config.data.max_prompt_tokens,
                                         [where for where, _ in records])
        if skipped:
            raise DataError(f"{v.data}: {skipped} problems have prompts longer than data.max_prompt_tokens; "
                            f"validation would silently measure fewer problems")
        share = pairs[rank::world]
        self.prompts = [pair.student_ids for pair in share]
        self.problems = []
        for pair in share:
            record = records[pair.problem_index][1]
            answer = record.get(config.data.answer_field, "")
            answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
            self.problems.append(Problem(problem_id=str(pair.problem_index), problem=str(record.get(config.data.field, "")),
                                         answers=answers, extra={"record": record}))
        self.custom_grader = None
        if grader is not None:
            self.custom_grader = lambda responses, problems: grader(responses, [p.extra["record"] for p in problems])
        self.eval_config = EvalConfig(samples=v.samples, temperature=v.temperature, top_p=v.top_p, top_k=v.top_k,
                                      max_new_tokens=self.max_new_tokens, seed=v.seed,
                                      problems_per_call=len(self.problems))
        self.best_score: float | None = None
        self.best_step: int | None = None

    def due(self, step: int, total_steps: int) -> bool:
        every = self.config.eval.every
        return every > 0 and (step % every == 0 or step == total_steps)

    def run(self, model, tokenizer, engine) -> dict:
        """Validate the current weights; returns the metrics (global over ranks)."""
        rows = evaluate(model, tokenizer, self.problems, self.eval_config, engine=engine, progress=False,
                        prompt_ids=self.prompts, grader=self.custom_grader)
        correct, tokens, count = all_reduce_sum(
            [sum(bool(r["correct"]) for r in rows), sum(r["tokens"] for r in rows), len(rows)], self.device)
        accuracy, mean_tokens = correct / count, tokens / count
        v = self.config.eval
        return {"eval_accuracy": accuracy, "eval_mean_tokens": mean_tokens,
                "eval_score": score(v.best_metric, accuracy, mean_tokens, v.length_penalty, self.max_new_tokens)}

    def is_best(self, metrics: dict, step: int) -> bool:
        value = metrics.get("eval_score")
        if value is None or (self.best_score is not None and value <= self.best_score):
            return False
        self.best_score, self.best_step = value, step
        return True

    def state(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def restore(self, state: dict) -> None:
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")
