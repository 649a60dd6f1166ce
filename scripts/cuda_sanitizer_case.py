"""One small case of every csrc/ kernel, for `compute-sanitizer --tool memcheck python <this>`
(tests/test_cuda_gpu.py runs it). Sizes are tiny and odd on purpose: tails everywhere."""
import math

import torch

import h3moe
from h3moe import reference as ref
from h3moe.ops import cuda

torch.manual_seed(0)
dev = "cuda"
T, E, K, H, I, B = 13, 6, 2, 40, 24, 1  # H, I multiples of 8 but not of 32
logits = torch.randn(T, E, device=dev, requires_grad=True)
r = h3moe.route(logits, K, backend="cuda")  # route_fwd + sort
(r.weights * torch.randn(T, K, device=dev)).sum().backward()  # route_bwd
layers = [torch.randn(T, E, device=dev, requires_grad=True) for _ in range(2)]
loss = h3moe.gating_loss(layers, torch.randint(0, E, (B,), device=dev), backend="cuda")  # psum fwd/bwd
loss.backward()
x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
wgu = (torch.randn(E, 2 * I, H, device=dev) / math.sqrt(H)).to(torch.bfloat16)
wd = (torch.randn(E, H, I, device=dev) / math.sqrt(I)).to(torch.bfloat16)
with torch.no_grad():
    rr = cuda.route(torch.randn(T, E, device=dev), K)
    y = h3moe.moe(x, wgu, wd, rr, backend="cuda")  # gate_up, down, combine
torch.cuda.synchronize()
y_ref = ref.experts_ref(x.float(), wgu.float(), wd.float(), rr.weights, rr.ids)
assert (y.float() - y_ref).abs().max().item() < 5e-2
print("sanitizer case ok")
