"""Data for H³Fusion fine-tuning: JSONL task records, a character-level tokenizer, batching.

A record is one JSON object per line: {"prompt": str, "response": str, "task": str}, `task` one of the
fused model's expert names. Encoding: `<s> prompt response </s>`; the LM loss covers the response and
`</s>` only (prompt positions carry label -100), the gating loss covers every real token.

Tiny models built for tests and the demo have no hub tokenizer (and there is no network), so
`char_tokenizer()` builds a `PreTrainedTokenizerFast` over printable ASCII, one token per character, that
saves with a model directory and loads back with `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "DataError",
    "char_tokenizer",
    "read_jsonl",
    "encode_records",
    "collate",
    "batches",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


class DataError(ValueError):
    """A bad data file or record; the message names the file and line."""


def char_tokenizer(chars: str = CHARS):
    """A character-level `PreTrainedTokenizerFast`: ids 0-3 are <pad>, <s>, </s>, <unk>, then one id per
    character of `chars`. Encoding prepends <s>; decoding joins characters without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",  # generation pads on the left; training batches pad themselves (collate)
    )


def read_jsonl(path: str | os.PathLike, task_names: Sequence[str] | None = None) -> list[dict]:
    """Read and check task records. Raises DataError naming `path:line` for a bad line, and
    FileNotFoundError for a missing file. Blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key in ("prompt", "response", "task"):
                if key not in rec:
                    raise DataError(f"{where}: missing key {key!r} (a record needs prompt, response and task)")
                if not isinstance(rec[key], str):
                    raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
            if task_names is not None and rec["task"] not in task_names:
                raise DataError(f"{where}: task {rec['task']!r} is not one of the experts {list(task_names)}")
            rec["_line"] = lineno
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def encode_records(records: Iterable[dict], tokenizer, task_names: Sequence[str], max_length: int = 256) -> list[dict]:
    """Records → examples {input_ids, labels (-100 on the prompt), task (int)}, truncated to max_length."""
    out = []
    eos = tokenizer.eos_token_id
    for rec in records:
        p = tokenizer(rec["prompt"])["input_ids"]
        r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        out.append({"input_ids": ids, "labels": labels, "task": list(task_names).index(rec["task"])})
    return out


def collate(examples: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples → input_ids (B, S), attention_mask (B, S), labels (B, S) with -100 on
    padding, task_labels (B,)."""
    S = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    tasks = torch.tensor([e["task"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_labels": tasks}


def batches(examples: Sequence[dict], batch_size: int, steps: int, generator: torch.Generator | None = None,
            pad_id: int = 0):
    """Yield `steps` batches, reshuffling each pass over the examples."""
    n = len(examples)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist() * max(1, -(-batch_size // n))
        chunk, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in chunk], pad_id)
