"""The per-token statistics layout shared by every backend (Python, Triton and C++).

`stats` is fp32 [N, NUM_STATS]; a log-sum-exp is stored split as max + log Z so that
probabilities are always formed from max-shifted logits (exact at any logit scale).
csrc/stats_layout.h mirrors these numbers; the native backend checks them at import.
"""
LOSS = 0               # divergence of the row (unclamped)
STUDENT_MAX = 1        # max_v x_s, the tempered student logits
STUDENT_LOG_Z = 2      # log sum_v exp(x_s - STUDENT_MAX)
TEACHER_MAX = 3        # max_v x_t
TEACHER_LOG_Z = 4      # log sum_v exp(x_t - TEACHER_MAX)
STUDENT_ENTROPY = 5    # H(softmax(x_s)), nats
TEACHER_ENTROPY = 6    # H(softmax(x_t)), nats
GRAD_SHIFT = 7         # per-row constant of the logit gradient (crisp_fast.backends)
STUDENT_RAW_MAX = 8    # max of the untempered student logits (only when need_raw_lse, else 0)
STUDENT_RAW_LOG_Z = 9  # log sum exp(y_s - STUDENT_RAW_MAX) (only when need_raw_lse, else 0)
GRAD_SHIFT_LO = 10     # GRAD_SHIFT - fp32(GRAD_SHIFT): the shift is stored as hi + lo (exact at any KL)
NUM_STATS = 11
