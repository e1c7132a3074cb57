"""Evaluation: generate with the shared rollout engines, grade as the paper grades (math-verify,
last `Answer:` line or last `\\boxed{}`), report accuracy and response length side by side.

    crisp-fast eval --model PATH --data champ --out runs/base      (crisp_fast.eval.cli)
    crisp-fast grade responses.jsonl --out graded.jsonl
    crisp-fast compare runs/base runs/crisp

The grader (`crisp_fast.eval.grader`) and the problem loaders (`crisp_fast.eval.problems`) need
no torch; this package imports nothing heavy until a function that needs it runs.
"""
