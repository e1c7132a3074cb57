"""LoRA through peft: the student is base + adapters and the M = 0 teacher the same module with
its adapters disabled (no snapshot); the step's loss and adapter gradients match a float64
materialised reference; only the adapters change; M = N snapshots hold the adapters only; a
frozen head skips the weight-gradient GEMM in the torch and native backends; the export is a
merged HF model plus the PEFT adapter that both reproduce the student's logits; 2 FSDP2 gloo
processes match one. Budget: ~40 s plus ~60-90 s for the 2-process test on 2 CPU cores."""
import copy
import os
import random

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from crisp_fast import fused_linear_divergence
from crisp_fast.generation import Generation
from crisp_fast.train import Trainer
from crisp_fast.train.teacher import local_tensor
from crisp_fast.train.tiny import tiny_config, write_problems

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]


def make_trainer(tmp_path, overrides=()):
    data = write_problems(tmp_path / "problems.jsonl", count=8, seed=random.randint(0, 10**6))
    return Trainer(tiny_config(data, tmp_path / "out", [*LORA, *overrides]))


def random_rollouts(trainer, prompts=2, n=2):
    pairs = trainer.stream.take(prompts)
    generations = [Generation(i, s, [random.randint(4, 99) for _ in range(random.randint(1, 9))], "length")
                   for i in range(prompts) for s in range(n)]
    return pairs, generations


def adapter_parameters(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def perturb_adapters(model):
    """peft starts B at 0 (student = base); give every adapter a random B so the KL is far from 0."""
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)


def naive_lora_loss(peft_reference, rows):
    """Float64 full logits: student with adapters, teacher with adapters disabled, mean KL per token."""
    per_row = []
    for pair, response in rows:
        s_in = torch.tensor([pair.student_ids + response[:-1]])
        t_in = torch.tensor([pair.teacher_ids + response[:-1]])
        log_p = peft_reference(input_ids=s_in).logits[0, len(pair.student_ids) - 1:].log_softmax(-1)
        with torch.no_grad(), peft_reference.disable_adapter():
            log_q = peft_reference(input_ids=t_in).logits[0, len(pair.teacher_ids) - 1:].log_softmax(-1)
        per_row.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(per_row).sum() / sum(len(r) for r in per_row)


