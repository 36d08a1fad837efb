#!/usr/bin/env python3
"""One DASH search step in PyTorch: the peer that dash's CUDA search step is timed against.

The same step as dash's: a frozen Llama-shaped decoder (random bf16 weights: speed does not
depend on the values) whose every layer mixes the candidate operators with weights
π_l = softmax(α_l / τ); the teacher (every layer softmax attention) runs in the same step without
gradients; the loss is the token-mean KL(p_teacher ‖ p_student); backward reaches the
architecture logits α only (every weight has requires_grad = False, activations carry gradients).

Operators, each the fastest PyTorch route on Hopper:
  softmax  scaled_dot_product_attention (causal; its default backend, cuDNN on Hopper)
  swa:W    flex_attention with a sliding-window block mask (compiled), sharing softmax's Q/K/V
  gla      flash-linear-attention's chunk_simple_gla on the op's own projections
  gdn      flash-linear-attention's chunk_gated_delta_rule (L2-normalised q, k in the kernel)
Softmax and the window share the teacher's projections, so their outputs are mixed before the
output projection, as dash does. Where fla refuses the backward of a data-dependent gate on this
Triton (Hopper, Triton < 3.7.1), the peer keeps the gate out of the backward (--gate detached):
it then does strictly less work than dash, which differentiates through every gate.

  python3 benchmarks/peer/search_step.py --shape smollm2 --batch 16 --seq 2048 --ops softmax,swa:512,gla,gdn
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # layers, d_model, heads, kv heads, d_head, d_ff, vocab, rope theta
    "smollm2": dict(layers=30, d=576, heads=9, kv=3, d_head=64, ff=1536, vocab=49152, theta=100000.0),
    "qwen3b": dict(layers=36, d=2048, heads=16, kv=2, d_head=128, ff=11008, vocab=151936, theta=1000000.0),
}


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(T, d_head, theta, device):
    inv = 1.0 / theta ** (torch.arange(0, d_head, 2, device=device, dtype=torch.float32) / d_head)
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    return torch.cos(ang).to(torch.bfloat16), torch.sin(ang).to(torch.bfloat16)


def rope(x, cos, sin):  # x [B, T, H, D], rotate-half convention
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Model:
    def __init__(self, shape, ops, device):
        s = SHAPES[shape]
        self.s, self.ops = s, ops
        g = torch.Generator(device=device).manual_seed(0)

        def w(*dims, std=None):
            std = std if std is not None else 1 / math.sqrt(dims[-1])
            return (torch.randn(*dims, device=device, generator=g) * std).to(torch.bfloat16)

        d, H, Hkv, D, ff = s["d"], s["heads"], s["kv"], s["d_head"], s["ff"]
        self.embed = w(s["vocab"], d, std=0.02)
        self.final_norm = torch.ones(d, device=device, dtype=torch.bfloat16)
        self.layers = []
        for _ in range(s["layers"]):
            layer = dict(norm1=torch.ones(d, device=device, dtype=torch.bfloat16),
                         norm2=torch.ones(d, device=device, dtype=torch.bfloat16),
                         wqkv=w((H + 2 * Hkv) * D, d), wo=w(d, H * D), w_gate_up=w(2 * ff, d), w_down=w(d, ff))
            if "gla" in [o[0] for o in ops]:
                layer["gla"] = dict(wqkv=w(3 * H * D, d), wo=w(d, H * D), w_gate=w(H, d, std=0.1 / math.sqrt(d)))
            if "gdn" in [o[0] for o in ops]:
                layer["gdn"] = dict(wqkv=w(3 * H * D, d), wo=w(d, H * D), w_gate=w(H, d, std=0.1 / math.sqrt(d)),
                                    w_beta=w(H, d, std=0.1 / math.sqrt(d)))
            self.layers.append(layer)


def build_ops(model, T, device, gate_detached):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    s = model.s
    H, Hkv, D = s["heads"], s["kv"], s["d_head"]
    cos, sin = rope_tables(T, D, s["theta"], device)
    flex = torch.compile(flex_attention)
    masks = {}
    for name, arg in model.ops:
        if name == "swa":
            W = arg

            def window(b, h, q_idx, kv_idx, W=W):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

            masks[W] = create_block_mask(window, None, None, T, T, device=device)

    def qkv_heads(layer, x):
        B = x.shape[0]
        qkv = x @ layer["wqkv"].t()
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = rope(q.view(B, T, H, D), cos, sin)
        k = rope(k.view(B, T, Hkv, D), cos, sin)
        return q, k, v.view(B, T, Hkv, D)

    def softmax_core(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=H != Hkv)
        return out.transpose(1, 2)

    def window_core(q, k, v, W):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[W],
                   enable_gqa=H != Hkv)
        return out.transpose(1, 2)

    def gla(p, x):
        from fla.ops.simple_gla import chunk_simple_gla
        B = x.shape[0]
        q, k, v = (t.reshape(B, T, H, D) for t in (x @ p["wqkv"].t()).chunk(3, dim=-1))
        g = F.logsigmoid((x @ p["w_gate"].t()).float()) / 16
        if gate_detached:
            g = g.detach()
        o, _ = chunk_simple_gla(q, k, v, g=g, scale=1 / math.sqrt(D))
        return o.reshape(B, T, H * D) @ p["wo"].t()

    def gdn(p, x):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        B = x.shape[0]
        q, k, v = (t.reshape(B, T, H, D) for t in (x @ p["wqkv"].t()).chunk(3, dim=-1))
        g = F.logsigmoid((x @ p["w_gate"].t()).float()) / 16
        beta = torch.sigmoid((x @ p["w_beta"].t()).float()).to(torch.bfloat16)
        if gate_detached:
            g, beta = g.detach(), beta.detach()
        o, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=1.0, use_qk_l2norm_in_kernel=True)
        return o.reshape(B, T, H * D) @ p["wo"].t()

    def mixer(layer, x, pi):
        """Σ_i π_i o_i(x): shared-projection ops mixed before Wo. pi None: the teacher."""
        B = x.shape[0]
        q, k, v = qkv_heads(layer, x)
        if pi is None:
            return softmax_core(q, k, v).reshape(B, T, H * D) @ layer["wo"].t()
        shared, own = 0, 0
        for i, (name, arg) in enumerate(model.ops):
            if name == "softmax":
                shared = shared + pi[i] * softmax_core(q, k, v)
            elif name == "swa":
                shared = shared + pi[i] * window_core(q, k, v, arg)
            elif name == "gla":
                own = own + pi[i] * gla(layer["gla"], x)
            elif name == "gdn":
                own = own + pi[i] * gdn(layer["gdn"], x)
        out = own
        if not isinstance(shared, int):
            out = out + shared.reshape(B, T, H * D) @ layer["wo"].t()
        return out

    return mixer


def forward(model, mixer, tokens, pis):
    x = model.embed[tokens]
    for l, layer in enumerate(model.layers):
        pi = None if pis is None else pis[l]
        x = x + mixer(layer, rms_norm(x, layer["norm1"]), pi).to(x.dtype)
        h = rms_norm(x, layer["norm2"])
        gate, up = (h @ layer["w_gate_up"].t()).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ layer["w_down"].t()
    return rms_norm(x, model.final_norm)


def kl_loss(model, teacher_h, student_h, chunk_tokens=4096):
    """Token-mean KL(p_teacher ‖ p_student), a chunk of tokens at a time (bf16 logits, fp32 softmax)."""
    t, s = teacher_h.flatten(0, 1), student_h.flatten(0, 1)
    total = 0
    for i in range(0, t.shape[0], chunk_tokens):
        lt = F.log_softmax((t[i:i + chunk_tokens] @ model.embed.t()).float(), dim=-1)
        ls = F.log_softmax((s[i:i + chunk_tokens] @ model.embed.t()).float(), dim=-1)
        total = total + F.kl_div(ls, lt, log_target=True, reduction="sum")
    return total / t.shape[0]


def parse_ops(text):
    ops = []
    for item in text.split(","):
        name, _, arg = item.partition(":")
        ops.append((name, int(arg) if arg else 512 if name == "swa" else None))
    return ops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ops", default="softmax,swa:512,gla,gdn")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gate", choices=["detached", "differentiated"], default="detached")
    p.add_argument("--out", help="JSON file for the result")
    args = p.parse_args()

    device = "cuda"
    ops = parse_ops(args.ops)
    model = Model(args.shape, ops, device)
    mixer = build_ops(model, args.seq, device, args.gate == "detached")
    alpha = torch.zeros(model.s["layers"], len(ops), device=device, requires_grad=True)
    tau = 1.0

    def step():
        tokens = torch.randint(0, model.s["vocab"], (args.batch, args.seq), device=device)
        with torch.no_grad():
            teacher_h = forward(model, mixer, tokens, None)
        pis = torch.softmax(alpha / tau, dim=-1).to(torch.bfloat16)
        student_h = forward(model, mixer, tokens, pis)
        loss = kl_loss(model, teacher_h, student_h)
        loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch * args.seq
    result = dict(peer="pytorch", shape=args.shape, batch=args.batch, seq=args.seq, ops=args.ops, gate=args.gate,
                  step_s=round(median, 4), tokens_per_s=round(tokens / median), loss=float(loss),
                  memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2), torch=torch.__version__)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
