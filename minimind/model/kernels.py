"""Speed kernels that the model calls: the same numbers as a few lines of plain PyTorch, computed with
less memory and fewer passes. Each is tested against its plain formula in tests/test_kernels.py.

- `rms_norm`: RMSNorm with its gradient written out (`RMSNormFunction`).
- `next_token_loss`: the next-token cross-entropy straight from the final hidden states, chunk by
  chunk, so the (tokens x vocabulary) logits never exist at once, and for the labelled rows alone
  where a batch's prompts and padding are a share of it (`labelled_rows`). Training, validation,
  `eval`, DPO and GRPO all compute their losses and log-probabilities here, through the model's
  forward.

The plain forms, for reference:

    rms_norm(x, w)        = w * (x / sqrt(mean(x^2) + eps))        (normalised in float32)
    next_token_loss(h, W) = cross_entropy((h @ W^T)[:, :-1], labels[:, 1:], ignore_index=-100)
"""
import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX

# Rows of logits per chunk: 1024 x 6400 float32 is 26 MB, a quarter of the full logits at the
# default batch, and still large enough to keep the lm_head matmuls efficient.
DEFAULT_CHUNK_SIZE = 1024
# labelled_rows keeps every row where more than this share of them has a target
MOSTLY_LABELLED = 0.95


# ---------------------------------------------------------------- RMSNorm

class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out, so that backward needs only x and r = rsqrt(mean(x^2) + eps).

    With n = x * r and y = n * w, g = dL/dy, gn = g * w, C the width:
        dL/dw = sum over rows of g * n
        dL/dx = r * (gn - n * mean(gn * n))
    Autograd of the three-line forward would keep n as well (one more activation per norm) and
    take more passes over memory.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, scale_in_float32=False):
        x32 = x.float().reshape(-1, x.shape[-1])
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        if scale_in_float32:  # MiniMind-3's order: scaled in float32, then cast back
            return (x32 * rstd * weight).to(x.dtype).view(*x.shape[:-1], -1)
        # Normalised in float32, cast back to x's dtype, then scaled (the original MiniMind2's order).
        return ((x32 * rstd).to(x.dtype) * weight).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        normed = x.float().reshape(-1, width) * rstd
        grad = grad_out.float().reshape(-1, width)
        grad_weight = (grad * normed).sum(0)
        grad_normed = grad * weight.float()
        grad_x = torch.addcmul(grad_normed, normed, (grad_normed * normed).mean(-1, keepdim=True), value=-1)
        return grad_x.mul_(rstd).view_as(x).to(x.dtype), grad_weight.to(weight.dtype), None, None