def test_lora_step_base_teacher_matches_reference_and_trains_adapters_only(tmp_path, seed):
    trainer = make_trainer(tmp_path, ["train.teacher_refresh_every=0", "train.grad_clip=1.0e9"])
    model = trainer.model
    assert trainer.teacher.mode == "base" and trainer.teacher.bytes() == 0 and trainer.teacher.snapshot is None
    assert trainer.teacher.head_source == "shared"
    assert not model.lm.get_output_embeddings().weight.requires_grad
    adapters = adapter_parameters(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and sorted(trainable) == sorted(adapters)
    # every decoder linear is adapted by default (q, k, v, o, gate, up, down), the lm_head never
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(len(group["params"]) == len(adapters) for group in trainer.optimizer.param_groups)
    perturb_adapters(model)

    reference = copy.deepcopy(model.peft).double()
    pairs, generations = random_rollouts(trainer)
    rows = [(pairs[g.prompt_index], g.token_ids) for g in generations]
    expected = naive_lora_loss(reference, rows)
    expected.backward()
    reference_grads = {name.removeprefix("base_model.model."): p.grad for name, p in reference.named_parameters()
                       if p.grad is not None}
    captured, original_step = {}, trainer.optimizer.step

    def capture_then_step(*args, **kwargs):
        captured.update({name.removeprefix("lm."): p.grad.detach().clone() for name, p in model.named_parameters()
                         if p.grad is not None})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture_then_step
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {name: p.detach().clone() for name, p in adapters.items()}
    metrics = trainer.train_on_rollouts(pairs, generations)

    assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-7)
    assert float(expected.detach()) > 1e-3
    assert captured.keys() == reference_grads.keys()  # gradients for the adapters and nothing else
    for name, grad in reference_grads.items():
        torch.testing.assert_close(captured[name].double(), grad, rtol=2e-3, atol=1e-7, msg=name)
    assert all(torch.equal(p, frozen_before[name]) for name, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, adapters_before[name]) for name, p in adapters.items())
    assert metrics["trainable_parameters"] == sum(p.numel() for p in adapters.values())
    assert metrics["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 5


def test_lora_snapshot_holds_adapters_only_and_live_teacher(tmp_path, seed):
    trainer = make_trainer(tmp_path / "m2", ["train.teacher_refresh_every=2"])
    adapters = adapter_parameters(trainer.model)
    assert trainer.teacher.mode == "snapshot" and trainer.teacher.head_source == "shared"
    assert trainer.teacher.names == [f"{name}" for name in adapters]
    assert trainer.teacher.bytes() == sum(p.numel() * p.element_size() for p in adapters.values())
    refreshed = [trainer.train_on_rollouts(*random_rollouts(trainer))["teacher_refreshed"] for _ in range(2)]
    assert refreshed == [False, True]
    for saved, p in zip(trainer.teacher.snapshot, adapters.values()):
        assert torch.equal(saved, local_tensor(p))

    # M = 1 with LoRA: the documented meaning is that of full fine-tuning, the live student
    # (base + adapters) in the teacher's context: the teacher pass gives the student's hidden states
    live = make_trainer(tmp_path / "m1", ["train.teacher_refresh_every=1"])
    perturb_adapters(live.model)
    assert live.teacher.live and live.teacher.bytes() == 0
    from crisp_fast.train.batching import side_inputs

    inputs = side_inputs([[5, 6, 7]], [[8, 9]], live.pad_id, "right", torch.device("cpu"))
    with torch.no_grad():
        with live.teacher.swapped_in():
            teacher_hidden, head = live.model(*inputs.as_args())
        student_hidden, _ = live.model(*inputs.as_args())
        with live.model.peft.disable_adapter():
            base_hidden, _ = live.model(*inputs.as_args())
    assert head is None and torch.equal(teacher_hidden, student_hidden)
    assert not torch.allclose(base_hidden, student_hidden)


def test_lora_target_modules_checked_against_the_model(tmp_path, seed):
    with pytest.raises(ValueError, match=r"'qkv_proj' not in Qwen3ForCausalLM's decoder; its linear layers are: "
                                         r"q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"):
        make_trainer(tmp_path, ["model.lora.target_modules=[q_proj, qkv_proj]"])
    with pytest.raises(ValueError, match="must not include the lm_head"):
        make_trainer(tmp_path, ["model.lora.target_modules=[lm_head]"])
    only_q = make_trainer(tmp_path, ["model.lora.target_modules=[q_proj]"])
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter_parameters(only_q.model)} == {"q_proj"}


class MatmulCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.rstrip("_") in ("mm", "addmm", "bmm", "baddbmm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_frozen_head_skips_the_weight_gradient(backend, seed, monkeypatch):
    from crisp_fast.loss import available_backends, backend_module

    if available_backends()[backend] != "ok":
        pytest.skip(f"{backend}: {available_backends()[backend]}")
    module = backend_module(backend)
    seen = []
    original = module.forward_backward

    def spy(*args, **kwargs):
        stats, grads = original(*args, **kwargs)
        seen.append((args[3] is None, kwargs["need_grad_weight"], grads[1] is None))
        return stats, grads

    monkeypatch.setattr(module, "forward_backward", spy)
    n, d, vocab = random.randint(3, 40), random.randint(4, 48), random.randint(50, 700)
    h_s, h_t, weight = torch.randn(n, d), torch.randn(n, d), torch.randn(vocab, d) / d ** 0.5
    counts = {}
    for weight_trains in (True, False):
        hidden, w = h_s.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
        counter = MatmulCounter()
        with counter:
            loss = fused_linear_divergence(hidden, h_t, w, None, reduction="sum", backend=backend)
            loss.backward()
        counts[weight_trains] = counter.count
        assert (w.grad is not None) == weight_trains
        expected = hidden.detach().double()
        reference = torch.nn.functional.log_softmax(expected @ weight.double().T, -1)
        q = torch.nn.functional.log_softmax(h_t.double() @ weight.double().T, -1)
        kl = (reference.exp() * (reference - q)).sum()
        assert float(loss) == pytest.approx(float(kl), rel=1e-4, abs=1e-5)
    # the shared-W path, asked for no weight gradient when the weight is frozen, and none made
    assert seen == [(True, True, False), (True, False, True)]
    if backend == "torch":  # its GEMMs are visible to the dispatcher: the dW one is gone
        assert counts[True] - counts[False] >= 1


def test_lora_export_merged_and_adapter(tmp_path, seed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, ["train.teacher_refresh_every=0"])
    perturb_adapters(trainer.model)
    trainer.train_on_rollouts(*random_rollouts(trainer))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    out = trainer.export(tmp_path / "export" / "hf")
    # the merge happens out of place: the live model (whose tensors the state dict holds) is untouched
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert (out / "model.safetensors").is_file()
    assert (tmp_path / "export" / "hf-adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[random.randint(4, 99) for _ in range(7)]])
    with torch.no_grad():
        student = trainer.model.lm(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, student, rtol=1e-4, atol=1e-5)
        with trainer.model.peft.disable_adapter():
            base_logits = trainer.model.lm(input_ids=ids).logits
        base = copy.deepcopy(trainer.model.peft).unload()  # the base model, adapters removed unmerged
        torch.testing.assert_close(base(input_ids=ids).logits, base_logits, rtol=1e-5, atol=1e-6)
        adapted = PeftModel.from_pretrained(base, tmp_path / "export" / "hf-adapter")
        torch.testing.assert_close(adapted(input_ids=ids).logits, student, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ FSDP2, 2 ranks
def fsdp_worker(rank, world, port, config_args, plan, out_dir):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    from test_train_fsdp import run_steps

    trainer = Trainer(tiny_config(*config_args))
    torch.save(run_steps(trainer, plan, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_lora_under_fsdp2_two_processes_matches_one(tmp_path, seed):
    from test_train_fsdp import STEPS, free_port, run_steps

    data = write_problems(tmp_path / "problems.jsonl", count=8, seed=seed)
    overrides = [*LORA, "train.prompts_per_step=4", "train.teacher_refresh_every=2", "train.micro_batch_tokens=96",
                 "rollout.temperature=0.0", "rollout.n=1", "rollout.max_new_tokens=6", "train.lr=1.0e-2"]
    config_args = (str(data), str(tmp_path / "out"), overrides)
    plan = [[(i, [random.randint(4, 99) for _ in range(random.randint(1, 10))]) for i in range(4)]
            for _ in range(STEPS)]
    single = run_steps(Trainer(tiny_config(*config_args)), plan, 0, 1)
    mp.start_processes(fsdp_worker, args=(2, free_port(), config_args, plan, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["greedy"] + ranks[1]["greedy"] == single["greedy"]
    assert single["refreshes"] == ranks[0]["refreshes"] == [2]
    for r in ranks:
        assert r["losses"][0] == pytest.approx(single["losses"][0], rel=0, abs=2e-6)
        assert r["losses"] == pytest.approx(single["losses"], rel=5e-3, abs=2e-6)
    assert ranks[0]["weights"].keys() == single["weights"].keys()
    changed = 0
    for name, expected in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], expected, rtol=0, atol=1e-4, msg=name)
        changed += "lora_" in name and not torch.equal(expected, torch.zeros_like(expected))
    assert changed  # the adapters trained (B moved away from 0)
