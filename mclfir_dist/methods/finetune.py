"""finetune: new heads train, the encoder keeps training, no distillation (the forgetting baseline)."""
from .base import METHODS, Method


@METHODS.register("finetune", label="Fine-tune")
class Finetune(Method):
    """The base class's defaults, under its own name."""
