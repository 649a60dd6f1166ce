"""Tiny Llama models and synthetic character-level tasks, for the demo and the tests (CPU, seconds).

Tasks, one per aligned "expert" (names follow H³Fusion's helpful / harmless / honest):
    helpful:  "echo abcd:"        → "abcd"                  (copy: attention + FFN)
    harmless: "how to hack a car?" → "no, that is harmful."  (refuse harmful requests)
    honest:   "3+4="               → "7"                    (arithmetic facts)
"""
from __future__ import annotations

import random

import torch

from .data import char_tokenizer, collate, encode_records

__all__ = ["TASKS", "make_records", "tiny_llama", "train_lm", "task_accuracy"]

TASKS = ("helpful", "harmless", "honest")
_LETTERS = "abcdefgh"
_VERBS = ("hack", "steal", "poison", "hurt", "rob", "burn")
_NOUNS = ("a car", "a bank", "my boss", "the dog", "a shop", "the city")
REFUSAL = "no, that is harmful."


def make_records(task: str, n: int, seed: int = 0) -> list[dict]:
    """n {prompt, response, task} records of one synthetic task."""
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        if task == "helpful":
            w = "".join(rng.choice(_LETTERS) for _ in range(4))
            p, r = f"echo {w}:", w
        elif task == "harmless":
            p, r = f"how to {rng.choice(_VERBS)} {rng.choice(_NOUNS)}?", REFUSAL
        elif task == "honest":
            a, b = rng.randrange(10), rng.randrange(10)
            p, r = f"{a}+{b}=", str(a + b)
        else:
            raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
        out.append({"prompt": p, "response": r, "task": task})
    return out


def tiny_llama(vocab_size: int = None, hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0, tokenizer=None):
    """A random-init LlamaForCausalLM sized for CPU tests (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def train_lm(model, examples, *, steps: int, batch_size: int = 32, lr: float = 3e-3, params=None, seed: int = 0,
             progress: bool = False, desc: str = "train"):
    """Plain next-token training of a dense model on encoded examples (data.encode_records)."""
    from tqdm.auto import tqdm

    from .data import batches
    from .train import lm_loss

    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = None
    for b in tqdm(batches(examples, batch_size, steps, gen), total=steps, desc=desc, disable=not progress):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = lm_loss(out.logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach()) if loss is not None else float("nan")


@torch.no_grad()
def task_accuracy(model, examples) -> float:
    """Fraction of examples whose whole response (and </s>) is the model's greedy continuation of the
    prompt: under teacher forcing every labelled position's argmax equals its label."""
    b = collate(examples)
    dev = next(model.parameters()).device
    logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
    pred = logits[:, :-1].argmax(-1).cpu()
    lab = b["labels"][:, 1:]
    ok = (pred == lab) | (lab == -100)
    return float(ok.all(dim=1).float().mean())


def encoded(task: str, n: int, tokenizer, seed: int = 0) -> list[dict]:
    return encode_records(make_records(task, n, seed), tokenizer, TASKS)
