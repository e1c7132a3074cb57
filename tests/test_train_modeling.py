"""The model side of the trainer: the model's logit transforms (Gemma-2 softcapping, Cohere
logit scale, an lm_head bias) and the loss options (divergence, jsd beta, loss temperature)
reach the fused loss, checked against the HF model's own logits in float64; a model whose logits
the loss cannot reproduce is refused; bf16 mixed precision and CPU offload in one process go
through FSDP2 on a 1-rank group (bf16 compute, fp32 master weights, gradients and optimizer
state). Budget: ~60 s on 2 CPU cores."""
import math
import random

import pytest
import torch

from crisp_fast.generation import Generation
from crisp_fast.train import Trainer
from crisp_fast.train.modeling import check_logit_pipeline, logit_transform
from crisp_fast.train.teacher import local_tensor
from crisp_fast.train.tiny import tiny_config, write_problems

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512}
ARCHITECTURES = {
    "qwen3": {},
    # softcap and scale chosen so that they change the logits a lot (tiny models' logits are ~1)
    "gemma2": {"final_logit_softcapping": 0.7, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 8,
               "sliding_window": 16},
    "cohere": {"logit_scale": 3.0},
    "phi": {"partial_rotary_factor": 0.5},  # its lm_head has a bias
}


def make_trainer(tmp_path, overrides=(), architecture="qwen3"):
    data = write_problems(tmp_path / "problems.jsonl", count=8, seed=random.randint(0, 10**6))
    build = dict(TINY, architecture=architecture, **ARCHITECTURES[architecture])
    if architecture == "phi":
        build.pop("head_dim")
    extra = ["model.attn_implementation=eager"] if architecture == "gemma2" else []
    return Trainer(tiny_config(data, tmp_path / "out", [*extra, *overrides], **build))


def random_rollouts(trainer, prompts=2, n=2):
    pairs = trainer.stream.take(prompts)
    generations = [Generation(i, s, [random.randint(4, 99) for _ in range(random.randint(1, 8))], "length")
                   for i in range(prompts) for s in range(n)]
    return pairs, generations


def float64_copy(lm, tensors=None):
    import copy

    reference = copy.deepcopy(lm).double().eval()
    if tensors is not None:
        with torch.no_grad():
            for parameter, tensor in zip(reference.parameters(), tensors):
                parameter.copy_(tensor.double())
    return reference


def materialised_divergence(student_lm, teacher_lm, rows, divergence, beta, temperature):
    """The HF models' own logits (float64) -> tempered log-softmax -> divergence, mean per token."""
    per_row, teacher_entropy = [], []
    for pair, response in rows:
        s_in = torch.tensor([pair.student_ids + response[:-1]])
        t_in = torch.tensor([pair.teacher_ids + response[:-1]])
        log_p = (student_lm(input_ids=s_in).logits[0, len(pair.student_ids) - 1:] / temperature).log_softmax(-1)
        log_q = (teacher_lm(input_ids=t_in).logits[0, len(pair.teacher_ids) - 1:] / temperature).log_softmax(-1)
        p, q = log_p.exp(), log_q.exp()
        if divergence == "reverse_kl":
            value = (p * (log_p - log_q)).sum(-1)
        elif divergence == "forward_kl":
            value = (q * (log_q - log_p)).sum(-1)
        else:
            log_m = (beta * q + (1 - beta) * p).log()
            value = beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
        per_row.append(value)
        teacher_entropy.append(-(q * log_q).sum(-1))
    tokens = sum(len(r) for r in per_row)
    return torch.cat(per_row).sum() / tokens, torch.cat(teacher_entropy).sum() / tokens


