"""Typed training configuration: dataclasses read from YAML, `section.key=value` overrides,
validated up front with errors that name the offending key.

    config = load_config("configs/tiny.yaml", ["train.steps=3", "rollout.max_new_tokens=32"])
"""
from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault."""


@dataclass
class LoraConfig:
    # trainer-memory (issue 14.3): LoRA adapters through the `peft` library; the teacher at M = 0
    # is the same module with the adapters disabled (see docs/train.md, "LoRA, offload, bf16")
    enabled: bool = False
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling alpha / r
    dropout: float = 0.0
    target_modules: tuple = ()  # () = every linear layer of the decoder (never the lm_head)


@dataclass
class ModelConfig:
    # a local path, a hub name, or "build" (a fresh model from `build`, e.g. for tests and the tiny run)
    source: str = "build"
    build: dict = field(default_factory=dict)  # config kwargs; `architecture` picks the class (qwen3, llama)
    tokenizer: str = ""  # "" = the model's own folder (source; the built-in "tiny-char" for source=build) | a path / hub name | tiny-char
    dtype: str = "float32"  # master weights: float32 (bf16 compute on GPU comes from mixed precision)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    attn_implementation: str = "auto"  # auto (flash_attention_2 if installed on CUDA, else sdpa) | sdpa | eager | ...
    activation_checkpointing: str = "auto"  # auto (per step, from the micro-batch sizes; see below) | on | off
    liger: str = "auto"  # auto (liger-kernel model patches on CUDA when installed) | on | off
    seed: int = 0  # weight init seed for source="build"
    trust_remote_code: bool = False  # passed to every from_pretrained (model, tokenizer, vLLM): run the repo's own code?
    # trainer-memory (issue 14): LoRA and FSDP2 CPU offload of parameters, gradients, optimizer state
    lora: LoraConfig = field(default_factory=LoraConfig)
    cpu_offload: bool = False
    # activation_checkpointing=auto: on for a step whose largest micro-batch forward (tokens through
    # the decoder at once: the packed row, or count x longest padded row) has at least this many
    activation_checkpointing_min_tokens: int = 1024
    # a decoder MLP over more tokens than this runs a tile at a time: in pieces in the teacher pass,
    # and, in a checkpointed layer, with each tile recomputed in backward (train/tiling.py); 0 = off
    mlp_tile_tokens: int = 4096


@dataclass
class DataConfig:
    path: str = ""
    field: str = "problem"
    format: str = "auto"  # auto (from the suffix) | jsonl | parquet
    max_prompt_tokens: int = 2048  # prompts (student or teacher) longer than this are skipped and counted
    shuffle: bool = True
    answer_field: str = "answer"  # when every problem has it, each step's rollouts are graded against it


@dataclass
class PromptConfig:
    preset: str = "v1"  # v1 (concise) | v2 (difficulty-aware): the teacher's instruction wording
    placement: str = "header"  # header (replace the student header) | system (system message) | suffix
    student_header: str = ""  # "" = the preset's ordinary header
    answer_format: str = ""  # "" = the preset's answer-format line
    teacher_instruction: str = ""  # "" = the preset's conciseness instruction
    enable_thinking: bool | None = None  # passed to chat templates that understand it (Qwen3)
    template: str = "chat"  # chat (messages through the tokenizer's chat template) | raw (the two format strings below, as text)
    student_template: str = ""  # raw: the student's prompt, a format string over the record's fields, e.g. "Add: {problem}\n"
    teacher_template: str = ""  # raw: the teacher's prompt, e.g. "Add concisely: {problem}\n"
    teacher_context: str = ""  # both modes: privileged context only the teacher sees, e.g. "Reference solution: {solution}"


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8192
    max_batch_tokens: int = 262_144  # hf: batch * (prompt + new tokens) per generate call
    vllm_gpu_memory_utilization: float = 0.3


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 32  # global, across ranks; must divide by the world size
    micro_batch_tokens: int = 16_384  # padded tokens per forward (the longer of student/teacher rows)
    lr: float = 1e-6
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    teacher_refresh_every: int = 50  # M: 0 frozen initial teacher, 1 live student, M>1 refresh every M steps
    teacher_snapshot_device: str = "cpu"  # where the snapshot's local shards live: cpu | device
    teacher_snapshot_dtype: str = "same"  # same (as the master weights) | bfloat16 | float32
    normalization: str = "token"  # token: mean over all response tokens of the global batch | sequence
    loss_backend: str = "auto"  # crisp_fast.fused_linear_reverse_kl backend
    # scratch the CPU loss backends may hold per micro-batch (MiB); 0 = the library's default (40% of
    # the lm_head gradient). More buys faster GEMMs: see docs/train.md, "The loss's workspace"
    loss_workspace_mb: float = 0.0
    padding_side: str = "right"
    seed: int = 0
    max_response_tokens: int = 0  # 0 = no cap; else responses are cut to this many tokens for the loss
    log_teacher_entropy: bool = True  # log the teacher entropy (from the loss's own pass, no extra pass)
    lr_schedule: str = "constant"  # constant | linear (to 0 at train.steps) | cosine (to 0 at train.steps), after warmup
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr over the first warmup_steps steps
    threads: int = 0  # torch CPU threads; 0 = auto (1 for a model under 50M parameters on CPU, else torch's default)
    # trainer-memory (issue 15.4): the divergence and its temperature (separate from the sampling
    # temperature), and an EMA teacher (0 = off; a rate in (0, 1] replaces the hard refresh every M)
    divergence: str = "reverse_kl"  # reverse_kl | forward_kl | jsd
    jsd_beta: float = 0.5  # jsd only: M = beta * teacher + (1 - beta) * student
    loss_temperature: float = 1.0
    teacher_ema: float = 0.0
    packing: bool = True  # a micro-batch's sequences as one row, no padding (crisp_fast.train.packing)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between sharded checkpoints (0 = only at the end; the end is always saved)
    resume: str = "auto"  # auto (latest complete checkpoint in OUT/checkpoints) | never | a checkpoint path
    keep: int = 2
    export_hf: bool = True  # save_pretrained-compatible safetensors in OUT/hf at the end


@dataclass
class LogConfig:
    tensorboard: str = "auto"  # auto (if installed) | on | off
    wandb: bool = False
    wandb_project: str = "crisp-fast"
    progress: bool = True  # a progress bar; false: a text line every print_every steps instead
    print_every: int = 1  # steps between progress updates / printed lines (0 = none)
    samples_every: int = 10  # steps between OUT/samples/step_X.jsonl files of (prompt, response, correct, length); 0 = none


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validations on `data` (0 = none); also at the last step
    data: str = ""  # held-out problems (JSONL / parquet), the same fields as data.path's
    samples: int = 1  # k of mean@k
    limit: int = 0  # only the first N problems (0 = all)
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    seed: int = 0  # the same seed at every validation: the numbers differ only by the weights
    best_metric: str = "accuracy"  # keep OUT/best/: accuracy | mean_tokens (lower is better) | penalized_accuracy | none
    length_penalty: float = 0.0  # penalized_accuracy = accuracy - length_penalty * mean_tokens / max_new_tokens


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out: str = "runs/crisp"
    eval: ValidationConfig = field(default_factory=ValidationConfig)


def _coerce(where: str, value: Any, annotation) -> Any:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    if value is None and "None" in text:
        return None
    if text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if text == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) or 1.0e9 (no sign) as text
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if text == "bool" or text.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if text == "str":
        if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if text == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if text == "tuple":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(f'{where}{k}') for k in unknown)}; "
                          f"known keys{' of ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _from_dict(annotation, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(f"{where}{name}", value, annotation)
    return cls(**kwargs)


def _annotation_of(keys: list[str]):
    """The type annotation of the config key at `keys` (None if there is no such key)."""
    cls = Config
    for index, key in enumerate(keys):
        hints = get_type_hints(cls)
        if key not in hints:
            return None
        if index == len(keys) - 1:
            return hints[key]
        if not dataclasses.is_dataclass(hints[key]):
            return None
        cls = hints[key]
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value): the text itself for a string key
    (`out=010` is the folder "010", not the octal 8), YAML-parsed otherwise."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if _annotation_of(key.split(".")) is str:
        # a string key takes the text as it is; a YAML-quoted text ('"Add: {problem}\\n"') is
        # unquoted, escapes included, so a newline can be written on a command line
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            try:
                return key.split("."), str(yaml.safe_load(raw))
            except yaml.YAMLError as error:
                raise ConfigError(f"override {text!r}: not a valid quoted string ({error})") from None
        return key.split("."), raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from None
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, base: dict | None = None) -> Config:
    """Read YAML (or start from `base`), apply overrides, build the dataclasses and validate."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        keys, value = parse_override(override)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {key!r} is not a section")
        node[keys[-1]] = value
    try:
        config = _from_dict(Config, data, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None
    validate(config)
    return config


def _require(condition: bool, message: str):
    if not condition:
        raise ConfigError(message)


def _template_fields(key: str, template: str) -> list[str]:
    """The `{field}` names of a format string; a malformed one is an error naming `key`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigError(f"{key} is not a valid format string ({error}); write a literal brace as {{{{ or }}}}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigError(f"{key}: {{{name}}} must name a field of the problem record (a plain name; "
                              f"write a literal brace as {{{{ or }}}})")
        if spec or conversion:
            raise ConfigError(f"{key}: {{{name}}} takes no format spec or conversion")
        names.append(name)
    return names


def validate(config: Config) -> None:
    """Impossible values fail here, before any model is loaded."""
    m, d, p, r, t, c = config.model, config.data, config.prompts, config.rollout, config.train, config.checkpoint
    log, v = config.log, config.eval
    _require(bool(m.source), "model.source must be a path, a hub name or 'build'")
    _require(m.source != "build" or bool(m.build), "model.source='build' needs model.build (the model config)")
    _require(m.dtype in ("float32", "bfloat16", "float16"), f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    _require(m.mixed_precision in ("auto", "bf16", "off"), f"model.mixed_precision must be auto, bf16 or off, got {m.mixed_precision!r}")
    for key in ("activation_checkpointing", "liger"):
        value = getattr(m, key)
        _require(value in ("auto", "on", "off"), f"model.{key} must be auto, on or off, got {value!r}")
    _require(m.seed >= 0, f"model.seed must be >= 0, got {m.seed}")
    _require(bool(d.path), "data.path is required (a JSONL or parquet file of problems)")
    _require(d.format in ("auto", "jsonl", "parquet"), f"data.format must be auto, jsonl or parquet, got {d.format!r}")
    _require(d.max_prompt_tokens >= 1, f"data.max_prompt_tokens must be >= 1, got {d.max_prompt_tokens}")
    _require(bool(d.field), "data.field must name the problem's field")
    _require(bool(d.answer_field), "data.answer_field must name the answer's field")
    _require(p.preset in ("v1", "v2"), f"prompts.preset must be v1 or v2, got {p.preset!r}")
    _require(p.placement in ("header", "system", "suffix"), f"prompts.placement must be header, system or suffix, got {p.placement!r}")
    _require(p.template in ("chat", "raw"), f"prompts.template must be chat or raw, got {p.template!r}")
    if p.template == "raw":
        for key in ("student_template", "teacher_template"):
            _require(bool(getattr(p, key)), f"prompts.template=raw needs prompts.{key} (a format string over the "
                                            f"problem record's fields, e.g. \"Add: {{problem}}\\n\")")
        for key in ("student_header", "answer_format", "teacher_instruction"):
            _require(not getattr(p, key), f"prompts.{key} is a chat-mode text; with prompts.template=raw write it "
                                          f"into prompts.student_template / prompts.teacher_template")
        _require(p.student_template != p.teacher_template or bool(p.teacher_context),
                 "prompts.student_template and prompts.teacher_template are the same text: the teacher would see "
                 "exactly the student's prompt and the KL would be 0")
    else:
        for key in ("student_template", "teacher_template"):
            _require(not getattr(p, key), f"prompts.{key} is used with prompts.template=raw only (chat mode builds "
                                          f"messages from student_header / teacher_instruction / answer_format)")
    for key in ("student_template", "teacher_template", "teacher_context"):
        _template_fields(f"prompts.{key}", getattr(p, key))
    _require(r.engine in ("hf", "vllm"), f"rollout.engine must be hf or vllm, got {r.engine!r}")
    _require(r.engine != "vllm" or m.source != "build",
             "rollout.engine='vllm' needs model.source to be a path or hub name (vLLM loads the architecture itself)")
    _require(r.n >= 1, f"rollout.n must be >= 1, got {r.n}")
    _require(r.temperature >= 0, f"rollout.temperature must be >= 0, got {r.temperature}")
    _require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    _require(r.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {r.top_k}")
    _require(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    _require(r.max_batch_tokens >= 1, f"rollout.max_batch_tokens must be >= 1, got {r.max_batch_tokens}")
    _require(0 < r.vllm_gpu_memory_utilization <= 1,
             f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {r.vllm_gpu_memory_utilization}")
    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _require(t.prompts_per_step >= 1, f"train.prompts_per_step must be >= 1, got {t.prompts_per_step}")
    _require(t.micro_batch_tokens >= 2, f"train.micro_batch_tokens must be >= 2, got {t.micro_batch_tokens}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(len(t.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                       for b in t.betas), f"train.betas must be two numbers in [0, 1), got {t.betas}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")
    _require(t.teacher_refresh_every >= 0, f"train.teacher_refresh_every must be >= 0 (0 = frozen), got {t.teacher_refresh_every}")
    _require(t.teacher_snapshot_device in ("cpu", "device"), f"train.teacher_snapshot_device must be cpu or device, got {t.teacher_snapshot_device!r}")
    _require(t.teacher_snapshot_dtype in ("same", "bfloat16", "float32"), f"train.teacher_snapshot_dtype must be same, bfloat16 or float32, got {t.teacher_snapshot_dtype!r}")
    _require(t.normalization in ("token", "sequence"), f"train.normalization must be token or sequence, got {t.normalization!r}")
    _require(t.padding_side in ("left", "right"), f"train.padding_side must be left or right, got {t.padding_side!r}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _require(t.max_response_tokens >= 0, f"train.max_response_tokens must be >= 0, got {t.max_response_tokens}")
    _require(t.lr_schedule in ("constant", "linear", "cosine"), f"train.lr_schedule must be constant, linear or cosine, got {t.lr_schedule!r}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.threads >= 0, f"train.threads must be >= 0 (0 = auto), got {t.threads}")
    _require(m.activation_checkpointing_min_tokens >= 1,
             f"model.activation_checkpointing_min_tokens must be >= 1, got {m.activation_checkpointing_min_tokens}")
    _require(m.mlp_tile_tokens >= 0, f"model.mlp_tile_tokens must be >= 0 (0 = off), got {m.mlp_tile_tokens}")
    _require(c.every >= 0, f"checkpoint.every must be >= 0, got {c.every}")
    _require(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    _require(log.tensorboard in ("auto", "on", "off"), f"log.tensorboard must be auto, on or off, got {log.tensorboard!r}")
    _require(log.print_every >= 0, f"log.print_every must be >= 0 (0 = never), got {log.print_every}")
    _require(log.samples_every >= 0, f"log.samples_every must be >= 0 (0 = never), got {log.samples_every}")
    _require(bool(config.out), "out must name the output folder")
    _require(v.every >= 0, f"eval.every must be >= 0 (0 = no validation), got {v.every}")
    _require(v.every == 0 or bool(v.data), "eval.every > 0 needs eval.data (a held-out problems file)")
    _require(v.samples >= 1, f"eval.samples must be >= 1, got {v.samples}")
    _require(v.limit >= 0, f"eval.limit must be >= 0 (0 = all), got {v.limit}")
    _require(v.max_new_tokens >= 0, f"eval.max_new_tokens must be >= 0 (0 = rollout.max_new_tokens), got {v.max_new_tokens}")
    _require(v.temperature >= 0, f"eval.temperature must be >= 0, got {v.temperature}")
    _require(0 < v.top_p <= 1, f"eval.top_p must be in (0, 1], got {v.top_p}")
    _require(v.top_k >= 0, f"eval.top_k must be >= 0 (0 = off), got {v.top_k}")
    _require(v.seed >= 0, f"eval.seed must be >= 0, got {v.seed}")
    _require(v.best_metric in BEST_METRICS, f"eval.best_metric must be one of {', '.join(BEST_METRICS)}, got {v.best_metric!r}")
    _require(v.length_penalty >= 0, f"eval.length_penalty must be >= 0, got {v.length_penalty}")
    validate_memory_and_loss_options(config)


def validate_memory_and_loss_options(config: Config) -> None:
    """model.lora, model.cpu_offload, train.divergence / jsd_beta / loss_temperature / teacher_ema
    (trainer-memory, issues 14 and 15.4)."""
    lora, t = config.model.lora, config.train
    if lora.enabled:
        _require(lora.r >= 1, f"model.lora.r must be >= 1, got {lora.r}")
        _require(lora.alpha > 0 and lora.alpha != float("inf"), f"model.lora.alpha must be a finite number > 0, got {lora.alpha}")
        _require(0 <= lora.dropout < 1, f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        _require(all(isinstance(name, str) and name for name in lora.target_modules),
                 f"model.lora.target_modules must be a list of module names (e.g. [q_proj, v_proj]), got {list(lora.target_modules)}")
        _require(config.rollout.engine != "vllm",
                 "model.lora with rollout.engine='vllm' is not supported (vLLM would need the adapters pushed as LoRA); use rollout.engine=hf")
    _require(t.divergence in ("reverse_kl", "forward_kl", "jsd"),
             f"train.divergence must be reverse_kl, forward_kl or jsd, got {t.divergence!r}")
    _require(0 <= t.jsd_beta <= 1, f"train.jsd_beta must be in [0, 1], got {t.jsd_beta}")
    _require(0 < t.loss_temperature < float("inf"), f"train.loss_temperature must be a finite number > 0, got {t.loss_temperature}")
    _require(0 <= t.loss_workspace_mb < float("inf"),
             f"train.loss_workspace_mb must be a finite number >= 0 (0 = the library default), got {t.loss_workspace_mb}")
    _require(0 <= t.teacher_ema <= 1, f"train.teacher_ema must be in [0, 1] (0 = off), got {t.teacher_ema}")
    _require(t.teacher_ema == 0 or t.teacher_refresh_every != 1,
             "train.teacher_ema needs a snapshot teacher, but train.teacher_refresh_every=1 is the live student "
             "(no snapshot); set teacher_refresh_every to 0 or > 1 (it is not used while teacher_ema > 0)")


# what `eval.best_metric` may name (crisp_fast.train.validation scores them)
BEST_METRICS = ("accuracy", "mean_tokens", "penalized_accuracy", "none")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
