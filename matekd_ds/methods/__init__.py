"""Training methods. Each takes a step's micro-batches, runs forward/backward on the engine it
trains, steps it, and returns its losses; `phase(step)` names what a step trains. The Trainer
drives any of them through the `Method` protocol."""

from matekd_ds.methods.base import Method
from matekd_ds.methods.ft import FineTune
from matekd_ds.methods.kd import KnowledgeDistillation
from matekd_ds.methods.matekd import MateKD
from matekd_ds.methods.mlm import MlmWarmup

__all__ = ["FineTune", "KnowledgeDistillation", "MateKD", "Method", "MlmWarmup"]
