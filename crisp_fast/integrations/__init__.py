"""Adapters that put crisp_fast's fused loss under other projects' trainers.

    crisp_fast.integrations.trl    TRL's DistillationTrainer: `patch_distillation_trainer()`
    crisp_fast.integrations.liger  `FusedLinearJSDLoss`, a drop-in for Liger's chunked
                                   `LigerFusedLinearJSDLoss` (hard CE + soft JSD)

Each submodule is imported on its own (`from crisp_fast.integrations.trl import ...`), so using one
never requires the other project to be installed; this package imports neither.
"""
