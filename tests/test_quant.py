"""Quantized experts (issue 7): bitsandbytes layouts, the torch fallback, the Triton kernels (interpreter on
CPU, full shapes on the GPU tier), h3moe.quantize on h3moe.MoE / transformers Mixtral / ModuleList experts
with bitsandbytes linears, save / load, and one compile-tier check.

The reference everywhere: dequantize (ours, proven equal to bitsandbytes' dequantize_4bit /
int8_vectorwise_dequant below) followed by h3moe.reference.experts_ref.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import h3moe
from h3moe import reference as ref
from h3moe.integrations import bitsandbytes as hb
from h3moe.ops import quant as oq
from h3moe.ops.routing import route

HAS_CUDA = torch.cuda.is_available()
FORMATS = [
    # (quant_type, double_quant)
    ("nf4", False),  # NF4, fp32 absmax
    ("nf4", True),  # NF4, nested absmax (uint8 + absmax2 per 256 blocks + offset)
    ("fp4", False),  # FP4: table in bit-pattern order (not sorted)
    ("fp4", True),
    ("int8", False),  # LLM.int8 row-wise
]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _weights(E, H, I, dtype, device="cpu"):
    w_gu = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
    w_dn = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)
    return w_gu, w_dn


def _quantized(E, H, I, quant_type, blocksize, nested=False, dtype=torch.float32, device="cpu"):
    """(gate_up, down) QuantizedWeight of fresh random experts (_weights), quantized alike."""
    w_gu, w_dn = _weights(E, H, I, dtype, device)
    return (hb.quantize_weight(w_gu, quant_type, blocksize, nested),
            hb.quantize_weight(w_dn, quant_type, blocksize, nested))


# ------------------------------------------------------------------------------------------ layouts vs bnb


@pytest.mark.parametrize("quant_type,nested", [f for f in FORMATS if f[0] != "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_4bit_layout_equals_bitsandbytes(quant_type, nested, dtype):
    F = _bnb()
    E, N, Kd, bs = 3, 96, 128, 64
    W = torch.randn(E, N, Kd).to(dtype)
    qw = hb.QuantizedWeight.from_float(W, quant_type, bs, nested)
    for e in range(E):
        packed, qs = F.quantize_4bit(W[e], blocksize=bs, quant_type=quant_type, compress_statistics=nested)
        assert torch.equal(packed.view(-1), qw.qweight[e])  # same bytes, high nibble first
        if nested:
            assert torch.equal(qs.state2.absmax, qw.absmax2[e]) and torch.equal(qs.offset, qw.offset[e])
            # bitsandbytes' CPU C kernel rounds some values near a midpoint to the farther of two neighbouring
            # codes (its torch op does not): where the nested codes differ, they are neighbours and ours is
            # the nearer one.
            diff = (qs.absmax.int() - qw.absmax[e].int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.05
            am = F.quantize_4bit(W[e], blocksize=bs, quant_type=quant_type)[1].absmax  # fp32 absmax
            nb = am.numel()
            scaled = (am - qs.offset) / qs.state2.absmax.repeat_interleave(256)[:nb]
            code2 = qs.state2.code
            d_ours = (scaled - code2[qw.absmax[e].long()]).abs()
            d_bnb = (scaled - code2[qs.absmax.long()]).abs()
            assert (d_ours <= d_bnb + 1e-6).all()
        else:
            assert torch.equal(qs.absmax, qw.absmax[e])
        # bitsandbytes' own dequantize reads our per-expert slice and state: exactly our dequantize.
        p, st = qw.to_bnb(e)
        got = F.dequantize_4bit(p, st)
        assert got.shape == (N, Kd) and got.dtype == dtype
        assert torch.equal(got, qw.dequantize(e))
        # and it gives back the expert's own matrix, within 4-bit error (half the largest code gap × absmax)
        assert (got.float() - W[e].float()).abs().max() <= 0.2 * W[e].float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_layout_equals_bitsandbytes(dtype):
    F = _bnb()
    W = torch.randn(2, 48, 80).to(dtype)
    qw = hb.QuantizedWeight.from_float(W, "int8")
    for e in range(2):
        q, stats, _ = F.int8_vectorwise_quant(W[e].clone())
        assert torch.equal(q, qw.qweight[e]) and torch.equal(stats, qw.absmax[e])
        assert torch.equal(F.int8_vectorwise_dequant(q, stats).to(dtype), qw.dequantize(e))


def test_tables_equal_bitsandbytes():
    F = _bnb()
    for qt in ("nf4", "fp4"):
        assert torch.equal(hb.code_4bit(qt), F.get_4bit_type(qt, device="cpu"))
    assert torch.equal(hb.dynamic_map(), F.create_dynamic_map())


def test_errors():
    W = torch.randn(2, 8, 48)
    with pytest.raises(ValueError, match="quant_type"):
        hb.QuantizedWeight.from_float(W, "nf3")
    with pytest.raises(ValueError, match="blocksize"):
        hb.QuantizedWeight.from_float(W, "nf4", blocksize=48)
    gu = hb.QuantizedWeight.from_float(torch.randn(2, 64, 48), "nf4", 32)  # 32 does not divide H=48
    dn = hb.QuantizedWeight.from_float(torch.randn(2, 48, 32), "nf4", 32)
    r = route(torch.randn(3, 2), 1)
    x = torch.randn(3, 48)
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="torch")  # the fallback takes any block layout
    assert torch.isfinite(y).all()
    if oq._backend.interpreter_enabled() or HAS_CUDA:
        with pytest.raises(ValueError, match="blocksize"):
            oq._quant_moe_triton(x, gu.packed, dn.packed, r, "silu")
    with pytest.raises(ValueError, match="shapes"):
        oq.quant_moe(torch.randn(3, 40), gu.packed, dn.packed, r, backend="torch")


# ----------------------------------------------------------------------------------- numerics: torch path


def _ref(x, gu, dn, r, activation="silu"):
    """bitsandbytes-equal dequantize, then the eager reference, in x's dtype."""
    return ref.experts_ref(x, gu.dequantize(dtype=x.dtype), dn.dequantize(dtype=x.dtype), r.weights, r.ids,
                           activation)


CASES = [
    # (T, H, I, E, K)
    (1, 64, 64, 4, 2),  # decode: one token
    (7, 64, 32, 5, 1),  # prime E, k=1, I = one 32-block per row (fp4 bs=32)
    (20, 128, 64, 8, 2),  # some experts get no rows
    (3, 64, 64, 2, 2),  # k = E: every expert gets every token
]


