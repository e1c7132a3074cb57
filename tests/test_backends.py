"""One conformance suite for every registered backend (crisp_fast.backends.BACKENDS).

One harness, fresh random inputs each run (the `seed` fixture), a float64 truth (crisp_fast.reference
on the inputs cast to float64), and one bound, the Cut Cross-Entropy method: for the loss, the
gradients of the student hidden states, the lm_head weight and the student bias, and every
TokenStats field, our error against the truth is at most

    2 x the error of the plain materialised computation (crisp_fast.reference on the inputs
        upcast to fp32, gradients returned in the inputs' dtype) + FLOOR
        (+ one ulp of the output's dtype for bf16/fp16 gradients, which are rounded to it),

each error measured as max |x - truth| / max |truth| over the tensor (counted rows for the stats).
A backend that is not available here is skipped with its reason; the Triton backend runs through
the interpreter (TRITON_INTERPRET=1, tests/conftest.py) on the small cases only (slow ones marked).
"""
import math

import pytest
import torch

from crisp_fast import fused_linear_divergence, reference
from crisp_fast.backends import BACKENDS
from crisp_fast.loss import available_backends

FLOOR = 2e-6  # ~16 fp32 ulps of the tensor's scale: where both errors are at rounding level


def _floor(tensor):
    """A gradient returned in bf16/fp16 is rounded to that dtype (the plain computation's too): its
    error is quantised to the output's ulp, so that ulp (at the tensor's scale) is added to the floor."""
    low = tensor.dtype in (torch.bfloat16, torch.float16)
    return FLOOR + (torch.finfo(tensor.dtype).eps if low else 0.0)
STATS_FIELDS = ("divergence", "student_lse", "teacher_lse", "student_entropy", "teacher_entropy")
_STATE = available_backends()


def _backend_params(interpreter_too_slow=False):
    params = []
    for name in BACKENDS:
        marks = []
        if _STATE[name] != "ok" and not _STATE[name].startswith("ok"):
            marks.append(pytest.mark.skip(reason=f"backend {name!r} unavailable: {_STATE[name]}"))
        if name == "triton" and interpreter_too_slow:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(name, marks=marks, id=name))
        if name == "native":
            # forward_backward's other schedule: at these small D the default budget streams, so the
            # full-row loop (4 GEMMs) runs here in forced 7-row chunks (the `_native_schedule` fixture)
            params.append(pytest.param(name, marks=marks + [pytest.mark.native_full_rows], id="native-full-rows"))
    return params


@pytest.fixture(autouse=True)
def _native_schedule(request, monkeypatch):
    if request.node.get_closest_marker("native_full_rows"):
        monkeypatch.setenv("CRISP_FAST_NATIVE_CHUNK_ROWS", "7")


ALL = _backend_params()
ALL_BUT_SLOW_INTERPRETER = _backend_params(interpreter_too_slow=True)


# ------------------------------------------------------------------------------------------
# the harness
# ------------------------------------------------------------------------------------------
class Problem:
    """Inputs of one call: student/teacher hidden states and heads, biases, mask, token weights."""

    def __init__(self, h_s, h_t, w, w_t=None, b_s=None, b_t=None, *, mask=None, token_weights=None,
                 dtype=torch.float32, weight_requires_grad=True):
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        self.h_s, self.h_t, self.w, self.w_t = cast(h_s), cast(h_t), cast(w), cast(w_t)
        self.b_s, self.b_t = b_s, b_t  # biases are fp32 whatever the dtype
        self.mask, self.token_weights = mask, token_weights
        self.weight_requires_grad = weight_requires_grad

    @property
    def n(self):
        return self.h_s.shape[0]


