"""One CRISP training step on a long rollout, in a child process that reports its peak memory.

    python -m benchmarks.rollout_step --loss fused --response-tokens 16384
    python -m benchmarks.rollout_step --loss materialised --response-tokens 16384

A tiny Qwen3-architecture model (2 layers, hidden 256, head_dim 64, tied embeddings) with the
real 151,936-token vocabulary scores one sampled response in two contexts, as CRISP does: the
student prompt (with grad) and the longer teacher prompt (no grad), the same response ids after
each. The loss is the mean reverse KL over the response tokens, from the final hidden states and
the shared lm_head: either crisp_fast's fused loss (`--loss fused`) or full logits + log_softmax
(`--loss materialised`). Then backward and an AdamW step. Prints `RESULT {json}` with the wall
time and the peak RSS, total and over the model + inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.fused_impls import PeakMemory, _rss_bytes

VOCAB = 151936


def tiny_qwen3(vocab: int, seq_len: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=max(seq_len, 4096), tie_word_embeddings=True,
                         # sdpa: causal attention over 16k positions must not build 16k x 16k scores
                         attn_implementation="sdpa")
    return Qwen3ForCausalLM(config)


def materialised_reverse_kl(student_hidden, teacher_hidden, weight):
    """What a trainer without a fused loss does: [R, V] logits on both sides, log_softmax, KL."""
    student_logp = torch.log_softmax((student_hidden @ weight.T).float(), dim=-1)
    with torch.no_grad():
        teacher_logp = torch.log_softmax((teacher_hidden @ weight.T).float(), dim=-1)
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1).mean()


def crisp_step(model, optimizer, student_ids, teacher_ids, response_tokens, loss_kind, backend):
    """Teacher pass (no grad) -> student pass (grad) -> reverse KL on the response -> AdamW.
    The hidden state at position p predicts token p + 1, so the response's predictions are the
    `response_tokens` positions ending one before each sequence's end."""
    import crisp_fast

    with torch.no_grad():
        teacher_states = model.model(input_ids=teacher_ids).last_hidden_state
    teacher_hidden = teacher_states[0, -response_tokens - 1:-1]
    student_states = model.model(input_ids=student_ids).last_hidden_state
    student_hidden = student_states[0, -response_tokens - 1:-1]
    weight = model.lm_head.weight
    if loss_kind == "fused":
        loss = crisp_fast.fused_linear_reverse_kl(student_hidden, teacher_hidden, weight, backend=backend)
    else:
        loss = materialised_reverse_kl(student_hidden, teacher_hidden, weight)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("fused", "materialised"), required=True)
    parser.add_argument("--response-tokens", type=int, default=16384)
    parser.add_argument("--student-prompt-tokens", type=int, default=64)
    parser.add_argument("--teacher-prompt-tokens", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (MemoryError, RuntimeError) as error:
        text = str(error)
        oom = isinstance(error, MemoryError) or "can't allocate memory" in text
        result = {"status": "OOM" if oom else "error", "error": text.splitlines()[0][:500]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run(args):
    import crisp_fast

    torch.manual_seed(args.seed)
    total = args.teacher_prompt_tokens + args.response_tokens
    model = tiny_qwen3(args.vocab, total)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    response = torch.randint(0, args.vocab, (1, args.response_tokens))
    student_ids = torch.cat([torch.randint(0, args.vocab, (1, args.student_prompt_tokens)), response], 1)
    teacher_ids = torch.cat([torch.randint(0, args.vocab, (1, args.teacher_prompt_tokens)), response], 1)
    backend = args.backend
    if args.loss == "fused" and backend == "auto":
        # what "auto" picks for fp32 CPU tensors, named so the report says which backend ran
        backend = "native" if crisp_fast.available_backends().get("native") == "ok" else "torch"
    memory = PeakMemory("cpu")
    start = time.perf_counter()
    loss = crisp_step(model, optimizer, student_ids, teacher_ids, args.response_tokens, args.loss, backend)
    seconds = time.perf_counter() - start
    over = memory.peak_over_baseline()
    return {"status": "ok", "loss_kind": args.loss, "backend": backend if args.loss == "fused" else None,
            "response_tokens": args.response_tokens, "parameters": sum(p.numel() for p in model.parameters()),
            "loss": loss, "time_s": seconds, "peak_over_start_bytes": over, "baseline_bytes": memory.baseline,
            "peak_rss_bytes": _rss_bytes("VmHWM"), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
