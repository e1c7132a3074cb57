"""crisp_fast.integrations.trl: TRL's DistillationTrainer on the fused loss.

Function level: the patched `_chunked_divergence_loss` against TRL's own function (fp32) and the
fp64 reference, over every option it takes. Trainer level: a few on-policy steps of
`trl.DistillationTrainer` on tiny local Qwen3 models (student and teacher of different widths)
log the same losses patched and unpatched. Budget: ~60 s on 2 quiet cores (~110 s at load 13).

    PYTHONPATH=. pytest tests/test_integrations_trl.py -q
"""
from __future__ import annotations

import contextlib
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
distillation_trainer = pytest.importorskip("trl.trainer.distillation_trainer")

from crisp_fast import reference  # noqa: E402
from crisp_fast.integrations import trl as crisp_trl  # noqa: E402

TRL_LOSS = distillation_trainer._chunked_divergence_loss
assert not hasattr(TRL_LOSS, "_crisp_fast_backend"), "a previous test left TRL patched"


@pytest.fixture(autouse=True)
def _restore_trl():
    """Whatever a test does, TRL's own function is back afterwards."""
    yield
    crisp_trl.unpatch_distillation_trainer()
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS


def _inputs(dtype, *, batch=3, length=7, d=24, d_teacher=40, vocab=173, bias=True, fully_masked=False):
    """Random inputs shaped as TRL passes them; logits of a few units, as a trained head gives."""
    hs = torch.randn(batch, length, d, dtype=dtype)
    ht = torch.randn(batch, length, d_teacher, dtype=dtype)
    ws = torch.randn(vocab, d, dtype=dtype) / d**0.5 * 2
    wt = torch.randn(vocab, d_teacher, dtype=dtype) / d_teacher**0.5 * 2
    bs = torch.randn(vocab, dtype=dtype) if bias else None
    bt = torch.randn(vocab, dtype=dtype) if bias else None
    mask = torch.rand(batch, length) > 0.35
    mask[0, 0] = True
    if fully_masked:
        mask[:] = False
    return hs, ht, ws, wt, bs, bt, mask.long()


def _run(loss_fn, hs, ht, ws, wt, bs, bt, mask, beta, **options):
    """(loss, entropy_sum, n_valid, grad_hidden, grad_weight, grad_bias) of one call."""
    hs = hs.clone().requires_grad_()
    ws = ws.clone().requires_grad_()
    bs = None if bs is None else bs.clone().requires_grad_()
    loss, entropy_sum, n_valid = loss_fn(hs, ht, ws, wt, mask, beta, student_lm_head_bias=bs,
                                         teacher_lm_head_bias=bt, **options)
    loss.backward()
    return loss.detach(), entropy_sum, n_valid, hs.grad, ws.grad, None if bs is None else bs.grad


def _truth(hs, ht, ws, wt, bs, bt, mask, beta, *, num_items_in_batch=None, temperature=1.0,
           student_logit_scale=1.0, teacher_logit_scale=1.0, student_final_logit_softcapping=None,
           teacher_final_logit_softcapping=None):
    """The same quantities from crisp_fast.reference in float64 (autograd through full logits)."""
    cast = [None if x is None else x.double() for x in (hs, ht, ws, wt, bs, bt)]
    hs, ht, ws, wt, bs, bt = cast
    hs.requires_grad_(), ws.requires_grad_()
    if bs is not None:
        bs.requires_grad_()
    scale_cap = dict(student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                     student_softcap=student_final_logit_softcapping,
                     teacher_softcap=teacher_final_logit_softcapping)
    total = reference.fused_linear_divergence(hs, ht, ws, wt, student_bias=bs, teacher_bias=bt, mask=mask != 0,
                                              temperature=temperature, reduction="sum", divergence="jsd",
                                              beta=beta, **scale_cap)
    n_valid = int((mask != 0).sum())
    loss = total / (max(n_valid, 1) if num_items_in_batch is None else float(num_items_in_batch))
    loss.backward()
    stats = reference.token_statistics(hs.detach(), ht, ws.detach(), wt, student_bias=None if bs is None else bs.detach(),
                                       teacher_bias=bt, temperature=temperature, **scale_cap)
    entropy_sum = (stats["student_entropy"] * (mask.reshape(-1) != 0)).sum()
    return loss.detach(), entropy_sum, n_valid, hs.grad, ws.grad, None if bs is None else bs.grad


