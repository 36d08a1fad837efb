#!/usr/bin/env python3
"""Reference data for dash's GGUF reader, made with the `gguf` package (ggml's own Python
implementation of the format), so that the C++ reader is checked against an independent one.

Writes into OUT (default tests/fixtures/gguf):
  tiny_llama.gguf, tiny_qwen2.gguf   small valid models written by gguf.GGUFWriter, with their
  tiny_llama.json, tiny_qwen2.json   config and, per tensor, the sum and 16 sampled values of the
                                     gguf package's dequantisation
  bad_magic.gguf, truncated.gguf, huge_kv_count.gguf
                                     malformed copies (fuzzer seeds)
and, with --smollm2 PATH, smollm2_reference.json: the same statistics for three tensors of the
SmolLM2-135M-Instruct Q4_1 GGUF (types Q8_0, Q4_1 and F32).

    pip install gguf numpy
    python scripts/gguf_reference.py --smollm2 models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import json
import pathlib
import struct

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants


def statistics(name, tensor_type, values):
    """Sum (float64) and 16 evenly spaced flat samples of a dequantised tensor."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    indices = [i * (flat.size - 1) // 15 for i in range(16)]
    return {
        "name": name,
        "type": tensor_type,
        "shape": [int(d) for d in np.asarray(values).shape],
        "sum": float(flat.astype(np.float64).sum()),
        "samples": [[int(i), float(flat[i])] for i in indices],
    }


def dump(reference):
    """JSON with one tensor per line."""
    parts = [f' "{k}": {json.dumps(v)}' for k, v in reference.items() if k != "tensors"]
    tensors = ",\n".join("  " + json.dumps(t) for t in reference["tensors"])
    return "{\n" + ",\n".join(parts + [f' "tensors": [\n{tensors}\n ]']) + "\n}\n"


def tensor_statistics(path, names):
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    out = []
    for name in names:
        t = by_name[name]
        values = quants.dequantize(t.data, t.tensor_type)
        out.append(statistics(name, t.tensor_type.name, values))
    return out


def write_tiny(path, arch, rng):
    d_model, n_heads, n_kv_heads, d_ff, vocab = 32, 2, 1, 32, 32
    d_head = d_model // n_heads
    qwen2 = arch == "qwen2"
    config = {
        "architecture": arch, "n_layers": 1, "d_model": d_model, "n_heads": n_heads,
        "n_kv_heads": n_kv_heads, "d_head": d_head, "d_ff": d_ff, "vocab_size": vocab,
        "context_length": 64, "rms_eps": 1e-6 if qwen2 else 1e-5,
        "rope_theta": 1000000.0 if qwen2 else 10000.0, "rope_style": "half" if qwen2 else "interleaved",
        "qkv_bias": qwen2, "tied_embeddings": not qwen2,
    }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(1)
    w.add_context_length(config["context_length"])
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(config["rms_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if qwen2:
        w.add_vocab_size(vocab)  # llama: the reader takes it from token_embd.weight's rows

    q_dim, kv_dim = n_heads * d_head, n_kv_heads * d_head
    layout = [  # name, row-major shape [out, in], storage type
        ("token_embd.weight", (vocab, d_model), Q.Q4_0 if qwen2 else Q.Q8_0),
        ("blk.0.attn_norm.weight", (d_model,), Q.F16),
        ("blk.0.attn_q.weight", (q_dim, d_model), Q.Q4_0),
        ("blk.0.attn_k.weight", (kv_dim, d_model), Q.Q4_1),
        ("blk.0.attn_v.weight", (kv_dim, d_model), Q.F16),
        ("blk.0.attn_output.weight", (d_model, q_dim), Q.Q8_0),
        ("blk.0.ffn_norm.weight", (d_model,), Q.BF16),
        ("blk.0.ffn_gate.weight", (d_ff, d_model), Q.Q4_0 if qwen2 else Q.Q8_0),
        ("blk.0.ffn_up.weight", (d_ff, d_model), Q.Q4_0),
        ("blk.0.ffn_down.weight", (d_model, d_ff), Q.Q4_1),
        ("output_norm.weight", (d_model,), Q.F32),
    ]
    if qwen2:
        layout += [
            ("blk.0.attn_q.bias", (q_dim,), Q.F32),
            ("blk.0.attn_k.bias", (kv_dim,), Q.F32),
            ("blk.0.attn_v.bias", (kv_dim,), Q.F32),
            ("output.weight", (vocab, d_model), Q.Q4_0),
        ]
    stats = []
    for name, shape, qtype in layout:
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            data = x
        elif qtype == Q.F16:
            data = x.astype(np.float16)
        else:
            data = quants.quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        stats.append(statistics(name, qtype.name, quants.dequantize(data, qtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"config": config, "tensors": stats}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures/gguf")
    parser.add_argument("--smollm2", help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)

    for arch in ("llama", "qwen2"):
        reference = write_tiny(out / f"tiny_{arch}.gguf", arch, rng)
        (out / f"tiny_{arch}.json").write_text(dump(reference))

    valid = (out / "tiny_llama.gguf").read_bytes()
    (out / "bad_magic.gguf").write_bytes(b"GGUG" + valid[4:])
    (out / "truncated.gguf").write_bytes(valid[: len(valid) // 3])
    (out / "huge_kv_count.gguf").write_bytes(valid[:16] + struct.pack("<Q", 1 << 60) + valid[24:])

    if args.smollm2:
        names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight"]
        reference = {"file": pathlib.Path(args.smollm2).name, "tensors": tensor_statistics(args.smollm2, names)}
        (out / "smollm2_reference.json").write_text(dump(reference))


if __name__ == "__main__":
    main()
