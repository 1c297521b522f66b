#!/usr/bin/env python3
"""PyTorch eager reference for `rewind bench train`.

The same decoder as rewind's benchmark (llama-style: RMSNorm, RoPE, causal attention, SwiGLU,
tied head; the synthetic d=512/8-head model or SmolLM2-135M's shapes), the same midpoint scheme
(p_{j+1} = p_{j-1} + 2h f_j(p_j), both seeds the embedding, read-out p_L), the same batch of
token ids and the same measurement: seconds of one forward + backward of the next-token loss,
median over timed steps after a warm-up. Weights are random: step time depends on shapes only.

Strategies, as in rewind:
  store       ordinary autograd, every activation kept
  checkpoint  torch.utils.checkpoint around each block
  reversible  a custom autograd function keeping only the top pair (p_{L-1}, p_L) and
              rebuilding p_{j-1} = p_{j+1} - 2h f_j(p_j) on the way down; one evaluation of
              each block serves the rebuild and its vector-Jacobian product.

    python bench/torch_reference.py --depths 8,16,32,64,96 --batch 8 --seq 64 --json
    python bench/torch_reference.py --preset smollm2 --batch 4 --seq 64
    python bench/torch_reference.py --check      # reversible gradients == store's, in f64
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PRESETS = {
    # rewind bench train's synthetic decoder (SwiGLU at 8/3 d, rounded up to 64).
    "synthetic": dict(d=512, heads=8, kv_heads=8, inter=1408, vocab=50304),
    # SmolLM2-135M-Instruct's shapes (30 layers unless --depths says otherwise).
    "smollm2": dict(d=576, heads=9, kv_heads=3, inter=1536, vocab=49152),
}


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq, head_dim, theta, dtype, device):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    """f_j(p) = attn(norm(p)) + mlp(norm(p + attn(norm(p)))): the block's residual increment."""

    def __init__(self, d, heads, kv_heads, inter):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.q = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, d, bias=False)
        self.gate = nn.Linear(d, inter, bias=False)
        self.up = nn.Linear(d, inter, bias=False)
        self.down = nn.Linear(inter, d, bias=False)

    def attention(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, p, cos, sin):
        attn = self.attention(self.attn_norm(p), cos, sin)
        h = p + attn
        mlp = self.down(F.silu(self.gate(self.mlp_norm(h))) * self.up(self.mlp_norm(h)))
        return attn + mlp


class MidpointStack(torch.autograd.Function):
    """The reversible backward: keeps (p_{L-1}, p_L), rebuilds the rest on the way down."""

    @staticmethod
    def forward(ctx, e, h, blocks, cos, sin, *params):
        with torch.no_grad():
            prev, cur = e, e
            for block in blocks:
                prev, cur = cur, prev + 2 * h * block(cur, cos, sin)
        ctx.h, ctx.blocks, ctx.cos, ctx.sin = h, blocks, cos, sin
        ctx.save_for_backward(prev, cur)
        return cur

    @staticmethod
    def backward(ctx, grad_top):
        below, top = ctx.saved_tensors  # (p_j, p_{j+1}) for j = L - 1
        adj_below, adj_top = torch.zeros_like(grad_top), grad_top
        grads = []
        for block in reversed(ctx.blocks):
            params = list(block.parameters())
            with torch.enable_grad():
                x = below.detach().requires_grad_(True)
                fx = block(x, ctx.cos, ctx.sin)
            with torch.no_grad():
                rebuilt = top - 2 * ctx.h * fx  # p_{j-1}
            gx, *gp = torch.autograd.grad(fx, [x] + params, grad_outputs=2 * ctx.h * adj_top)
            grads.append(gp)
            below, top = rebuilt.detach(), below
            adj_below, adj_top = adj_top, adj_below + gx
        flat = [g for gp in reversed(grads) for g in gp]
        # Duplicate seeding: p_{-1} = p_0 = e.
        return (adj_below + adj_top, None, None, None, None, *flat)


class Decoder(nn.Module):
    def __init__(self, layers, d, heads, kv_heads, inter, vocab, seq, dtype, device):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, inter) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.h = 1.0
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        self.to(dtype=dtype, device=device)
        self.cos, self.sin = rope_tables(seq, d // heads, 10_000.0, dtype, device)

    def stack(self, e, strategy):
        if strategy == "reversible":
            params = [p for b in self.blocks for p in b.parameters()]
            return MidpointStack.apply(e, self.h, self.blocks, self.cos, self.sin, *params)
        prev, cur = e, e
        for block in self.blocks:
            f = (
                checkpoint(block, cur, self.cos, self.sin, use_reentrant=False)
                if strategy == "checkpoint"
                else block(cur, self.cos, self.sin)
            )
            prev, cur = cur, prev + 2 * self.h * f
        return cur

    def loss(self, inputs, targets, strategy):
        hidden = self.norm(self.stack(self.embed(inputs), strategy))
        logits = hidden @ self.embed.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def token_batch(batch, seq, vocab, device):
    # The same ids as rewind's benchmark: i * 2654435761 mod vocab.
    ids = (torch.arange(batch * (seq + 1), dtype=torch.int64) * 2_654_435_761) % vocab
    ids = ids.view(batch, seq + 1).to(device)
    return ids[:, :seq], ids[:, 1:]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, inputs, targets, strategy, steps, device):
    def step():
        model.zero_grad(set_to_none=True)
        model.loss(inputs, targets, strategy).backward()

    step()  # warm-up
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), peak


def check(device):
    """Reversible and checkpoint gradients equal store's (f64, 12 layers)."""
    torch.manual_seed(0)
    model = Decoder(12, 64, 4, 2, 160, 300, 16, torch.float64, device)
    inputs, targets = token_batch(2, 16, 300, device)
    grads = {}
    for strategy in ("store", "checkpoint", "reversible"):
        model.zero_grad(set_to_none=True)
        model.loss(inputs, targets, strategy).backward()
        grads[strategy] = [p.grad.clone() for p in model.parameters()]
    worst = 0.0
    for strategy in ("checkpoint", "reversible"):
        for got, want in zip(grads[strategy], grads["store"]):
            worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-300)).item())
    print(f"max relative gradient error against store (f64, 12 layers): {worst:.2e}")
    if worst > 1e-10:
        raise SystemExit("reversible gradients disagree with store")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    ap.add_argument("--depths", default=None, help="comma-separated layer counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--strategies", default="store,checkpoint,reversible")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        check(device)
        return
    shape = PRESETS[args.preset]
    default_depths = "30" if args.preset == "smollm2" else "8,16,32,64,96"
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    for layers in map(int, (args.depths or default_depths).split(",")):
        torch.manual_seed(1)
        model = Decoder(layers, seq=args.seq, dtype=dtype, device=device, **shape)
        inputs, targets = token_batch(args.batch, args.seq, shape["vocab"], device)
        for strategy in args.strategies.split(","):
            seconds, peak = measure(model, inputs, targets, strategy, args.steps, device)
            row = dict(
                implementation=f"pytorch {torch.__version__} eager",
                preset=args.preset,
                strategy=strategy,
                scheme="midpoint(h=1)",
                layers=layers,
                batch=args.batch,
                seq=args.seq,
                dtype=args.dtype,
                threads=torch.get_num_threads(),
                step_seconds=seconds,
                tokens_per_s=args.batch * args.seq / seconds,
                peak_bytes=peak,
            )
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"{strategy:<11} L={layers:<3} batch={args.batch} seq={args.seq} "
                    f"step {seconds:.3f} s  {row['tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
