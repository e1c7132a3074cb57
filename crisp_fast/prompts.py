"""Prompt texts shared by the trainer and the evaluator.

The student prompt used in training and the default evaluation prompt must be the same text:
otherwise a before/after comparison measures the prompt, not the training. Both import it here.
"""

# Named instruction presets, in this project's own words. v1: be concise. v2: be concise, but
# difficulty-aware — never trade correctness for brevity on hard, multi-step problems.
PRESETS = {
    "v1": {
        "student_header": "Solve the following math problem step by step.",
        "teacher_instruction": (
            "Solve the following math problem correctly and concisely. Get straight to the point: "
            "skip restating the problem, repeated checks and needless elaboration, and write only "
            "the reasoning steps that are needed to reach the answer."),
        "answer_format": "Put the final answer on its own last line as 'Answer: <answer>'.",
    },
    "v2": {
        "student_header": "Solve the following math problem step by step.",
        "teacher_instruction": (
            "Solve the following math problem concisely, but correctness comes before brevity. "
            "For an easy problem, go straight to the answer without detours or restatements. For a "
            "hard or multi-step problem, keep every step the solution needs, including any case "
            "analysis, and finish with a brief check; drop only what is redundant."),
        "answer_format": "Put the final answer on its own last line as 'Answer: <answer>'.",
    },
}


def student_template(preset: str = "v1") -> str:
    """The student's user message with a `{problem}` slot, exactly as the trainer renders it."""
    texts = PRESETS[preset]
    return "\n\n".join([texts["student_header"], "{problem}", texts["answer_format"]])
