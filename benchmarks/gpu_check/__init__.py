"""`make gpu-check`: the GPU claims of crisp-fast proved or disproved in one prepared command.

Run on a lent GPU machine from the repository root (docs/benchmarks.md, "Running the GPU check on
a lent machine"):

    make gpu-check                              # = python -m benchmarks.gpu_check, at most 8 minutes
    make gpu-check GPU_CHECK_ARGS=--dry-run     # every part's code path on CPU at tiny shapes (CI)

The check is a list of parts (`plan.py`): the CUDA tests, the fused loss at a Qwen3-8B shape
against Liger, TRL and the cuBLAS 4-GEMM floor (one part per contender), and one CRISP trainer
step on a tiny real-vocabulary Qwen3 (HF generate, and vLLM when importable). Each part runs in
its own child process under a hard time limit (`runner.py`): a part past its limit is killed with
everything it started, reported as timed out with what it had measured so far, and the next part
runs. The tables, versions and nvidia-smi facts go to gpu_check.json / gpu_check.md in
$GPU_CHECK_OUT (default benchmarks/results/) (`report.py`).

Nothing here imports torch at module level except the part modules, which run only in children.
"""
