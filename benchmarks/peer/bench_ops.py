#!/usr/bin/env python3
"""dash's CUDA operators against their peers, in one process on one GPU.

Each case runs dash's kernel (through libdash_peer.so, on torch tensors and torch's stream) and
the peer on the same inputs, times both with CUDA events (median of --reps after --warmup runs)
and writes one record per (op, shape, pass):

  op, shape, dtype, pass, ms, tflops, peer, peer_ms, ratio   (ratio = peer_ms / ms: > 1 is faster)

Peers: torch's scaled_dot_product_attention (its default backend, which is cuDNN on Hopper, and
its flash backend) for Softmax; dash's own causal Softmax for SlidingWindow and for the backward
of GatedDeltaNet; flash-linear-attention's chunk_simple_gla (data-dependent gate forward; its
constant-decay g_gamma variant for forward+backward, the gated backward being refused by fla on
Hopper with Triton < 3.7.1) and chunk_gated_delta_rule for the linear operators.

FLOPs: attention 4·B·H·D per attended pair (backward 2.5×); linear operators by dash's cost
model for chunk 64 (per token and head 4·C·D + 4·D² forward, twice that backward), so TFLOP/s of
the linear ops compare dash and fla on the same count, not on their own kernels' work.

  python3 benchmarks/peer/bench_ops.py --lib build/libdash_peer.so --out results.json
"""
import argparse
import ctypes
import datetime
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

from timing import median_ms


