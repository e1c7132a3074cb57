"""How much memory one CRISP step needs, per rank, before anything is loaded.

    crisp-fast plan-memory --config configs/qwen3-8b.yaml --world-size 8 --tokens 10240 --device-memory 80
    plan = plan_memory(load_config("configs/tiny.yaml"), world_size=1, tokens=4096)

The model is built on the meta device from its config (no weights), so the parameter counts are
exact for any architecture transformers knows. Everything else is counted from the shapes:

  parameters     P x bytes(model.dtype) / W                       (FSDP2 shards every parameter)
  gradients      trainable x bytes(model.dtype) / W
  optimizer      AdamW: 2 x trainable x 4 / W (fused: no temporaries during its step)
  teacher        the snapshot (full: P, LoRA: adapters; 0 when M = 1, and for LoRA with M = 0)
                 and, during the teacher pass, a stash of the student's shards when the
                 snapshot's dtype differs (otherwise the two trade places: teacher.py)
  gathered       FSDP2's unsharded copies in the compute dtype (root group + two decoder layers),
                 when sharded (W > 1) or cast (bf16 compute over fp32 masters)
  activations    what autograd saves per token per decoder layer (see `_layer_saved_bytes`, read
                 off a Qwen3/Llama layer with saved_tensors_hooks), x layers x tokens; with
                 checkpointing, one layer input per layer plus one layer's recomputation, whose
                 MLP holds one tile of model.mlp_tile_tokens (train/tiling.py)
  loss buffers   the gathered student and teacher hidden states and d(hidden) (fp32); on CPU also
                 the loss's scratch (train.loss_workspace_mb, default 40% of d(W) + d(hidden));
                 the fused loss's d(W) is the lm_head's gradient (with the gradients)
  rollout        hf: the KV cache for rollout.max_batch_tokens; vllm: its memory fraction

A step's peak is the largest of its phases (rollout, teacher pass, loss, decoder backward,
optimizer step), each the sum of what is alive then. "Tokens" is what one micro-batch forward puts
through the decoder (the packed row). Validated against measured CPU peaks in
tests/test_memory_plan.py; the numbers for Qwen3-8B are in docs/train.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crisp_fast.backends import DEFAULT_WORKSPACE_SHARE

GIB = 1024 ** 3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelShape:
    parameters: int
    head_parameters: int        # lm_head (0 extra when tied: counted once in `parameters`)
    embedding_parameters: int
    layer_parameters: int       # one decoder layer
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    lora_parameters: int = 0    # adapters on every decoder linear (the LoRA default targets)
    lora_rank: int = 0


@dataclass
class Plan:
    mode: str                   # full | lora | offload
    world_size: int
    tokens: int
    checkpointing: bool
    device: dict = field(default_factory=dict)  # component -> bytes on the accelerator
    host: dict = field(default_factory=dict)    # component -> bytes in host memory
    phases: dict = field(default_factory=dict)  # phase -> bytes alive on the device at its peak
    peak: int = 0
    peak_phase: str = ""


def _hf_config(model_config, tokenizer_size: int | None = None):
    from transformers import AutoConfig

    if model_config.source == "build":
        spec = dict(model_config.build)
        architecture = spec.pop("architecture", "qwen3")
        if tokenizer_size is not None:
            spec.setdefault("vocab_size", tokenizer_size)
        return AutoConfig.for_model(architecture, **spec)
    try:
        return AutoConfig.from_pretrained(model_config.source)
    except OSError as error:
        raise ValueError(f"cannot read the model config of model.source={model_config.source!r} ({error}); offline, "
                         "give the shape instead: model.source=build model.build={architecture: ..., ...} "
                         "(docs/train.md shows Qwen3-8B)") from None


def model_shape(model_config, *, hf_config=None, lora_rank: int = 0, lora_targets=None) -> ModelShape:
    """Parameter counts of the model named by `model_config`, built on the meta device."""
    from transformers import AutoModelForCausalLM

    if hf_config is None:
        size = None
        if model_config.source == "build" and "vocab_size" not in model_config.build:
            from crisp_fast.train.modeling import load_tokenizer

            size = len(load_tokenizer(model_config))
        hf_config = _hf_config(model_config, size)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config)
    parameters = sum(p.numel() for p in lm.parameters())  # tied weights once
    head = lm.get_output_embeddings().weight
    embedding = lm.get_input_embeddings().weight
    tied = head is embedding
    layers = list(lm.get_decoder().layers)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    lora = 0
    if lora_rank:
        for name, module in layers[0].named_modules():
            if isinstance(module, torch.nn.Linear) and (lora_targets is None or name.split(".")[-1] in lora_targets):
                lora += lora_rank * (module.in_features + module.out_features)
        lora *= len(layers)
    return ModelShape(
        parameters=parameters, head_parameters=0 if tied else head.numel(), embedding_parameters=embedding.numel(),
        layer_parameters=sum(p.numel() for p in layers[0].parameters()), layers=len(layers), hidden=text.hidden_size,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size, vocab=text.vocab_size, tied=tied, lora_parameters=lora,
        lora_rank=lora_rank)


def _layer_saved_bytes(s: ModelShape, compute: int, lora: bool) -> int:
    """Bytes autograd keeps per token for one Qwen3/Llama decoder layer (SDPA/flash attention),
    read off the real layer with saved_tensors_hooks (tests/test_memory_plan.py checks it):
      each RMSNorm (2, and Qwen3's q/k norms): its input in fp32, one rsqrt, the normalised
        input in the compute dtype; the decoder norms' outputs (the next linear's input) too
      attention: rotated q and k, v, the output (o_proj's input), one log-sum-exp per head
      MLP: gate, up, silu(gate), silu(gate) * up
      LoRA: the rank-r output of each adapter's A (its input is the base linear's)"""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    c, fp32 = compute, 4
    norms = 2 * (s.hidden * fp32 + fp32 + 2 * s.hidden * c)
    attention = (q + kv) * fp32 + (s.heads + s.kv_heads) * fp32 + 3 * (q + kv) * c + s.heads * fp32
    mlp = 4 * s.intermediate * c
    adapters = 7 * s.lora_rank * c if lora else 0
    return norms + attention + mlp + adapters


def _mlp_saved_bytes(s: ModelShape, compute: int) -> int:
    """Per token, the MLP's share of `_layer_saved_bytes`: gate, up, silu(gate), their product."""
    return 4 * s.intermediate * compute


