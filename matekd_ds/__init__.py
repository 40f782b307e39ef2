"""matekd-ds: MATE-KD (Masked Adversarial TExt Knowledge Distillation) on DeepSpeed."""

__version__ = "0.1.0"
