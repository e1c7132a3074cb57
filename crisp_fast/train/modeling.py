"""The one model: loading (path, hub name, or built from a config), the tiny built-in tokenizer,
and `CrispModel`, the single nn.Module whose forward serves both contexts.

`CrispModel.forward` returns hidden states (teacher pass) or the fused loss (student pass); it is
the FSDP2 root, so the lm_head weight is gathered by FSDP's own hooks for exactly the span of
the call and its gradient is reduce-scattered like any other. Logits are never formed: the
decoder's final hidden states at the response-predicting positions go to
`crisp_fast.fused_linear_reverse_kl` with the lm_head weight.
"""
from __future__ import annotations

import importlib.util
import string

import torch
from torch import nn

from crisp_fast.loss import fused_linear_reverse_kl

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


def load_tokenizer(model_config):
    if model_config.tokenizer == "tiny-char":
        return tiny_char_tokenizer()
    from transformers import AutoTokenizer

    source = model_config.tokenizer or model_config.source
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {source!r} has no chat template; CRISP prompts are chat messages")
    return tokenizer


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
        model = AutoModelForCausalLM.from_pretrained(model_config.source, dtype=dtype, attn_implementation=attn)
    if device.type == "cuda" and model_config.liger != "off":
        _apply_liger(model, required=model_config.liger == "on")
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


class CrispModel(nn.Module):
    """One model, two contexts. `lm` is a Hugging Face causal LM."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

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
                teacher_head=None, token_weights=None, backend="auto", teacher_entropy=False):
        """Teacher mode (`teacher_hidden is None`): returns (hidden [N, D], a detached copy of the
        lm_head weight). Student mode: returns (sum_i w_i KL_i, TokenStats, teacher entropy or
        None), with `teacher_head=None` meaning the teacher shares the student's lm_head."""
        hidden = self.response_hidden(input_ids, attention_mask, position_ids, gather_index)
        head = self.lm.get_output_embeddings().weight
        if teacher_hidden is None:
            return hidden, head.detach().clone()
        loss, stats = fused_linear_reverse_kl(hidden, teacher_hidden.to(hidden.dtype), head,
                                              None if teacher_head is None else teacher_head.to(head.dtype),
                                              token_weights=token_weights, reduction="sum", backend=backend,
                                              return_stats=True)
        entropy = None
        if teacher_entropy:
            with torch.no_grad():  # the teacher's own entropy: its distribution scored against itself
                teacher_weight = head if teacher_head is None else teacher_head.to(head.dtype)
                _, teacher_stats = fused_linear_reverse_kl(teacher_hidden.to(hidden.dtype), teacher_hidden.to(hidden.dtype),
                                                           teacher_weight.detach(), reduction="sum", backend=backend,
                                                           return_stats=True)
                entropy = teacher_stats.student_entropy
        return loss, stats, entropy