@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("T,H,I,E,K", CASES)
def test_torch_fallback_equals_reference(quant_type, nested, T, H, I, E, K):
    gu, dn = _quantized(E, H, I, quant_type, 32, nested)
    x = torch.randn(T, H)
    r = route(torch.randn(T, E), K)
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="torch")
    torch.testing.assert_close(y, _ref(x, gu, dn, r), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ numerics: Triton interpreter


def _poison(monkeypatch):
    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(oq, "_empty", nan_empty)


needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or oq._backend.interpreter_enabled()) or not oq._backend._triton_installed(),
    reason="needs triton (GPU or TRITON_INTERPRET=1)")


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("T,H,I,E,K,act", [
    (1, 64, 64, 4, 2, "silu"),  # decode tile BM=16 mostly padding
    (70, 64, 32, 3, 2, "gelu_tanh"),  # S=140 > 64: prefill tiles BM=64, partial last tile per expert
    (9, 64, 64, 8, 3, "relu"),  # E > active experts: empty experts skipped by the tile scan
    (20, 64, 64, 4, 2, "silu"),  # T > GEMV_MAX_T, S = 40 <= 64: the BM=16 tl.dot decode tiles
    (1, 64, 64, 4, 2, "relu2"),  # squared ReLU on the gate (GEMV)
])
def test_triton_interpreter_equals_reference(monkeypatch, quant_type, nested, T, H, I, E, K, act):
    """The tl.dot kernels (and the GEMV at T=1, 9) against dequantize + reference: the tensor-core decode
    kernels are off here (TC_MAX_T = 0; test_triton_tc_decode_equals_reference covers them)."""
    if HAS_CUDA:
        pytest.skip("the GPU tier covers this")
    from h3moe.kernels import quant as kq

    monkeypatch.setattr(kq, "TC_MAX_T", 0)
    _poison(monkeypatch)
    dtype = torch.float16 if quant_type == "nf4" else torch.float32  # interpreter: no bf16 tl.dot
    bs = 32 if quant_type == "fp4" or I % 64 else 64
    gu, dn = _quantized(E, H, I, quant_type, bs, nested, dtype=dtype)
    x = torch.randn(T, H).to(dtype)
    r = route(torch.randn(T, E), K)
    y = oq.quant_moe(x, gu.packed, dn.packed, r, activation=act, backend="triton")
    assert not torch.isnan(y).any()
    want = ref.experts_ref(x.double(), gu.dequantize(dtype=dtype).double(), dn.dequantize(dtype=dtype).double(),
                           r.weights.double(), r.ids, act)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)
    else:  # within a small multiple of eager fp16's own error
        eager = _ref(x, gu, dn, r, act).double()
        bound = 2 * (eager - want).abs().max() + 1e-3
        assert (y.double() - want).abs().max() <= bound


GEMV_CASES = [
    # (T, H, I, E, K, blocksize, BN override); expert 0 never gets a token in every case
    (1, 128, 256, 4, 2, 64, None),  # T=1: ROWS=1, down split over I (KSPLIT=2), two 64-blocks per chunk
    (3, 64, 512, 9, 8, 64, 128),  # K=8 of 8 routable experts: ROWS=4, down KSPLIT=4; BN=128 (interpreter time)
    (16, 64, 64, 5, 1, 32, None),  # T=16 = GEMV_MAX_T, k=1, prime E: ROWS=8, experts with > 8 rows get 2 tiles
    (5, 160, 96, 6, 3, 32, 64),  # H, I multiples of the blocksize but not of the chunk nor of BN=64: masks
    (2, 64, 64, 8, 1, 64, None),  # most experts empty, ROWS=2 tiles half used
    (1, 256, 256, 3, 2, 256, None),  # blocksize 256 > the GEMV's 128-element sub-block: two absmax per block
]


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("T,H,I,E,K,bs,bn", GEMV_CASES)
def test_triton_gemv_decode_equals_reference(monkeypatch, quant_type, nested, T, H, I, E, K, bs, bn):
    """The GEMV decode kernels (T <= GEMV_MAX_T; the tensor-core decode kernels off) against dequantize +
    reference, poisoned outputs."""
    if HAS_CUDA:
        pytest.skip("the GPU tier covers this")
    from h3moe.kernels import quant as kq

    monkeypatch.setattr(kq, "TC_MAX_T", 0)
    _poison(monkeypatch)
    picked = []
    real_pick = kq.pick_decode_config

    def pick(*a):
        cfg = real_pick(*a)
        if bn is not None:
            cfg = {**cfg, "BN": bn}
        picked.append((a[-1], cfg))
        return cfg

    monkeypatch.setattr(kq, "pick_decode_config", pick)
    # fp16 and fp32 activations alternate over the cases (fp16 for NF4 / FP4 on odd T, int8 on even T)
    dtype = torch.float16 if (T % 2 == 1) == (quant_type != "int8") else torch.float32
    gu, dn = _quantized(E, H, I, quant_type, bs, nested, dtype=dtype)
    x = torch.randn(T, H).to(dtype)
    logits = torch.randn(T, E)
    logits[:, 0] = -1e4  # an expert with no token
    r = route(logits, K)
    assert r.counts[0] == 0
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    assert {p for p, _ in picked} == {"gate_up", "down"}  # the GEMV kernels ran
    if T == 1:
        assert all(c["ROWS"] == 1 for _, c in picked)
    assert not torch.isnan(y).any() and y.dtype == dtype
    want = ref.experts_ref(x.double(), gu.dequantize(dtype=dtype).double(), dn.dequantize(dtype=dtype).double(),
                           r.weights.double(), r.ids)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)
    else:
        eager = _ref(x, gu, dn, r).double()
        bound = 2 * (eager - want).abs().max() + 1e-3
        assert (y.double() - want).abs().max() <= bound


TC_CASES = [
    # (T, H, I, E, K, blocksize, hot): hot routes ~all tokens to expert 1 (its rows exceed one BM tile);
    # expert 0 never gets a token
    (2, 128, 256, 4, 2, 64, False),  # T=2: BM=16 mostly padding; down split over I (KSPLIT=2)
    (16, 64, 96, 5, 1, 32, False),  # blocksize 32: 4-word K steps; I=96: gate_up rows masked (BN=64); prime E
    (40, 128, 128, 3, 2, 128, False),  # S=80 over 3 experts: BM=64, 8 warps; two K steps per block
    (24, 64, 128, 8, 2, 64, True),  # S=48, BM=16, expert 1 holds ~24 rows: two row tiles of one expert
    (3, 256, 256, 9, 8, 256, False),  # K=8 of 8 routable experts; blocksize 256 > SUB=64: 4 steps per block
    (150, 64, 64, 3, 2, 64, False),  # prefill: ~100 rows per expert, two BM=64 tiles each
]


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("T,H,I,E,K,bs,hot", TC_CASES)
def test_triton_tc_decode_equals_reference(monkeypatch, quant_type, nested, T, H, I, E, K, bs, hot):
    """The tensor-core decode kernels (fp16 / bf16 activations, TC_MIN_T <= T <= TC_MAX_T) against dequantize
    + reference, 4-bit and int8 (int8 ignores the blocksize; I=96 takes 32-element K steps), poisoned outputs
    (the interpreter runs the table-load lookup and fp16: its bf16 tl.dot is wrong; the GPU tier runs bf16 and
    the shuffle)."""
    if HAS_CUDA:
        pytest.skip("the GPU tier covers this")
    from h3moe.kernels import quant as kq

    _poison(monkeypatch)
    picked = []
    real_pick = kq.pick_tc_config

    def pick(*a):
        picked.append(a[7])  # proj
        return real_pick(*a)

    monkeypatch.setattr(kq, "pick_tc_config", pick)
    dtype = torch.float16
    gu, dn = _quantized(E, H, I, quant_type, bs, nested, dtype=dtype)
    x = torch.randn(T, H).to(dtype)
    logits = torch.randn(T, E)
    logits[:, 0] = -1e4  # an expert with no token
    if hot:
        logits[:, 1] += 1e3
    r = route(logits, K)
    assert r.counts[0] == 0 and (not hot or r.counts[1] > 16)
    assert kq.quant_kernel(T, half=True) == "tc" and kq.quant_kernel(T, half=False) != "tc"
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    assert set(picked) == {"gate_up", "down"}  # the tensor-core kernels ran
    assert not torch.isnan(y).any() and y.dtype == dtype
    want = ref.experts_ref(x.double(), gu.dequantize(dtype=dtype).double(), dn.dequantize(dtype=dtype).double(),
                           r.weights.double(), r.ids)
    eager = _ref(x, gu, dn, r).double()
    bound = 2 * (eager - want).abs().max() + 1e-3
    assert (y.double() - want).abs().max() <= bound