def activation_bytes(s: ModelShape, tokens: int, compute: int, checkpointing: bool, lora: bool = False,
                     mlp_tile_tokens: int = 0) -> int:
    """Saved activations of one micro-batch forward with grad, at the start of its backward; with
    checkpointing, plus the one layer being recomputed (its MLP a tile at a time, train/tiling.py)."""
    saved = saved_at_loss_bytes(s, tokens, compute, checkpointing, lora)
    return saved + (recomputed_layer_bytes(s, tokens, compute, lora, mlp_tile_tokens) if checkpointing else 0)


def saved_at_loss_bytes(s: ModelShape, tokens: int, compute: int, checkpointing: bool, lora: bool = False) -> int:
    """What the decoder's forward leaves saved for backward while the loss runs: every layer's
    saved tensors, or with checkpointing each layer's input only; cos/sin, the final norm, the ids."""
    rotary = 2 * s.head_dim * compute  # cos and sin, once per forward
    final_norm = s.hidden * 4 + 4 + s.hidden * compute
    per_layer = s.hidden * compute if checkpointing else _layer_saved_bytes(s, compute, lora)
    return tokens * (s.layers * per_layer + rotary + final_norm + 8)


def recomputed_layer_bytes(s: ModelShape, tokens: int, compute: int, lora: bool, mlp_tile_tokens: int) -> int:
    """One checkpointed layer's recomputation in backward: all it saves, its MLP for one tile."""
    mlp = _mlp_saved_bytes(s, compute)
    tile = min(tokens, mlp_tile_tokens or tokens)
    return tokens * (_layer_saved_bytes(s, compute, lora) - mlp) + tile * mlp


