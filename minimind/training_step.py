"""The fast training step: a chunked cross-entropy over the vocabulary and a fused AdamW.

The model's own `forward(input_ids, labels=...)` computes the loss the plain way: full logits
(B, S, vocab) in float32, log-softmax, then autograd's backward through both: three tensors of
B*S*vocab floats (52 MB each at the seed's shape). `causal_lm_loss` computes the same loss and its
gradient chunk by chunk in the forward pass, so the full logits never exist; `training_step` puts it
together with the model and the fused optimizer. docs/benchmarks.md has the measured speed. The numbers agree with the plain step to float32
rounding (tests/test_training_step.py).

    loss = training_step(model, input_ids, labels, optimizer)          # one whole step
    loss, aux_loss = model_loss(model, input_ids, labels)              # for a loop of its own
    (loss + aux_loss).backward()
"""
import torch

from .model import MoEFeedForward

IGNORE_INDEX = -100
# Rows of logits per chunk: 1024 x 6400 float32 is 26 MB, a quarter of the full logits at the
# default batch, and still large enough to keep the lm_head matmuls efficient.
DEFAULT_CHUNK_SIZE = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of -log softmax(hidden @ weight^T)[target], with the gradients
    computed in the same pass: d loss / d logits = (softmax - onehot(target)) / n_valid, so
    d hidden = that @ weight and d weight = that^T @ hidden, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_grad, compute_weight_grad):
        # hidden (N, C), weight (V, C), targets (N,) with IGNORE_INDEX for rows without a target
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0).unsqueeze(1)
        # Each row's share of the mean: 1/n_valid, or 0 for ignored rows.
        row_scale = (valid.float() / n_valid).unsqueeze(1)
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
                # softmax - onehot, in place; the 1/n_valid row scale is applied to the narrow
                # (rows, C) operands instead of this wide (rows, V) one.
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
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss is 1 in a plain step; scaling in place saves two copies of large tensors.
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden.mul_(grad_loss), grad_weight, None, None, None, None


def causal_lm_loss(hidden, lm_head_weight, labels, chunk_size=DEFAULT_CHUNK_SIZE):
    """Next-token cross-entropy from the final hidden states, without materialising full logits.

    hidden (B, S, C) is the output of the model's final norm, lm_head_weight (V, C), labels (B, S)
    the unshifted labels as MiniMindForCausalLM.forward takes them (position t predicts labels[t+1];
    -100 is ignored). Returns the float32 mean loss, equal to
    F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100) to float32 rounding.
    The gradients are computed here, in the forward pass, and handed out by one backward: call
    backward once per loss (no retain_graph, no higher-order gradients).
    """
    batch, seq_len, width = hidden.shape
    # Shift the labels rather than the hidden states: the last position gets no target, and
    # hidden stays contiguous.
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    compute_weight_grad = torch.is_grad_enabled() and lm_head_weight.requires_grad
    compute_grad = compute_weight_grad or (torch.is_grad_enabled() and hidden.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden.reshape(batch * seq_len, width), lm_head_weight, targets.reshape(-1), chunk_size,
        compute_grad, compute_weight_grad,
    )


def output_weight(lm_head):
    """The output layer's weight as the forward pass uses it. Under LoRA with trainable special
    tokens, peft wraps the (tied) output layer and swaps the trained rows in at each forward:
    ask its token adapter for that merged weight, so their gradient flows to the trained rows."""
    adapter = getattr(lm_head, "token_adapter", None)
    if adapter is None:
        return lm_head.weight
    if adapter.disable_adapters or adapter.merged or not adapter.active_adapters:
        return adapter.base_layer.weight
    return adapter.get_merged_weights(adapter.active_adapters)


def model_loss(model, input_ids, labels, attention_mask=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """(next-token loss, MoE auxiliary loss) of a MiniMindForCausalLM, by the chunked path.

    Same values as `out = model(input_ids, attention_mask, labels=labels)`; out.loss, out.aux_loss.
    A peft-wrapped model works too: its adapters sit inside the layers that `model.model` runs.
    """
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    hidden = model.model(input_ids, attention_mask)
    loss = causal_lm_loss(hidden, output_weight(model.lm_head), labels, chunk_size)
    aux_loss = sum(
        (layer.mlp.aux_loss for layer in model.model.layers if isinstance(layer.mlp, MoEFeedForward)),
        loss.new_zeros(()),
    )
    return loss, aux_loss


def make_optimizer(parameters, lr, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW with its fused kernel: one pass over each parameter's state instead of the ~10
    per-tensor passes of the default implementation on CPU. `parameters` may be param groups."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


def training_step(model, input_ids, labels, optimizer, attention_mask=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """One step: forward, chunked loss (+ MoE aux loss), backward, optimizer step. Returns the loss."""
    loss, aux_loss = model_loss(model, input_ids, labels, attention_mask, chunk_size)
    (loss + aux_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