def test_pick_tc_config():
    from h3moe.kernels import quant as kq

    # Mixtral at T=16, K=2: one 16-row tile per expert; 64 gate + 64 up rows; down split 4 ways
    c = kq.pick_tc_config(16, 32, 8, 4, 64, 4096, 14336, "gate_up")
    assert (c["BM"], c["BN"], c["SUB"], c["KSPLIT"], c["num_warps"]) == (16, 64, 64, 1, 4)
    c = kq.pick_tc_config(16, 32, 8, 4, 64, 14336, 4096, "down")
    assert (c["BM"], c["BN"], c["KSPLIT"]) == (16, 128, 4)  # 32 * 8 * 4 = 1024 programs
    assert kq.pick_tc_config(64, 128, 8, 4, 64, 4096, 14336, "gate_up")["BM"] == 32  # ~16 rows per expert
    c = kq.pick_tc_config(64, 128, 3, 4, 32, 4096, 11008, "gate_up")  # H3Fusion: ~43 rows per expert
    assert (c["BM"], c["BN"], c["SUB"], c["num_warps"]) == (64, 64, 32, 8)
    c = kq.pick_tc_config(4096, 8192, 8, 4, 64, 14336, 4096, "down")  # prefill: 64-row tiles, no K split
    assert (c["BM"], c["BN"], c["KSPLIT"], c["num_warps"]) == (64, 128, 1, 8)
    assert kq.pick_tc_config(64, 512, 128, 4, 64, 2048, 768, "gate_up")["BM"] == 16  # Qwen3: ~4 rows per expert
    assert kq.pick_tc_config(2, 4, 8, 4, 4096, 14336, 4096, "down")["SUB"] == 64  # K steps inside a 4096 block
    # int8: 64-byte K steps where the row length allows, else 32
    assert kq.pick_tc_config(16, 32, 8, 8, 0, 4096, 14336, "gate_up")["SUB"] == 64
    assert kq.pick_tc_config(16, 32, 8, 8, 0, 96, 64, "down")["SUB"] == 32


def test_tc_depth(monkeypatch):
    """Words in flight: two K steps at decode tiles (BM=16) on sm_90, one above and on sm_80;
    H3MOE_QUANT_TC_DEPTH overrides it per call (the GPU's comparison), and a bad value fails loudly. The
    interpreter cases above run both."""
    from h3moe.kernels import quant as kq

    monkeypatch.delenv("H3MOE_QUANT_TC_DEPTH", raising=False)
    depth = [kq.pick_tc_config(T, 2 * T, 8, 4, 64, 4096, 14336, "gate_up")["DEPTH"] for T in (2, 16, 64, 4096)]
    assert depth == [2, 2, 1, 1]
    assert kq.pick_tc_config(16, 32, 8, 4, 64, 4096, 14336, "gate_up", arch=80)["DEPTH"] == 1  # sm_80 would spill
    monkeypatch.setenv("H3MOE_QUANT_TC_DEPTH", "1")
    assert kq.pick_tc_config(16, 32, 8, 8, 0, 4096, 14336, "down")["DEPTH"] == 1
    monkeypatch.setenv("H3MOE_QUANT_TC_DEPTH", "3")
    with pytest.raises(ValueError, match="H3MOE_QUANT_TC_DEPTH"):
        kq.pick_tc_config(16, 32, 8, 8, 0, 4096, 14336, "down")


def test_pick_decode_config():
    from h3moe.kernels import quant as kq

    # Mixtral at T=1, K=2: 16-row tiles, the down projection split 4 ways -> 4096/16 * 2 * 4 = 2048 programs
    c = kq.pick_decode_config(1, 2, 8, 4, 64, 14336, 4096, "down")
    assert (c["ROWS"], c["BN"], c["NBLK"], c["KSPLIT"], c["num_warps"]) == (1, 16, 2, 4, 1)
    c = kq.pick_decode_config(1, 2, 8, 4, 64, 4096, 14336, "gate_up")
    assert (c["BN"], c["KSPLIT"]) == (8, 1)  # 8 gate + 8 up rows; no split: the epilogue needs all of H
    assert kq.pick_decode_config(16, 32, 8, 8, 0, 14336, 4096, "down")["ROWS"] == 8  # GEMV_ROWS
    assert kq.pick_decode_config(3, 6, 8, 4, 32, 96, 64, "down")["NBLK"] == 1  # 96 is no multiple of 64 or 128
    c = kq.pick_decode_config(5, 10, 8, 8, 0, 160, 64, "down")
    assert c["BK"] == 32 and c["KSPLIT"] == 1 and c["ROWS"] == 8


def _packed_view_case(quant_type, T, dtype):
    """(E, gate_up, down, x, routing, the Triton result) at E=3, H=I=64, K=2, for the packed-view tests."""
    if HAS_CUDA:
        pytest.skip("the GPU tier covers the kernels")
    E, H, I, K = 3, 64, 64, 2
    gu, dn = _quantized(E, H, I, quant_type, 64, dtype=dtype)
    x = torch.randn(T, H).to(dtype)
    r = route(torch.randn(T, E), K)
    return E, gu, dn, x, r, oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("quant_type,T,dtype", [("nf4", 1, torch.float32), ("nf4", 3, torch.float16),
                                             ("int8", 3, torch.float16)])
def test_word_kernels_read_a_misaligned_packed_view(quant_type, T, dtype):
    """The GEMV (T=1) and tensor-core (T=3, fp16; 4-bit and int8) kernels read the packed bytes as 32-bit
    words: a qweight view that starts off a 4-byte boundary (a slice of a larger buffer) is copied first, and
    the result is the aligned one's."""
    E, gu, dn, x, r, want = _packed_view_case(quant_type, T, dtype)
    q = gu.packed.qweight
    buf = torch.empty(q.numel() + 1, dtype=q.dtype)
    view = buf[1:].view(q.shape)
    view.copy_(q)
    oq._WARNED.clear()
    with pytest.warns(UserWarning, match="4-byte boundary"):
        assert view.data_ptr() % 4 and oq._words(view).data_ptr() % 4 == 0
    got = oq.quant_moe(x, gu.packed._replace(qweight=view), dn.packed, r, backend="triton")
    assert torch.equal(got, want)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("quant_type,T,dtype", [("nf4", 1, torch.float32), ("nf4", 3, torch.float16),
                                             ("nf4", 40, torch.float32), ("int8", 3, torch.float16)])
