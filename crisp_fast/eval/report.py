"""Evaluation reports: per-sample rows -> a summary (mean@k accuracy, mean response tokens,
truncation rate, by subset and level), its printed table, and the paper-style comparison of
several summaries (`accuracy / length / reduction%` per dataset) with an accuracy-vs-tokens plot.

Accuracy is stored as a fraction in [0, 1] and printed in percent. Response tokens count the
whole response as the paper does: thinking + answer + the EOS token when one was drawn.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from statistics import mean, median

from crisp_fast.eval.problems import DataError

SUMMARY_VERSION = 1


def _group_stats(rows: list[dict]) -> dict:
    """mean@k over the problems in `rows` (each problem's sample accuracy, averaged over problems,
    so a problem counts once whatever its sample count), pass@k, tokens, truncation."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_problem[str(row["problem_id"])].append(row)
    per_problem_accuracy = [mean(bool(r["correct"]) for r in samples) for samples in by_problem.values()]
    tokens = [int(r["tokens"]) for r in rows]
    correct_tokens = [int(r["tokens"]) for r in rows if r["correct"]]
    return {
        "n_problems": len(by_problem),
        "n_samples": len(rows),
        "accuracy": mean(per_problem_accuracy),
        "pass_at_k": mean(any(bool(r["correct"]) for r in samples) for samples in by_problem.values()),
        "mean_tokens": mean(tokens),
        "median_tokens": median(tokens),
        "mean_tokens_correct": mean(correct_tokens) if correct_tokens else None,
        "truncation_rate": mean(r.get("finish_reason") == "length" for r in rows),
        "answer_found_rate": mean(r.get("boxed_answer") is not None or r.get("answer_line") is not None
                                  for r in rows),
    }


