"""The `h3moe` console script.

    h3moe fuse --expert PATH [--expert PATH ...] [--name NAME ...] [--base PATH] --out DIR
    h3moe train --model DIR --data FILE.jsonl [--out DIR]
    h3moe generate --model DIR --prompt TEXT [--prompt TEXT ...]
    h3moe info
    h3moe bench [ARGS...]          (runs the benchmark driver, `python -m bench`)

Outputs are written to a temporary directory beside --out and renamed into place only when complete, so a
failure never leaves a half-written --out. Errors (bad paths, bad records with their line number, config
mismatches) print one line `h3moe: error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

__all__ = ["main"]


class CLIError(Exception):
    pass


@contextmanager
def _atomic_dir(out: str, force: bool):
    """Yield a temp dir next to `out`; on success move it to `out` (replacing it with force=True)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force and not (os.path.isdir(out) and not os.listdir(out)):
        raise CLIError(f"--out {out} exists and is not empty (pass --force to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CLIError(f"--out {out}: parent directory {parent} does not exist")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise CLIError(f"--dtype: expected one of {sorted(table)} or auto, got {name!r}")
    return table[name]


def _check_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise CLIError(f"{what}: no such directory: {path}")
    return path


def _load_tokenizer(*paths):
    from transformers import AutoTokenizer

    for p in paths:
        if p and os.path.isdir(p) and any(os.path.isfile(os.path.join(p, f))
                                          for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(p)
    return None


def _fused_model(path: str, device, dtype=None):
    from transformers import AutoModelForCausalLM

    _check_dir(path, "--model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"--model: {path} has no config.json (not a model directory)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto").to(device)
    return model.eval()


def _expert_names(config) -> list[str]:
    names = getattr(config, "h3fusion_experts", None)
    E = getattr(config, "num_local_experts", None)
    if E is None:
        raise CLIError(f"model_type {getattr(config, 'model_type', '?')!r} is not a fused MoE model "
                       f"(no num_local_experts)")
    return list(names) if names and len(names) == E else [f"expert{e}" for e in range(E)]


# ----------------------------------------------------------------------------------------------- commands

def cmd_fuse(a) -> int:
    from .fusion import fuse
    from .fusion.data import read_jsonl

    for p in a.expert:
        _check_dir(p, "--expert")
    if a.base:
        _check_dir(a.base, "--base")
    names = a.name or [os.path.basename(os.path.normpath(p)) for p in a.expert]
    if len(names) != len(a.expert):
        raise CLIError(f"--name: given {len(names)} names for {len(a.expert)} experts")
    if len(set(names)) != len(names):
        raise CLIError(f"expert names must be distinct, got {names} (use --name)")
    tok = _load_tokenizer(a.base, *a.expert)
    prompts = None
    if a.router_init == "hidden":
        if not a.prompts:
            raise CLIError("--router-init hidden needs --prompts FILE.jsonl (records with prompt and task)")
        if tok is None:
            raise CLIError("--router-init hidden needs a tokenizer saved with the base or an expert")
        recs = read_jsonl(a.prompts, names)
        prompts = [[r["prompt"] for r in recs if r["task"] == n][: a.num_prompts] for n in names]
        missing = [n for n, p in zip(names, prompts) if not p]
        if missing:
            raise CLIError(f"--prompts {a.prompts}: no prompts for expert(s) {missing}")
    with _atomic_dir(a.out, a.force) as tmp:
        print(f"fusing {len(a.expert)} experts {names} (top_k={a.top_k}, router={a.router_init}, "
              f"attention={a.attention})", file=sys.stderr)
        model = fuse(a.expert, base=a.base, top_k=a.top_k, router_init=a.router_init, attention=a.attention,
                     names=names, prompts=prompts, tokenizer=tok, dtype=_dtype(a.dtype), seed=a.seed,
                     progress=True, check_architecture=not a.any_architecture)
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    print(f"wrote {a.out}: MixtralForCausalLM, {model.config.num_hidden_layers} layers x "
          f"{model.config.num_local_experts} experts, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0


def cmd_train(a) -> int:
    import torch

    from .fusion import H3FusionLoss, freeze_for_fusion, router_accuracy, train_fusion, use_h3moe_experts
    from .fusion.data import collate, encode_records, read_jsonl

    _check_dir(a.model, "--model")
    if not os.path.isfile(a.data):
        raise CLIError(f"--data: no such file: {a.data}")
    if a.grad_accum < 1 or a.batch_size % a.grad_accum:
        raise CLIError(f"--grad-accum {a.grad_accum}: expected a positive divisor of --batch-size {a.batch_size}")
    out = a.out or a.model
    force = a.force or out == a.model
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise CLIError(f"--model: {a.model} has no config.json (not a model directory)")
    names = _expert_names(AutoConfig.from_pretrained(a.model))
    recs = read_jsonl(a.data, names)  # every record is checked before the model loads
    device = _device(a.device)
    model = _fused_model(a.model, device, _dtype(a.dtype))
    tok = _load_tokenizer(a.model)
    if tok is None:
        raise CLIError(f"--model {a.model}: no tokenizer saved there")
    examples = encode_records(recs, tok, names, a.max_length)
    torch.manual_seed(a.seed)
    impl = use_h3moe_experts(model)
    freeze_for_fusion(model, attention=a.train_attention)
    loss = H3FusionLoss(model, gate_coef=a.gate_coef, gammas=a.gamma, load_balancing_coef=a.lb_coef,
                        z_coef=a.z_coef, variant=a.variant, backend=a.backend)
    probe = collate(examples[: min(len(examples), 256)])
    before = router_accuracy(model, probe, len(names))
    print(f"training {len(examples)} records, {a.steps} steps on {device} (experts: {impl})", file=sys.stderr)
    hist = train_fusion(model, examples, steps=a.steps, batch_size=a.batch_size, lr=a.lr, router_lr=a.router_lr,
                        loss=loss, seed=a.seed, progress=not a.quiet, grad_accum=a.grad_accum,
                        gradient_checkpointing=a.gradient_checkpointing)
    after = router_accuracy(model, probe, len(names))
    with _atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    first, last = hist[0], hist[-1]
    print("loss " + ", ".join(f"{k} {first[k]:.4f} -> {last[k]:.4f}" for k in last if k != "step"))
    print("router accuracy " + ", ".join(
        f"{n} {before.get(i, float('nan')):.0%} -> {after.get(i, float('nan')):.0%}" for i, n in enumerate(names)))
    print(f"wrote {out}")
    return 0


def cmd_generate(a) -> int:
    import torch

    from .reference import mean_router_probs_ref

    device = _device(a.device)
    if a.quantize:
        # experts quantized on the CPU, then moved: a fused model larger than the GPU in bf16 fits packed
        from .integrations.bitsandbytes import quantize

        model = _fused_model(a.model, "cpu", _dtype(a.dtype))
        try:
            model = quantize(model, a.quantize, a.blocksize, a.double_quant)
        except ValueError as err:
            raise CLIError(f"--quantize {a.quantize}: {err}") from None
        print(model.h3moe_quant_report)
        model = model.to(device)
    else:
        model = _fused_model(a.model, device, _dtype(a.dtype))
    tok = _load_tokenizer(a.model)
    if tok is None:
        raise CLIError(f"--model {a.model}: no tokenizer saved there")
    tok.padding_side = "left"
    names = _expert_names(model.config) if hasattr(model.config, "num_local_experts") else None
    for prompt in a.prompt:
        enc = tok(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                                 temperature=a.temperature if a.temperature > 0 else None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            route = ""
            if names:
                r = model(**enc, output_router_logits=True).router_logits
                p = mean_router_probs_ref(r, 1, enc["attention_mask"])[0]
                route = "  [router: " + " ".join(f"{n} {float(v):.2f}" for n, v in zip(names, p)) + "]"
        print(f"{prompt!r} -> {text!r}{route}")
    return 0


def cmd_info(a) -> int:
    import platform

    import torch

    from . import __version__, backends

    print(f"h3moe {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for mod in ("triton", "transformers", "peft", "bitsandbytes"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - report, never fail
            print(f"{mod}: not available ({type(e).__name__})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"CUDA {torch.version.cuda}")
    else:
        print("GPU: none (CPU only)")
    print("backends:")
    for st in backends().values():
        ops = f" ops={','.join(st.ops)}" if st.ops else ""
        print(f"  {st}{ops}")
    return 0


def cmd_bench(a, rest) -> int:
    try:
        try:
            from bench.__main__ import main as bench_main
        except ImportError:
            if not os.path.isfile(os.path.join(os.getcwd(), "bench", "__main__.py")):
                raise
            sys.path.insert(0, os.getcwd())  # the console script runs from the venv; the driver is in the tree
            from bench.__main__ import main as bench_main
    except ImportError as e:
        raise CLIError(f"the benchmark driver is not importable ({e}); run it from the h3moe source tree "
                       f"(python -m bench)") from None
    return bench_main(rest) or 0


# ----------------------------------------------------------------------------------------------- parser

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="h3moe", description="H³Fusion MoE: fuse, train, generate, info, bench")
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("fuse", help="fuse dense Llama-family models (or LoRA adapters) into a Mixtral MoE")
    f.add_argument("--expert", action="append", required=True, help="expert model or LoRA adapter dir (repeat)")
    f.add_argument("--name", action="append", help="expert/task name, one per --expert (default: dir names)")
    f.add_argument("--base", help="base model dir for embeddings, norms, attention, lm_head (default: 1st expert)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--top-k", type=int, default=2)
    f.add_argument("--router-init", choices=("zeros", "hidden", "random"), default="zeros")
    f.add_argument("--attention", choices=("base", "mean"), default="base")
    f.add_argument("--prompts", help="JSONL records (prompt, task) for --router-init hidden")
    f.add_argument("--num-prompts", type=int, default=16, help="prompts per expert for --router-init hidden")
    f.add_argument("--dtype", default="auto")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="replace an existing --out")
    f.add_argument("--any-architecture", action="store_true",
                   help="fuse a model_type other than llama/mistral (Mixtral may not reproduce its layers)")

    t = sub.add_parser("train", help="fine-tune a fused model with the gating loss")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help="JSONL: {prompt, response, task} per line")
    t.add_argument("--out", help="output directory (default: replace --model when done)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4, help="experts' learning rate")
    t.add_argument("--router-lr", type=float, default=None, help="router learning rate (default 10x --lr)")
    t.add_argument("--gate-coef", type=float, default=1.0, help="λ, weight of the gating loss")
    t.add_argument("--gamma", type=float, default=0.0, help="γ, weight of the drift regularizer")
    t.add_argument("--lb-coef", type=float, default=0.0, help="load-balancing loss weight")
    t.add_argument("--z-coef", type=float, default=0.0, help="router z-loss weight")
    t.add_argument("--variant", choices=("paper", "nll"), default="paper")
    t.add_argument("--backend", default="auto", help="h3moe backend for the gating loss")
    t.add_argument("--train-attention", action="store_true", help="also train attention (frozen by default)")
    t.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step (divides --batch-size): less activation memory")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the decoder layers' activations in the backward: less memory, ~1/3 more compute")
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--device")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--force", action="store_true", help="replace an existing --out")

    g = sub.add_parser("generate", help="generate text with a (fused) model")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--device")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--quantize", choices=("nf4", "fp4", "int8"),
                   help="quantize the experts (bitsandbytes layouts, read packed by h3moe's kernels) before moving "
                        "the model to --device; prints the memory before and after")
    g.add_argument("--blocksize", type=int, default=64, help="4-bit absmax block size (--quantize nf4/fp4)")
    g.add_argument("--double-quant", action="store_true", help="nested absmax (--quantize nf4/fp4)")

    sub.add_parser("info", help="versions, backends, GPU")
    sub.add_parser("bench", help="run the benchmarks (python -m bench), arguments passed through", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(None, argv[1:])
        except CLIError as e:
            print(f"h3moe: error: {e}", file=sys.stderr)
            return 2
    a = _parser().parse_args(argv)
    try:
        return {"fuse": cmd_fuse, "train": cmd_train, "generate": cmd_generate, "info": cmd_info}[a.cmd](a)
    except (CLIError, OSError, ValueError) as e:
        print(f"h3moe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