def _evaluate(problem, cast, loss_fn, *, reduction, upstream, raw_coeff, options):
    """(loss, grads of h_s / w / b_s, stats dict) of one implementation on `problem` cast by `cast`."""
    h_s = problem.h_s.detach().clone().requires_grad_(True)
    w = problem.w.detach().clone().requires_grad_(problem.weight_requires_grad)
    b_s = None if problem.b_s is None else problem.b_s.detach().clone().requires_grad_(True)
    loss, stats = loss_fn(cast(h_s), cast(problem.h_t), cast(w), cast(problem.w_t), cast(b_s), cast(problem.b_t),
                          reduction=reduction, raw_coeff=raw_coeff, options=options, mask=problem.mask,
                          token_weights=problem.token_weights)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    if loss.requires_grad:
        (loss * up).sum().backward()
    return loss.detach(), (h_s.grad, w.grad, None if b_s is None else b_s.grad), stats


def _materialised(h_s, h_t, w, w_t, b_s, b_t, *, reduction, raw_coeff, options, mask, token_weights):
    """crisp_fast.reference, every logit materialised, in the dtype of its (cast) inputs."""
    tw = None if token_weights is None else token_weights.to(h_s.dtype)
    loss = reference.fused_linear_divergence(h_s, h_t, w, w_t, student_bias=b_s, teacher_bias=b_t, mask=mask,
                                             token_weights=tw, reduction=reduction, **options)
    stat_options = {k: v for k, v in options.items() if k not in ("divergence", "beta")}
    with torch.no_grad():
        stats = reference.token_statistics(h_s, h_t, w, w_t, student_bias=b_s, teacher_bias=b_t, **stat_options)
        stats["divergence"] = reference.fused_linear_divergence(h_s, h_t, w, w_t, student_bias=b_s, teacher_bias=b_t,
                                                                reduction="none", **options)
    if raw_coeff is not None:
        y = reference.logits(h_s, w, b_s, logit_scale=options.get("student_logit_scale", 1.0),
                             softcap=options.get("student_softcap"))
        counted = torch.ones(h_s.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
        loss = loss + (raw_coeff.to(y.dtype) * torch.logsumexp(y, dim=-1))[counted].sum()
    return loss, stats


def _fused(backend):
    def run(h_s, h_t, w, w_t, b_s, b_t, *, reduction, raw_coeff, options, mask, token_weights):
        loss, stats = fused_linear_divergence(h_s, h_t, w, w_t, student_bias=b_s, teacher_bias=b_t, mask=mask,
                                              token_weights=token_weights, reduction=reduction, backend=backend,
                                              return_stats=True, _raw_lse_coeff=raw_coeff, **options)
        fields = {name: getattr(stats, name) for name in STATS_FIELDS}
        if raw_coeff is not None:
            fields["student_raw_lse"] = stats.student_raw_lse
        fields["counted"] = stats.counted
        return loss, fields
    return run


def _error(value, truth):
    value, truth = value.double(), truth.double()
    scale = truth.abs().max().item()
    return ((value - truth).abs().max().item()) / (scale if scale > 0 else 1.0)


def _reordered_plain(problem, common):
    """The plain materialised computation again with the hidden and vocabulary axes permuted (the
    same math, another fp32 rounding of every dot product and row sum), its results mapped back:
    {quantity: value} like `check` collects them."""
    d, d_t, vocab = problem.h_s.shape[1], problem.h_t.shape[1], problem.w.shape[0]
    pd, pt, pv = torch.randperm(d), torch.randperm(d_t), torch.randperm(vocab)
    w_t = None if problem.w_t is None else problem.w_t[pv][:, pt]
    h_t = problem.h_t[:, pt] if problem.w_t is not None else problem.h_t[:, pd]
    permuted = Problem(problem.h_s[:, pd], h_t, problem.w[pv][:, pd], w_t,
                       None if problem.b_s is None else problem.b_s[pv], None if problem.b_t is None else problem.b_t[pv],
                       mask=problem.mask, token_weights=problem.token_weights, dtype=problem.h_s.dtype,
                       weight_requires_grad=problem.weight_requires_grad)
    to32 = lambda t: None if t is None else t.float()  # noqa: E731
    loss, (g_h, g_w, g_b), stats = _evaluate(permuted, to32, _materialised, **common)
    inverse_d, inverse_v = torch.argsort(pd), torch.argsort(pv)
    values = {"loss": loss, "grad_hidden": None if g_h is None else g_h[:, inverse_d],
              "grad_weight": None if g_w is None else g_w[inverse_v][:, inverse_d],
              "grad_bias": None if g_b is None else g_b[inverse_v]}
    counted = torch.ones(problem.n, dtype=torch.bool) if problem.mask is None else problem.mask.reshape(-1).bool()
    values.update({name: value[counted] for name, value in stats.items()})
    return values


def check(backend, problem, *, reduction="mean", upstream=None, raw_coeff=None, **options):
    """Assert the bound on the loss, the three gradients and every TokenStats field; return the
    errors {quantity: (ours, plain)} for the report."""
    if reduction == "none" and upstream is None:
        upstream = torch.randn(problem.n)
    common = dict(reduction=reduction, upstream=upstream, raw_coeff=raw_coeff, options=options)
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    to32 = lambda t: None if t is None else t.float()  # noqa: E731
    same = lambda t: t  # noqa: E731
    truth = _evaluate(problem, to64, _materialised, **common)
    plain = _evaluate(problem, to32, _materialised, **common)
    plain_reordered = _reordered_plain(problem, common)
    ours = _evaluate(problem, same, _fused(backend), **common)

    counted = torch.ones(problem.n, dtype=torch.bool) if problem.mask is None else problem.mask.reshape(-1).bool()
    assert torch.equal(ours[2]["counted"], counted)
    quantities = {"loss": (ours[0], plain[0], truth[0])}
    for name, o, p, t in zip(("grad_hidden", "grad_weight", "grad_bias"), ours[1], plain[1], truth[1]):
        if t is None:
            assert o is None, f"{name} should not exist (its input does not require grad)"
            continue
        assert o is not None and o.dtype == p.dtype, (name, None if o is None else o.dtype, p.dtype)
        quantities[name] = (o, p, t)
    for name in ours[2]:
        if name == "counted":
            continue
        o = ours[2][name]
        assert (o[~counted] == 0).all(), f"uncounted rows of {name} must hold 0"
        quantities[name] = (o[counted], plain[2][name][counted], truth[2][name][counted])

    errors, failures = {}, []
    for name, (o, p, t) in quantities.items():
        assert o.shape == t.shape, (name, o.shape, t.shape)
        # the plain fp32 error is a random variable of the rounding order: its size is taken as the
        # larger of two equally valid orders, so that one lucky draw does not set the bound
        ours_error, plain_error = _error(o, t), max(_error(p, t), _error(plain_reordered[name], t))
        errors[name] = (ours_error, plain_error)
        floor = _floor(o)
        if not ours_error <= 2 * plain_error + floor:  # also fails on NaN
            failures.append(f"{name}: error {ours_error:.2e} > 2 x plain {plain_error:.2e} + {floor:.0e}")
    assert not failures, f"backend={backend!r}: " + "; ".join(failures)
    return errors


# ------------------------------------------------------------------------------------------
# input builders
# ------------------------------------------------------------------------------------------
def random_problem(n, d, vocab, *, d_teacher=None, spread=1.0, bias=False, **kwargs):
    """Gaussian hidden states and heads; a teacher close to the student (own head when d_teacher)."""
    h_s = torch.randn(n, d) * spread
    w = torch.randn(vocab, d) / d**0.5
    if d_teacher is None:
        h_t, w_t = h_s + 0.5 * spread * torch.randn(n, d), None
    else:
        h_t, w_t = torch.randn(n, d_teacher) * spread, torch.randn(vocab, d_teacher) / d_teacher**0.5
    b_s = torch.randn(vocab) if bias else None
    b_t = torch.randn(vocab) if bias else None
    return Problem(h_s, h_t, w, w_t, b_s, b_t, **kwargs)


def peaked_problem(n=37, d=48, vocab=1009, gap=None, **kwargs):
    """Every row's top logit `gap` above the rest (default: 8 to 30 across the rows, so that some
    rows' gradients are not below fp32 resolution): orthonormal hidden states, and the row of W of
    each row's token carries `gap` times that hidden state. Half the teacher rows agree on the top
    token, half put it elsewhere."""
    gap = torch.linspace(8.0, 30.0, n)[torch.randperm(n), None] if gap is None else gap
    q, _ = torch.linalg.qr(torch.randn(d, d))
    h_s = q[:n] * 1.0
    w = torch.randn(vocab, d) / d**0.5
    tokens = torch.randperm(vocab)[:n]
    w[tokens] += gap * h_s
    h_t = h_s.clone()
    h_t[1::2] = torch.roll(h_s, 1, dims=0)[1::2]
    h_t += 0.05 * torch.randn(n, d)
    return Problem(h_s, h_t, w, **kwargs)


def huge_logits_problem(n=23, vocab=517, **kwargs):
    """Logits around +1e4 (student) and -1e4 (teacher), exact fp32 integers, KL of order 1: a
    constant coordinate carries the offset (W's mean column is 1e4), small integers the rest."""
    d = 8
    w = torch.randint(-1, 2, (vocab, d)).float()
    w[:, 0] = 1e4
    h_s = torch.randint(-2, 3, (n, d)).float()
    h_t = torch.randint(-2, 3, (n, d)).float()
    h_s[:, 0], h_t[:, 0] = 1.0, -1.0
    return Problem(h_s, h_t, w, **kwargs)


# ------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------
DIVERGENCE_CASES = [
    dict(divergence="reverse_kl"),
    dict(divergence="forward_kl"),
    dict(divergence="jsd", beta=0.5),
    dict(divergence="jsd", beta=0.15, temperature=0.7),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=_case_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_divergences_reductions_masks_weights(seed, backend, case, reduction):
    weights = torch.rand(29) if reduction != "mean" else None
    problem = random_problem(29, 19, 1031, spread=2.0, bias=True, mask=torch.rand(29) > 0.3, token_weights=weights)
    check(backend, problem, reduction=reduction, **case)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peaked_large_logits(seed, backend, reduction):
    check(backend, peaked_problem(), reduction=reduction)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_logits_around_1e4(seed, backend, reduction, divergence):
    check(backend, huge_logits_problem(), reduction=reduction, divergence=divergence, beta=0.4)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [0.05, 4.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extreme_temperatures(seed, backend, temperature, reduction):
    problem = random_problem(31, 24, 777, spread=1.5, bias=True, mask=torch.rand(31) > 0.2)
    check(backend, problem, reduction=reduction, temperature=temperature)


@pytest.mark.parametrize("backend", ALL)
def test_probability_near_one(seed, backend):
    """p_max up to 1 - 1e-7: a gap of ~17 nats between the top logit and the rest."""
    check(backend, peaked_problem(n=19, d=24, vocab=211, gap=17.0 + math.log(211)), temperature=1.0)


@pytest.mark.parametrize("backend", ALL_BUT_SLOW_INTERPRETER)
@pytest.mark.parametrize("reduction", ["mean", pytest.param("none", marks=pytest.mark.slow)])
def test_real_vocabulary_size(seed, backend, reduction):
    check(backend, random_problem(3, 8, 151_936, d_teacher=5, bias=True), reduction=reduction, temperature=1.3)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_scale_and_softcap(seed, backend, reduction):
    problem = random_problem(27, 16, 613, spread=3.0, bias=True, mask=torch.rand(27) > 0.25)
    check(backend, problem, reduction=reduction, temperature=1.7, student_logit_scale=0.8, teacher_logit_scale=1.3,
          student_softcap=4.0, teacher_softcap=6.0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_separate_teacher_head_of_another_hidden_size(seed, backend, divergence):
    check(backend, random_problem(21, 12, 509, d_teacher=20, spread=2.0, bias=True), divergence=divergence)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", DIVERGENCE_CASES[:3], ids=_case_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_minus_inf_bias_entries_are_exact(seed, backend, case, reduction):
    """Banned tokens: -inf in both biases, and (except forward KL, which is then +inf) -inf in the
    student's bias where the teacher has mass. p = 0 there; the result is finite and exact."""
    problem = random_problem(17, 10, 401, spread=2.0, bias=True)
    banned = torch.randperm(401)[:40]
    problem.b_s[banned[:20]] = problem.b_t[banned[:20]] = -math.inf
    if case["divergence"] != "forward_kl":
        problem.b_s[banned[20:]] = -math.inf
    check(backend, problem, reduction=reduction, temperature=0.9, **case)


@pytest.mark.parametrize("backend", ALL)
def test_raw_lse_term(seed, backend):
    problem = random_problem(17, 10, 211, bias=True, mask=torch.rand(17) > 0.2)
    check(backend, problem, reduction="sum", raw_coeff=torch.rand(17), temperature=2.0, student_logit_scale=0.7,
          student_softcap=5.0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_gets_no_gradient(seed, backend, reduction):
    """lm_head without requires_grad (LoRA): no weight gradient (and no dW GEMM), the rest exact."""
    check(backend, random_problem(19, 14, 307, bias=True, weight_requires_grad=False), reduction=reduction)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_inputs(seed, backend, dtype, reduction):
    problem = random_problem(33, 48, 1031, spread=3.0, bias=True, mask=torch.rand(33) > 0.2, dtype=dtype)
    check(backend, problem, reduction=reduction, divergence="jsd", beta=0.5)
    check(backend, peaked_problem(n=19, d=24, vocab=307, dtype=dtype), reduction=reduction)


# ------------------------------------------------------------------------------------------
# non-finite inputs (by contract)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
def test_row_of_all_minus_inf_logits_is_nan(seed, backend):
    """Row 2's logits are all -inf (h[2, 0] = +inf against a negative column of W): that row's
    divergence and statistics are NaN; every other row is still exact."""
    problem = random_problem(9, 6, 97)
    problem.w[:, 0] = -1.0 - torch.rand(97)
    problem.h_s[2, 0] = math.inf
    loss, stats = fused_linear_divergence(problem.h_s, problem.h_t, problem.w, reduction="none", backend=backend,
                                          return_stats=True)
    assert torch.isnan(loss[2]) and torch.isnan(stats.divergence[2])
    others = torch.arange(9) != 2
    exact = reference.fused_linear_divergence(problem.h_s.double(), problem.h_t.double(), problem.w.double(),
                                              reduction="none")
    torch.testing.assert_close(loss[others].double(), exact[others], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_nan_and_inf_propagate_and_masked_rows_are_ignored(seed, backend):
    problem = random_problem(8, 6, 70)
    h_s, h_t, w = problem.h_s, problem.h_t, problem.w
    h_s[3, 2] = math.nan
    assert torch.isnan(fused_linear_divergence(h_s, h_t, w, backend=backend))
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    assert torch.isfinite(fused_linear_divergence(h_s, h_t, w, mask=mask, backend=backend))
    h_t[5, 0] = math.inf
    assert not torch.isfinite(fused_linear_divergence(h_s, h_t, w, mask=mask, backend=backend))
    b = torch.zeros(70)
    b[7] = math.inf
    assert not torch.isfinite(fused_linear_divergence(h_s, h_t, w, student_bias=b, mask=mask, backend=backend))


# ------------------------------------------------------------------------------------------
# repeatability
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic_gradients_are_bitwise_repeatable(seed, backend, reduction):
    problem = random_problem(25, 16, 523, bias=True)
    upstream = torch.randn(25)
    runs = []
    for _ in range(2):
        loss, grads, _ = _evaluate(problem, lambda t: t, _fused_deterministic(backend), reduction=reduction,
                                   upstream=upstream if reduction == "none" else None, raw_coeff=None, options={})
        runs.append([loss, *grads])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _fused_deterministic(backend):
    def run(h_s, h_t, w, w_t, b_s, b_t, *, reduction, raw_coeff, options, mask, token_weights):
        loss = fused_linear_divergence(h_s, h_t, w, w_t, student_bias=b_s, teacher_bias=b_t, reduction=reduction,
                                       backend=backend, deterministic=True)
        return loss, {}
    return run


def test_cli_lists_every_registered_backend(capsys):
    from crisp_fast.cli import main

    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert listed == list(BACKENDS) and lines[0].split()[1] == "ok"
