"""`crisp-fast eval | grade | compare` (dispatched here from crisp_fast/cli.py).

    crisp-fast eval --model Qwen/Qwen3-8B --data math500 --data aime24 --out runs/base
    crisp-fast eval --model runs/crisp/final --data champ --engine vllm --out runs/crisp
    crisp-fast grade responses.jsonl --out graded.jsonl
    crisp-fast compare runs/base/MATH-500 runs/crisp/MATH-500 --plot compare.png

Each function takes argv and returns an exit code: 0 done, 2 bad input (the message names the
file and line), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

from crisp_fast.eval.problems import DataError


def _fail(command: str, message: str) -> int:
    print(f"crisp-fast {command}: error: {message}", file=sys.stderr)
    return 2


def _write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


# -------------------------------------------------------------------------------------- eval

def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crisp-fast eval", description=(
        "Generate k samples per problem, grade them (last Answer: line or last \\boxed{}, math-verify), and "
        "report mean@k accuracy and mean response tokens. Defaults are the paper's protocol."))
    parser.add_argument("--model", required=True, help="local model folder or hub name")
    parser.add_argument("--data", required=True, action="append",
                        help="champ | math500 | aime24 | aime25 | FILE.jsonl/.json/.parquet | org/hub-name "
                             "(repeat for several datasets)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--samples", type=int, default=8, help="samples per problem (k of mean@k)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=30000)
    parser.add_argument("--prompt-template", default="default",
                        help="default | boxed | plain | @FILE | a text containing {problem}")
    parser.add_argument("--no-chat-template", action="store_true", help="send the bare prompt text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problems-per-call", type=int, default=16, help="problems per engine call")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--split", default=None, help="hub dataset split")
    for name in ("problem", "answer", "id", "subset", "level"):
        parser.add_argument(f"--{name}-field", default=None, help=f"row field holding the {name}")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own Python code (off by default: never asked interactively)")
    parser.add_argument("--device", default=None, help="HF engine device (default: cuda if present)")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM context length")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM memory share")
    parser.add_argument("--grade-timeout", type=int, default=5, help="seconds per math-verify parse/compare")
    parser.add_argument("--grade-workers", type=int, default=1, help="grading processes in parallel")
    parser.add_argument("--label", default=None, help="model name in reports (default: the model folder name)")
    parser.add_argument("--out", default=None, help="output folder (default: eval_runs/<label>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def eval_main(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    from crisp_fast.eval.problems import FieldNames, load_problems
    from crisp_fast.eval.report import format_summary, summarize
    from crisp_fast.eval.runner import EvalConfig, config_dict, evaluate, load_model, model_label

    try:
        config = EvalConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, prompt_template=args.prompt_template,
                            chat_template=not args.no_chat_template, seed=args.seed,
                            problems_per_call=args.problems_per_call, grade_timeout_s=args.grade_timeout,
                            grade_workers=args.grade_workers)
        config.sampling(None)  # validates temperature / top-p / top-k / max-new-tokens before loading
    except ValueError as error:
        return _fail("eval", str(error))
    fields = FieldNames(problem=args.problem_field, answer=args.answer_field, problem_id=args.id_field,
                        subset=args.subset_field, level=args.level_field)
    try:  # every dataset is checked before the (slow) model load
        datasets = [load_problems(source, fields=fields, split=args.split, limit=args.limit) for source in args.data]
    except DataError as error:
        return _fail("eval", str(error))
    names = [name for name, _ in datasets]
    if len(set(names)) != len(names):
        return _fail("eval", f"two --data sources share a name ({', '.join(names)}): their outputs would collide")
    label = args.label or model_label(args.model)
    out = args.out or os.path.join("eval_runs", label)
    model, tokenizer, engine = load_model(args.model, args.engine, args.dtype, args.device, args.max_model_len,
                                          args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code)
    for name, problems in datasets:
        run_dir = out if len(datasets) == 1 else os.path.join(out, name)
        samples_path = os.path.join(run_dir, "samples.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        with open(samples_path, "w", encoding="utf-8") as samples_file:
            def write_rows(new_rows, handle=samples_file):
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in new_rows)
                handle.flush()

            rows = evaluate(model, tokenizer, problems, config, engine=engine, progress=not args.quiet,
                            on_rows=write_rows)
        summary = summarize(rows, model=label, model_path=args.model, dataset=name, engine=args.engine,
                            config=config_dict(config), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            grader="last 'Answer:' line or last \\boxed{}, math-verify")
        _write_json(os.path.join(run_dir, "summary.json"), summary)
        print(format_summary(summary))
        print(f"wrote {samples_path} and {os.path.join(run_dir, 'summary.json')}\n")
    return 0


# ------------------------------------------------------------------------------------- grade

def grade_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crisp-fast grade", description=(
        "Grade existing responses: each JSONL row needs an answer (text or list of acceptable texts) and a "
        "response; the output rows add correct, boxed_answer, answer_line, boxed_correct, answer_line_correct."))
    parser.add_argument("responses", help="RESPONSES.jsonl")
    parser.add_argument("--out", default=None, help="GRADED.jsonl (default: RESPONSES.graded.jsonl)")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--grade-timeout", type=int, default=5, help="seconds per math-verify parse/compare")
    parser.add_argument("--workers", type=int, default=1, help="grading processes in parallel")
    args = parser.parse_args(argv)
    from crisp_fast.eval.grader import grade_many
    from crisp_fast.eval.problems import read_jsonl

    graded = []
    try:
        for line_number, row in read_jsonl(args.responses):
            where = f"{args.responses}:{line_number}"
            for field in (args.answer_field, args.response_field):
                if field not in row:
                    raise DataError(f"{where}: no {field!r} field (fields: {', '.join(row) or 'none'})")
            reference, response = row[args.answer_field], row[args.response_field]
            if not (isinstance(reference, (str, int, float)) and not isinstance(reference, bool)) and not (
                    isinstance(reference, list) and reference and all(isinstance(r, (str, int, float)) for r in reference)):
                raise DataError(f"{where}: {args.answer_field!r} must be text, a number or a list of them, got {reference!r}")
            if response is not None and not isinstance(response, str):
                raise DataError(f"{where}: {args.response_field!r} must be text (or null), got {type(response).__name__}")
            graded.append((row, response, reference))
    except DataError as error:
        return _fail("grade", str(error))
    if not graded:
        return _fail("grade", f"{args.responses}: holds no responses")
    results = grade_many([(response, reference) for _, response, reference in graded], args.grade_timeout, args.workers)
    graded = [{**row, **result.as_dict()} for (row, _, _), result in zip(graded, results)]
    out = args.out or (os.path.splitext(args.responses)[0] + ".graded.jsonl")
    _write_jsonl(out, graded)
    correct = sum(row["correct"] for row in graded)
    print(f"accuracy {100 * correct / len(graded):.2f}% ({correct}/{len(graded)} correct; "
          f"boxed {sum(r['boxed_correct'] for r in graded)}, answer line {sum(r['answer_line_correct'] for r in graded)}, "
          f"no answer found {sum(r['boxed_answer'] is None and r['answer_line'] is None for r in graded)})")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------- compare

def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="crisp-fast compare", description=(
        "Paper-style table (accuracy / length / token change vs the base model) per dataset, and a PNG of "
        "accuracy vs mean tokens. The first summary's model is the base unless --base names another."))
    parser.add_argument("summaries", nargs="+", help="summary.json files or eval run folders")
    parser.add_argument("--labels", default=None, help="comma-separated model names, one per summary")
    parser.add_argument("--base", default=None, help="label of the base model (default: the first summary's)")
    parser.add_argument("--plot", default="comparison.png", help="PNG path ('' for none)")
    parser.add_argument("--json", default=None, help="also write the comparison rows here")
    args = parser.parse_args(argv)
    from crisp_fast.eval.report import comparison_rows, format_comparison, load_summary, plot_comparison

    try:
        summaries = [load_summary(path) for path in args.summaries]
    except DataError as error:
        return _fail("compare", str(error))
    labels = [str(s["model"]) for s in summaries]
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(summaries):
            return _fail("compare", f"--labels names {len(labels)} models for {len(summaries)} summaries")
    seen = {}
    for summary, label in zip(summaries, labels):
        key = (label, summary["dataset"])
        if key in seen:
            return _fail("compare", f"{summary['_path']} and {seen[key]} are both {label!r} on {summary['dataset']!r}; "
                                    "name them apart with --labels")
        seen[key] = summary["_path"]
    base = args.base if args.base is not None else labels[0]
    if base not in labels:
        return _fail("compare", f"--base {base!r} is none of the models: {', '.join(dict.fromkeys(labels))}")
    rows = comparison_rows(summaries, labels, base)
    print(format_comparison(rows))
    if args.plot:
        print(f"wrote {plot_comparison(rows, args.plot)}")
    if args.json:
        _write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


__all__ = ["eval_main", "grade_main", "compare_main", "eval_parser"]
