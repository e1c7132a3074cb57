// The per-token statistics layout, mirrored from kernels/stats_layout.py (the one definition).
//
// `stats` is fp32 [N, kNumStats]. A log-sum-exp is stored split as max + log Z so that every
// probability is formed from max-shifted logits, p = exp((x - max) - log Z): a whole lse of
// logits ~1e4 rounded to fp32 is off by ~1e-3, and p formed from it would not sum to 1.
// The extension exports these numbers as `stats_layout()`; crisp_fast/backends/native.py compares
// them with the Python module at import and refuses to run if they differ.
#pragma once

#include <cstdint>

namespace crisp_native {

enum StatColumn : int64_t {
  kLoss = 0,            // divergence of the row (unclamped)
  kStudentMax = 1,      // max_v x_s, the tempered student logits
  kStudentLogZ = 2,     // log sum_v exp(x_s - kStudentMax)
  kTeacherMax = 3,      // max_v x_t
  kTeacherLogZ = 4,     // log sum_v exp(x_t - kTeacherMax)
  kStudentEntropy = 5,  // H(softmax(x_s)), nats
  kTeacherEntropy = 6,  // H(softmax(x_t)), nats
  kGradShift = 7,       // per-row constant of the logit gradient (crisp_fast.backends)
  kStudentRawMax = 8,   // max of the untempered student logits (only when need_raw_lse, else 0)
  kStudentRawLogZ = 9,  // log sum exp(y_s - kStudentRawMax) (only when need_raw_lse, else 0)
  kGradShiftLo = 10,    // kGradShift's rounding residual: the shift is stored as hi + lo
  kNumStats = 11,
};

// (Python name, value) pairs, in column order, for `stats_layout()`.
struct StatName {
  const char* name;
  int64_t value;
};
inline constexpr StatName kStatNames[] = {
    {"LOSS", kLoss},
    {"STUDENT_MAX", kStudentMax},
    {"STUDENT_LOG_Z", kStudentLogZ},
    {"TEACHER_MAX", kTeacherMax},
    {"TEACHER_LOG_Z", kTeacherLogZ},
    {"STUDENT_ENTROPY", kStudentEntropy},
    {"TEACHER_ENTROPY", kTeacherEntropy},
    {"GRAD_SHIFT", kGradShift},
    {"STUDENT_RAW_MAX", kStudentRawMax},
    {"STUDENT_RAW_LOG_Z", kStudentRawLogZ},
    {"GRAD_SHIFT_LO", kGradShiftLo},
    {"NUM_STATS", kNumStats},
};

}  // namespace crisp_native