def test_kernels_read_strided_packed_tensors(quant_type, T, dtype):
    """Packed tensors that are strided views (rows of a wider buffer; the kernels compute their own offsets and
    would read the wrong bytes) give the contiguous result: qweight copied with one warning, absmax quietly.
    GEMV (T=1), tensor cores (T=3, fp16) and tl.dot (T=40, fp32)."""
    E, gu, dn, x, r, want = _packed_view_case(quant_type, T, dtype)

    def strided(t):  # the same values as the leading columns of a wider, NaN/garbage-filled buffer
        wide = torch.full((t.shape[0], t.shape[1] + 8), 7, dtype=t.dtype) if not t.is_floating_point() else \
            torch.full((t.shape[0], t.shape[1] + 8), float("nan"), dtype=t.dtype)
        view = wide[:, : t.shape[1]]
        view.copy_(t)
        assert not view.is_contiguous()
        return view

    p = dn.packed
    q = p.qweight.reshape(E, -1) if p.qweight.dim() > 2 else p.qweight
    q = strided(q).view(p.qweight.shape) if p.qweight.dim() == 2 else strided(q).unflatten(1, p.qweight.shape[1:])
    oq._WARNED.clear()
    with pytest.warns(UserWarning, match="not contiguous"):
        got = oq.quant_moe(x, gu.packed, p._replace(qweight=q, absmax=strided(p.absmax)), r, backend="triton")
    assert torch.equal(got, want)


def test_auto_falls_back_for_layouts_the_kernels_cannot_read(monkeypatch):
    """Blocks that span rows (blocksize 128 over rows of 64): backend="auto" where Triton would run dequantizes
    per expert instead, with one warning; backend="triton" says why it cannot."""
    E, H, I, T, K = 3, 64, 128, 2, 2
    gu, dn = _quantized(E, H, I, "nf4", 128)
    x = torch.randn(T, H)
    r = route(torch.randn(T, E), K)
    want = oq.quant_moe(x, gu.packed, dn.packed, r, backend="torch")
    monkeypatch.setattr(oq._backend, "resolve", lambda backend, device, op: "triton")  # as on a GPU
    monkeypatch.setattr(oq, "_WARNED", set())
    with pytest.warns(UserWarning, match="row length 64"):
        got = oq.quant_moe(x, gu.packed, dn.packed, r)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        oq.quant_moe(x, gu.packed, dn.packed, r)
    with pytest.raises(ValueError, match="row length 64"):
        oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")


def test_w4_lookup_choice(monkeypatch):
    """The 4-bit kernels' nibble lookup: the interpreter always takes the table loads (it cannot run the PTX
    shuffle); on a GPU the decode kernels (GEMV, tensor-core) shuffle and the tl.dot kernels load unless
    H3MOE_W4_LOOKUP forces one; which kernels a call runs (quant_kernel, H3MOE_QUANT_KERNEL); a typo fails loudly
    instead of silently timing the other."""
    from h3moe.kernels import quant as kq

    monkeypatch.delenv("H3MOE_W4_LOOKUP", raising=False)
    monkeypatch.delenv("H3MOE_QUANT_KERNEL", raising=False)
    assert kq.w4_lookup("gemv", interpret=True) == kq.w4_lookup("tc", interpret=True) == "load"
    assert kq.w4_lookup("dot", interpret=True) == "load"
    assert kq.w4_lookup("gemv", interpret=False) == kq.w4_lookup("tc", interpret=False) == "shfl"
    assert kq.w4_lookup("dot", interpret=False) == "load"
    # which kernels: GEMV at T=1, tensor cores from 2 tokens on (fp16 / bf16); fp32: GEMV to 16, then tl.dot
    assert [kq.quant_kernel(T, True) for T in (1, 2, 16, 64, 65, 16384)] == ["gemv"] + ["tc"] * 5
    assert [kq.quant_kernel(T, False) for T in (1, 16, 17)] == ["gemv", "gemv", "dot"]
    assert kq.default_w4_lookup(1) == kq.default_w4_lookup(4096) == "shfl"
    assert kq.default_w4_lookup(17, half=False) == "load"
    for mode in ("load", "shfl"):
        monkeypatch.setenv("H3MOE_W4_LOOKUP", mode)
        assert kq.w4_lookup("gemv", interpret=False) == kq.w4_lookup("dot", interpret=False) == mode
        assert kq.w4_lookup("tc", interpret=False) == mode
    monkeypatch.setenv("H3MOE_QUANT_KERNEL", "tc")  # the tensor cores at any T; fp32 activations cannot
    assert [kq.quant_kernel(T, True) for T in (1, 16, 65, 4096)] == ["tc"] * 4
    assert kq.quant_kernel(1, False) == "gemv"
    monkeypatch.setenv("H3MOE_QUANT_KERNEL", "gemv")  # the GEMV up to GEMV_MAX_T, tl.dot above
    assert [kq.quant_kernel(T, True) for T in (1, 16, 17)] == ["gemv", "gemv", "dot"]
    monkeypatch.setenv("H3MOE_QUANT_KERNEL", "dot")
    assert [kq.quant_kernel(T, h) for T in (1, 64) for h in (True, False)] == ["dot"] * 4
    monkeypatch.setenv("H3MOE_QUANT_KERNEL", "tensor")
    with pytest.raises(ValueError, match="H3MOE_QUANT_KERNEL"):
        kq.quant_kernel(2, True)
    monkeypatch.setenv("H3MOE_W4_LOOKUP", "shuffle")
    with pytest.raises(ValueError, match="H3MOE_W4_LOOKUP"):
        kq.w4_lookup("gemv", interpret=False)
    assert kq.w4_lookup("gemv", interpret=True) == "load"


