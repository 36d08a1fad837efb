#!/usr/bin/env python3
"""dash's search step against the PyTorch step (search_step.py), in one process on one stream.

For each case (a model shape, its operators, batch × length) dash's step runs first
(DeviceSearchModel::step through libdash_peer.so's dash_search_step_*, on torch's current stream),
then the PyTorch step; both are timed with CUDA events, median of --steps after --warmup (the
first warm-up steps of PyTorch include torch.compile's and fla's Triton autotuning, minutes on a
machine with cold caches; progress lines with the elapsed time show where the time goes). The
PyTorch step tries the requested batch and halves it until it fits in memory; dash then runs at
that batch too, where it differs. Peak memory: PyTorch's max_memory_allocated over its steps;
dash's, the device memory the process gained from before creating the model to after its steps
(weights + workspace: dash allocates nothing per step).

Model FLOPs of one step (the useful work; dash's per-layer recomputation in the backward and
every elementwise op, norm, RoPE and softmax exponent are not counted). N = B·T tokens,
L layers, d model width, H/Hkv heads of D, f the MLP width, V the vocabulary, C = 64 the chunk:
  per token and layer, GEMMs (2 FLOPs per multiply-add):
    shared  = 2·d·(H + 2·Hkv)·D + 2·H·D·d                    q|k|v and output projections
    mlp     = 2·d·2f + 2·f·d                                   gate|up and down
    gla     = 2·d·(H + 2·Hkv)·D + 2·d·H + 2·H·D·d              its own q|k|v, gate, output
    gdn     = 2·d·3·H·D + 2·d·2·H + 2·H·D·d                    its own q|k|v (H heads), gate|β, output
  attention, per sequence and layer: 4·H·D per attended (query, key) pair,
    causal: T(T+1)/2 pairs;  window W: Σ_i min(i + 1, W) pairs
  linear operators, per token, head and layer (the chunked form): 4·C·D + 4·D² (gla and gdn alike)
  head: 2·N·d·V per logit product
  teacher   = L·N·(shared + mlp) + L·B·4HD·causal + 2NdV
  student   = L·N·(shared + mlp + Σ_own) + L·B·4HD·(causal + Σ_W window_W) + L·N·H·Σ_linear + 2NdV
  backward  = L·N·(shared + mlp + Σ_own)       (to activations only: the weights are frozen)
            + 2.5·(student attention) + 2·(student linear operators) + 2NdV   (dL/dh at the head)
  step      = teacher + student + backward
Model FLOP utilisation = step / time / 989 TFLOP/s (dense bf16 peak of an H100 SXM / H200, no
sparsity).

  python3 benchmarks/peer/bench_search_step.py --lib libdash_peer.so --out results.json --commit SHA
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import search_step  # noqa: E402
from timing import median_ms  # noqa: E402

PEAK_TFLOPS = 989.0
CHUNK = 64

CASES = {
    "smollm2": dict(shape="smollm2", ops="softmax,swa:512,gla,gdn", batch=16, seq=2048),
    "qwen3b": dict(shape="qwen3b", ops="softmax,swa:2048,gla", batch=4, seq=4096),
    "tiny": dict(shape="tiny", ops="softmax,swa:64,gla,gdn", batch=2, seq=256),
}


def window_pairs(T, W):
    return sum(min(i + 1, W) for i in range(T))


def step_flops(s, ops, B, T):
    """The model FLOPs of one step (module docstring), with the parts for the record."""
    L, d, H, Hkv, D, f, V = s["layers"], s["d"], s["heads"], s["kv"], s["d_head"], s["ff"], s["vocab"]
    N = B * T
    shared = 2 * d * (H + 2 * Hkv) * D + 2 * H * D * d
    mlp = 2 * d * 2 * f + 2 * f * d
    own = {"gla": 2 * d * (H + 2 * Hkv) * D + 2 * d * H + 2 * H * D * d,
           "gdn": 2 * d * 3 * H * D + 2 * d * 2 * H + 2 * H * D * d}
    linear_core = 4 * CHUNK * D + 4 * D * D
    causal = T * (T + 1) // 2
    pairs = causal + sum(window_pairs(T, W) for name, W in ops if name == "swa")
    n_linear = sum(1 for name, _ in ops if name in ("gla", "gdn"))
    student_gemm = L * N * (shared + mlp + sum(own[name] for name, _ in ops if name in own))
    student_attention = L * B * 4 * H * D * pairs
    student_linear = L * N * H * linear_core * n_linear
    head = 2 * N * d * V
    teacher = L * N * (shared + mlp) + L * B * 4 * H * D * causal + head
    student = student_gemm + student_attention + student_linear + head
    backward = student_gemm + 2.5 * student_attention + 2 * student_linear + head
    return dict(teacher=teacher, student=student, backward=backward, total=teacher + student + backward)


class Dash:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.dash_last_error.restype = ctypes.c_char_p
        self.lib.dash_search_step_create.argtypes = [ctypes.c_int] * 9 + [ctypes.c_double, ctypes.c_char_p,
                                                                          ctypes.c_int, ctypes.c_int,
                                                                          ctypes.POINTER(ctypes.c_void_p)]
        self.lib.dash_search_step_run.argtypes = [ctypes.c_void_p] * 4
        self.lib.dash_search_step_read.argtypes = [ctypes.c_void_p] * 4
        self.lib.dash_search_step_bytes.argtypes = [ctypes.c_void_p]
        self.lib.dash_search_step_bytes.restype = ctypes.c_size_t
        self.lib.dash_search_step_destroy.argtypes = [ctypes.c_void_p]

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {self.lib.dash_last_error().decode()}")


STARTED = time.time()


def progress(what):
    print(f"[{time.time() - STARTED:6.1f} s] {what}", flush=True)


def logged(fn, label):
    """fn, printing the elapsed time after each of its first calls (the warm-up)."""
    calls = [0]

    def call():
        fn()
        calls[0] += 1
        if calls[0] <= 3:
            torch.cuda.synchronize()
            progress(f"{label}: step {calls[0]} done")

    return call


def stream_ptr():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def free_memory():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def time_pytorch(case, batch, gate, args):
    """Times the PyTorch step; returns the record, or raises torch.cuda.OutOfMemoryError."""
    step = None
    free_memory()
    try:
        torch.cuda.reset_peak_memory_stats()
        progress(f"{case['shape']} pytorch ({gate}) {batch}×{case['seq']}: building")
        step = search_step.PeerStep(case["shape"], case["ops"], batch, case["seq"], gate)
        tokens = torch.randint(0, step.model.s["vocab"], (batch, case["seq"]), device="cuda")
        ms = median_ms(logged(lambda: step(tokens), f"{case['shape']} pytorch"), args.warmup,
                                   args.steps)
        loss = step(tokens).item()
        grad = step.alpha.grad
        return dict(step_ms=round(ms, 2), loss=loss, alpha_grad_finite=bool(torch.isfinite(grad).all()),
                    alpha_grad_abs_max=float(grad.abs().max()),
                    peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    sdpa_gqa_in_kernel=step.mixer.sdpa_route.get("gqa"))
    finally:
        del step
        free_memory()


def time_dash(dash, case, batch, args):
    s = search_step.SHAPES[case["shape"]]
    ops = search_step.parse_ops(case["ops"])
    free_memory()
    free_before = torch.cuda.mem_get_info()[0]
    handle = ctypes.c_void_p()
    progress(f"{case['shape']} dash {batch}×{case['seq']}: building")
    dash.check(dash.lib.dash_search_step_create(s["layers"], s["d"], s["heads"], s["kv"], s["d_head"], s["ff"],
                                                s["vocab"], int(s["tied"]), int(s["bias"]), s["theta"],
                                                case["ops"].encode(), batch, case["seq"], ctypes.byref(handle)),
               "dash_search_step_create")
    try:
        ids = torch.randint(0, s["vocab"], (batch * case["seq"],), device="cuda", dtype=torch.int32)
        pi = torch.full((s["layers"], len(ops)), 1.0 / len(ops), device="cuda", dtype=torch.float32)

        def step():
            dash.check(dash.lib.dash_search_step_run(handle, ctypes.c_void_p(ids.data_ptr()),
                                                     ctypes.c_void_p(pi.data_ptr()), stream_ptr()),
                       "dash_search_step_run")

        ms = median_ms(logged(step, f"{case['shape']} dash"), args.warmup, args.steps)
        loss = (ctypes.c_float * 2)()
        grad = (ctypes.c_float * (s["layers"] * len(ops)))()
        dash.check(dash.lib.dash_search_step_read(handle, loss, grad, stream_ptr()), "dash_search_step_read")
        held = free_before - torch.cuda.mem_get_info()[0]
        return dict(step_ms=round(ms, 2), loss=float(loss[1]),
                    pi_grad_finite=all(abs(g) < float("inf") for g in grad),
                    pi_grad_abs_max=max(abs(g) for g in grad), peak_memory_gib=round(held / 2**30, 2),
                    workspace_gib=round(dash.lib.dash_search_step_bytes(handle) / 2**30, 2))
    finally:
        dash.lib.dash_search_step_destroy(handle)
        free_memory()


def summarise(case, batch, record):
    s = search_step.SHAPES[case["shape"]]
    flops = step_flops(s, search_step.parse_ops(case["ops"]), batch, case["seq"])
    seconds = record["step_ms"] * 1e-3
    record["tokens_per_s"] = round(batch * case["seq"] / seconds)
    record["model_tflop"] = round(flops["total"] / 1e12, 2)
    record["mfu"] = round(flops["total"] / seconds / (PEAK_TFLOPS * 1e12), 4)
    return record


def dash_case(name, batch, dash_ms, dash, args, add):
    case = CASES[name]
    mine = time_dash(dash, case, batch, args)
    dash_ms[name, batch] = mine["step_ms"]
    add(summarise(case, batch, dict(case=name, impl="dash", batch=batch, seq=case["seq"], **mine)))


def headline(name, gate, batches, dash_ms, dash, args, add):
    """PyTorch at the largest batch that fits (halving from the case's), dash at that batch if not timed yet."""
    case = CASES[name]
    batch = case["batch"]
    while True:
        try:
            record = time_pytorch(case, batch, gate, args)
            break
        except torch.cuda.OutOfMemoryError:
            add(dict(case=name, impl="pytorch", gate=gate, batch=batch, seq=case["seq"], error="out of memory"))
            if batch == 1:
                record = None
                break
            batch //= 2
        except Exception as e:  # the record says what failed
            add(dict(case=name, impl="error", gate=gate, batch=batch, error=f"{type(e).__name__}: {e}"[:2000]))
            record = None
            break
    batches[name] = batch
    if record is not None:
        add(summarise(case, batch, dict(case=name, impl="pytorch", gate=gate, batch=batch, seq=case["seq"],
                                        **record)))
    if (name, batch) not in dash_ms:
        dash_case(name, batch, dash_ms, dash, args, add)
    if record is not None:
        add(dict(case=name, impl="ratio", gate=gate, batch=batch,
                 speedup=round(record["step_ms"] / dash_ms[name, batch], 3)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", required=True, help="libdash_peer.so")
    p.add_argument("--out", required=True, help="JSON file to write (rewritten after every measurement)")
    p.add_argument("--commit", default="unknown", help="commit of the code measured")
    p.add_argument("--command", default=" ".join(sys.argv), help="the command to record")
    p.add_argument("--cases", default="smollm2,qwen3b", help="of " + ",".join(CASES))
    p.add_argument("--gates", default="differentiated",
                   help="PyTorch gate modes (search_step.py); the first is the headline, the others follow "
                        "every case's headline while time is left")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no optional measurement after this")
    args = p.parse_args()
    started = STARTED
    dash = Dash(args.lib)

    import fla
    result = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  cudnn=torch.backends.cudnn.version(), fla=getattr(fla, "__version__", "unknown"),
                  commit=args.commit, command=args.command, peak_tflops=PEAK_TFLOPS,
                  timing=f"CUDA events on one stream, median of {args.steps} steps after {args.warmup}",
                  flops=__doc__[__doc__.index("Model FLOPs"):__doc__.index("\n\n  python3")], peer=search_step.__doc__, shapes={}, records=[])

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def add(record):
        result["records"].append(record)
        print(json.dumps(record), flush=True)
        save()

    gates = args.gates.split(",")
    batches, dash_ms = {}, {}
    for name in args.cases.split(","):  # dash first: seconds per case, while PyTorch's first steps compile
        result["shapes"][name] = dict(search_step.SHAPES[name], **CASES[name])
        try:
            dash_case(name, CASES[name]["batch"], dash_ms, dash, args, add)
        except Exception as e:
            add(dict(case=name, impl="error", error=f"dash: {type(e).__name__}: {e}"[:2000]))
    for name in args.cases.split(","):
        try:
            headline(name, gates[0], batches, dash_ms, dash, args, add)
        except Exception as e:  # the other cases still run; the record says what failed
            add(dict(case=name, impl="error", error=f"{type(e).__name__}: {e}"[:2000]))
    for gate in gates[1:]:
        for name in args.cases.split(","):
            if time.time() - started > args.budget_s:
                add(dict(case=name, impl="pytorch", gate=gate, skipped=f"past the {args.budget_s:.0f} s budget"))
                continue
            case, batch = CASES[name], batches.get(name, CASES[name]["batch"])
            try:
                record = time_pytorch(case, batch, gate, args)
            except torch.cuda.OutOfMemoryError:
                add(dict(case=name, impl="pytorch", gate=gate, batch=batch, error="out of memory"))
                continue
            except Exception as e:
                add(dict(case=name, impl="error", gate=gate, error=f"{type(e).__name__}: {e}"[:2000]))
                continue
            add(summarise(case, batch, dict(case=name, impl="pytorch", gate=gate, batch=batch, seq=case["seq"],
                                            **record)))
            if (name, batch) in dash_ms:
                add(dict(case=name, impl="ratio", gate=gate, batch=batch,
                         speedup=round(record["step_ms"] / dash_ms[name, batch], 3)))
    result["elapsed_s"] = round(time.time() - started, 1)
    save()
    print(f"{'case':8s} {'impl':8s} {'gate':15s} {'B×T':>10s} {'ms':>9s} {'tok/s':>10s} {'MFU':>6s} {'GiB':>7s}")
    for r in result["records"]:
        if "step_ms" in r:
            print(f"{r['case']:8s} {r['impl']:8s} {r.get('gate', '-'):15s} {str(r['batch']) + '×' + str(r['seq']):>10s} "
                  f"{r['step_ms']:9.2f} {r['tokens_per_s']:10d} {r['mfu']:6.3f} {r['peak_memory_gib']:7.2f}")
        elif r["impl"] == "ratio":
            print(f"{r['case']:8s} speedup dash vs pytorch ({r['gate']}, B {r['batch']}): {r['speedup']}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
