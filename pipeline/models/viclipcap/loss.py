"""Cross-entropy through a frozen LM head, a chunk of positions at a time.

With the head frozen, the only gradient the loss sends back is the one w.r.t. the LM's final hidden
states, ((softmax - onehot) @ W) / n, and it can be made in the forward, chunk by chunk, while each
chunk's logits are at hand. So the (positions × vocabulary) fp32 logits, 200 MB for a batch of 40
captions over GPT-2's 50,257 tokens, are never held at once, and the backward is one multiply.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK = 256  # positions a chunk: 256 × 50,257 fp32 logits are 51 MB


def frozen_head_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = CHUNK,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
    """F.cross_entropy(head(hidden).float(), targets), for a head that gets no gradient; with `weights` (n,),
    each position's share of the loss instead of 1/n: (F.cross_entropy(..., reduction="none") * weights).sum().
    A padding position with weight 0 adds nothing, so padded positions need not be gathered out first.

    hidden: (n, W) the LM's final hidden states at the positions that predict `targets` (n,).
    Under autocast the head's products run in autocast's dtype and the log-softmax in fp32, as
    autocast would run the head and a loss on logits cast to fp32.
    """
    if any(p.requires_grad for p in head.parameters()):
        raise ValueError("frozen_head_cross_entropy: the head has trainable weights, which it would leave without gradients")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    bias = None if head.bias is None else head.bias.float()
    return _FrozenHeadCrossEntropy.apply(hidden, head.weight.to(dtype), bias, targets, weights, chunk)


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, chunk):  # hidden (n, W), weight (V, W), targets (n,)
        n = len(targets)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # no work for it under no_grad
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are the ones meant
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                logits = (hidden[rows].to(weight.dtype) @ weight.T).float()  # (c, V)
                if bias is not None:
                    logits += bias
                logp = logits.log_softmax(dim=1)  # (c, V), fp32
                picked = logp.gather(1, targets[rows, None]).squeeze(1)  # (c,)
                scale = None if weights is None else weights[rows].float()[:, None]  # (c, 1)
                total -= picked.sum() if scale is None else (picked * scale[:, 0]).sum()
                if grad is not None:
                    probs = logp.exp_()  # softmax, in place
                    probs[torch.arange(len(probs), device=probs.device), targets[rows]] -= 1
                    if scale is not None:
                        probs *= scale
                    grad[rows] = probs.to(weight.dtype) @ weight  # (c, W)
        if weights is None:  # the mean
            total /= n
            if grad is not None:
                grad /= n
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None
