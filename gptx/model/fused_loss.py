"""The output head and the cross-entropy loss in one pass over chunks of positions
(train.fused_loss), so the (B, T, V) logits never exist whole.

Unfused, the head's logits, their fp32 copy, the log-softmax that cross-entropy keeps for
backward and the gradient of the logits are each B*T x V: with GPT-2's vocabulary they
dwarf everything else the last stage holds. Here each chunk of positions goes through
logits, log-sum-exp, its loss and the gradient of its logits within forward, and only its
share of grad_x and grad_W outlives it. Backward then only multiplies those by the incoming
gradient, so no matmul is recomputed: the head still costs its three matmuls (logits,
grad_x, grad_W), all done once, in forward.

Only the training engines use it (gptx.parallel.pipeline, gptx.parallel.data_parallel, the benchmark's plain
loop): there the head layer returns (hidden, weight) and the loss function does the head's
work. `GPT` keeps returning logits for sampling, evaluation and export.
"""
from __future__ import annotations

import torch

# Budget of one chunk's fp32 logits. Bytes rather than positions, so the memory a chunk
# takes does not grow with the vocabulary (a 256-token vocabulary gets 131,072 positions a
# chunk, a 256k one 131). Each chunk also reads and writes the whole fp32 grad_W
# accumulator, 8 bytes per weight, against 6 FLOPs per weight per position of its three
# matmuls: a chunk needs some hundreds of positions to stay compute-bound on a GPU, which
# this budget gives GPT-2's table (667 positions of 50,304 rows).
CHUNK_BYTES = 128 * 2 ** 20
IGNORE_INDEX = -100  # F.cross_entropy's default: such labels add no loss and no gradient


def chunk_positions(vocab_rows: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that a chunk's fp32 logits fit `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab_rows))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply in here: autocast's, else the activations' own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against labels; gradients made in forward.

    The gradients are kept unscaled and in fp32 until backward multiplies them by
    grad_output: with fp16, grad_output is the loss scale, and (softmax - onehot) / N
    of a large batch alone would underflow fp16.
    """

    @staticmethod
    def forward(ctx, x, weight, labels, vocab_size: int, rows: int, dtype: torch.dtype,
                grad_x_needed: bool, grad_w_needed: bool):
        n_pos, width = x.shape
        vocab_rows = weight.size(0)
        device = x.device
        with torch.autocast(device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            valid = labels != IGNORE_INDEX
            # Gathers need an index in range; the ignored rows' losses and gradients are dropped below.
            targets = labels.masked_fill(~valid, 0)
            n_valid = valid.sum().to(torch.float32)
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            grad_x = torch.empty(n_pos, width, dtype=torch.float32, device=device) if grad_x_needed else None
            grad_w = torch.zeros(vocab_rows, width, dtype=torch.float32, device=device) if grad_w_needed else None
            for start in range(0, n_pos, rows):
                end = min(start + rows, n_pos)
                logits = torch.mm(xc[start:end], wc.t()).float()  # (r, C) x (C, V) -> (r, V), fp32
                if vocab_rows != vocab_size:
                    # Padding rows are never tokens: exp(-inf) gives them no probability and no gradient,
                    # and the weight keeps its aligned width.
                    logits[:, vocab_size:] = float("-inf")
                target = targets[start:end, None]  # (r, 1)
                target_logit = logits.gather(1, target)  # (r, 1)
                top = logits.amax(1, keepdim=True)  # (r, 1)
                # In place from here: the chunk's logits become its softmax, then its gradient.
                probs = logits.sub_(top).exp_()
                total = probs.sum(1, keepdim=True)  # (r, 1)
                row_loss = total.log() + top - target_logit  # (r, 1): log-sum-exp - target logit
                keep = valid[start:end, None]  # (r, 1)
                loss_sum += torch.where(keep, row_loss, 0.0).sum()
                del logits  # the next chunk's logits are allocated before this loop variable is rebound
                if grad_x is None and grad_w is None:
                    del probs
                    continue
                grad = probs.div_(total)
                grad.scatter_add_(1, target, torch.full_like(target_logit, -1.0))  # softmax - onehot
                grad32 = grad
                # In the compute dtype, as autocast's linear backward would: unscaled, |values| <= 1.
                grad = grad.to(dtype)
                # Ignored positions are dropped on the (r, C) side of each product rather than in the
                # (r, V) gradient: a cheaper pass, and no host read of whether any label is ignored.
                if grad_x is not None:
                    if dtype == torch.float32:
                        torch.mm(grad, wc, out=grad_x[start:end])
                    else:
                        grad_x[start:end] = torch.mm(grad, wc)  # (r, V) x (V, C) -> (r, C)
                    grad_x[start:end].mul_(keep)
                if grad_w is not None:
                    x_kept = xc[start:end] * keep  # (r, C)
                    if dtype == torch.float32:
                        grad_w.addmm_(grad.t(), x_kept)  # (V, r) x (r, C)
                    elif dtype == torch.float16:
                        # A chunk's sum over its positions, before the 1/N, can pass fp16's 65,504
                        # (a token repeated next to large activations) where the unfused path,
                        # which divides first, does not: this product is taken in fp32.
                        grad_w.addmm_(grad32.t(), x_kept.float())
                    else:
                        grad_w += torch.mm(grad.t(), x_kept)
                del probs, grad, grad32
            inv_n = 1.0 / n_valid
            for g in (grad_x, grad_w):
                if g is not None:
                    g.mul_(inv_n)
        ctx.grads = [grad_x, grad_w]
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss_sum * inv_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("the fused loss's gradients were already used: it supports one backward "
                               "(no retain_graph)")
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            # Scaled in fp32 first: with fp16 grad_output is the loss scale that lifts g into range.
            out.append(None if g is None else g.mul_(grad_output).to(dtype))
        grads.clear()  # no other reference, so autograd can take fp32 tensors as .grad without a copy
        return out[0], out[1], None, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
                         rows: int | None = None) -> torch.Tensor:
    """The loss `lm_loss(vocab_logits(x, weight, vocab_size), labels)` gives, chunk by chunk.

    x (..., C) hidden states, weight (V padded, C), labels (...) token ids; `vocab_size` the
    real rows of the table (default all), `rows` positions per chunk (default: CHUNK_BYTES of
    fp32 logits). Returns the mean over the positions whose label is not -100, in fp32.
    """
    vocab_size = weight.size(0) if vocab_size is None else vocab_size
    rows = rows or chunk_positions(weight.size(0))
    x2 = x.flatten(0, -2)  # (..., C) -> (N, C)
    grad_on = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(x2, weight, labels.reshape(-1), vocab_size, rows, _compute_dtype(x),
                                     grad_on and x.requires_grad, grad_on and weight.requires_grad)


class FusedLMLoss:
    """The loss_fn in fused mode: `outputs` is what the fused head returns, (hidden, weight)
    (gptx.model.layers: tied_hidden_and_weight, LMHead(fused=True))."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        hidden, weight = outputs
        return linear_cross_entropy(hidden, weight, labels, self.vocab_size)


def hidden_and_head_weight(head: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused head's outputs for a model assembled on one device (GPT.head()): x and the
    table, the embedding's when tied (TokenEmbedding), else LMHead's."""
    return x, head.wte.weight if hasattr(head, "wte") else head.lm_head.weight
