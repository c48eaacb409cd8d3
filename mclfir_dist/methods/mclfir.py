"""MCL-FIR: an EMA teacher of the encoder, updated after every optimizer step, and a distillation
term (`loss.kd_type`, registered in losses.DISTILLATIONS) that pulls the student towards it."""
from typing import Dict, List

from .losses import DISTILLATIONS
from .teacher import EMATeacher
from .base import METHODS, IncrementContext, LossTerm, Method, StepOutput, distil_rows


@METHODS.register("mclfir", label="MCL-FIR")
class MCLFIR(Method):
    tune_space = {**Method.tune_space, "loss.kd_weight": {"log": [0.1, 100.0]},
                  "teacher.decay": {"choices": [0.9, 0.95, 0.98, 0.99, 0.995, 0.999]}}

    def setup(self, model) -> None:
        self.teacher = EMATeacher(model.trunk, self.cfg.teacher.decay, self.cfg.teacher.warmup_steps)
        self.teacher.to(self.runtime.device)
        self.kd = DISTILLATIONS.get(self.cfg.loss.kd_type)

    def begin_increment(self, ctx: IncrementContext, model, resuming: bool) -> None:
        self.teacher.forget_tensor_lists()   # the increment's prepare() may move or cast the student

    def distillation(self, ctx: IncrementContext, model, out: StepOutput) -> List[LossTerm]:
        if self.cfg.loss.kd_weight <= 0 or (self.kd.needs_old_heads and not ctx.old_attributes):
            return []
        rows = self.rows_to_distil()
        _, pooled, fmap = distil_rows(out, rows)
        views = out.batch["teacher_images"][:rows].to(self.runtime.device, non_blocking=True)
        old_heads = [model.heads[a] for a in ctx.old_attributes]
        return [LossTerm("kd", self.cfg.loss.kd_weight, self.kd.loss(pooled, fmap, self.teacher(views), old_heads))]

    def after_step(self, model) -> None:
        self.teacher.update(model.trunk)

    def modules(self):
        return [self.teacher.module]

    def state_dict(self) -> Dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.teacher.load_state_dict(state["teacher"])

    def log_values(self) -> Dict[str, float]:
        return {"train/teacher_decay": self.teacher.current_decay()}