def plan_memory(config, *, world_size: int = 1, tokens: int | None = None, loss_rows: int | None = None,
                mode: str = "full", device: str = "cuda", checkpointing: bool | None = None,
                shape: ModelShape | None = None, device_memory_gib: float | None = None) -> Plan:
    """The per-rank plan of one step. `tokens`: tokens per micro-batch forward (default: the
    longest a micro-batch can be); `loss_rows`: response tokens scored in it (default: tokens)."""
    m, t, r = config.model, config.train, config.rollout
    if tokens is None:
        tokens = max(t.micro_batch_tokens, config.data.max_prompt_tokens + r.max_new_tokens)
    rows = tokens if loss_rows is None else loss_rows
    lora = mode == "lora"
    if shape is None:
        lora_cfg = getattr(m, "lora", None)
        rank = int(getattr(lora_cfg, "r", 16) or 16) if lora else 0
        targets = getattr(lora_cfg, "target_modules", None) if lora else None
        shape = model_shape(m, lora_rank=rank, lora_targets=targets or None)
    W = world_size
    master = BYTES[m.dtype]
    use_bf16 = m.mixed_precision == "bf16" or (m.mixed_precision == "auto" and device == "cuda")
    compute = 2 if use_bf16 else master
    if checkpointing is None:
        checkpointing = m.activation_checkpointing == "on" or (
            m.activation_checkpointing == "auto" and tokens >= m.activation_checkpointing_min_tokens)
    P = shape.parameters
    trainable = shape.lora_parameters if lora else P
    refresh = t.teacher_refresh_every
    snapshot_dtype = master if t.teacher_snapshot_dtype == "same" else BYTES[t.teacher_snapshot_dtype]
    if refresh == 1 or (lora and refresh == 0):
        snapshot_elements = 0
    else:
        snapshot_elements = trainable if lora else P
    on_host = {"parameters": 0, "gradients": 0, "optimizer": 0}
    device_bytes = {
        "parameters": (P + (shape.lora_parameters if lora else 0)) * master // W,
        "gradients": trainable * master // W,
        "optimizer": 2 * trainable * 4 // W,
    }
    if mode == "offload":  # FSDP2 CPUOffloadPolicy: the sharded state lives on the host
        on_host = dict(device_bytes)
        device_bytes = {key: 0 for key in device_bytes}
    snapshot = snapshot_elements * snapshot_dtype // W
    device_bytes["teacher_snapshot"] = 0 if t.teacher_snapshot_device == "cpu" and device == "cuda" else snapshot
    on_host["teacher_snapshot"] = snapshot - device_bytes["teacher_snapshot"]
    # the student's shards while the snapshot is swapped in: an unwrapped model's trade places with a
    # snapshot of their dtype; FSDP2 shards (wrap: several ranks, bf16 or offload) and a snapshot in
    # another dtype need a stash (teacher.py)
    fsdp_wrapped = W > 1 or use_bf16 or mode == "offload"
    stash = snapshot_elements * master // W if fsdp_wrapped or snapshot_dtype != master else 0
    if mode == "offload":  # the shards, hence their stash, are on the host
        on_host["teacher_stash (teacher pass)"], stash = stash, 0
    root = shape.embedding_parameters + shape.head_parameters + shape.hidden
    gathered = 0
    if W > 1 or compute != master or mode == "offload":
        gathered = (root + 2 * shape.layer_parameters) * compute
    tile = getattr(m, "mlp_tile_tokens", 0)
    activations = activation_bytes(shape, tokens, compute, checkpointing, lora, tile)
    activations_other = activation_bytes(shape, tokens, compute, not checkpointing, lora, tile)
    saved_at_loss = saved_at_loss_bytes(shape, tokens, compute, checkpointing, lora)
    head_trains = not lora
    # the gathered student and teacher hidden states and d(hidden); the fused loss's d(W) is the
    # lm_head's gradient, counted with the gradients
    loss = rows * shape.hidden * 4 * 3
    if device == "cpu":  # the CPU backends' logits chunks (on GPU the Triton tiles are on chip)
        loss += int(t.loss_workspace_mb * 2**20) or int(DEFAULT_WORKSPACE_SHARE * 4 * (shape.vocab + rows) * shape.hidden)
    # backward of one layer: d(input) and d(output), d(MLP hidden) (for one tile when the layer is
    # recomputed with a tiled MLP)
    mlp_rows = min(tokens, tile or tokens) if checkpointing else tokens
    backward_transient = (tokens * 2 * shape.hidden + mlp_rows * 2 * shape.intermediate) * 4
    recomputed = recomputed_layer_bytes(shape, tokens, compute, lora, tile) if checkpointing else 0
    if r.engine == "vllm":
        # vLLM takes its fraction of the whole device (80 GiB when no size is given)
        rollout = int(r.vllm_gpu_memory_utilization * (device_memory_gib or 80) * GIB) if device == "cuda" else 0
    else:
        rollout = 2 * shape.layers * shape.kv_heads * shape.head_dim * compute * r.max_batch_tokens
    resident = device_bytes["parameters"] + device_bytes["optimizer"] + device_bytes["teacher_snapshot"]
    phases = {
        "rollout": resident + gathered + rollout,
        "teacher pass": resident + stash + gathered + rows * shape.hidden * 4
                        + (tokens * shape.hidden + min(tokens, tile or tokens) * 2 * shape.intermediate) * compute,
        # the gradients of earlier micro-batches exist in both (gradient accumulation)
        "loss": resident + gathered + device_bytes["gradients"] + saved_at_loss + loss,
        "decoder backward": resident + gathered + device_bytes["gradients"] + saved_at_loss + recomputed
                            + rows * shape.hidden * 4 + backward_transient,
        "optimizer step": resident + device_bytes["gradients"],
    }
    if r.engine == "vllm":  # colocated: its memory stays taken during training
        for phase in ("teacher pass", "loss", "decoder backward", "optimizer step"):
            phases[phase] += rollout
    device_bytes.update({"teacher_stash (teacher pass)": stash, "fsdp_gathered": gathered,
                         f"activations ({'with' if checkpointing else 'without'} checkpointing)": activations,
                         f"activations ({'without' if checkpointing else 'with'} checkpointing)": activations_other,
                         "loss_buffers": loss, "rollout_engine": rollout})
    peak_phase = max(phases, key=phases.get)
    return Plan(mode, W, tokens, checkpointing, device_bytes, on_host, phases, phases[peak_phase], peak_phase)


