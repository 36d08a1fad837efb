#!/usr/bin/env python3
"""One DASH search step in PyTorch: the peer that dash's CUDA search step is timed against.

The same step as dash's: a frozen Llama-shaped decoder (random bf16 weights: speed does not
depend on the values) whose every layer mixes the candidate operators with weights
π_l = softmax(α_l / τ); the teacher (every layer softmax attention) runs in the same step without
gradients; the loss is the token-mean KL(p_teacher ‖ p_student); backward reaches the
architecture logits α only (every weight has requires_grad = False, activations carry gradients).

Operators, each the fastest PyTorch route on Hopper:
  softmax  scaled_dot_product_attention (causal, GQA in the kernel; cuDNN, flash or memory-efficient
           backend, never the math one: where none of them takes GQA, k/v heads are repeated)
  swa:W    flex_attention with a sliding-window block mask (compiled), sharing softmax's Q/K/V
  gla      flash-linear-attention's chunk_simple_gla on the op's own projections (q: H heads, k/v:
           the teacher's Hkv heads, repeated to H as dash's GQA reads them)
  gdn      flash-linear-attention's chunk_gated_delta_rule (L2-normalised q, k in the kernel; a
           state per query head, so q, k, v all have H heads, as dash's default)
Softmax and the window share the teacher's projections, so their outputs are mixed before the
output projection, as dash does. The residual stream is bf16 (dash keeps it in fp32).

Gates (--gate). fla refuses any backward with a data-dependent gate g on this Triton (Hopper,
Triton >= 3.4 and < 3.7.1: its gated chunk_bwd_dqkwg is reported to give wrong results, fla
issue #640), whether or not g itself needs a gradient, since dq and dk go through the same kernel.
  differentiated  the gates are data-dependent and differentiated, as dash's; the guard is
                  switched off, so the kernels and their time are fla's, but dq, dk, dg of the
                  gated operators may be wrong on this Triton: a timing peer, not a numerical one.
  constant        keeps to what fla computes correctly here: gla with a constant per-head decay
                  (g_gamma), gdn without the decay (chunk_delta_rule, β data-dependent and
                  differentiated); strictly less work than dash (no gate projections, no dg).

  python3 benchmarks/peer/search_step.py --shape smollm2 --batch 16 --seq 2048 --ops softmax,swa:512,gla,gdn
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from timing import median_ms

SHAPES = {
    # layers, d_model, heads, kv heads, d_head, d_ff, vocab, rope theta, tied head, q/k/v biases
    "smollm2": dict(layers=30, d=576, heads=9, kv=3, d_head=64, ff=1536, vocab=49152, theta=100000.0, tied=True,
                    bias=False),
    "qwen3b": dict(layers=36, d=2048, heads=16, kv=2, d_head=128, ff=11008, vocab=151936, theta=1000000.0,
                   tied=False, bias=True),
    "tiny": dict(layers=2, d=128, heads=4, kv=2, d_head=32, ff=256, vocab=512, theta=10000.0, tied=True, bias=False),
}


def rms_norm(x, w, eps=1e-5):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


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

        def bias(n):
            return w(n, std=0.02) if s["bias"] else None

        self.embed = w(s["vocab"], d, std=0.02)
        self.head = self.embed if s["tied"] else w(s["vocab"], d)
        self.final_norm = torch.ones(d, device=device, dtype=torch.bfloat16)
        self.layers = []
        names = [o[0] for o in ops]
        for _ in range(s["layers"]):
            layer = dict(norm1=torch.ones(d, device=device, dtype=torch.bfloat16),
                         norm2=torch.ones(d, device=device, dtype=torch.bfloat16),
                         wqkv=w((H + 2 * Hkv) * D, d), bqkv=bias((H + 2 * Hkv) * D), wo=w(d, H * D),
                         w_gate_up=w(2 * ff, d), w_down=w(d, ff))
            if "gla" in names:
                layer["gla"] = dict(wqkv=w((H + 2 * Hkv) * D, d), bqkv=bias((H + 2 * Hkv) * D), wo=w(d, H * D),
                                    w_gate=w(H, d, std=0.1 / math.sqrt(d)),
                                    g_gamma=F.logsigmoid(torch.linspace(0.46, 1.75, H, device=device)) / 16)
            if "gdn" in names:
                layer["gdn"] = dict(wqkv=w(3 * H * D, d), bqkv=bias(3 * H * D), wo=w(d, H * D),
                                    w_gate=w(H, d, std=0.1 / math.sqrt(d)), w_beta=w(H, d, std=0.1 / math.sqrt(d)))
            self.layers.append(layer)


def build_ops(model, T, device, gate):
    """The mixer Σ_i π_i o_i for sequences of T tokens; gate: 'differentiated' or 'constant'."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if gate == "differentiated":
        import fla.ops.common.chunk_o as fla_chunk_o
        fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # the Hopper guard, see the module's docstring
    s = model.s
    H, Hkv, D = s["heads"], s["kv"], s["d_head"]
    cos, sin = rope_tables(T, D, s["theta"], device)
    flex = torch.compile(flex_attention, dynamic=False)
    masks = {}
    for name, arg in model.ops:
        if name == "swa":
            W = arg

            def window(b, h, q_idx, kv_idx, W=W):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < W)

            masks[W] = create_block_mask(window, None, None, T, T, device=device)

    def qkv_heads(layer, x):
        B = x.shape[0]
        qkv = F.linear(x, layer["wqkv"], layer["bqkv"])
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = rope(q.view(B, T, H, D), cos, sin)
        k = rope(k.view(B, T, Hkv, D), cos, sin)
        return q, k, v.view(B, T, Hkv, D)

    fused_backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    sdpa_route = {}

    def softmax_core(q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if H != Hkv and sdpa_route.get("gqa", True):
            try:
                with sdpa_kernel(fused_backends):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                sdpa_route["gqa"] = True
                return out.transpose(1, 2)
            except RuntimeError:
                if "gqa" in sdpa_route:
                    raise
                sdpa_route["gqa"] = False
        if H != Hkv:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        with sdpa_kernel(fused_backends):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2)

    def window_core(q, k, v, W):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=masks[W],
                   enable_gqa=H != Hkv)
        return out.transpose(1, 2)

    def gla(p, x):
        from fla.ops.simple_gla import chunk_simple_gla
        B = x.shape[0]
        q, k, v = F.linear(x, p["wqkv"], p["bqkv"]).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.reshape(B, T, H, D)
        k = k.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
        v = v.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2)
        if gate == "differentiated":
            g = F.logsigmoid(F.linear(x, p["w_gate"]).float()) / 16
            o, _ = chunk_simple_gla(q, k, v, g=g, scale=1 / math.sqrt(D))
        else:
            o, _ = chunk_simple_gla(q, k, v, g_gamma=p["g_gamma"], scale=1 / math.sqrt(D))
        return F.linear(o.reshape(B, T, H * D), p["wo"])

    def gdn(p, x):
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        B = x.shape[0]
        q, k, v = (t.reshape(B, T, H, D) for t in F.linear(x, p["wqkv"], p["bqkv"]).chunk(3, dim=-1))
        beta = torch.sigmoid(F.linear(x, p["w_beta"]).float()).to(torch.bfloat16)
        if gate == "differentiated":
            g = F.logsigmoid(F.linear(x, p["w_gate"]).float()) / 16
            o, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=1.0, use_qk_l2norm_in_kernel=True)
        else:
            o, _ = chunk_delta_rule(q, k, v, beta=beta, scale=1.0, use_qk_l2norm_in_kernel=True)
        return F.linear(o.reshape(B, T, H * D), p["wo"])

    def mixer(layer, x, pi):
        """Σ_i π_i o_i(x): shared-projection ops mixed before Wo. pi None: the teacher."""
        B = x.shape[0]
        q, k, v = qkv_heads(layer, x)
        if pi is None:
            return F.linear(softmax_core(q, k, v).reshape(B, T, H * D), layer["wo"])
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
            out = out + F.linear(shared.reshape(B, T, H * D), layer["wo"])
        return out

    mixer.sdpa_route = sdpa_route
    return mixer


