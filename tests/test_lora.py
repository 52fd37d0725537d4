"""LoRA: only adapters train, peft opens what we save, merging changes nothing, resume is exact."""
import warnings

import torch
from peft import PeftModel

from minimind import MiniMindConfig, MiniMindForCausalLM, load_model
from minimind.commands.main import main as cli_main
from minimind.commands.train import main as train_main
from minimind.commands.train import parse as parse_train_args
from minimind.data.batching import collate
from minimind.data.datasets import SFTDataset
from minimind.data.tokenizer import load_tokenizer
from minimind.model.lora import add_lora, apply_adapter, merged_copy
from minimind.training.stages.stage import count_labelled_tokens, language_model_loss

from .conftest import TINY, assert_same_weights, train_until_third_save

LORA = ["--lora_rank", "4", "--lora_alpha", "8"]


def tiny_lora_model(seed=0):
    torch.manual_seed(seed)
    base = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    model = add_lora(base, parse_train_args(LORA).lora)
    for name, p in model.named_parameters():  # B starts at zero; make the update visible
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_only_adapter_parameters_change_in_a_step(conversations):
    model = tiny_lora_model().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)  # the special tokens' embedding rows
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) < 0.05 * total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate([SFTDataset([conversations], load_tokenizer(), 64)[i] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = language_model_loss(model, batch, count_labelled_tokens(batch))
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in trainable), name


def test_chunked_loss_through_adapters_matches_full_logits():
    """Training's chunked loss sees the adapters and the trained special-token rows exactly as the
    full logits of peft's own forward do: same loss, same gradients on every trainable tensor."""
    ids = torch.randint(0, 6400, (3, 16))
    ids[:, 3] = 2  # <|im_end|> as input and as target: its trained row matters both ways
    labels = ids.clone()
    labels[0, :5] = -100
    grads = []
    for fast in (True, False):
        model = tiny_lora_model().train()
        for name, p in model.named_parameters():
            if "trainable_tokens" in name:
                torch.nn.init.normal_(p, std=0.5)
        if fast:
            loss = model(ids, labels=labels, return_logits=False).loss
        else:
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = grads
    assert abs(fast_loss - plain_loss) < 1e-5 * plain_loss
    assert fast_grads.keys() == plain_grads.keys() and any("trainable_tokens" in n for n in fast_grads)
    for name in plain_grads:
        assert plain_grads[name].abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_merged_logits_equal_adapter_logits():
    model = tiny_lora_model().eval()
    ids = torch.randint(0, 6400, (2, 12))
    with torch.no_grad():
        with_adapter = model(ids).logits
        merged = merged_copy(model)
        assert isinstance(merged, MiniMindForCausalLM)
        assert (merged(ids).logits - with_adapter).abs().max().item() < 1e-5
        with model.disable_adapter():
            assert (model(ids).logits - with_adapter).abs().max().item() > 1e-3  # the adapter does something


def test_lora_training_writes_an_adapter_peft_opens_and_merge_matches(conversations, tmp_path):
    base_dir = tmp_path / "base"
    torch.manual_seed(1)
    MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)).save_pretrained(base_dir)
    load_tokenizer().save_pretrained(base_dir)
    out = tmp_path / "lora"
    assert train_main(TINY[8:] + LORA + ["--data", str(conversations), "--pretrained_path", str(base_dir),
                                         "--max_steps", "3", "--learning_rate", "1e-2", "--output_dir", str(out)]) == 0
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    # the checkpoint holds the adapters only, not a copy of the base
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"] and all("lora_" in k or "trainable_tokens" in k for k in checkpoint["model"])
    ids = torch.randint(0, 6400, (1, 10))
    peft_model = PeftModel.from_pretrained(load_model(base_dir), str(adapter)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["merge", "--base", str(base_dir), "--adapter", str(adapter), "--out",
                         str(tmp_path / "merged")]) == 0
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    # one copy of the weights unless --save_pth asks for the original format too
    assert (tmp_path / "merged" / "model.safetensors").exists() and not (tmp_path / "merged" / "model.pth").exists()
    assert cli_main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output_dir",
                     str(tmp_path / "merged_pth"), "--save_pth"]) == 0
    with torch.no_grad():
        reference = peft_model(ids).logits
        assert (load_model(tmp_path / "merged")(ids).logits - reference).abs().max().item() < 1e-5
        assert (load_model(tmp_path / "merged_pth" / "model.pth")(ids).logits - reference).abs().max().item() < 1e-5
        assert (load_model(out / "final")(ids).logits - reference).abs().max().item() < 1e-5
        assert (apply_adapter(load_model(base_dir), adapter)(ids).logits - reference).abs().max().item() < 1e-5
        assert (load_model(base_dir)(ids).logits - reference).abs().max().item() > 1e-4


def test_lora_resume_is_exact(conversations, tmp_path, monkeypatch):
    args = TINY + LORA + ["--data", str(conversations), "--epochs", "2", "--save_steps", "3", "--learning_rate", "5e-3"]
    assert train_main(args + ["--output_dir", str(tmp_path / "ref")]) == 0
    train_until_third_save(args, tmp_path / "cut", monkeypatch)
    assert train_main(args + ["--output_dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert_same_weights(torch.load(tmp_path / "cut" / "model_final.pth", weights_only=True),
                        torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True))


def test_gradient_checkpointing_trains_lora_to_the_same_weights(conversations, tmp_path, monkeypatch):
    args = TINY + LORA + ["--data", str(conversations), "--max_steps", "3", "--learning_rate", "5e-3", "--dropout", "0.1"]
    assert train_main(args + ["--output_dir", str(tmp_path / "plain")]) == 0
    import minimind.model.model
    real_checkpoint, calls = minimind.model.model.checkpoint, []
    monkeypatch.setattr(minimind.model.model, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    assert train_main(args + ["--output_dir", str(tmp_path / "ckpt"), "--gradient_checkpointing"]) == 0
    assert len(calls) >= 3 * 2  # every block of every training step went through checkpoint
    assert_same_weights(torch.load(tmp_path / "ckpt" / "model_final.pth", weights_only=True),
                        torch.load(tmp_path / "plain" / "model_final.pth", weights_only=True))