def format_plan(plans: list[Plan], device_memory_gib: float | None) -> str:
    """A table per mode: bytes per component and phase, and whether the peak fits."""
    lines = []
    for plan in plans:
        lines.append(f"== {plan.mode} fine-tuning" if plan.mode != "offload" else "== full fine-tuning, CPU offload")
        lines.append(f"   per rank, world size {plan.world_size}, {plan.tokens} tokens per micro-batch forward, "
                     f"checkpointing {'on' if plan.checkpointing else 'off'}")
        for name, value in plan.device.items():
            host = plan.host.get(name, 0)
            extra = f"   (+ {host / GIB:8.2f} GiB on the host)" if host else ""
            lines.append(f"   {name:40s} {value / GIB:8.2f} GiB{extra}")
        for name, value in plan.host.items():
            if name not in plan.device:
                lines.append(f"   {name + ' (host)':40s} {value / GIB:8.2f} GiB")
        for phase, value in plan.phases.items():
            lines.append(f"   phase: {phase:33s} {value / GIB:8.2f} GiB")
        verdict = ""
        if device_memory_gib is not None:
            fits = plan.peak <= device_memory_gib * GIB
            verdict = f" -> {'fits' if fits else 'does NOT fit'} in {device_memory_gib:g} GiB"
        lines.append(f"   peak ({plan.peak_phase}): {plan.peak / GIB:.2f} GiB{verdict}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from crisp_fast.train.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="crisp-fast plan-memory",
                                     description="per-rank memory of one CRISP step, without loading the model")
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per micro-batch forward (default: the largest a micro-batch can be)")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB per device; say whether it fits")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--modes", default="full,lora,offload", help="comma-separated: full, lora, offload")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if args.world_size < 1 or (args.tokens is not None and args.tokens < 1):
        print("crisp-fast plan-memory: --world-size and --tokens must be >= 1", file=sys.stderr)
        return 2
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - {"full", "lora", "offload"})
    if unknown:
        print(f"crisp-fast plan-memory: unknown mode(s) {', '.join(unknown)} (full, lora, offload)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        plans = [plan_memory(config, world_size=args.world_size, tokens=args.tokens, mode=mode, device=args.device,
                             device_memory_gib=args.device_memory) for mode in modes]
    except (ConfigError, OSError, ValueError) as error:
        print(f"crisp-fast plan-memory: {error}", file=sys.stderr)
        return 2
    print(format_plan(plans, args.device_memory))
    return 0
