"""Knowledge distillation: a student learns from a teacher's whole next-token distribution.

Beside the usual cross-entropy against the text's next token, the student is pulled towards the
teacher's prediction at every labelled position, softened by a temperature T:

    p_t = softmax(teacher logits / T),  p_s = softmax(student logits / T)
    loss = CE(student, next tokens) + alpha * T^2 * KL(p_t || p_s)
    KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v))

both terms averaged over the labelled tokens (all tokens in pretraining text, the assistant's in
conversations). The teacher's distribution says which wrong tokens are nearly right, which one
observed token cannot. T > 1 flattens both distributions so those small probabilities count; the
T^2 keeps the gradient's size independent of T (the KL's gradient shrinks as 1/T^2).

Written this way the teacher only adds: a teacher that predicts exactly what the student does (its
own copy) adds a KL of 0 with a gradient of 0, and the loss is the student's cross-entropy
(tests/test_distill.py). The teacher is frozen and in eval mode; it must share the student's
tokenizer (the same vocabulary means the same thing), which is checked.
"""
import torch
import torch.nn.functional as F

from ..data.tokenizer import load_tokenizer, tokenizer_hash
from ..errors import UserError
from ..inference.decoding import model_device
from ..inference.loading import saved_tokenizer_dir
from ..model.checkpoint import load_model
from ..model.kernels import IGNORE_INDEX, next_token_targets


def distillation_kl(student_logits, teacher_logits, temperature):
    """KL(softmax(t / T) || softmax(s / T)) for each row, (N,), from logits (N, V), in float32."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)


def distill_loss(model, batch, normalizer, helpers):
    """CE + alpha * T^2 * KL over the labelled tokens (and the MoE balancing loss), each a sum over
    the tokens divided by `normalizer` (labelled tokens in the whole optimizer step). The student's
    cross-entropy comes from its forward, exactly as pretraining and SFT compute it."""
    teacher, temperature, alpha = helpers["teacher"], helpers["temperature"], helpers["alpha"]
    input_ids, labels = batch["input_ids"], batch["labels"]
    out = model(input_ids, labels=labels, num_items_in_batch=normalizer)
    labelled = next_token_targets(labels) != IGNORE_INDEX
    student_logits = out.logits.reshape(-1, out.logits.shape[-1])[labelled]
    with torch.no_grad():
        teacher_logits = teacher(input_ids).logits.reshape(-1, out.logits.shape[-1])[labelled]
    kl = distillation_kl(student_logits, teacher_logits, temperature).sum() / normalizer
    share = int(labelled.sum()) / normalizer  # this micro-batch's part of the step
    loss = out.loss + alpha * temperature ** 2 * kl + out.aux_loss * share
    return loss, {"loss": loss.detach(), "ce": out.loss.detach(), "kl": kl.detach()}


def load_teacher(path, student, tokenizer_path):
    """The frozen teacher (eval mode, on the student's device), refused when it cannot share the
    student's tokenizer: another vocabulary size, or another tokenizer saved with it."""
    teacher = load_model(path, device=model_device(student))
    for p in teacher.parameters():
        p.requires_grad_(False)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"--teacher {path}: its vocabulary has {teacher.config.vocab_size} tokens, the student's "
                        f"{student.config.vocab_size}; distillation compares their predictions token by token, "
                        f"so both must use the same tokenizer")
    saved = saved_tokenizer_dir(path)
    if saved is not None and tokenizer_hash(load_tokenizer(saved)) != tokenizer_hash(load_tokenizer(tokenizer_path)):
        raise UserError(f"--teacher {path}: it was trained with the tokenizer in {saved}, which differs from the "
                        f"student's (--tokenizer); distill with the teacher's tokenizer")
    return teacher
