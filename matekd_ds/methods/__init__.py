"""Training methods. Each takes a step's micro-batches, runs forward/backward on the engine it
trains and steps it, and returns its losses. `phase(step)` says which engine a step trains."""

from matekd_ds.methods.ft import FineTune
from matekd_ds.methods.kd import KnowledgeDistillation
from matekd_ds.methods.matekd import MateKD

__all__ = ["FineTune", "KnowledgeDistillation", "MateKD"]
