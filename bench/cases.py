"""What the benchmark measures: model shapes, token counts, cases, their inputs, fp32 references and the
FLOP / byte models behind the TFLOP/s and GB/s columns.

Cases (letters: T tokens, E experts, K top-k, H hidden, I intermediate, S = T*K rows, L layers):
    route   softmax top-k routing of (T, E) logits (h3moe.route also builds the sort metadata).
    fwd     the expert GEMMs forward, given the routing: x (T, H) → y (T, H). Routing is computed once,
            outside the timing, for every implementation (transformers' functions sort inside theirs).
    fwdbwd  fwd plus the backward for a random dy: grads of x, w_gate_up, w_down and the routing weights.
    layer   a whole MoE layer forward: router linear, routing, experts.
    gating  H3Fusion's gating loss over L layers of router logits, forward + backward.
    nf4     quantized decode: fwd over NF4 experts (bitsandbytes layout, blocksize 64).
    int8    quantized decode: fwd over int8 row-wise experts (LLM.int8 vector-wise layout).

References: every row's rel_err = ‖out − ref‖ / ‖ref‖ (the worst over the outputs and gradients a case
returns), ref computed in fp32 from the same (rounded) inputs. `reference.experts_ref` gathers one weight
matrix per (token, slot) — O(T·K·I·H) memory, terabytes at Mixtral T=4096 — so above a small size the
reference is `experts_fp32`: the same math as a loop over experts in fp32 (TF32 off), checked equal to
experts_ref in bench/test_bench_smoke.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from h3moe import reference as ref

__all__ = [
    "Model", "Case", "MODELS", "TINY_MODELS", "TOKENS", "CASES", "QUANT_CASES",
    "plan", "make_inputs", "input_sets", "reference_outputs", "experts_fp32", "flops", "bytes_moved", "L2_BYTES",
]


@dataclass(frozen=True)
class Model:
    name: str
    H: int
    I: int
    E: int
    K: int
    L: int  # layers (the gating loss averages over them)
    title: str


#: Real model shapes. L is the model's layer count (gating loss case).
MODELS = {
    "h3fusion": Model("h3fusion", 4096, 11008, 3, 2, 32, "H³Fusion (3× Llama-2-7B FFN, top-2)"),
    "mixtral": Model("mixtral", 4096, 14336, 8, 2, 32, "Mixtral-8x7B"),
    "qwen3": Model("qwen3", 2048, 768, 128, 8, 48, "Qwen3-30B-A3B"),
    "olmoe": Model("olmoe", 2048, 1024, 64, 8, 16, "OLMoE-1B-7B"),
}

#: CPU smoke shapes: H and I multiples of 64 (torch's CPU grouped_mm needs 16-byte strides; the quantized
#: Triton kernels need the 64-element NF4 blocks inside one row).
TINY_MODELS = {
    "tiny": Model("tiny", 64, 128, 4, 2, 2, "tiny (E=4, K=2)"),  # few experts, like H³Fusion
    "tiny-many": Model("tiny-many", 64, 64, 16, 4, 3, "tiny many-expert (E=16, K=4)"),  # many small experts
}

TOKENS = (1, 16, 128, 1024, 4096, 16384)
CASES = ("route", "fwd", "fwdbwd", "layer", "gating", "nf4", "int8")
QUANT_CASES = ("nf4", "int8")
#: Inputs smaller than this fit in an H100's 50 MB L2: the driver rotates among several input sets.
L2_BYTES = 50 * 2**20


@dataclass(frozen=True)
class Case:
    case: str
    model: Model
    T: int
    dtype: torch.dtype
    #: Implementations left out of this plan entry, with the reason (budget rules, e.g. no eager at 16384).
    skip: tuple[tuple[str, str], ...] = field(default=())

    @property
    def S(self) -> int:
        return self.T * self.model.K

    @property
    def key(self) -> str:
        return f"{self.case}/{self.model.name}/T={self.T}/{dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------------------------------------- plans

_NO_EAGER_BIG = (("hf:eager", "budget: the eager loop is not timed at 16384 tokens for big models"),)


def _big(m: Model) -> bool:
    """Llama-sized FFN experts (H³Fusion, Mixtral): their eager loop at 16384 tokens costs the budget."""
    return m.H * m.I >= 2**25


def plan(mode: str, dtype: torch.dtype, *, cases=None, models=None, tokens=None) -> list[Case]:
    """The ordered list of cases for a run mode.

    full: every case × model × token count (quantized decode at T ≤ 128).
    quick: the GPU check's ~3 minutes, most important first (what the targets need: fwd at 1, 16, 4096;
        fwdbwd at 4096; quantized decode), then the rest of the curve; the driver stops adding cases at its
        --budget-s, so the order is the priority.
    smoke: tiny shapes, all cases, for CPU CI.
    Filters (cases, models, tokens) keep the order.
    """
    if mode == "smoke":
        ms = list(TINY_MODELS.values())
        steps = [(c, (1, 16, 64)) for c in CASES]
    else:
        ms = list(MODELS.values())
        if mode == "full":
            steps = [("fwd", TOKENS), ("fwdbwd", TOKENS), ("nf4", (1, 16, 128)), ("int8", (1, 16, 128)),
                     ("layer", TOKENS), ("route", TOKENS), ("gating", TOKENS)]
        elif mode == "quick":
            steps = [
                ("fwd", (1, 16, 4096)),  # targets: decode bandwidth, fwd vs grouped_mm / eager / matmul peak
                ("fwdbwd", (4096,)),  # targets: fwd+bwd vs eager / grouped_mm
                ("nf4", (1, 16)),  # target: NF4 decode vs bf16 decode
                ("int8", (1, 16)),
                ("fwd", (128, 1024, 16384)),  # the rest of the forward curve
                ("route", (16, 4096, 16384)),
                ("layer", (16, 4096)),
                ("nf4", (128,)),  # quantized prefill: the tensor-core kernels against the tl.dot ones
                ("gating", (4096, 16384)),
                ("fwdbwd", (1024, 16384)),
            ]
        else:
            raise ValueError(f"mode: expected full, quick or smoke, got {mode!r}")
    out = []
    for case, toks in steps:
        if cases and case not in cases:
            continue
        for m in ms:
            if models and m.name not in models:
                continue
            for T in toks:
                if tokens and T not in tokens:
                    continue
                skip = _NO_EAGER_BIG if (mode != "full" and T >= 16384 and _big(m)) else ()
                out.append(Case(case, m, T, dtype if mode != "smoke" else torch.float32, skip))
    return out


# --------------------------------------------------------------------------------------------- inputs


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, dtype, device, g, std=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)


def make_weights(m: Model, dtype, device, seed: int) -> dict:
    """Random expert weights at the scale an init would give (outputs O(1) for x ~ N(0, 1))."""
    g = _gen(seed, device)
    w_gate_up = torch.empty(m.E, 2 * m.I, m.H, dtype=dtype, device=device)  # (E, 2I, H)
    w_down = torch.empty(m.E, m.H, m.I, dtype=dtype, device=device)  # (E, H, I)
    for e in range(m.E):  # one expert at a time: no fp32 copy of the whole tensor
        w_gate_up[e] = _randn((2 * m.I, m.H), dtype, device, g, 1 / math.sqrt(m.H))
        w_down[e] = _randn((m.H, m.I), dtype, device, g, 1 / math.sqrt(m.I))
    router = _randn((m.E, m.H), dtype, device, g, 1 / math.sqrt(m.H))  # (E, H)
    return {"w_gate_up": w_gate_up, "w_down": w_down, "router": router}


def make_inputs(c: Case, device, seed: int, weights: dict | None = None) -> dict:
    """One input set for case c: never zeros (random normal activations and logits).

    Expert cases: x (T, H), w_gate_up (E, 2I, H), w_down (E, H, I), router (E, H), weights (T, K) fp32,
    ids (T, K) int64, routing (h3moe.Routing, built by torch ops once here), dy (T, H) for fwdbwd.
    route: logits (T, E). gating: logits list of L (T, E), labels (B,), mask (B, S).
    """
    from h3moe.ops.routing import as_routing

    m, T = c.model, c.T
    g = _gen(seed + 1, device)
    if c.case == "route":
        return {"logits": _randn((T, m.E), c.dtype, device, g, 2.0)}
    if c.case == "gating":
        B = max(1, T // 512)
        S = T // B
        lengths = torch.randint(max(1, S * 3 // 4), S + 1, (B,), generator=g, device=device)  # ~12% padding
        mask = (torch.arange(S, device=device)[None, :] < lengths[:, None]).to(torch.int64)  # (B, S)
        logits = [_randn((T, m.E), c.dtype, device, g, 2.0) for _ in range(m.L)]
        labels = torch.randint(0, m.E, (B,), generator=g, device=device)
        return {"logits": logits, "labels": labels, "mask": mask}
    w = weights if weights is not None else make_weights(m, c.dtype, device, seed)
    x = _randn((T, m.H), c.dtype, device, g)  # (T, H)
    logits = x.float() @ w["router"].float().t()  # (T, E) routing decided in fp32 once, shared by all
    rw, ids = ref.route_ref(logits, m.K)  # (T, K) fp32, (T, K) int64
    inp = {"x": x, **w, "weights": rw, "ids": ids, "routing": as_routing((rw, ids), m.E)}
    if c.case == "fwdbwd":
        inp["dy"] = _randn((T, m.H), c.dtype, device, g)
    return inp


def input_sets(c: Case, device, weights: dict | None = None, seed: int | None = None) -> list[dict]:
    """Input sets to rotate among while timing c: one when the inputs exceed L2 (50 MB), else enough fresh
    sets (weights included: only tiny shapes have small weights) to cover 4× L2 — at most 64 on a GPU (the
    driver flushes L2 between repetitions where even 64 do not cover it) and 4 on a CPU."""
    seed = 1234 + c.T if seed is None else seed
    inp0 = make_inputs(c, device, seed, weights)
    nbytes = input_bytes(inp0)
    if nbytes >= L2_BYTES:
        return [inp0]
    cap = 64 if torch.device(device).type == "cuda" else 4
    n = min(cap, max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1))))
    return [inp0] + [make_inputs(c, device, seed + 97 * j) for j in range(1, n)]


def input_bytes(inp) -> int:
    total = 0
    for v in inp.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return total


def experts_touched(ids: torch.Tensor, E: int) -> int:
    return int(torch.unique(ids).numel()) if ids.numel() else 0


# ----------------------------------------------------------------------------------------- references


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls in full precision (no TF32) on GPU."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def experts_fp32(x, w_gate_up, w_down, weights, ids, activation: str = "silu") -> torch.Tensor:
    """reference.experts_ref's math in fp32 as a loop over experts (one host sync): O(T·H + one expert's
    weights) memory instead of O(T·K·I·H). Differentiable w.r.t. every float input (pass fp32 leaves).

    x (T, H), w_gate_up (E, 2I, H), w_down (E, H, I), weights (T, K), ids (T, K) → (T, H) fp32.
    """
    act = ref.ACTIVATIONS[activation]
    T, H = x.shape
    K = ids.shape[1]
    E, I = w_down.shape[0], w_down.shape[2]
    xf = x.float()
    wflat = weights.reshape(-1).float()  # (S,)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (S,) slots sorted by expert
    counts = torch.bincount(flat, minlength=E).tolist()
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        tok = slots // K  # (n,)
        h = xf.index_select(0, tok) @ w_gate_up[e].float().t()  # (n, 2I)
        a = act(h[:, :I]) * h[:, I:]  # (n, I)
        o = a @ w_down[e].float().t()  # (n, H)
        y = y.index_add(0, tok, o * wflat.index_select(0, slots).unsqueeze(1))
    return y


def _experts_ref_fp32(x, w_gate_up, w_down, weights, ids) -> torch.Tensor:
    """reference.experts_ref itself where its gathered weights are small, experts_fp32 elsewhere."""
    T, K = ids.shape
    gathered = T * K * 3 * w_down.shape[1] * w_down.shape[2] * 4
    if gathered <= 64 * 2**20:
        return ref.experts_ref(x.float(), w_gate_up.float(), w_down.float(), weights.float(), ids)
    return experts_fp32(x, w_gate_up, w_down, weights, ids)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.detach().double(), want.detach().double()
    den = torch.linalg.vector_norm(want).item()
    num = torch.linalg.vector_norm(out - want).item()
    return num / den if den > 0 else num


def reference_outputs(c: Case, inp: dict, dequantized=None):
    """fp32 reference outputs of case c for one input set, in the order the implementations return theirs:
    route: (sorted weights,); fwd/layer/nf4/int8: (y,); fwdbwd: (y, dx, dw_gate_up, dw_down, dweights);
    gating: (loss, d logits of every layer).
    `dequantized`: (w_gate_up, w_down) the quantized cases compute over (each quantizer's own dequantization).
    """
    with exact_fp32():
        if c.case == "route":
            w, _ = ref.route_ref(inp["logits"].float(), c.model.K)
            return (w.sort(dim=1).values,)
        if c.case == "gating":
            leaves = [t.detach().float().requires_grad_(True) for t in inp["logits"]]
            loss = ref.gating_loss_ref(leaves, inp["labels"], inp["mask"])
            grads = torch.autograd.grad(loss, leaves)
            return (loss.detach(), torch.cat([g.reshape(-1) for g in grads]))
        if c.case in ("fwd",):
            return (_experts_ref_fp32(inp["x"], inp["w_gate_up"], inp["w_down"], inp["weights"], inp["ids"]),)
        if c.case in QUANT_CASES:
            wgu, wd = dequantized
            return (_experts_ref_fp32(inp["x"], wgu, wd, inp["weights"], inp["ids"]),)
        if c.case == "layer":
            logits = inp["x"].float() @ inp["router"].float().t()
            w, ids = ref.route_ref(logits, c.model.K)
            return (_experts_ref_fp32(inp["x"], inp["w_gate_up"], inp["w_down"], w, ids),)
        if c.case == "fwdbwd":
            x = inp["x"].detach().float().requires_grad_(True)
            wgu = inp["w_gate_up"].detach().float().requires_grad_(True)
            wd = inp["w_down"].detach().float().requires_grad_(True)
            rw = inp["weights"].detach().float().requires_grad_(True)
            y = experts_fp32(x, wgu, wd, rw, inp["ids"])
            grads = torch.autograd.grad(y, (x, wgu, wd, rw), inp["dy"].float())
            out = (y.detach(), *grads)
            del x, wgu, wd, rw, y
            return out
    raise ValueError(f"unknown case {c.case!r}")


def compare(outs, refs) -> tuple[float, list[float]]:
    """rel_err of each output against its reference; the worst first."""
    parts = [rel_err(o, r) for o, r in zip(outs, refs)]
    if len(parts) != len(refs):
        raise ValueError(f"implementation returned {len(parts)} outputs, reference {len(refs)}")
    return max(parts), parts


# ------------------------------------------------------------------------------- FLOP and byte models


def flops(c: Case) -> float | None:
    """Useful FLOPs: 2·S·H·2I (gate_up) + 2·S·I·H (down) = 6·S·H·I forward, 3× that for fwd+bwd; the
    router linear adds 2·T·H·E for a layer. None where the case is memory-bound (route, gating)."""
    m = c.model
    fwd = 6.0 * c.S * m.H * m.I
    if c.case in ("fwd",) + QUANT_CASES:
        return fwd
    if c.case == "fwdbwd":
        return 3 * fwd
    if c.case == "layer":
        return fwd + 2.0 * c.T * m.H * m.E
    return None


def weight_bytes_per_expert(c: Case) -> float:
    """Bytes of one expert's w_gate_up + w_down as the case stores them."""
    m = c.model
    n = 3 * m.H * m.I
    if c.case == "nf4":
        return n * (0.5 + 4 / 64)  # packed nibbles + one fp32 absmax per 64-block
    if c.case == "int8":
        return n + (2 * m.I + m.H) * 4  # int8 + one fp32 scale per row
    return n * torch.finfo(c.dtype).bits / 8


def bytes_moved(c: Case, touched: int) -> float:
    """Minimum traffic (each byte once): the weights of the experts the routing touched, x read, y written
    (fwd, layer, quantized); for fwd+bwd the weights read twice and their grads written (3×) plus x, dy read,
    y, dx written; route: logits read, weights + ids written; gating: logits read, their grads written."""
    m = c.model
    elt = torch.finfo(c.dtype).bits / 8
    if c.case == "route":
        return c.T * m.E * elt + c.S * (4 + 8)
    if c.case == "gating":
        return 2 * m.L * c.T * m.E * elt
    act = 2 * c.T * m.H * elt
    w = touched * weight_bytes_per_expert(c)
    if c.case == "fwdbwd":
        return 3 * w + 2 * act
    if c.case == "layer":
        return w + act + m.E * m.H * elt
    return w + act
