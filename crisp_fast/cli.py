"""`crisp-fast <command> ...`: one entry point; each command lives in the module that owns it.

    crisp-fast train    --config FILE [--out DIR] [section.key=value ...]   (crisp_fast.train)
    crisp-fast eval     --model PATH --data FILE ...                        (crisp_fast.eval)
    crisp-fast grade    RESPONSES.jsonl [--out GRADED.jsonl]                (crisp_fast.eval)
    crisp-fast compare  BASE_SUMMARY CANDIDATE_SUMMARY ...                  (crisp_fast.eval)
    crisp-fast demo     [--out DIR] [--teacher-refresh-every M]             (crisp_fast.demo)
    crisp-fast backends                                                     which loss backends run here
    crisp-fast plan-memory --config FILE [--world-size W] [--tokens T] [--device-memory GiB]
                                                                            (crisp_fast.train.memory_plan)
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help); modules are imported only when their command runs
COMMANDS = {
    "train": ("crisp_fast.train.main", "main", "run CRISP self-distillation training"),
    "eval": ("crisp_fast.eval.cli", "eval_main", "generate and grade a model on a math dataset"),
    "grade": ("crisp_fast.eval.cli", "grade_main", "grade existing responses (no model)"),
    "compare": ("crisp_fast.eval.cli", "compare_main", "compare evaluation summaries, paper-style"),
    "demo": ("crisp_fast.demo.main", "main", "the embedded default: CRISP on a toy reasoning world"),
    "backends": ("crisp_fast.cli", "backends_main", "list the fused-loss backends and whether they run here"),
    "plan-memory": ("crisp_fast.train.memory_plan", "main", "per-rank memory of a training step, before loading"),
}


def backends_main(argv: list[str]) -> int:
    """Each registered backend, whether it runs here (or why not), and the native build's flags."""
    from crisp_fast.loss import available_backends

    for name, state in available_backends().items():
        print(f"{name:8s} {state}")
        if name == "native" and state == "ok":
            print(f"{'':8s} {_native_build_info()}")
    return 0


def _native_build_info() -> str:
    """The flags the native extension was built with, when it says (`build_info()`)."""
    try:
        from crisp_fast import _native
    except ImportError as error:  # built by the JIT loader instead: nothing to ask
        return f"build info unavailable ({error})"
    build_info = getattr(_native, "build_info", None)
    if build_info is None:
        return "build info unavailable (this build of crisp_fast._native does not export build_info())"
    info = build_info()
    if isinstance(info, dict):
        # one line per key; a multi-line value (ATen's parallel report) folded onto its line
        return "built with\n" + "\n".join(f"{'':9s}{key}: {'; '.join(str(value).split(chr(10))).strip()}"
                                           for key, value in info.items())
    return f"built with {info}"


def usage() -> str:
    lines = ["usage: crisp-fast <command> [args]", "", "commands:"]
    lines += [f"  {name:10s} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"crisp-fast: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