@pytest.mark.interpreter
@needs_triton
def test_custom_ops_opcheck():
    """torch.library.opcheck on the h3moe::quant_* ops (schema, fake, dispatch) at a tiny shape."""
    E, H, I, T, K = 2, 64, 64, 3, 2
    dtype = torch.float16 if not HAS_CUDA else torch.bfloat16
    dev = "cuda" if HAS_CUDA else "cpu"
    w_gu, w_dn = _weights(E, H, I, dtype, dev)
    x = torch.randn(T, H, device=dev).to(dtype)
    r = route(torch.randn(T, E, device=dev), K)
    slots, offs = r.sorted_slots.int(), r.offsets.int()
    w = r.weights.float().contiguous()  # (T, K)
    a = torch.randn(T * K, I, device=dev).to(dtype)
    p = hb.quantize_weight(w_gu, "nf4", 64, True).packed
    torch.library.opcheck(torch.ops.h3moe.quant_w4_gate_up.default,
                          (x, p.qweight, p.absmax, p.absmax2, p.code2, p.offset, p.code, slots, offs, K, I, 64,
                           "silu"))
    p8 = hb.quantize_weight(w_dn, "int8").packed
    torch.library.opcheck(torch.ops.h3moe.quant_w8_down.default, (a, p8.qweight, p8.absmax, slots, offs, w))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, needs_triton])])
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quant_moe_compiles_fullgraph(monkeypatch, backend, quant_type):
    """torch.compile(fullgraph=True) traces quant_moe (routing included) without a graph break, the way a
    serving stack compiles a quantized model (with CUDA graphs: the GPU test below), and gives eager's output.
    The torch fallback's per-expert loop runs on data-dependent sizes there (no branch on an empty expert)."""
    if backend == "triton" and not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    E, H, I, T, K = 4, 64, 32, 5, 2
    dev = "cuda" if HAS_CUDA else "cpu"
    gu, dn = _quantized(E, H, I, quant_type, 32, quant_type == "nf4", device=dev)
    x = torch.randn(T, H, device=dev).to(torch.float16)
    logits = torch.randn(T, E, device=dev)
    logits[:, 0] = -1e4  # expert 0 gets no row: the empty case inside the compiled loop

    def f(x, logits):
        return h3moe.quant_moe(x, gu.packed, dn.packed, route(logits, K, backend=backend), backend=backend)

    want = f(x, logits)
    torch._dynamo.reset()
    try:
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, logits)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)
    torch.testing.assert_close(got.float(), _ref(x.float(), gu, dn, route(logits, K)), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------- modules and models


def test_quantize_h3moe_module_and_report():
    moe = h3moe.MoE(64, 64, 4, 2)
    x = torch.randn(2, 5, 64)
    h3moe.quantize(moe, "nf4", 64, True)
    assert isinstance(moe, hb.QuantizedMoE) and isinstance(moe.gate_up_proj, hb.QuantizedWeight)
    rep = moe.h3moe_quant_report
    assert rep.expert_bytes_after < rep.expert_bytes_before / 5  # fp32 → ~4.1 bits
    moe.to(torch.bfloat16).float()  # dtype casts leave the quantization state alone
    assert moe.gate_up_proj.absmax2.dtype == torch.float32 and moe.gate_up_proj.code.dtype == torch.float32
    y = moe(x)
    logits = moe.gate(x.reshape(-1, 64))
    w, ids = ref.route_ref(logits, 2)
    want = ref.experts_ref(x.reshape(-1, 64), moe.gate_up_proj.dequantize(), moe.down_proj.dequantize(), w, ids)
    torch.testing.assert_close(y.reshape(-1, 64), want, rtol=1e-5, atol=1e-5)


def test_quantize_bare_experts_module_and_moe_roundtrip(tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = tf.MixtralConfig(hidden_size=64, intermediate_size=64, num_local_experts=3)
    experts = tf.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    q = h3moe.quantize(experts, "int8")
    assert isinstance(q, hb.QuantizedExperts) and q.h3moe_quant_report.expert_bytes_after > 0
    x, r = torch.randn(4, 64), route(torch.randn(4, 3), 2)
    torch.testing.assert_close(q(x, r.ids, r.weights), _ref(x, q.gate_up_proj, q.down_proj, r), rtol=1e-5,
                               atol=1e-5)
    # h3moe.MoE: save / load into a fresh layer
    moe = h3moe.quantize(h3moe.MoE(64, 64, 4, 2), "fp4", 32, True)
    path = str(tmp_path / "moe.safetensors")
    hb.save_quantized(moe, path)
    fresh = hb.load_quantized(h3moe.MoE(64, 64, 4, 2), path)
    assert isinstance(fresh, hb.QuantizedMoE) and fresh.gate_up_proj.nested
    x = torch.randn(6, 64)
    assert torch.equal(fresh(x), moe(x))


def _tiny_mixtral():
    tf = pytest.importorskip("transformers")
    cfg = tf.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    torch.manual_seed(1)
    model = tf.MixtralForCausalLM(cfg).eval()
    return tf, cfg, model


def _dequantized_copy(tf, cfg, qmodel):
    """The same model with float experts holding the dequantized weights."""
    m = tf.MixtralForCausalLM(cfg).eval()
    sd = {k: v for k, v in qmodel.state_dict().items() if ".experts." not in k}
    m.load_state_dict(sd, strict=False)
    for layer, ql in zip(m.model.layers, qmodel.model.layers):
        ex = ql.mlp.experts
        layer.mlp.experts.gate_up_proj.data.copy_(ex.gate_up_proj.dequantize())
        layer.mlp.experts.down_proj.data.copy_(ex.down_proj.dequantize())
    return m


def test_mixtral_quantized_generates_compiled_with_a_static_cache():
    """Serving's setup end to end: a quantized Mixtral's forward under torch.compile(fullgraph=True) with a
    static KV cache generates the same tokens as eager (the quantized experts trace: no graph break)."""
    tf, cfg, model = _tiny_mixtral()
    h3moe.quantize(model, "nf4", 32)
    ids = torch.randint(2, 96, (1, 6))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
        try:
            got = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
        finally:
            torch._dynamo.reset()
    assert torch.equal(got, want)


def test_mixtral_quantized_generates_and_roundtrips(tmp_path, caplog):
    tf, cfg, model = _tiny_mixtral()
    with caplog.at_level("INFO", logger="h3moe"):
        h3moe.quantize(model, "nf4", blocksize=64, double_quant=False)
    assert "->" in caplog.text and "bytes" in caplog.text  # the memory report line
    rep = model.h3moe_quant_report
    assert len(rep.modules) == 2 and rep.model_bytes_after < rep.model_bytes_before
    assert isinstance(model.model.layers[0].mlp.experts, hb.QuantizedExperts)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
        deq = _dequantized_copy(tf, cfg, model)
        want = deq(ids).logits
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    out_deq = deq.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 12) and torch.equal(out, out_deq)
    # save / load through safetensors into a fresh unquantized model
    path = str(tmp_path / "q.safetensors")
    hb.save_quantized(model, path)
    fresh = tf.MixtralForCausalLM(cfg).eval()
    hb.load_quantized(fresh, path)
    assert isinstance(fresh.model.layers[1].mlp.experts, hb.QuantizedExperts)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)


@pytest.mark.parametrize("quant_type,nested", [("fp4", True), ("int8", False)])
def test_mixtral_other_formats_close_to_dequantized(quant_type, nested):
    tf, cfg, model = _tiny_mixtral()
    h3moe.quantize(model, quant_type, 32, nested)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _dequantized_copy(tf, cfg, model)(ids).logits,
                                   rtol=1e-4, atol=1e-4)


class _Mlp(torch.nn.Module):
    def __init__(self, lin, H, I):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = lin(H, I), lin(H, I), lin(I, H)
        self.act_fn = torch.nn.SiLU()


class _ListBlock(torch.nn.Module):
    """A ModuleList-style MoE block (experts[e](x) in a Python loop)."""

    def __init__(self, lin, H, I, E):
        super().__init__()
        self.experts = torch.nn.ModuleList(_Mlp(lin, H, I) for _ in range(E))


