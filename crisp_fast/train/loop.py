"""The CRISP training loop: rollouts from the student, the same response tokens scored in two
contexts by one model, fused reverse KL from hidden states, AdamW.

    from crisp_fast.train import load_config, train
    result = train(load_config("configs/tiny.yaml"))      # or: crisp-fast train --config ...

One step (`Trainer.train_step`):
  1. take `prompts_per_step` problems (each rank its share); student and teacher prompt ids
  2. sample responses from the student; keep the exact sampled ids
  3. per micro-batch: teacher pass (snapshot swapped in, no grad) -> teacher hidden states;
     student pass (grad) -> fused reverse KL on the hidden states with the lm_head weight
  4. backward, clip the gradient norm, skip the step if it is not finite, AdamW, LR schedule
  5. refresh the teacher snapshot every `teacher_refresh_every` steps
Around it: grading of the rollouts (when problems carry answers) and samples (grading.py),
validation and the best checkpoint (validation.py), verified checkpoints (checkpoint.py).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crisp_fast.generation import Generation, SamplingConfig, make_engine
from crisp_fast.train import checkpoint as ckpt
from crisp_fast.train.batching import micro_batch_tokens, packed_side_inputs, plan_micro_batches, side_inputs
from crisp_fast.train.config import Config, to_dict
from crisp_fast.train.data import (
    PromptPair, ProblemStream, check_problem_field, encode_problems, has_answers, read_records,
)
from crisp_fast.train.fsdp import (
    all_reduce_max, all_reduce_sum, enable_activation_checkpointing, reshard_all, root_gathered,
    setup_distributed,
)
from crisp_fast.train.grading import MathGrader, grade_rollouts, write_samples
from crisp_fast.train.metrics import MetricsLogger, peak_memory_bytes, reset_peak_memory
from crisp_fast.train.lora import parameter_counts
from crisp_fast.train.modeling import attention_implementation, base_teacher, load_model, load_tokenizer, prepare_model, tokenizer_source
from crisp_fast.train.prompts import build_prompts, check_instruction_fits, check_tokenizer, prompt_texts
from crisp_fast.train.runtime import check_vocabulary, choose_threads, resolve_loss_backend, return_freed_host_memory
from crisp_fast.train.schedule import make_scheduler, restore_scheduler, scheduler_state
from crisp_fast.train.packing import check_packing_supported, prepare_for_packing
from crisp_fast.train.teacher import TeacherSnapshot
from crisp_fast.train.tiling import tile_mlps
from crisp_fast.train.validation import Validator


@dataclass
class TrainResult:
    history: list[dict]          # the per-step metrics (rank 0's view, global values)
    model: torch.nn.Module       # the trained HF model (sharded DTensors under FSDP)
    tokenizer: object
    out_dir: Path
    teacher_refreshes: list[int] = field(default_factory=list)


class Trainer:
    """`grader(responses, records) -> list[bool]` replaces the math grader of the rollouts (and
    of validation); by default rollouts are graded when every problem has `data.answer_field`."""

    def __init__(self, config: Config, out_dir: str | Path | None = None, *, grader=None):
        self.config = config
        self.out_dir = Path(out_dir or config.out)
        self.rank, self.world, self.device = setup_distributed()
        return_freed_host_memory(self.device)  # CPU: freed activations leave the resident set (runtime.py)
        cfg_m, cfg_t = config.model, config.train
        if cfg_t.prompts_per_step % self.world:
            raise ValueError(f"train.prompts_per_step={cfg_t.prompts_per_step} must divide by the world size {self.world}")

        # prompts and data first: a bad template or data line fails before the model is loaded
        self.tokenizer = load_tokenizer(cfg_m)
        self.texts = prompt_texts(config.prompts, config.data.field)
        check_tokenizer(self.tokenizer, self.texts, tokenizer_source(cfg_m))
        check_instruction_fits(self.tokenizer, self.texts, config.data.max_prompt_tokens, config.prompts.enable_thinking)
        records = read_records(config.data.path, config.data.format)
        if config.prompts.template == "chat":
            check_problem_field(records, config.data.field)
        self.records = [record for _, record in records]
        if grader is None and has_answers(records, config.data.answer_field):
            grader = MathGrader(config.data.answer_field)
        self.grader = grader

        def encode(problem):
            return build_prompts(self.tokenizer, problem, self.texts, config.prompts.enable_thinking)

        pairs, self.skipped_prompts = encode_problems(self.records, encode, config.data.max_prompt_tokens,
                                                      [where for where, _ in records])
        self.stream = ProblemStream(pairs, seed=cfg_t.seed, shuffle=config.data.shuffle)
        custom = grader if not isinstance(grader, MathGrader) else None
        self.validator = (Validator(config, encode, custom, self.rank, self.world, self.device)
                          if config.eval.every else None)
        self.loss_backend = resolve_loss_backend(cfg_t.loss_backend, self.device, getattr(torch, cfg_m.dtype))

        if cfg_t.packing:  # an attention that cannot keep packed sequences apart fails before loading
            check_packing_supported(attention_implementation(cfg_m.attn_implementation, self.device))
        lm = load_model(cfg_m, self.tokenizer, self.device)
        check_vocabulary(lm, self.tokenizer, tokenizer_source(cfg_m))
        self.threads = choose_threads(cfg_t.threads, self.device, sum(p.numel() for p in lm.parameters()))
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if cfg_t.packing:
            prepare_for_packing(lm)
        if cfg_m.mlp_tile_tokens:
            tile_mlps(lm, cfg_m.mlp_tile_tokens)
        # "auto" is decided per step from the micro-batch sizes (_decide_checkpointing)
        self.checkpointing = None
        if cfg_m.activation_checkpointing == "on":
            enable_activation_checkpointing(lm)
            self.checkpointing = True
        self.model = prepare_model(lm, cfg_m, self.device)  # LoRA adapters, FSDP2 / bf16 / CPU offload
        # only what trains (with LoRA, the adapters): no AdamW state for frozen parameters. fused=True:
        # one kernel per parameter, so no foreach temporaries the size of all parameters (measured:
        # foreach AdamW's step added 308 MB, a third of a 4k-token step's peak, for a 79 M-parameter model)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg_t.lr,
                                           betas=tuple(cfg_t.betas), weight_decay=cfg_t.weight_decay, fused=True)
        self.teacher = TeacherSnapshot(self.model, cfg_t.teacher_refresh_every, device=cfg_t.teacher_snapshot_device,
                                       dtype=cfg_t.teacher_snapshot_dtype, ema=cfg_t.teacher_ema,
                                       base_teacher=base_teacher(self.model))
        self.scheduler = make_scheduler(self.optimizer, cfg_t.lr_schedule, cfg_t.warmup_steps, cfg_t.steps)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.engine = None
        self.step = 0

    # ---------------------------------------------------------------------------------- rollouts
    def _rollout_engine(self):
        if self.engine is None:
            r = self.config.rollout
            if r.engine == "vllm":
                self.engine = make_engine("vllm", self.model.lm, self.tokenizer, model_path=self.config.model.source,
                                          gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                                          trust_remote_code=self.config.model.trust_remote_code)
                self.engine.push_weights(self.model.lm)
            else:
                self.engine = make_engine("hf", self.model.lm, self.tokenizer, max_batch_tokens=r.max_batch_tokens)
        return self.engine

    def rollout(self, pairs: list[PromptPair]) -> list[Generation]:
        r = self.config.rollout
        # the seed depends only on (seed, step, rank): a resumed run samples what the first run did
        seed = (self.config.train.seed * 1_000_003 + self.step) * 4099 + self.rank
        sampling = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=r.max_new_tokens, seed=seed)
        with root_gathered(self.model):
            return self._rollout_engine().generate([p.student_ids for p in pairs], sampling)

    # ------------------------------------------------------------------------------ optimisation
    def train_on_rollouts(self, pairs: list[PromptPair], generations: list[Generation]) -> dict:
        """Steps 3-5 on given rollouts (benchmarks call this with synthetic long responses)."""
        t = self.config.train
        cap = t.max_response_tokens or None
        rows = [(pairs[g.prompt_index], g.token_ids[:cap]) for g in generations if g.token_ids]
        local_tokens = sum(len(response) for _, response in rows)
        global_tokens, global_rows = all_reduce_sum([local_tokens, len(rows)], self.device)
        if global_tokens == 0:
            raise RuntimeError("every rollout in this step is empty; nothing to train on")

        # loss = sum over the global batch of w_i * KL_i, with
        #   token:    w_i = 1 / (response tokens in the global batch)  -> the mean KL per response token
        #   sequence: w_i = 1 / (len(response) * responses in the global batch) -> mean of per-response means
        # Every rank adds its part; FSDP averages gradients over ranks, so each rank backpropagates
        # world * its part and the reduced gradient is that of the global loss.
        def weights(response):
            if t.normalization == "token":
                return [1.0 / global_tokens] * len(response)
            return [1.0 / (len(response) * global_rows)] * len(response)

        lengths = [max(len(p.student_ids), len(p.teacher_ids)) + len(r) - 1 for p, r in rows]
        micro_batches = plan_micro_batches(lengths, t.micro_batch_tokens, packed=t.packing) if rows else []
        self._decide_checkpointing(max((micro_batch_tokens([lengths[i] for i in group], t.packing)
                                        for group in micro_batches), default=0))
        # FSDP's collectives need the same number of forward/backward passes on every rank
        n_micro = all_reduce_max(len(micro_batches), self.device)
        sums = {"loss": 0.0, "kl": 0.0, "student_entropy": 0.0, "teacher_entropy": 0.0}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for index in range(n_micro):
            members = micro_batches[index] if index < len(micro_batches) else [0]
            dummy = index >= len(micro_batches)  # a rank with fewer micro-batches replays one at weight 0
            batch = [rows[i] for i in members] if rows else [(pairs[0], pairs[0].student_ids[-1:])]
            responses = [response for _, response in batch]
            if t.packing:
                student = packed_side_inputs([p.student_ids for p, _ in batch], responses, self.device)
                teacher = packed_side_inputs([p.teacher_ids for p, _ in batch], responses, self.device)
            else:
                student = side_inputs([p.student_ids for p, _ in batch], responses, self.pad_id, t.padding_side, self.device)
                teacher = side_inputs([p.teacher_ids for p, _ in batch], responses, self.pad_id, t.padding_side, self.device)
            token_weights = torch.tensor([w for r in responses for w in weights(r)], device=self.device)
            if dummy:
                token_weights.zero_()

            # teacher pass, just in time: snapshot weights in, hidden states out, student weights back.
            # Its lm_head goes to the loss by reference (None: the student's own tensor, shared-W path);
            # only a head sharded over ranks is kept from the gather (see teacher.py, head_source)
            source = self.teacher.head_source
            reshard_all(self.model)
            with torch.no_grad(), self.teacher.swapped_in():
                teacher_hidden, teacher_head = self.model(*teacher.as_args(), copy_head=source == "gather")
            reshard_all(self.model)
            if source == "snapshot":
                teacher_head = self.teacher.snapshot_head(teacher_hidden.device, teacher_hidden.dtype)

            loss, stats, teacher_entropy = self.model(
                *student.as_args(), teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                token_weights=token_weights, backend=t.loss_backend, teacher_entropy=t.log_teacher_entropy,
                divergence=t.divergence, beta=t.jsd_beta, temperature=t.loss_temperature,
                workspace_bytes=int(t.loss_workspace_mb * 2**20) or None)
            del teacher_hidden, teacher_head  # the loss keeps what its backward needs; free the rest now
            (loss * self.world).backward()
            with torch.no_grad():
                token_weights_mean = torch.full_like(token_weights, 0.0 if dummy else 1.0 / global_tokens)
                sums["loss"] += float(loss)
                sums["kl"] += float((stats.divergence * token_weights_mean).sum())
                sums["student_entropy"] += float((stats.student_entropy * token_weights_mean).sum())
                if teacher_entropy is not None:
                    sums["teacher_entropy"] += float((teacher_entropy * token_weights_mean).sum())

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the step count, skipped steps included
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        refreshed = self.teacher.maybe_refresh(self.step)
        if self.engine is not None and hasattr(self.engine, "push_weights") and not skipped:
            self.engine.push_weights(self.model.lm)

        totals = dict(zip(sums, all_reduce_sum(list(sums.values()), self.device)))
        return {"loss": totals["loss"], "kl": totals["kl"], "student_entropy": totals["student_entropy"],
                "teacher_entropy": totals["teacher_entropy"] if t.log_teacher_entropy else None,
                "grad_norm": grad_norm, "skipped": skipped, "teacher_refreshed": refreshed,
                "response_tokens": int(global_tokens), "responses": int(global_rows),
                "mean_response_tokens": global_tokens / max(global_rows, 1), "micro_batches": n_micro,
                "activation_checkpointing": bool(self.checkpointing),
                **dict(zip(("trainable_parameters", "total_parameters"), parameter_counts(self.model)))}

    def grade_and_sample(self, batch: list[PromptPair], generations: list[Generation]) -> dict:
        """Grade this step's rollouts (accuracy, lengths of correct and wrong responses) and, every
        `log.samples_every` steps, write them to OUT/samples/. Collective under torchrun."""
        step, every = self.step + 1, self.config.log.samples_every
        sampling = every > 0 and step % every == 0
        if self.grader is None and not sampling:
            return {}
        responses = [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generations]
        records = [self.records[batch[g.prompt_index].problem_index] for g in generations]
        lengths = [len(g.token_ids) for g in generations]
        metrics, verdicts = {}, [None] * len(generations)
        if self.grader is not None:
            metrics, verdicts = grade_rollouts(self.grader, responses, records, lengths, self.device)
        if sampling:
            answer_field = self.config.data.answer_field
            rows = [{"step": step, "rank": self.rank, "prompt": self.tokenizer.decode(batch[g.prompt_index].student_ids),
                     "response": response, "answer": record.get(answer_field), "correct": verdict, "length": length,
                     "finish_reason": g.finish_reason}
                    for g, response, record, verdict, length in zip(generations, responses, records, verdicts, lengths)]
            write_samples(self.out_dir, step, rows, self.rank)
        return metrics

    def _decide_checkpointing(self, largest_forward_tokens: int) -> None:
        """model.activation_checkpointing=auto: recompute the decoder layers in backward when this
        step's largest micro-batch forward reaches activation_checkpointing_min_tokens. Switching
        is cheap (flags on the layers); the decision is printed when it changes. Every rank decides
        on the global maximum, so FSDP ranks run the same recomputation."""
        cfg_m = self.config.model
        if cfg_m.activation_checkpointing != "auto":
            return
        largest = all_reduce_max(largest_forward_tokens, self.device)
        wanted = largest >= cfg_m.activation_checkpointing_min_tokens
        if wanted == self.checkpointing:
            return
        lm = self.model.lm
        if wanted:
            enable_activation_checkpointing(lm)
        elif self.checkpointing is not None:
            lm.activation_checkpointing_disable()
        self.checkpointing = wanted
        if self.rank == 0:
            print(f"crisp: activation checkpointing {'on' if wanted else 'off'} from step {self.step + 1}: largest "
                  f"micro-batch forward {largest} tokens {'>=' if wanted else '<'} "
                  f"model.activation_checkpointing_min_tokens={cfg_m.activation_checkpointing_min_tokens}")

    def train_step(self, on_rollouts=None) -> dict:
        """One full CRISP step; returns its metrics (global over ranks). `on_rollouts(batch,
        generations) -> dict`, if given, sees this rank's rollouts before training on them and its
        metrics join the step's."""
        reset_peak_memory(self.device)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        start = time.perf_counter()
        share = self.config.train.prompts_per_step // self.world
        batch = self.stream.take(self.config.train.prompts_per_step)[self.rank * share:(self.rank + 1) * share]
        generations = self.rollout(batch)
        stopped = all_reduce_sum([sum(g.finish_reason == "stop" for g in generations), len(generations)], self.device)
        rollout_seconds = time.perf_counter() - start
        metrics = {"step": self.step + 1}
        metrics.update(self.grade_and_sample(batch, generations))
        if on_rollouts is not None:
            metrics.update(on_rollouts(batch, generations))
        metrics.update(self.train_on_rollouts(batch, generations))
        seconds = time.perf_counter() - start
        metrics.update({
            "stop_fraction": stopped[0] / max(stopped[1], 1),
            "rollout_seconds": rollout_seconds, "train_seconds": seconds - rollout_seconds, "step_seconds": seconds,
            "tokens_per_second": metrics["response_tokens"] / seconds,
            "train_tokens_per_second": metrics["response_tokens"] / max(seconds - rollout_seconds, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "teacher_snapshot_bytes": self.teacher.bytes(), "lr": lr, "loss_backend": self.loss_backend,
        })
        return metrics

    # ------------------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {"scheduler": scheduler_state(self.scheduler),
                "validation": self.validator.state() if self.validator is not None else None}

    def save_checkpoint(self, root: Path | None = None, keep: int | None = None) -> Path:
        return ckpt.save(root or self.out_dir / "checkpoints", self.step, self.model, self.optimizer, self.teacher,
                         self.stream.position, keep or self.config.checkpoint.keep, self._trainer_state())

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def _latest_usable(self, root: Path) -> Path | None:
        """The newest checkpoint under `root` that verifies; each one that does not is named,
        with why, and the previous one is tried."""
        for partial in sorted(root.glob("step_*.partial")) if root.is_dir() else []:
            self._say(f"crisp: ignoring {partial}: a save that did not finish")
        candidates = ckpt.checkpoint_dirs(root)
        for candidate in reversed(candidates):
            problem = ckpt.verify(candidate)
            if problem is None:
                return candidate
            self._say(f"crisp: {problem}; falling back to the previous checkpoint")
        if candidates:
            raise ckpt.CheckpointError(f"no usable checkpoint in {root} (all {len(candidates)} failed verification, "
                                       f"see above); move them away, or set checkpoint.resume=never to start afresh")
        return None

    def maybe_resume(self) -> Path | None:
        resume = self.config.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            path = self._latest_usable(self.out_dir / "checkpoints")
            if path is None:
                return None
            extra = ckpt.load(path, self.model, self.optimizer, self.teacher, verified=True)
        else:
            path = Path(resume)
            if not path.is_dir():
                raise ckpt.CheckpointError(f"checkpoint.resume={resume}: no such checkpoint folder")
            extra = ckpt.load(path, self.model, self.optimizer, self.teacher)
        self.step, self.stream.position = extra["step"], extra["data_position"]
        state = extra.get("trainer") or {}
        restore_scheduler(self.scheduler, state.get("scheduler") or {"last_epoch": self.step, "step_count": self.step + 1})
        if self.validator is not None and state.get("validation"):
            self.validator.restore(state["validation"])
        return path

    def export(self, path: str | Path | None = None) -> Path:
        return ckpt.export_hf(Path(path or self.out_dir / "hf"), self.model, self.tokenizer)

    # ------------------------------------------------------------------------------------- run
    def validate(self) -> dict:
        with root_gathered(self.model):
            return self.validator.run(self.model.lm, self.tokenizer, self._rollout_engine())

    def run(self) -> TrainResult:
        c = self.config
        resumed = self.maybe_resume()
        logger = MetricsLogger(self.out_dir, enabled=self.rank == 0, total_steps=c.train.steps, start_step=self.step,
                               tensorboard=c.log.tensorboard, wandb=c.log.wandb, wandb_project=c.log.wandb_project,
                               progress=c.log.progress, config=to_dict(c), print_every=c.log.print_every)
        if self.rank == 0:
            if resumed:
                print(f"crisp: resumed from {resumed} at step {self.step}")
            if self.skipped_prompts:
                print(f"crisp: skipped {self.skipped_prompts} problems longer than data.max_prompt_tokens")
            threads = (f"{self.threads}" + (" (auto: a model under 50M parameters on CPU)" if not c.train.threads else "")
                       if self.threads else f"torch's default ({torch.get_num_threads()})")
            print(f"crisp: loss backend {self.loss_backend}; torch threads {threads}; "
                  f"{'grading rollouts' if self.grader is not None else 'no answers to grade against'}", flush=True)
        try:
            while self.step < c.train.steps:
                metrics = self.train_step()
                if metrics["skipped"] and self.rank == 0:
                    print(f"crisp: step {metrics['step']}: gradient norm {metrics['grad_norm']} is not finite; step skipped")
                if self.validator is not None and self.validator.due(self.step, c.train.steps):
                    metrics.update(self.validate())
                logger.log(metrics)
                if self.validator is not None and self.validator.is_best(metrics, self.step):
                    best = self.save_checkpoint(self.out_dir / "best", keep=1)
                    if self.rank == 0:
                        print(f"crisp: step {self.step}: best eval_score so far ({c.eval.best_metric}) "
                              f"{metrics['eval_score']:.4g} -> {best}", flush=True)
                if (c.checkpoint.every and self.step % c.checkpoint.every == 0) or self.step == c.train.steps:
                    self.save_checkpoint()
            if c.checkpoint.export_hf:
                self.export()
        finally:
            logger.close()
        return TrainResult(logger.history, self.model.lm, self.tokenizer, self.out_dir, list(self.teacher.refreshes))


def train(config: Config, out_dir: str | Path | None = None) -> TrainResult:
    """Run CRISP training as configured; returns the metrics history and the trained model."""
    return Trainer(config, out_dir).run()