def _assert_close(actual, expected, *, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


OPTIONS = {
    "plain": {},
    "temperature": dict(temperature=0.7),
    "scale": dict(student_logit_scale=1.7, teacher_logit_scale=0.6),
    "softcap": dict(student_final_logit_softcapping=2.5, teacher_final_logit_softcapping=4.0),
    "everything": dict(temperature=1.3, student_logit_scale=0.8, teacher_logit_scale=1.4,
                       student_final_logit_softcapping=3.0, teacher_final_logit_softcapping=2.0,
                       num_items_in_batch=11),
    "num_items_tensor": dict(num_items_in_batch=torch.tensor(29)),
}


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_matches_trl_and_fp64_reference(seed, beta, case):
    options = OPTIONS[case]
    inputs = _inputs(torch.float32)
    ours = _run(crisp_trl.chunked_divergence_loss, *inputs, beta, **options)
    theirs = _run(TRL_LOSS, *inputs, beta, **options)
    truth = _truth(*inputs, beta, **options)
    assert ours[2].dtype == theirs[2].dtype and int(ours[2]) == int(theirs[2]) == truth[2]
    assert ours[0].dtype == theirs[0].dtype == torch.float32 and ours[0].dim() == 0
    assert ours[1].requires_grad is False
    names = ("loss", "entropy_sum", None, "grad student_hidden", "grad lm_head_weight", "grad lm_head_bias")
    for name, mine, trls, exact in zip(names, ours, theirs, truth):
        if name is None:
            continue
        # fp32 against fp64: both implementations round alike; ours must be at least as close as ~TRL's
        _assert_close(mine, exact, rtol=2e-5, atol=2e-6, what=f"{name} vs fp64")
        _assert_close(mine, trls, rtol=2e-5, atol=2e-6, what=f"{name} vs TRL")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backends_and_no_bias(seed, backend):
    inputs = _inputs(torch.float32, bias=False, d_teacher=24)
    loss_fn = lambda *a, **k: crisp_trl.chunked_divergence_loss(*a, backend=backend, **k)  # noqa: E731
    ours = _run(loss_fn, *inputs, 0.5, temperature=2.0)
    theirs = _run(TRL_LOSS, *inputs, 0.5, temperature=2.0)
    for mine, trls in zip(ours[:2] + ours[3:5], theirs[:2] + theirs[3:5]):
        _assert_close(mine, trls, rtol=2e-5, atol=2e-6, what=f"backend={backend}")
    assert ours[5] is None


def test_shared_head_self_distillation(seed):
    """One lm_head for both sides (teacher_lm_head_weight is the student's): same values as TRL,
    and only the student side's gradient reaches the shared weight."""
    hs, ht, ws, _, bs, bt, mask = _inputs(torch.float32, d_teacher=24)
    results = []
    for loss_fn in (crisp_trl.chunked_divergence_loss, TRL_LOSS):
        weight = ws.clone().requires_grad_()
        hidden = hs.clone().requires_grad_()
        loss, entropy_sum, _ = loss_fn(hidden, ht, weight, weight, mask, 1.0, student_lm_head_bias=bs,
                                       teacher_lm_head_bias=bt)
        loss.backward()
        results.append((loss.detach(), entropy_sum, hidden.grad, weight.grad))
    for mine, trls in zip(*results):
        _assert_close(mine, trls, rtol=2e-5, atol=2e-6, what="shared head")


def test_fully_masked_rank_is_a_finite_zero(seed):
    inputs = _inputs(torch.float32, fully_masked=True)
    loss, entropy_sum, n_valid, grad_hidden, grad_weight, _ = _run(crisp_trl.chunked_divergence_loss, *inputs, 0.5)
    assert loss.item() == 0.0 and entropy_sum.item() == 0.0 and int(n_valid) == 0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0
    theirs = _run(TRL_LOSS, *inputs, 0.5)
    assert theirs[0].item() == 0.0


def test_autocast_bf16_as_close_to_fp64_as_trl(seed):
    """Under CPU autocast both project in bf16 (TRL's `_compute_dtype`), and fp32 master weights get
    fp32 grads. The truth is fp64 on the bf16-rounded hidden states and weights; ours must be about as close to it as TRL's
    (Cut Cross-Entropy's test: the error is bounded by that of the native-precision baseline)."""
    inputs = _inputs(torch.float32)
    results = []
    for loss_fn in (crisp_trl.chunked_divergence_loss, TRL_LOSS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(loss_fn, *inputs, 0.5, temperature=0.9))
    ours, theirs = results
    hs, ht, ws, wt, bs, bt, mask = inputs
    rounded = [x.bfloat16().float() for x in (hs, ht, ws, wt)]
    truth = _truth(*rounded, bs, bt, mask, 0.5, temperature=0.9)
    assert ours[4].dtype == torch.float32
    for index, name in ((0, "loss"), (1, "entropy"), (3, "dh"), (4, "dW")):
        error_ours = (ours[index].double() - truth[index]).abs().max().item()
        error_trl = (theirs[index].double() - truth[index]).abs().max().item()
        # twice TRL's error, or bf16's half-ulp of the largest entry: both are rounding, not math
        assert error_ours <= 2 * error_trl + 2**-9 * truth[index].abs().max().item(), (
            f"autocast {name}: ours {error_ours:.3g} vs TRL {error_trl:.3g}")
        _assert_close(ours[index], theirs[index], rtol=5e-3, atol=1e-5, what=f"autocast {name}")


def test_bf16_inputs_close_to_fp64(seed):
    inputs = _inputs(torch.bfloat16)
    ours = _run(crisp_trl.chunked_divergence_loss, *inputs, 1.0, temperature=1.5)
    truth = _truth(*inputs, 1.0, temperature=1.5)
    assert ours[3].dtype == ours[4].dtype == torch.bfloat16
    for name, mine, exact in zip(("loss", "entropy", None, "dh", "dW"), ours, truth):
        if name is not None:
            _assert_close(mine, exact, rtol=2e-2, atol=1e-3, what=f"bf16 {name}")


def test_bad_inputs_raise_clear_errors(seed):
    hs, ht, ws, wt, bs, bt, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        crisp_trl.chunked_divergence_loss(hs, ht, ws, wt[:-1], mask, 0.5)
    with pytest.raises(ValueError, match="beta"):
        crisp_trl.chunked_divergence_loss(hs, ht, ws, wt, mask, 1.5)
    with pytest.raises(ValueError, match="mask"):
        crisp_trl.chunked_divergence_loss(hs, ht, ws, wt, mask[:, :-1], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        crisp_trl.chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, temperature=0.0)


def test_fsdp2_dtensor_heads_are_gathered(seed):
    """DTensor weights (a one-process gloo mesh) give the values and the (DTensor) gradient TRL gives."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    with tempfile.NamedTemporaryFile() as store_file:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(store_file.name, 1))
        try:
            mesh = init_device_mesh("cpu", (1,))
            hs, ht, ws, wt, _, _, mask = _inputs(torch.float32)
            results = []
            for loss_fn in (crisp_trl.chunked_divergence_loss, TRL_LOSS):
                weight = torch.nn.Parameter(distribute_tensor(ws.clone(), mesh, [Shard(0)]))
                teacher_weight = distribute_tensor(wt.clone(), mesh, [Shard(0)])
                hidden = hs.clone().requires_grad_()
                loss, entropy_sum, _ = loss_fn(hidden, ht, weight, teacher_weight, mask, 0.5, temperature=1.2)
                loss.backward()
                assert isinstance(weight.grad, DTensor)
                results.append((loss.detach(), entropy_sum, hidden.grad, weight.grad.full_tensor()))
        finally:
            dist.destroy_process_group()
    for mine, trls in zip(*results):
        _assert_close(mine, trls, rtol=2e-5, atol=2e-6, what="DTensor head")


# --------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------
def test_patch_undo_context_manager_and_nesting():
    assert not crisp_trl.is_patched()
    handle = crisp_trl.patch_distillation_trainer()
    assert crisp_trl.is_patched() and handle.active
    assert distillation_trainer._chunked_divergence_loss is not TRL_LOSS
    handle.undo()
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS and not crisp_trl.is_patched()
    handle.undo()  # a second undo changes nothing
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS

    with crisp_trl.patch_distillation_trainer(backend="torch") as outer:
        outer_function = distillation_trainer._chunked_divergence_loss
        with crisp_trl.patch_distillation_trainer(backend="auto"):
            assert distillation_trainer._chunked_divergence_loss._crisp_fast_backend == "auto"
        assert distillation_trainer._chunked_divergence_loss is outer_function
        assert outer_function._crisp_fast_backend == "torch"
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS

    crisp_trl.patch_distillation_trainer()
    crisp_trl.patch_distillation_trainer()
    crisp_trl.unpatch_distillation_trainer()
    assert distillation_trainer._chunked_divergence_loss is TRL_LOSS


def test_patched_name_is_what_the_trainer_calls(seed):
    """The patched module global computes crisp_fast's value (the trainer looks the name up per step)."""
    inputs = _inputs(torch.float32)
    calls = []
    with crisp_trl.patch_distillation_trainer(backend="torch"):
        original = crisp_trl.chunked_divergence_loss
        crisp_trl.chunked_divergence_loss = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            patched = _run(distillation_trainer._chunked_divergence_loss, *inputs, 0.5)
        finally:
            crisp_trl.chunked_divergence_loss = original
    assert calls == [1]
    _assert_close(patched[0], _run(TRL_LOSS, *inputs, 0.5)[0], rtol=2e-5, atol=2e-6, what="patched")


# --------------------------------------------------------------------------------------------
# the trainer, end to end
# --------------------------------------------------------------------------------------------
def _tokenizer():
    """A WordLevel tokenizer built here (no hub) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>", "<end>", "plus", "is"] + [str(i) for i in range(24)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <end> ' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")
    return tokenizer


def _tiny_qwen3(vocab, hidden, seed):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return Qwen3ForCausalLM(config)


def _train_and_log(beta, patched, workdir):
    from datasets import Dataset

    tokenizer = _tokenizer()
    prompts = [[{"role": "user", "content": f"{i} plus {i + 3} is"}] for i in range(8)]
    config = trl.DistillationConfig(
        output_dir=workdir, use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, logging_steps=1, report_to="none", max_completion_length=6, beta=beta,
        temperature=0.9, learning_rate=1e-2, gradient_checkpointing=False, save_strategy="no", seed=5)
    # student 32 wide, teacher 48 wide: the two heads have different hidden sizes
    trainer = trl.DistillationTrainer(model=_tiny_qwen3(len(tokenizer), 32, 0),
                                      teacher_model=_tiny_qwen3(len(tokenizer), 48, 1), args=config,
                                      train_dataset=Dataset.from_dict({"prompt": prompts}),
                                      processing_class=tokenizer)
    switch = crisp_trl.patch_distillation_trainer(backend="torch") if patched else contextlib.nullcontext()
    with switch:
        trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry and "entropy" in entry]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trainer_logs_match_unpatched(beta, tmp_path):
    """Same seed, same on-policy samples: the logged loss, entropy and grad norm agree to fp32
    rounding (rtol 1e-4) at every step, so the trajectories stay together."""
    unpatched = _train_and_log(beta, False, str(tmp_path / "trl"))
    patched = _train_and_log(beta, True, str(tmp_path / "crisp"))
    assert len(unpatched) == len(patched) == 3
    for step, (theirs, ours) in enumerate(zip(unpatched, patched)):
        assert ours["num_tokens"] == theirs["num_tokens"], f"step {step}: the rollouts differ"
        assert theirs["loss"] > 0
        for key in ("loss", "entropy", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), f"step {step} {key}"