def forward(model, mixer, tokens, pis):
    x = model.embed[tokens]
    for l, layer in enumerate(model.layers):
        pi = None if pis is None else pis[l]
        x = x + mixer(layer, rms_norm(x, layer["norm1"]), pi).to(x.dtype)
        h = rms_norm(x, layer["norm2"])
        gate, up = F.linear(h, layer["w_gate_up"]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, layer["w_down"])
    return rms_norm(x, model.final_norm)


def kl_loss(model, teacher_h, student_h, chunk_tokens=4096):
    """Token-mean KL(p_teacher ‖ p_student), a chunk of tokens at a time (bf16 logits, fp32 softmax)."""
    t, s = teacher_h.flatten(0, 1), student_h.flatten(0, 1)
    total = 0
    for i in range(0, t.shape[0], chunk_tokens):
        lt = F.log_softmax(F.linear(t[i:i + chunk_tokens], model.head).float(), dim=-1)
        ls = F.log_softmax(F.linear(s[i:i + chunk_tokens], model.head).float(), dim=-1)
        total = total + F.kl_div(ls, lt, log_target=True, reduction="sum")
    return total / t.shape[0]


def parse_ops(text):
    ops = []
    for item in text.split(","):
        name, _, arg = item.partition(":")
        ops.append((name, int(arg) if arg else 512 if name == "swa" else None))
    return ops


class PeerStep:
    """One search step: tokens [B, T] → the loss, with dL/dα in alpha.grad (α [layers, ops], τ = 1)."""

    def __init__(self, shape, ops, batch, seq, gate, device="cuda"):
        self.ops = parse_ops(ops)
        self.model = Model(shape, self.ops, device)
        self.mixer = build_ops(self.model, seq, device, gate)
        self.alpha = torch.zeros(self.model.s["layers"], len(self.ops), device=device, requires_grad=True)
        self.batch, self.seq = batch, seq

    def __call__(self, tokens):
        self.alpha.grad = None
        with torch.no_grad():
            teacher_h = forward(self.model, self.mixer, tokens, None)
        pis = torch.softmax(self.alpha, dim=-1).to(torch.bfloat16)
        student_h = forward(self.model, self.mixer, tokens, pis)
        loss = kl_loss(self.model, teacher_h, student_h)
        loss.backward()
        return loss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ops", default="softmax,swa:512,gla,gdn")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gate", choices=["differentiated", "constant"], default="differentiated")
    p.add_argument("--out", help="JSON file for the result")
    args = p.parse_args()

    step = PeerStep(args.shape, args.ops, args.batch, args.seq, args.gate)
    tokens = torch.randint(0, step.model.s["vocab"], (args.batch, args.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(lambda: step(tokens), args.warmup, args.steps)
    loss = step(tokens)
    result = dict(peer="pytorch", shape=args.shape, batch=args.batch, seq=args.seq, ops=args.ops, gate=args.gate,
                  step_ms=round(ms, 2), tokens_per_s=round(args.batch * args.seq / (ms * 1e-3)), loss=float(loss),
                  alpha_grad_abs_max=float(step.alpha.grad.abs().max()),
                  memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), torch=torch.__version__)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
