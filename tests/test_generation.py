"""Rollout engines: token-budget batching, HF generate (left padding, exact ids, finish reasons,
seeds) against a hand-written greedy decoder, and the vLLM pieces that run without vLLM.
Budget: ~10 s on 2 CPU cores."""
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from crisp_fast.generation import Generation, SamplingConfig, make_engine
from crisp_fast.generation.batching import plan_batches
from crisp_fast.generation.hf import split_response
from crisp_fast.generation.vllm import hf_parameter_name, iter_full_weights, sampling_params_kwargs, to_generations

EOS, PAD, VOCAB = 3, 0, 40


def tiny_model(seed):
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=EOS,
                         pad_token_id=PAD, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).double().eval()


TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def greedy_reference(model, prompt, max_new_tokens):
    """Greedy decoding without cache, padding or batching: the obviously right answer."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(next_id)
        if next_id == EOS:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("budget", [1, 30, 10_000])
def test_plan_batches_covers_every_prompt_within_budget(seed, budget):
    lengths = [random.randint(1, 20) for _ in range(random.randint(1, 30))]
    batches = plan_batches(lengths, 5, budget, max_batch_size=7)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 7
        if len(batch) > 1:
            assert len(batch) * (max(lengths[i] for i in batch) + 5) <= budget
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches(lengths, 5, 0)


def test_hf_greedy_matches_reference_decoder_with_left_padding(seed):
    model = tiny_model(seed)
    prompts = [[random.randint(4, VOCAB - 1) for _ in range(random.randint(1, 9))] for _ in range(5)]
    # a small budget forces several batches of mixed lengths (left padding inside each)
    engine = make_engine("hf", model, TOKENIZER, max_batch_tokens=60)
    generations = engine.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=12))
    assert [(g.prompt_index, g.sample_index) for g in generations] == [(i, 0) for i in range(5)]
    for generation, prompt in zip(generations, prompts):
        expected = greedy_reference(model, prompt, 12)
        assert generation.token_ids == expected
        assert generation.finish_reason == ("stop" if expected[-1] == EOS else "length")


def test_hf_sampling_is_seeded_and_ordered(seed):
    model = tiny_model(seed)
    prompts = [[5, 6, 7], [8], [9, 10]]
    sampling = SamplingConfig(n=3, temperature=1.0, top_k=5, top_p=0.9, max_new_tokens=8, seed=seed)
    engine = make_engine("hf", model, TOKENIZER, max_batch_tokens=40)
    first, second = engine.generate(prompts, sampling), engine.generate(prompts, sampling)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [(g.prompt_index, g.sample_index) for g in first] == [(p, s) for p in range(3) for s in range(3)]
    for generation in first:
        assert 1 <= len(generation.token_ids) <= 8
        assert EOS not in generation.token_ids[:-1]
        assert all(0 <= t < VOCAB for t in generation.token_ids)
    assert model.training is False


def test_hf_engine_rejects_bad_inputs(seed):
    engine = make_engine("hf", tiny_model(seed), TOKENIZER)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        engine.generate([[4], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingConfig(n=0)
    with pytest.raises(ValueError, match="rollout engine"):
        make_engine("sglang", None, None)


def test_split_response_keeps_first_eos():
    assert split_response([4, 5, EOS, PAD, PAD], [EOS], 5) == ([4, 5, EOS], "stop")
    assert split_response([4, 5, 6], [EOS, 7], 3) == ([4, 5, 6], "length")
    assert split_response([7, 4], [EOS, 7], 2) == ([7], "stop")


def test_vllm_weight_names_and_bounded_groups(seed):
    assert hf_parameter_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert hf_parameter_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="nothing left"):
        hf_parameter_name("_orig_mod")
    model = tiny_model(seed)
    reference = {name: p.detach() for name, p in model.named_parameters()}
    largest = max(p.numel() * p.element_size() for p in reference.values())
    groups = list(iter_full_weights(model, max_bytes=largest, dtype=torch.float32))
    assert len(groups) > 1
    for group in groups:
        assert len(group) == 1 or sum(t.numel() * t.element_size() for _, t in group) <= largest
    streamed = {name: tensor for group in groups for name, tensor in group}
    assert streamed.keys() == reference.keys()
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference[name].float(), rtol=0, atol=0)


def test_vllm_sampling_translation_and_outputs():
    kwargs = sampling_params_kwargs(SamplingConfig(n=2, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=99))
    assert kwargs == {"n": 2, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 99,
                      "skip_special_tokens": False, "detokenize": False}
    assert sampling_params_kwargs(SamplingConfig(seed=4))["seed"] == 4
    assert sampling_params_kwargs(SamplingConfig(), seed=9)["seed"] == 9
    completion = lambda ids, reason: SimpleNamespace(token_ids=ids, finish_reason=reason)  # noqa: E731
    outputs = [SimpleNamespace(outputs=[completion((4, EOS), "stop"), completion((5, 6), "length")]),
               SimpleNamespace(outputs=[completion((7, EOS), "abort")])]
    assert to_generations(outputs, 2, [EOS]) == [Generation(0, 0, [4, EOS], "stop"), Generation(0, 1, [5, 6], "length"),
                                                 Generation(1, 0, [7, EOS], "stop")]
    with pytest.raises(RuntimeError, match="3 prompts"):
        to_generations(outputs, 3, [EOS])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM rollouts need a CUDA GPU")
def test_vllm_engine_greedy_matches_hf(tmp_path, seed):  # pragma: no cover - GPU only
    pytest.importorskip("vllm")
    model = tiny_model(seed).float()
    model.save_pretrained(tmp_path)
    engine = make_engine("vllm", model, TOKENIZER, model_path=str(tmp_path), dtype="float32",
                         gpu_memory_utilization=0.2, enforce_eager=True)
    engine.push_weights(model)
    prompts = [[5, 6, 7], [8, 9]]
    got = engine.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=8))
    expected = make_engine("hf", model, TOKENIZER).generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=8))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]


def test_checkpoint_generation_defaults_do_not_leak(seed):
    """Qwen3 checkpoints ship top_k=20, temperature=0.6; our SamplingConfig must win. With the
    model's own defaults set to top_k=1 (greedy), a leak would make every sample greedy."""
    model = tiny_model(seed)
    model.generation_config.top_k, model.generation_config.temperature = 1, 0.01
    model.generation_config.do_sample = True
    engine = make_engine("hf", model, TOKENIZER)
    prompt = [[5, 6, 7]]
    greedy = engine.generate(prompt, SamplingConfig(temperature=0.0, max_new_tokens=6))[0].token_ids
    samples = engine.generate(prompt, SamplingConfig(n=6, temperature=1.0, top_k=0, max_new_tokens=6, seed=seed))
    assert any(s.token_ids != greedy for s in samples)
    assert len({tuple(s.token_ids) for s in samples}) > 1