@pytest.mark.parametrize("architecture,divergence,beta,temperature", [
    ("gemma2", "reverse_kl", 1.0, 1.0),
    ("cohere", "forward_kl", 1.0, 0.7),
    ("phi", "jsd", 0.3, 1.0),
    ("qwen3", "jsd", 0.8, 1.6),
])
def test_logit_transforms_and_loss_options_match_the_hf_logits(tmp_path, seed, architecture, divergence, beta,
                                                               temperature):
    trainer = make_trainer(tmp_path, ["train.teacher_refresh_every=0", f"train.divergence={divergence}",
                                      f"train.jsd_beta={beta}", f"train.loss_temperature={temperature}",
                                      "rollout.temperature=1.0"], architecture)
    lm = trainer.model.lm
    transform = logit_transform(lm)
    if architecture == "gemma2":
        assert transform.softcap == 0.7
    if architecture == "cohere":
        assert transform.scale == 3.0
    if architecture == "phi":
        assert lm.get_output_embeddings().bias is not None
        with torch.no_grad():  # a bias far from 0, so that dropping it would show
            lm.get_output_embeddings().bias.normal_(0.0, 1.0)
    with torch.no_grad():
        for tensor, parameter in zip(trainer.teacher.snapshot, trainer.teacher.parameters):
            tensor.copy_(parameter + 0.3 * parameter.std().nan_to_num(0.1) * torch.randn_like(parameter))
    student = float64_copy(lm)
    index = {id(p): i for i, p in enumerate(trainer.teacher.parameters)}
    teacher = float64_copy(lm, [trainer.teacher.snapshot[index[id(p)]] for p in lm.parameters()])
    pairs, generations = random_rollouts(trainer)
    rows = [(pairs[g.prompt_index], g.token_ids) for g in generations]
    with torch.no_grad():
        expected, entropy = map(float, materialised_divergence(student, teacher, rows, divergence, beta, temperature))
    metrics = trainer.train_on_rollouts(pairs, generations)
    assert expected > 1e-5  # fp32 logits of size ~1 round at ~1e-7, hence abs=1e-7 below
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert metrics["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # the teacher's entropy, logged from the loss's own pass
    assert metrics["teacher_entropy"] == pytest.approx(entropy, rel=1e-5)


def test_a_logit_transform_the_loss_cannot_reproduce_is_refused(tmp_path, seed):
    trainer = make_trainer(tmp_path)
    lm = trainer.model.lm
    check_logit_pipeline(lm, logit_transform(lm))  # the plain model passes
    head = lm.get_output_embeddings()
    original = head.forward
    head.forward = lambda hidden: original(hidden) * 1.5  # what an unknown architecture might do
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM: its logits are not lm_head\(final hidden state\)"):
        check_logit_pipeline(lm, logit_transform(lm))


def captured_step(trainer):
    """One step; returns (metrics, {name: grad dtype/device}, dtypes seen by the first q_proj)."""
    seen, grads = [], {}
    layer = trainer.model.lm.get_decoder().layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, m.weight.dtype, out.dtype)))
    original_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.update({name: (local_tensor(p.grad).dtype, local_tensor(p.grad).device)
                      for name, p in trainer.model.named_parameters() if p.grad is not None})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture
    try:
        metrics = trainer.train_on_rollouts(*random_rollouts(trainer))
    finally:
        hook.remove()
        trainer.optimizer.step = original_step
    return metrics, grads, set(seen)


def test_bf16_in_one_process_keeps_fp32_master_weights(tmp_path, seed):
    from torch.distributed.fsdp import FSDPModule

    state = random.getstate()
    fp32 = make_trainer(tmp_path / "fp32", ["model.mixed_precision=off"])
    random.setstate(state)
    bf16 = make_trainer(tmp_path / "bf16", ["model.mixed_precision=bf16"])
    assert not isinstance(fp32.model, FSDPModule) and isinstance(bf16.model, FSDPModule)
    policy = bf16.model._get_fsdp_state()._mp_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    random.setstate(state)
    reference, _, fp32_seen = captured_step(fp32)
    random.setstate(state)
    metrics, grads, seen = captured_step(bf16)
    assert fp32_seen == {(torch.float32,) * 3}
    assert seen == {(torch.bfloat16,) * 3}  # the forward computes in bf16 ...
    assert grads and {dtype for dtype, _ in grads.values()} == {torch.float32}  # ... gradients land in fp32
    assert {local_tensor(p).dtype for p in bf16.model.parameters()} == {torch.float32}
    optimizer_state = [v for s in bf16.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert optimizer_state and {local_tensor(v).dtype for v in optimizer_state} == {torch.float32}
    assert {local_tensor(s).dtype for s in bf16.teacher.snapshot} == {torch.float32}
    # the same step in bf16 compute: bf16 has 8 bits of mantissa, so agreement to a few percent
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=5e-2, abs=1e-6)
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=5e-2)


def test_cpu_offload_in_one_process(tmp_path, seed):
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    state = random.getstate()
    plain = make_trainer(tmp_path / "plain")
    random.setstate(state)
    offloaded = make_trainer(tmp_path / "offload", ["model.cpu_offload=true"])
    groups = [m for m in offloaded.model.modules() if isinstance(m, FSDPModule)]
    assert len(groups) == offloaded.model.lm.config.num_hidden_layers + 1
    assert all(isinstance(g._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy) for g in groups)
    random.setstate(state)
    reference, _, _ = captured_step(plain)
    random.setstate(state)
    metrics, grads, _ = captured_step(offloaded)
    assert {device.type for _, device in grads.values()} == {"cpu"}
    assert {local_tensor(p).device.type for p in offloaded.model.parameters()} == {"cpu"}
    # fp32 either way, FSDP on one rank changes nothing but where the tensors live
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-8)
    assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
