"""The one model: loading (path, hub name, or built from a config), the tiny built-in tokenizer,
and `CrispModel`, the single nn.Module whose forward serves both contexts.

`CrispModel.forward` returns hidden states (teacher pass) or the fused loss (student pass); it is
the FSDP2 root, so the lm_head weight is gathered by FSDP's own hooks for exactly the span of
the call and its gradient is reduce-scattered like any other. Logits are never formed: the
decoder's final hidden states at the response-predicting positions go to
`crisp_fast.fused_linear_divergence` with the lm_head weight (and the model's logit
transforms: scale, softcap, bias).
"""
from __future__ import annotations

import importlib.util
import string
from typing import NamedTuple

import torch
from torch import nn

from crisp_fast.loss import fused_linear_divergence

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline) with Qwen-style chat markers, built
    offline: <|im_end|> ends a turn (EOS), <|endoftext|> pads."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {token: index for index, token in enumerate(TINY_SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tokenizer_source(model_config) -> str:
    """Where the tokenizer comes from: `model.tokenizer`, else the model's own folder (the
    built-in tiny-char tokenizer for a model built from a config)."""
    if model_config.tokenizer:
        return model_config.tokenizer
    return "tiny-char" if model_config.source == "build" else model_config.source


def load_tokenizer(model_config):
    source = tokenizer_source(model_config)
    if source == "tiny-char":
        return tiny_char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=model_config.trust_remote_code)


def attention_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(model_config, tokenizer, device: torch.device):
    """The HF causal LM named by `model_config` (master weights in `model_config.dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, model_config.dtype)
    attn = attention_implementation(model_config.attn_implementation, device)
    if model_config.source == "build":
        spec = dict(model_config.build)
        architecture = spec.pop("architecture", "qwen3")
        spec.setdefault("vocab_size", len(tokenizer))
        spec.setdefault("eos_token_id", tokenizer.eos_token_id)
        spec.setdefault("pad_token_id", tokenizer.pad_token_id)
        if spec["vocab_size"] < len(tokenizer):
            raise ValueError(f"model.build.vocab_size={spec['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
        config = AutoConfig.for_model(architecture, **spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_config.seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_config.source, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=model_config.trust_remote_code)
    if device.type == "cuda" and model_config.liger != "off":
        _apply_liger(model, required=model_config.liger == "on")
    check_logit_pipeline(model, logit_transform(model))
    return model


def _apply_liger(model, required: bool):
    """Liger's Triton RMSNorm / RoPE / SwiGLU patches (not its loss: the loss is ours)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if required:
            raise
        return
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def prepare_model(lm, model_config, device: torch.device) -> "CrispModel":
    """The trained module: `lm` with LoRA adapters when `model.lora.enabled`, as a CrispModel,
    on `device` and FSDP2-wrapped as `crisp_fast.train.fsdp.wrap` decides."""
    from crisp_fast.train.fsdp import wrap

    peft = None
    if model_config.lora.enabled:
        from crisp_fast.train.lora import apply_lora

        # peft draws A at random: seeded like the weights, so every rank (and a rerun) starts alike
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_config.seed)
            peft = apply_lora(lm, model_config.lora)
    return wrap(CrispModel(lm, peft), device, model_config.mixed_precision, model_config.cpu_offload)


def base_teacher(crisp_model):
    """peft's `disable_adapter` context factory when the model carries LoRA adapters, else None."""
    peft = getattr(crisp_model, "peft", None)
    return None if peft is None else peft.disable_adapter


class LogitTransform(NamedTuple):
    """What the model does between the decoder's last hidden state and its logits, in the fused
    loss's terms: z = (h W^T + b) * scale, then softcap * tanh(z / softcap) (crisp_fast.reference)."""

    scale: float = 1.0
    softcap: float | None = None


def logit_transform(lm) -> LogitTransform:
    """Read the model's logit transforms from its config: Gemma-2/3 `final_logit_softcapping`,
    Cohere `logit_scale` (a multiplier), Granite `logits_scaling` (a divisor). An lm_head bias is
    taken from the module itself. Anything else is caught by `check_logit_pipeline`."""
    config = lm.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    granite = getattr(config, "logits_scaling", None)
    if granite:
        scale /= float(granite)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