@pytest.mark.parametrize("kind", ["nf4", "nf4-nested", "int8"])
def test_take_over_bitsandbytes_linears(kind):
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    # I = 64: bitsandbytes' CPU dequantize_4bit kernel misreads rows shorter than a block (seen in 0.50.2:
    # a (64, 32) weight with blocksize 64 differs from its own torch op by 1e-2); our layout needs whole blocks
    # per row anyway.
    H, I, E = 64, 64, 3
    if kind == "int8":
        lin = lambda i, o: bnb.nn.Linear8bitLt(i, o, bias=False, has_fp16_weights=False)  # noqa: E731
    else:
        lin = lambda i, o: bnb.nn.Linear4bit(i, o, bias=False, quant_type="nf4",  # noqa: E731
                                             compress_statistics=kind.endswith("nested"))
    block = _ListBlock(lin, H, I, E).to("cpu")  # moving quantizes bitsandbytes' weights

    def deq(l):
        if kind == "int8":
            return F.int8_vectorwise_dequant(l.weight.data, l.weight.SCB).float()
        return F.dequantize_4bit(l.weight.data, l.weight.quant_state).float()

    Ws = [[deq(getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")] for m in block.experts]
    packed0 = block.experts[0].gate_proj.weight.data.clone()
    h3moe.quantize(block)
    assert isinstance(block.experts, hb.QuantizedExpertList) and len(block.experts) == E
    if kind != "int8":  # taken over, not requantized: the same bytes
        assert torch.equal(block.experts.gate_up_proj.qweight[0][: packed0.numel()], packed0.view(-1))
    x = torch.randn(5, H)
    for e, (wg, wu, wd) in enumerate(Ws):
        want = (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()
        torch.testing.assert_close(block.experts[e](x), want, rtol=1e-4, atol=1e-4)


def test_package_import_does_not_import_bitsandbytes():
    code = "import sys, h3moe; assert 'bitsandbytes' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------- compile tier


@pytest.mark.compile
def test_decode_kernel_compiles_without_spills():
    """Four specs here (the compile tier compiles them all): the NF4 nested GEMV decode gate_up kernel (T=1),
    the table-load variant of the GEMV down kernel, and the tensor-core gate_up kernel (T=16, T=1024), for sm_90:
    no spills, 16-byte weight loads, the lookup each one asks for (warp shuffles / table loads), no shared-memory
    staging beyond a small scratch in the GEMV, wgmma in the tensor-core kernel."""
    pytest.importorskip("triton")
    code = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from h3moe.kernels.aot import lane_asm_problem, resource_usage
from h3moe.kernels.quant import aot_specs
specs = aot_specs()
assert len({s.name for s in specs}) == len(specs) == 212
def build(prefix, max_shared=2048):
    s = next(s for s in specs if s.name.startswith(prefix))
    attrs = {(s.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in s.divisible}
    k = triton.compile(ASTSource(fn=s.fn, signature=s.signature, constexprs=s.constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": s.num_warps, "num_stages": s.num_stages})
    assert k.metadata.shared <= max_shared, k.metadata.shared
    assert "ld.global.v4.b32" in k.asm["ptx"] or "ld.global.v4.u32" in k.asm["ptx"], "no 16-byte weight loads"
    usage = resource_usage(k.asm["cubin"])
    assert usage["stack"] == 0 and usage["local"] == 0, usage
    # every shuffle lookup makes its table register in its own asm block from its own %laneid: a table built
    # in a separate op is a tensor to Triton, which may move it between lanes (a convert_layout did, once)
    assert lane_asm_problem(k.asm["ttgir"]) is None, lane_asm_problem(k.asm["ttgir"])
    SHFL_ASMS[:] = ["shfl.sync"] if "shfl.sync" in k.asm["ttgir"] else []  # shuffles come only from our asm
    return k.asm["ptx"]
SHFL_ASMS = []
# the default lookup: one shfl.sync.idx per weight (64 per thread per 1 KB chunk, unrolled), no table loads
ptx = build("quant_w4_gate_up_gemv[bf16,nf4+nested,T=1,")
assert ptx.count("shfl.sync.idx.b32") >= 64 and SHFL_ASMS, ptx.count("shfl.sync.idx.b32")
assert "ld.global.b64" not in ptx and "ld.global.u64" not in ptx, "a 64-bit table load is back"
# the table-load alternative: no shuffle lookups (Triton's own layout moves use a few shfl.idx)
ptx = build("quant_w4_down_gemv[bf16,nf4+load,T=1,")
assert ptx.count("shfl.sync.idx.b32") < 16, ptx.count("shfl.sync.idx.b32")
# the tensor-core decode kernel (T=16): wgmma, one shuffle per weight (128 rows x 64 codes per step over 128
# threads: 64 per thread), 16-byte word loads two steps ahead, the A tile's round trip: < 32 KB of shared memory
ptx = build("quant_w4_gate_up_tc[bf16,nf4,T=16,E=8,BM=16,BN=64,SUB=64,D=2,", max_shared=32768)
assert "wgmma.mma_async" in ptx and ptx.count("shfl.sync.idx.b32") >= 64, ptx.count("shfl.sync.idx.b32")
assert "ld.global.b64" not in ptx and SHFL_ASMS
# prefill (BM=64): the activations staged by Triton's pipeliner (cp.async) instead
ptx = build("quant_w4_gate_up_tc[bf16,nf4,T=1024,", max_shared=65536)
assert "wgmma.mma_async" in ptx and "cp.async" in ptx
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ GPU tier


def _ref_fp32_and_eager(x, gu, dn, r, limit=None):
    """fp32 reference on the dtype-rounded dequantized weights, and eager in x's dtype (the per-expert
    fallback: dequantize one expert, then its rows), for the tolerance; limit: the swiglu_limit."""
    T, H = x.shape
    K = r.top_k
    want = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in range(gu.shape[0]):
        tok, slot = torch.where(r.ids == e)
        if tok.numel() == 0:
            continue
        wg = gu.dequantize(e, x.dtype).float()
        wd = dn.dequantize(e, x.dtype).float()
        I = wd.shape[1]
        h = x[tok].float() @ wg.t()
        o = ref.glu_ref(h[:, :I], h[:, I:], "silu", limit) @ wd.t()
        want.index_add_(0, tok, o * r.weights[tok, slot, None])
    eager = oq.quant_moe(x, gu.packed, dn.packed, r, backend="torch", swiglu_limit=limit).float()
    return want, eager


GPU_CASES = [(qt, nested, torch.bfloat16) for qt, nested in FORMATS] + [("nf4", False, torch.float16),
                                                                        ("int8", False, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,nested,dtype", GPU_CASES)
@pytest.mark.parametrize("T", [1, 16, 64, 512])  # GEMV (1), tensor cores (16, 64 and prefill: S = 1024)
def test_gpu_kernels_equal_dequantize_reference(monkeypatch, quant_type, nested, dtype, T):
    E, H, I, K = 8, 4096, 14336, 2  # Mixtral-8x7B
    if T == 512 and (quant_type, nested) in (("fp4", False), ("nf4", True)):
        I = 1792  # prefill of every format at full size is slow to check; keep two at full size
    dev = "cuda"
    gu, dn = _quantized(E, H, I, quant_type, 64, nested, dtype=dtype, device=dev)
    x = torch.randn(T, H, device=dev).to(dtype)
    r = route(torch.randn(T, E, device=dev), K)
    _poison(monkeypatch)
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    assert y.dtype == dtype and not torch.isnan(y).any()
    want, eager = _ref_fp32_and_eager(x, gu, dn, r)
    err, eager_err = (y.float() - want).abs().max(), (eager - want).abs().max()
    assert err <= 2 * eager_err + 1e-3 * want.abs().max(), (err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("T,kernel", [(1, None), (16, None), (64, None), (20, "dot")])  # GEMV, tensor cores, tl.dot
def test_gpu_swiglu_limit_equals_reference(monkeypatch, quant_type, T, kernel):
    """The clamped SwiGLU (swiglu_limit, a constexpr of every gate_up kernel) on each kernel family, bf16,
    against dequantize + the clamped reference; the clamp binds."""
    if kernel:
        monkeypatch.setenv("H3MOE_QUANT_KERNEL", kernel)
    E, H, I, K, L = 8, 1024, 768, 2, 0.5
    gu, dn = _quantized(E, H, I, quant_type, 64, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    r = route(torch.randn(T, E, device="cuda"), K)
    _poison(monkeypatch)
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton", swiglu_limit=L)
    want, eager = _ref_fp32_and_eager(x, gu, dn, r, L)
    assert (want - _ref_fp32_and_eager(x, gu, dn, r)[0]).abs().max() > 0.1 * want.abs().max()
    err, eager_err = (y.float() - want).abs().max(), (eager - want).abs().max()
    assert err <= 2 * eager_err + 1e-3 * want.abs().max(), (err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("T,E,K,kernel", [(1, 8, 2, None), (3, 8, 2, None), (16, 8, 2, None), (1, 64, 8, None),
                                          (5, 64, 8, None), (40, 3, 2, None), (80, 8, 2, None), (20, 8, 2, "dot"),
                                          (80, 8, 2, "dot")])
def test_gpu_w4_lookups_agree(monkeypatch, quant_type, nested, T, E, K, kernel):
    """The 4-bit kernels' two nibble lookups (warp shuffle; 16-entry table loads, the interpreter's path) read
    the same fp32 codes: the GEMV kernels (T = 1), the tensor-core kernels (T = 3-80; 40 over 3 experts:
    BM=64) and the tl.dot kernels (H3MOE_QUANT_KERNEL=dot: BM=16 tiles at T=20, BM=64 at 80) give the same
    outputs up to instruction order, both equal to dequantize + reference. Only the GPU runs the shuffle (PTX);
    every other line is interpreter-tested."""
    from h3moe.kernels import quant as kq

    if kernel:
        monkeypatch.setenv("H3MOE_QUANT_KERNEL", kernel)

    H, I = 1024, 1536
    gu, dn = _quantized(E, H, I, quant_type, 64, nested, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    r = route(torch.randn(T, E, device="cuda"), K)
    _poison(monkeypatch)
    ys = {}
    for mode in ("shfl", "load"):
        monkeypatch.setenv("H3MOE_W4_LOOKUP", mode)
        ys[mode] = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    assert not torch.isnan(ys["shfl"]).any()
    # the same codes: equal up to the compiler's instruction order (a bf16 ulp); a wrong code is O(1) off
    scale = ys["load"].float().abs().max().item()
    torch.testing.assert_close(ys["shfl"].float(), ys["load"].float(), rtol=0, atol=1e-2 * scale)
    if kq.quant_kernel(T, True) != "dot":  # GEMV / tensor-core decode: the same arithmetic, nearly all equal
        assert (ys["shfl"] == ys["load"]).float().mean().item() > 0.99
    want, eager = _ref_fp32_and_eager(x, gu, dn, r)
    err, eager_err = (ys["shfl"].float() - want).abs().max(), (eager - want).abs().max()
    assert err <= 2 * eager_err + 1e-3 * want.abs().max(), (err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,dtype", [("nf4", torch.bfloat16), ("nf4", torch.float16),
                                              ("int8", torch.bfloat16)])
@pytest.mark.parametrize("T,E,K", [(2, 8, 2), (16, 8, 2), (16, 128, 8), (64, 3, 2), (512, 8, 2)])
def test_gpu_tc_decode_equals_gemv_and_dot(monkeypatch, quant_type, dtype, T, E, K):
    """The tensor-core kernels against the kernels they replace from 2 tokens on (GEMV up to 16 tokens, tl.dot
    above: TC_MAX_T = 0) and against dequantize + reference, at Mixtral / Qwen3-like widths (nested NF4,
    int8)."""
    from h3moe.kernels import quant as kq

    H, I = (4096, 3584) if E <= 8 else (2048, 768)
    gu, dn = _quantized(E, H, I, quant_type, 64, quant_type == "nf4", dtype=dtype, device="cuda")
    x = torch.randn(T, H, device="cuda").to(dtype)
    r = route(torch.randn(T, E, device="cuda"), K)
    _poison(monkeypatch)
    assert kq.quant_kernel(T, True) == "tc"
    y_tc = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    monkeypatch.setattr(kq, "TC_MAX_T", 0)
    y_old = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    want, eager = _ref_fp32_and_eager(x, gu, dn, r)
    eager_err = (eager - want).abs().max()
    for y in (y_tc, y_old):
        assert not torch.isnan(y).any()
        err = (y.float() - want).abs().max()
        assert err <= 2 * eager_err + 1e-3 * want.abs().max(), (err, eager_err)
    # and against h3moe/reference.py itself, on the same dequantized (dtype-rounded) weights, in fp32
    ref_y = ref.experts_ref(x.float(), gu.dequantize(dtype=dtype).float(), dn.dequantize(dtype=dtype).float(),
                            r.weights.float(), r.ids)
    assert (y_tc.float() - ref_y).abs().max() <= 2 * eager_err + 1e-3 * ref_y.abs().max()


@pytest.mark.gpu
def test_gpu_quantizer_runs_without_bitsandbytes():
    """Quantize on the GPU with the pure-torch quantizer (no bitsandbytes there), run the NF4 decode path
    (T=1, K=2) and check it against dequantize + reference. Its speed is the benchmark driver's business."""
    E, H, I, K = 8, 4096, 3584, 2
    gu, dn = _quantized(E, H, I, "nf4", 64, dtype=torch.bfloat16, device="cuda")
    assert gu.qweight.is_cuda and gu.qweight.shape == (E, 2 * I * H // 2)
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    r = route(torch.randn(1, E, device="cuda"), K)
    y = oq.quant_moe(x, gu.packed, dn.packed, r, backend="triton")
    want = ref.experts_ref(x.float(), gu.dequantize().float(), dn.dequantize().float(), r.weights, r.ids)
    assert torch.isfinite(y).all()
    rel = ((y.float() - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.gpu
def test_gpu_quant_moe_compiled_with_cuda_graphs():
    """Serving's compile: torch.compile(fullgraph=True) with CUDA graphs over routing + quant_moe (NF4, nested
    absmax) replays the graphs (the GEMV at T=1, the tensor-core kernels at T=16) and equals eager at every
    call, on fresh inputs each time (a replay reading the captured inputs, or a kernel the capture missed,
    would not). Dynamo's "cudagraphs" backend: the cudagraph trees of mode="reduce-overhead" without
    inductor's code generation (tens of seconds per graph, and our ops are opaque to it anyway). One format:
    int8 shares every line on this path."""
    E, H, I, K = 8, 1024, 1536, 2
    gu, dn = _quantized(E, H, I, "nf4", 64, True, dtype=torch.bfloat16, device="cuda")

    def f(x, logits):
        return oq.quant_moe(x, gu.packed, dn.packed, route(logits, K), backend="triton")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="cudagraphs", dynamic=False)
    try:
        for T in (1, 16):
            for _ in range(4):
                x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
                logits = torch.randn(T, E, device="cuda")
                want = f(x, logits)
                got = cf(x, logits).clone()  # the graph's output buffer is reused by the next replay
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3 * want.abs().max().item())
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_gpu_mixtral_generates_through_kernels(monkeypatch, quant_type):
    tf, cfg, model = _tiny_mixtral()
    model = model.to("cuda", torch.bfloat16)
    h3moe.quantize(model, quant_type, 64, quant_type == "nf4")
    calls = []
    real = oq._quant_moe_triton
    monkeypatch.setattr(oq, "_quant_moe_triton", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    with torch.no_grad():
        logits = model(ids).logits.float()
        deq = _dequantized_copy(tf, cfg, model).cuda()
        want = deq(ids).logits
    assert calls, "the quantized experts did not run the Triton kernels"
    assert (logits - want).abs().max() <= 0.05 * want.abs().max()
    out = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 17)


def _own_gate_experts(family: str, cls_name: str, limit: float):
    """A transformers experts module with its own _apply_gate (tiny, random), or skip where this transformers
    lacks the family."""
    import importlib
    import types

    pytest.importorskip("transformers")
    try:
        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        pytest.skip(f"this transformers has no {family}")
    cfg = types.SimpleNamespace(num_local_experts=3, num_experts=3, hidden_size=64, intermediate_size=32,
                                moe_intermediate_size=32, hidden_act="silu", swiglu_limit=limit, swiglu_alpha=1.702,
                                _experts_implementation="eager")
    m = getattr(mod, cls_name)(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quantize_keeps_a_clamped_swiglu(quant_type, tmp_path):
    """DeepSeek-V4's experts (act(min(gate, L)) * clamp(up, -L, L)): quantized with their swiglu_limit, equal to
    the model's own eager experts over the dequantized weights (the clamp binds: without it they differ); the
    limit survives save/load."""
    m = _own_gate_experts("deepseek_v4", "DeepseekV4Experts", 0.8)
    q = h3moe.quantize(m, quant_type, 32)
    assert isinstance(q, hb.QuantizedExperts) and q.swiglu_limit == 0.8
    with torch.no_grad():
        m.gate_up_proj.copy_(q.gate_up_proj.dequantize())
        m.down_proj.copy_(q.down_proj.dequantize())
        x, r = torch.randn(6, 64), route(torch.randn(6, 3), 2)
        want = m(x, r.ids, r.weights)
        got = q(x, r.ids, r.weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_ref(x, q.gate_up_proj, q.down_proj, r), want, atol=1e-3)  # the clamp matters
    holder = torch.nn.Module()
    holder.experts = _own_gate_experts("deepseek_v4", "DeepseekV4Experts", 0.8)
    h3moe.quantize(holder, quant_type, 32)
    hb.save_quantized(holder, str(tmp_path / "q.safetensors"))
    fresh = torch.nn.Module()
    fresh.experts = _own_gate_experts("deepseek_v4", "DeepseekV4Experts", 0.8)
    hb.load_quantized(fresh, str(tmp_path / "q.safetensors"))
    assert fresh.experts.swiglu_limit == 0.8
    with torch.no_grad():
        torch.testing.assert_close(fresh.experts(x, r.ids, r.weights), holder.experts(x, r.ids, r.weights))
    # a file saved before the limit was kept (no swiglu_limit in its metadata): the module it replaces says
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["h3moe_quant"])
    del meta["experts"]["swiglu_limit"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"h3moe_quant": json.dumps(meta)})
    old = torch.nn.Module()
    old.experts = _own_gate_experts("deepseek_v4", "DeepseekV4Experts", 0.8)
    hb.load_quantized(old, str(tmp_path / "old.safetensors"))
    assert old.experts.swiglu_limit == 0.8


def test_quantize_skips_a_clamped_gate_with_an_activation_it_lacks():
    """DeepSeek-V4's gate over an act_fn h3moe has no kernel for (quick_gelu): not taken for silu."""
    m = _own_gate_experts("deepseek_v4", "DeepseekV4Experts", 0.8)
    from transformers.activations import ACT2FN

    m.act_fn = ACT2FN["quick_gelu"]
    holder = torch.nn.Module()
    holder.experts = m
    h3moe.quantize(holder, "nf4", 32)
    assert holder.experts is m


def test_quantize_skips_a_gate_it_does_not_compute(caplog):
    """MiniMax-M3's experts ((up + 1) * gate * sigmoid(alpha * gate), clamped) are left unquantized, with a
    warning, rather than quantized into plain SwiGLU (which would change the model's outputs)."""
    holder = torch.nn.Module()
    holder.experts = _own_gate_experts("minimax_m3_vl", "MiniMaxM3VLExperts", 0.8)
    with caplog.at_level("WARNING", logger="h3moe"):
        h3moe.quantize(holder, "nf4", 32)
    assert type(holder.experts).__name__ == "MiniMaxM3VLExperts"
    assert "MiniMaxM3VLExperts._apply_gate" in caplog.text


@pytest.mark.interpreter
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("T", [1, 5, 24])
def test_triton_swiglu_limit_equals_reference(monkeypatch, quant_type, T):
    """quant_moe(swiglu_limit=L) on the Triton kernels (interpreter) and the torch fallback: bitsandbytes'
    dequantize followed by the clamped reference; the clamp binds."""
    if HAS_CUDA:
        pytest.skip("the GPU tier covers this")
    pytest.importorskip("triton")
    from h3moe.kernels import quant as kq

    monkeypatch.setattr(kq, "TC_MAX_T", 0)  # (the tensor-core kernels' inline asm does not interpret)
    E, H, I, K, L = 4, 64, 32, 2, 0.6
    gu = hb.quantize_weight(torch.randn(E, 2 * I, H) * 0.3, quant_type, 32).packed
    dn = hb.quantize_weight(torch.randn(E, H, I) * 0.3, quant_type, 32).packed
    Wg = torch.stack([oq.dequantize(gu, e, torch.float32) for e in range(E)]).double()
    Wd = torch.stack([oq.dequantize(dn, e, torch.float32) for e in range(E)]).double()
    x, r = torch.randn(T, H), route(torch.randn(T, E), K)
    want = ref.experts_ref(x.double(), Wg, Wd, r.weights.double(), r.ids, "silu", L)
    assert (want - ref.experts_ref(x.double(), Wg, Wd, r.weights.double(), r.ids)).abs().max() > 0.1
    for backend in ("torch", "triton"):
        y = h3moe.quant_moe(x, gu, dn, r, backend=backend, swiglu_limit=L)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=lambda s: f"{backend}: {s}")
    with pytest.raises(ValueError, match="swiglu_limit"):
        h3moe.quant_moe(x, gu, dn, r, swiglu_limit=0.0)
