"""AdamW over what is trained, its learning-rate schedule, gradient clipping and the precision policy's
gradient scaler: everything a training step needs besides the model and the batch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from pipeline.core.config import TrainSettings
from pipeline.core.devices import Precision, precision
from pipeline.models.base import CaptionModel, trainable


def warm_up_then_decay(warmup: int, steps: int, step: int) -> float:
    """The learning rate's factor at `step`: up from 0 over `warmup` steps, then down to 0 at `steps`. As
    transformers' `get_linear_schedule_with_warmup` computes it, which a baseline's process need not import."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(steps - step) / float(max(1, steps - warmup)))


@dataclass
class Optimisation:
    """Everything a training step needs besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_clip: float | None  # max gradient norm, or None
    policy: Precision  # the precision policy's choice for the device
    # Scales fp16 losses so small gradients do not underflow; a no-op unless the policy is fp16.
    scaler: torch.amp.GradScaler

    @classmethod
    def build(
        cls, model: CaptionModel, settings: TrainSettings, steps: int, device: torch.device
    ) -> Optimisation:
        """AdamW over what is trained, linear warm-up then decay over `steps`, precision from the policy."""
        # Fused on a GPU: one kernel for every parameter's update. Not on the CPU, where its updates round
        # differently from the foreach ones that the CPU's recorded figures come from.
        optimizer = torch.optim.AdamW(trainable(model), lr=settings.lr, weight_decay=settings.weight_decay,
                                      fused=device.type == "cuda")
        policy = precision(device)
        return cls(
            optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warm_up_then_decay, settings.warmup_steps, steps)),
            settings.grad_clip, policy, torch.amp.GradScaler(device.type, enabled=policy == "fp16"),
        )

    def state_dict(self) -> dict:
        return {part: getattr(self, part).state_dict() for part in ("optimizer", "scheduler", "scaler")}

    def load_state_dict(self, state: dict) -> None:
        for part, values in state.items():
            getattr(self, part).load_state_dict(values)

    def step(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainable(model), self.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped where fp16 gradients overflowed
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # the scale drops only after a skipped step
            self.scheduler.step()