@torch.no_grad()
def check_logit_pipeline(lm, transform: LogitTransform) -> None:
    """Run a few tokens through the HF model's own forward and through the path the loss takes
    (decoder -> final hidden state -> lm_head with `transform`): if the logits differ, the model
    does something to its logits that the fused loss would not, and training would fit the wrong
    distribution, so refuse. One tiny forward at load time."""
    head = lm.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(lm).__name__} has no lm_head (get_output_embeddings() is None): not a causal LM")
    vocab = head.weight.shape[0]
    ids = (torch.arange(1, 9, device=head.weight.device) * 7919 % vocab).unsqueeze(0)
    was_training = lm.training
    lm.eval()
    try:
        expected = lm(input_ids=ids, use_cache=False).logits.float()
        hidden = lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        # the GEMM in the model's dtype (as its own forward does), the transforms in fp32 as the loss does
        ours = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None)).float() * transform.scale
        if transform.softcap is not None:
            ours = transform.softcap * torch.tanh(ours / transform.softcap)
    finally:
        lm.train(was_training)
    tolerance = (2e-2 if head.weight.dtype != torch.float32 else 1e-4) * (1.0 + float(expected.abs().max()))
    error = float((ours - expected).abs().max())
    if not error <= tolerance:
        raise ValueError(
            f"{type(lm).__name__}: its logits are not lm_head(final hidden state) with the transforms the fused loss "
            f"supports (scale {transform.scale}, softcap {transform.softcap}, lm_head bias): max |difference| "
            f"{error:.3g} > {tolerance:.3g}. This model transforms its logits in a way crisp-fast cannot reproduce; "
            "training it would fit the wrong distribution")


class TeacherHead(NamedTuple):
    """The teacher's lm_head weight and bias (None: no bias), when they are not the student's."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


class CrispModel(nn.Module):
    """One model, two contexts. `lm` is a Hugging Face causal LM; `peft` the PeftModel handle
    when LoRA adapters are injected into `lm` (kept outside the module tree: its parameters are
    `lm`'s, and registering it would name each of them twice in the state dict)."""

    def __init__(self, lm: nn.Module, peft=None):
        super().__init__()
        self.lm = lm
        object.__setattr__(self, "peft", peft)
        self.logit_transform = logit_transform(lm)

    def response_hidden(self, input_ids, attention_mask, position_ids, gather_index):
        """Final hidden states (after the last norm) at the flattened positions `gather_index`.
        `attention_mask=None` means one packed row (crisp_fast.train.packing): the sequences are
        where `position_ids` restart at 0, and attention stays inside each."""
        decoder = self.lm.get_decoder()
        if attention_mask is None:
            from crisp_fast.train.packing import packed_decoder_kwargs, packed_forward

            with packed_forward():
                hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 **packed_decoder_kwargs(position_ids)).last_hidden_state
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather_index)

    def forward(self, input_ids, attention_mask, position_ids, gather_index, *, teacher_hidden=None,
                teacher_head: TeacherHead | None = None, token_weights=None, backend="auto", copy_head=False,
                divergence="reverse_kl", beta=1.0, temperature=1.0, teacher_entropy=False, workspace_bytes=None):
        """Teacher mode (`teacher_hidden is None`): returns (hidden [N, D], TeacherHead or None);
        the head is copied only with `copy_head` (FSDP: the gathered teacher head is freed when
        the root reshards, and a snapshot shard is not the full head). Student mode: returns
        (sum_i w_i D_i, TokenStats, teacher entropy or None); `teacher_head=None` means the
        teacher shares the student's lm_head tensor (the fused loss's shared-weight path)."""
        hidden = self.response_hidden(input_ids, attention_mask, position_ids, gather_index)
        head_module = self.lm.get_output_embeddings()
        head, bias = head_module.weight, getattr(head_module, "bias", None)
        if teacher_hidden is None:
            if not copy_head:
                return hidden, None
            return hidden, TeacherHead(head.detach().clone(), None if bias is None else bias.detach().clone())
        transform = self.logit_transform
        teacher_weight = None if teacher_head is None else teacher_head.weight.to(head.dtype)
        teacher_bias = bias if teacher_head is None else teacher_head.bias
        options = dict(temperature=temperature, student_logit_scale=transform.scale,
                       teacher_logit_scale=transform.scale, student_softcap=transform.softcap,
                       teacher_softcap=transform.softcap, backend=backend, workspace_bytes=workspace_bytes)
        loss, stats = fused_linear_divergence(hidden, teacher_hidden.to(hidden.dtype), head, teacher_weight,
                                              student_bias=bias, teacher_bias=teacher_bias,
                                              token_weights=token_weights, reduction="sum", divergence=divergence,
                                              beta=beta if divergence == "jsd" else 1.0, return_stats=True, **options)
        # the teacher's entropy comes out of the same fused pass (the kernels hold its log-sum-exp)
        entropy = stats.teacher_entropy if teacher_entropy else None
        return loss, stats, entropy
