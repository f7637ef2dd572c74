"""Training a GPT whose gradients are written by hand: config, optimizer, step, reporting, loop.

:func:`train` (:mod:`.loop`) runs a :class:`TrainConfig` (:mod:`.config`); the step
(:mod:`.step`) is shared with the benchmarks and the experiments.
"""
from manual_grad.training.config import TRAIN_MODEL, OptimizerConfig, TrainConfig
from manual_grad.training.host_memory import keep_host_memory
from manual_grad.training.loop import TrainResult, train
from manual_grad.training.optimizer import decay_mask, make_optimizer, make_schedule
from manual_grad.training.reporting import Progress, plot_losses, write_metrics
from manual_grad.training.step import init_state, make_eval_fn, make_train_step, train_step

__all__ = ["TrainConfig", "OptimizerConfig", "TRAIN_MODEL", "TrainResult", "train", "make_optimizer",
           "make_schedule", "decay_mask", "train_step", "make_train_step", "make_eval_fn", "init_state",
           "keep_host_memory",
           "Progress", "plot_losses", "write_metrics"]
