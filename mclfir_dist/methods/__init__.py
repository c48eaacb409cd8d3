"""Training methods, one file each, behind one interface (base.Method) and one registry (METHODS).

Importing this package registers the built-in methods: mclfir, finetune, lwf, frozen, static_joint."""
from .base import METHODS, IncrementContext, IncrementPlan, LossTerm, Method, StepOutput, build_method
from . import finetune, frozen, lwf, mclfir, static_joint  # noqa: F401  (registration)

__all__ = ["METHODS", "IncrementContext", "IncrementPlan", "LossTerm", "Method", "StepOutput", "build_method"]