def rms_norm(x, weight, eps, scale_in_float32=False):
    """weight * x / sqrt(mean(x^2) + eps), normalised in float32; cast back to x's dtype before scaling
    (MiniMind2, Llama), or after it with scale_in_float32 (MiniMind-3). In float32 the two are equal."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps, scale_in_float32)
    # Inference: the same arithmetic without the autograd.Function's per-call overhead
    # (16% of a decode step at the default shape); in float32, torch's fused kernel does it.
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight).to(x.dtype) if scale_in_float32 else normed.to(x.dtype) * weight


# ---------------------------------------------------------------- next-token cross-entropy

def labelled_rows(hidden, targets):
    """(index, hidden, targets) of the rows of hidden (N, C) that have a target, so that the losses
    compute the output layer's logits for those alone: prompts and padding are most of a
    conversation batch's rows (on the demo data 13-29% of an SFT batch's rows have a label, replayed
    text included; GRPO's 24-28%, DPO's 16-26%), and each row's (V, C) product is the step's
    largest at MiniMind's sizes. index None, and hidden and targets as they are, where nearly every
    row has one (packed pretraining text: all but each sequence's last position), so pretraining
    computes what it did."""
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if len(index) > hidden.shape[0] * MOSTLY_LABELLED:
        return None, hidden, targets
    return index, hidden.index_select(0, index), targets.index_select(0, index)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of row_scale * -log softmax(hidden @ weight^T)[target], with the gradients computed
    in the same pass: d loss / d logits = (softmax - onehot(target)) * row_scale, so d hidden = that @
    weight and d weight = that^T @ hidden, chunk by chunk. No recomputation in backward: right for a
    scalar loss whose every row weight is known in advance (a mean, or a sum over a known count)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_scale, chunk_size, compute_grad, compute_weight_grad):
        # hidden (N, C), weight (V, C), targets (N,) (rows without a target are clamped, their scale is 0)
        hidden_all = hidden
        index, hidden, targets = labelled_rows(hidden, targets)
        if index is not None:
            row_scale = row_scale.index_select(0, index)
        safe_targets = targets.clamp(min=0).unsqueeze(1)
        row_scale = row_scale.unsqueeze(1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad else None
        # A frozen output layer (LoRA without trainable tokens) needs no weight gradient.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if compute_weight_grad else None
        # Under autocast (or with bfloat16 activations) the matmuls run in the activations' dtype;
        # the loss and the softmax are always float32.
        weight_ = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_probs = torch.log_softmax((hidden[rows] @ weight_.t()).float(), dim=-1)
            target_log_probs = log_probs.gather(1, safe_targets[rows])
            loss -= (target_log_probs * row_scale[rows]).sum()
            if compute_grad:
                # softmax - onehot, in place; the row scale is applied to the narrow (rows, C)
                # operands instead of this wide (rows, V) one.
                grad_logits = log_probs.exp_()
                grad_logits.scatter_add_(1, safe_targets[rows], torch.full_like(target_log_probs, -1.0))
                grad_logits = grad_logits.to(hidden.dtype)
                scale = row_scale[rows].to(hidden.dtype)
                torch.mul(grad_logits @ weight_, scale, out=grad_hidden[rows])
                if grad_weight is None:
                    continue
                if grad_weight.dtype == hidden.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows] * scale)
                else:
                    grad_weight += grad_logits.t() @ (hidden[rows] * scale)
        if compute_grad and index is not None:  # the rows without a target get no gradient
            grad_hidden = torch.zeros_like(hidden_all).index_copy_(0, index, grad_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss is 1 in a plain step; scaling in place saves two copies of large tensors.
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden.mul_(grad_loss), grad_weight, None, None, None, None, None


class _LinearTokenLosses(torch.autograd.Function):
    """Per-row -log softmax(hidden @ weight^T)[target], (N,), 0 for rows without a target.

    For losses that combine rows in ways unknown in advance (DPO's sigmoid of a difference of
    summed log-probabilities): backward recomputes each chunk's softmax from the saved log-sum-exp,
    d hidden = (g * (softmax - onehot)) @ weight, one extra matmul per chunk instead of keeping
    the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        rows_all = hidden.shape[0]
        index, hidden, targets = labelled_rows(hidden, targets)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0).unsqueeze(1)
        weight_ = weight.to(hidden.dtype)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_sum_exp = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight_.t()).float()
            log_sum_exp[rows] = torch.logsumexp(logits, dim=-1)
            losses[rows] = log_sum_exp[rows] - logits.gather(1, safe_targets[rows]).squeeze(1)
        losses.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, safe_targets, valid, log_sum_exp, index)
        ctx.chunk_size, ctx.rows_all = chunk_size, rows_all
        if index is None:
            return losses
        return losses.new_zeros(rows_all).index_copy_(0, index, losses)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, safe_targets, valid, log_sum_exp, index = ctx.saved_tensors
        if index is not None:
            grad_losses = grad_losses.index_select(0, index)
        weight_ = weight.to(hidden.dtype)
        scale = (grad_losses * valid).unsqueeze(1)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            grad_logits = ((hidden[rows] @ weight_.t()).float() - log_sum_exp[rows].unsqueeze(1)).exp_()
            grad_logits.scatter_add_(1, safe_targets[rows], torch.full_like(scale[rows], -1.0))
            grad_logits = (grad_logits * scale[rows]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight_
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ hidden[rows]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_hidden is not None and index is not None:  # the rows without a target get none
            grad_hidden = grad_hidden.new_zeros(ctx.rows_all, hidden.shape[1]).index_copy_(0, index, grad_hidden)
        return grad_hidden, grad_weight, None, None


def next_token_targets(labels):
    """Position t predicts labels[t + 1]; the last position predicts nothing. (B, S) -> (B*S,)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets.reshape(-1)


def next_token_loss(hidden, weight, labels, num_items_in_batch=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """Cross-entropy of the next token, summed over the labelled tokens (labels != IGNORE_INDEX) and divided
    by `num_items_in_batch` (default: their number here, that is the mean).

    hidden (B, S, C) is the output of the model's final norm, weight (V, C) the output layer's,
    labels (B, S) the unshifted labels as the model's forward takes them. A count larger than this
    batch's (the labelled tokens of all micro-batches of an optimizer step) makes accumulated
    micro-batches add up to the gradient of one large batch, each token weighing the same.
    The gradients are computed here, in the forward pass, and handed out by one backward: call
    backward once per loss (no retain_graph, no higher-order gradients).
    """
    batch, seq_len, width = hidden.shape
    targets = next_token_targets(labels)
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    row_scale = valid.float() / count
    compute_weight_grad = torch.is_grad_enabled() and weight.requires_grad
    compute_grad = compute_weight_grad or (torch.is_grad_enabled() and hidden.requires_grad)
    return _LinearCrossEntropy.apply(hidden.reshape(batch * seq_len, width), weight, targets, row_scale,
                                     chunk_size, compute_grad, compute_weight_grad)


def next_token_losses(hidden, weight, labels, chunk_size=DEFAULT_CHUNK_SIZE):
    """The cross-entropy of each next token, (B, S): entry t is -log p(labels[t+1] | tokens <= t),
    0 where there is no label. Differentiable for any use of the result."""
    batch, seq_len, width = hidden.shape
    losses = _LinearTokenLosses.apply(hidden.reshape(batch * seq_len, width), weight,
                                      next_token_targets(labels), chunk_size)
    return losses.view(batch, seq_len)


def output_weight(lm_head):
    """The output layer's weight as its forward pass applies it. Under LoRA with trainable special
    tokens, peft wraps the (tied) output layer and swaps the trained rows in at each forward:
    ask its token adapter for that merged weight, so their gradient flows to the trained rows."""
    adapter = getattr(lm_head, "token_adapter", None)
    if adapter is None:
        return lm_head.weight
    if adapter.disable_adapters or adapter.merged or not adapter.active_adapters:
        return adapter.base_layer.weight
    return adapter.get_merged_weights(adapter.active_adapters)