def summarize(rows: list[dict], **metadata) -> dict:
    """The summary of one (model, dataset) run. `rows` need problem_id, correct, tokens,
    finish_reason, and optionally subset / level / boxed_answer / answer_line."""
    if not rows:
        raise ValueError("cannot summarise an evaluation with no samples")
    summary = {"summary_version": SUMMARY_VERSION, **metadata, **_group_stats(rows)}
    counts = defaultdict(int)
    for row in rows:
        counts[str(row["problem_id"])] += 1
    summary["samples_per_problem"] = max(counts.values())
    for key, name in (("subset", "by_subset"), ("level", "by_level")):
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row.get(key) is not None:
                groups[str(row[key])].append(row)
        if groups:
            summary[name] = {group: _group_stats(group_rows) for group, group_rows in sorted(groups.items())}
    return summary


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _tokens(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))) for line in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The printed table of one run: the whole set, then each subset and level."""
    header = ["group", "problems", f"mean@{summary.get('samples_per_problem', '?')} %",
              f"pass@{summary.get('samples_per_problem', '?')} %", "mean tokens", "truncated %"]

    def line(name: str, stats: dict) -> list[str]:
        return [name, str(stats["n_problems"]), _percent(stats["accuracy"]), _percent(stats["pass_at_k"]),
                _tokens(stats["mean_tokens"]), _percent(stats["truncation_rate"])]

    rows = [line("all", summary)]
    for key, label in (("by_subset", "subset"), ("by_level", "level")):
        for name, stats in summary.get(key, {}).items():
            rows.append(line(f"{label} {name}", stats))
    title = f"{summary.get('model', '?')} on {summary.get('dataset', '?')}"
    return f"{title}\n{format_table(rows, header)}"


def load_summary(path: str) -> dict:
    """A summary JSON file, or a run directory holding summary.json; DataError if unusable."""
    file_path = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    try:
        with open(file_path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except OSError as error:
        raise DataError(f"{file_path}: cannot read: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{file_path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(summary, dict):
        raise DataError(f"{file_path}: expected a JSON object (an eval summary)")
    for key in ("dataset", "accuracy", "mean_tokens"):
        if key not in summary:
            raise DataError(f"{file_path}: not an eval summary: no {key!r} field")
    for key in ("accuracy", "mean_tokens"):
        if not isinstance(summary[key], (int, float)) or isinstance(summary[key], bool):
            raise DataError(f"{file_path}: {key!r} must be a number, got {summary[key]!r}")
    summary.setdefault("model", os.path.basename(os.path.dirname(os.path.abspath(file_path))))
    summary["_path"] = file_path
    return summary


def comparison_rows(summaries: list[dict], labels: list[str], base_label: str) -> list[dict]:
    """One row per (dataset, model): accuracy, tokens, and the token reduction and accuracy change
    against the base model on the same dataset (None when the base has no run there)."""
    base_by_dataset = {s["dataset"]: s for s, label in zip(summaries, labels) if label == base_label}
    order = list(dict.fromkeys(s["dataset"] for s in summaries))
    rows = []
    for dataset in order:
        base = base_by_dataset.get(dataset)
        for summary, label in zip(summaries, labels):
            if summary["dataset"] != dataset:
                continue
            is_base = label == base_label
            reduction = delta = None
            if base is not None and not is_base and base["mean_tokens"] > 0:
                reduction = 1.0 - summary["mean_tokens"] / base["mean_tokens"]
                delta = summary["accuracy"] - base["accuracy"]
            rows.append({"dataset": dataset, "model": label, "is_base": is_base,
                         "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
                         "truncation_rate": summary.get("truncation_rate"),
                         "samples_per_problem": summary.get("samples_per_problem"),
                         "token_reduction": reduction, "accuracy_change": delta})
    return rows


def format_comparison(rows: list[dict]) -> str:
    """The paper-style table. Token change is printed as the paper prints it: -57% means the
    responses are 57% shorter than the base's (reduction = 1 - len / len_base = 0.57)."""
    header = ["dataset", "model", "accuracy %", "mean tokens", "tokens vs base", "accuracy vs base",
              "accuracy / length / change"]
    lines = []
    for row in rows:
        reduction = row["token_reduction"]
        change = "base" if row["is_base"] else ("-" if reduction is None else f"{-100 * reduction:+.1f}%")
        accuracy_change = "" if row["accuracy_change"] is None else f"{100 * row['accuracy_change']:+.1f}"
        paper = f"{_percent(row['accuracy'])} / {_tokens(row['mean_tokens'])}"
        if reduction is not None:
            paper += f" / {-100 * reduction:+.0f}%"
        lines.append([row["dataset"], row["model"], _percent(row["accuracy"]), _tokens(row["mean_tokens"]),
                      change, accuracy_change, paper])
    return format_table(lines, header)


def plot_comparison(rows: list[dict], path: str) -> str:
    """Accuracy vs mean response tokens, one point per model per dataset (a colour per dataset,
    a marker per model, a line from each dataset's base to the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    models = list(dict.fromkeys(row["model"] for row in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dv<>pP*X"
    for d, dataset in enumerate(datasets):
        colour = colours[d % len(colours)]
        points = [row for row in rows if row["dataset"] == dataset]
        base = next((row for row in points if row["is_base"]), None)
        for row in points:
            marker = markers[models.index(row["model"]) % len(markers)]
            axes.scatter(row["mean_tokens"], 100 * row["accuracy"], color=colour, marker=marker, s=60, zorder=3)
            axes.annotate(row["model"], (row["mean_tokens"], 100 * row["accuracy"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
            if base is not None and row is not base:
                axes.plot([base["mean_tokens"], row["mean_tokens"]], [100 * base["accuracy"], 100 * row["accuracy"]],
                          color=colour, alpha=0.4, linestyle="--", zorder=2)
        axes.scatter([], [], color=colour, marker="o", label=dataset)
    axes.set_xlabel("mean response tokens (thinking + answer + EOS)")
    axes.set_ylabel("accuracy, mean@k (%)")
    axes.set_title("accuracy vs response length")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["summarize", "format_summary", "load_summary", "comparison_rows", "format_comparison",
           "plot_comparison", "format_table"]