class Dash:
    """The C entry points of libdash_peer.so; a missing one makes its cases report 'missing'."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.dash_last_error.restype = ctypes.c_char_p

    def has(self, name):
        return hasattr(self.lib, name)

    def call(self, name, *args):
        fn = getattr(self.lib, name)
        converted = []
        for a in args:
            if isinstance(a, torch.Tensor):
                converted.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, float):
                converted.append(ctypes.c_float(a))
            elif a is None:
                converted.append(ctypes.c_void_p(0))
            elif isinstance(a, Raw):
                converted.append(a.value)
            else:
                converted.append(ctypes.c_longlong(a) if abs(a) >= 2**31 else ctypes.c_int(a))
        status = fn(*converted)
        if status != 0:
            raise RuntimeError(f"{name}: {self.lib.dash_last_error().decode()}")

    def size(self, name, *args):
        fn = getattr(self.lib, name)
        fn.restype = ctypes.c_size_t
        return int(fn(*[ctypes.c_int(a) for a in args]))


class Raw:
    """An argument passed as given (a 64-bit integer, a stream handle)."""

    def __init__(self, value):
        self.value = value


def stream():
    return Raw(ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))


def i64(x):
    return Raw(ctypes.c_longlong(x))


def size_t(x):
    return Raw(ctypes.c_size_t(x))


def attended_pairs(T, window, sinks=0):
    def capped(n, c):
        return n * (n + 1) / 2 if n <= c else c * (c + 1) / 2 + (n - c) * c

    w = T if window <= 0 else window
    return capped(T, w) + capped(max(0, T - w), sinks)


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


class Recorder:
    def __init__(self):
        self.records = []

    def add(self, op, shape, pass_, ms, flops, peer=None, peer_ms=None, note=None):
        rec = {"op": op, "shape": shape, "dtype": "bf16", "pass": pass_,
               "ms": round(ms, 4) if ms is not None else None,
               "tflops": round(flops / ms / 1e9, 1) if ms else None,
               "peer": peer, "peer_ms": round(peer_ms, 4) if peer_ms is not None else None,
               "ratio": round(peer_ms / ms, 3) if (ms and peer_ms) else None}
        if note:
            rec["note"] = note
        self.records.append(rec)
        print(f"{op:14s} {pass_:8s} {json.dumps(shape):44s} dash {rec['ms']} ms "
              f"({rec['tflops']} TF/s)  {peer}: {rec['peer_ms']} ms  ratio {rec['ratio']}", flush=True)


def attention_cases(dash, rec, args):
    for (B, H, Hkv, T, D, window) in [(4, 16, 16, 4096, 128, 0), (8, 16, 16, 2048, 64, 0),
                                      (1, 16, 16, 16384, 128, 0), (1, 16, 16, 16384, 128, 512)]:
        shape = {"B": B, "H": H, "Hkv": Hkv, "T": T, "D": D}
        if window:
            shape["W"] = window
        q, k, v = rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D)
        d_o = rand(B, T, H, D)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device="cuda", dtype=torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flops = 4 * B * H * D * attended_pairs(T, window)
        op = "sliding_window" if window else "softmax"

        def fwd():
            dash.call("dash_attention_forward", q, k, v, o, lse, B, T, H, Hkv, D, i64(window), i64(0), stream())

        has_bwd = dash.has("dash_attention_backward")
        if has_bwd:
            ws_bytes = dash.size("dash_attention_backward_workspace", B, T, H, Hkv, D)
            ws = torch.empty(max(ws_bytes, 1), device="cuda", dtype=torch.uint8)

        def fwd_bwd():
            fwd()
            dash.call("dash_attention_backward", q, k, v, o, lse, d_o, dq, dk, dv, B, T, H, Hkv, D, i64(window),
                      i64(0), ws, size_t(ws_bytes), stream())

        if not dash.has("dash_attention_forward"):
            rec.add(op, shape, "fwd", None, flops, note="missing")
            continue
        ms_f = median_ms(fwd, args.warmup, args.reps)
        ms_fb = median_ms(fwd_bwd, args.warmup, args.reps) if has_bwd else None
        if window:
            causal = {}
            for name in ("fwd", "fwd+bwd"):
                def run_causal(name=name):
                    dash.call("dash_attention_forward", q, k, v, o, lse, B, T, H, Hkv, D, i64(0), i64(0), stream())
                    if name == "fwd+bwd":
                        dash.call("dash_attention_backward", q, k, v, o, lse, d_o, dq, dk, dv, B, T, H, Hkv, D,
                                  i64(0), i64(0), ws, size_t(ws_bytes), stream())
                if name == "fwd" or has_bwd:
                    causal[name] = median_ms(run_causal, args.warmup, args.reps)
            rec.add(op, shape, "fwd", ms_f, flops, "dash softmax (causal)", causal.get("fwd"))
            if ms_fb:
                rec.add(op, shape, "fwd+bwd", ms_fb, 3.5 * flops, "dash softmax (causal)", causal.get("fwd+bwd"))
            continue
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        d_ot = d_o.transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for peer, backends in (("sdpa (default)", None), ("sdpa (flash)", [SDPBackend.FLASH_ATTENTION])):
            def p_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=H != Hkv)

            def p_fwd_bwd():
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=H != Hkv)
                out.backward(d_ot)

            def timed(fn):
                if backends is None:
                    return median_ms(fn, args.warmup, args.reps)
                with sdpa_kernel(backends):
                    return median_ms(fn, args.warmup, args.reps)

            rec.add(op, shape, "fwd", ms_f, flops, peer, timed(p_fwd))
            if ms_fb:
                rec.add(op, shape, "fwd+bwd", ms_fb, 3.5 * flops, peer, timed(p_fwd_bwd))


def linear_flops(B, T, H, D, chunk=64):
    return B * H * T * (4 * chunk * D + 4 * D * D)


def gla_cases(dash, rec, args, fla):
    from fla.ops.simple_gla import chunk_simple_gla
    for (B, T, H, Hkv, D) in [(4, 8192, 16, 16, 128), (16, 2048, 9, 3, 64)]:
        shape = {"B": B, "H": H, "Hkv": Hkv, "T": T, "D": D}
        q, k, v = rand(B, T, H, D), rand(B, T, Hkv, D), rand(B, T, Hkv, D)
        g = F.logsigmoid(rand(B, T, H, dtype=torch.float32) + 3) / 16
        d_o = rand(B, T, H, D)
        o, dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg = torch.empty_like(g)
        scale = 1 / math.sqrt(D)
        if not dash.has("dash_gla_forward"):
            rec.add("gated_linear", shape, "fwd", None, 0, note="missing")
            continue
        ws_bytes = dash.size("dash_gla_workspace", B, T, H, Hkv, D)
        ws = torch.empty(max(ws_bytes, 1), device="cuda", dtype=torch.uint8)

        def fwd():
            dash.call("dash_gla_forward", q, k, v, g, o, None, B, T, H, Hkv, D, scale, ws, size_t(ws_bytes), stream())

        def fwd_bwd():
            fwd()
            dash.call("dash_gla_backward", q, k, v, g, d_o, dq, dk, dv, dg, B, T, H, Hkv, D, scale, ws,
                      size_t(ws_bytes), stream())

        flops = linear_flops(B, T, H, D)
        ms_f = median_ms(fwd, args.warmup, args.reps)
        ms_fb = median_ms(fwd_bwd, args.warmup, args.reps) if dash.has("dash_gla_backward") else None
        rep = H // Hkv
        kr, vr = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)

        def p_fwd():
            with torch.no_grad():
                chunk_simple_gla(q, kr, vr, g=g, scale=scale)

        rec.add("gated_linear", shape, "fwd", ms_f, flops, "fla chunk_simple_gla (g)", median_ms(p_fwd, args.warmup,
                                                                                                   args.reps))
        if ms_fb:
            qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, kr, vr))
            gamma = (g.mean(dim=(0, 1))).detach()

            def p_fwd_bwd():
                out, _ = chunk_simple_gla(qg, kg, vg, g_gamma=gamma, scale=scale)
                out.backward(d_o)

            rec.add("gated_linear", shape, "fwd+bwd", ms_fb, 3 * flops, "fla chunk_simple_gla (g_gamma)",
                    median_ms(p_fwd_bwd, args.warmup, args.reps))


def gdn_cases(dash, rec, args, fla):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    for (B, T, H, Hs, D) in [(4, 8192, 16, 16, 128), (16, 2048, 9, 9, 64)]:
        shape = {"B": B, "H": H, "Hs": Hs, "T": T, "D": D}
        q, k, v = rand(B, T, H, D), rand(B, T, Hs, D), rand(B, T, Hs, D)
        g = F.logsigmoid(rand(B, T, Hs, dtype=torch.float32) + 3) / 16
        beta = torch.rand(B, T, Hs, device="cuda", dtype=torch.float32)
        d_o = rand(B, T, H, D)
        o, dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dg, dbeta = torch.empty_like(g), torch.empty_like(beta)
        scale, eps = 1 / math.sqrt(D), 1e-6
        if not dash.has("dash_gdn_forward"):
            rec.add("gated_delta_net", shape, "fwd", None, 0, note="missing")
            continue
        ws_bytes = dash.size("dash_gdn_workspace", B, T, H, Hs, D)
        ws = torch.empty(max(ws_bytes, 1), device="cuda", dtype=torch.uint8)

        def fwd():
            dash.call("dash_gdn_forward", q, k, v, g, beta, o, None, B, T, H, Hs, D, scale, eps, ws, size_t(ws_bytes),
                      stream())

        def fwd_bwd():
            fwd()
            dash.call("dash_gdn_backward", q, k, v, g, beta, d_o, dq, dk, dv, dg, dbeta, B, T, H, Hs, D, scale, eps,
                      ws, size_t(ws_bytes), stream())

        flops = linear_flops(B, T, H, D)
        ms_f = median_ms(fwd, args.warmup, args.reps)
        beta_b = beta.to(torch.bfloat16)

        def p_fwd():
            with torch.no_grad():
                chunk_gated_delta_rule(q, k, v, g=g, beta=beta_b, scale=scale, use_qk_l2norm_in_kernel=True)

        rec.add("gated_delta_net", shape, "fwd", ms_f, flops, "fla chunk_gated_delta_rule",
                median_ms(p_fwd, args.warmup, args.reps))
        if dash.has("dash_gdn_backward") and dash.has("dash_attention_backward"):
            ms_fb = median_ms(fwd_bwd, args.warmup, args.reps)
            o_s = torch.empty_like(q)
            lse = torch.empty(B, H, T, device="cuda", dtype=torch.float32)
            ws_a = dash.size("dash_attention_backward_workspace", B, T, H, Hs, D)
            wsa = torch.empty(max(ws_a, 1), device="cuda", dtype=torch.uint8)

            def softmax_fwd_bwd():
                dash.call("dash_attention_forward", q, k, v, o_s, lse, B, T, H, Hs, D, i64(0), i64(0), stream())
                dash.call("dash_attention_backward", q, k, v, o_s, lse, d_o, dq, dk, dv, B, T, H, Hs, D, i64(0),
                          i64(0), wsa, size_t(ws_a), stream())

            rec.add("gated_delta_net", shape, "fwd+bwd", ms_fb, 3 * flops, "dash softmax (causal)",
                    median_ms(softmax_fwd_bwd, args.warmup, args.reps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", required=True, help="libdash_peer.so")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--commit", default=None, help="commit of the code measured (default: git rev-parse)")
    parser.add_argument("--command", default=" ".join(sys.argv), help="the command to record")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--only", default="attention,gdn,gla", help="comma-separated case groups")
    args = parser.parse_args()

    torch.manual_seed(0)
    dash = Dash(args.lib)
    rec = Recorder()
    groups = args.only.split(",")
    fla = None
    try:
        import fla as fla_module
        fla = fla_module
    except ImportError as exc:
        print(f"flash-linear-attention not importable ({exc}); linear-op peers skipped", file=sys.stderr)

    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    props = torch.cuda.get_device_properties(0)
    result = {
        "date": datetime.date.today().isoformat(),
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "fla": getattr(fla, "__version__", None),
        "commit": commit,
        "command": args.command,
        "records": rec.records,
    }
    cases = {"attention": lambda: attention_cases(dash, rec, args),
             "gla": lambda: gla_cases(dash, rec, args, fla) if fla else None,
             "gdn": lambda: gdn_cases(dash, rec, args, fla) if fla else None}
    # Written after every group, so that a run cut short keeps what it measured.
    for group in groups:
        cases[group]()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
