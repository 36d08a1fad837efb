#!/usr/bin/env python3
"""Writes a Hugging Face model folder with random weights, for measuring dash at a model's shape.

  python3 benchmarks/random_checkpoint.py qwen2.5-3b OUT_DIR [--seed N]

OUT_DIR receives config.json, model.safetensors (bf16) and tokenizer.json. Speed does not depend
on the values: matrices are normal with standard deviation 0.02, norms 1, biases 0. The
tokenizer is byte-level BPE with the 256 byte symbols and no merges (one token per byte), so any
text feeds the model; its ids use only the first 256 rows of the embedding, and the LM head
still computes every row. Needs numpy.
"""
import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    # Qwen2.5-3B's config.json (the published model card's values).
    "qwen2.5-3b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
    },
}


def tensor_shapes(c):
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, d), "matrix"
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (d,), "norm"
        yield p + "self_attn.q_proj.weight", (q, d), "matrix"
        yield p + "self_attn.q_proj.bias", (q,), "bias"
        yield p + "self_attn.k_proj.weight", (kv, d), "matrix"
        yield p + "self_attn.k_proj.bias", (kv,), "bias"
        yield p + "self_attn.v_proj.weight", (kv, d), "matrix"
        yield p + "self_attn.v_proj.bias", (kv,), "bias"
        yield p + "self_attn.o_proj.weight", (d, q), "matrix"
        yield p + "post_attention_layernorm.weight", (d,), "norm"
        yield p + "mlp.gate_proj.weight", (f, d), "matrix"
        yield p + "mlp.up_proj.weight", (f, d), "matrix"
        yield p + "mlp.down_proj.weight", (d, f), "matrix"
    yield "model.norm.weight", (d,), "norm"
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (v, d), "matrix"


def bf16_bytes(x):
    """float32 array -> bf16 bytes, rounded to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16).tobytes()


def write_safetensors(path, config, seed):
    rng = np.random.default_rng(seed)
    shapes = list(tensor_shapes(config))
    header, offset = {}, 0
    for name, shape, _ in shapes:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path + ".partial", "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name, shape, kind in shapes:
            if kind == "matrix":
                values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            else:
                values = np.full(shape, 1.0 if kind == "norm" else 0.0, dtype=np.float32)
            out.write(bf16_bytes(values))
    os.replace(path + ".partial", path)
    return offset


def byte_alphabet():
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def byte_tokenizer():
    vocab = {s: b for b, s in byte_alphabet().items()}
    return {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = SHAPES[args.shape]
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        json.dump(byte_tokenizer(), f)
    size = write_safetensors(os.path.join(args.out, "model.safetensors"), config, args.seed)
    print(f"{args.out}: {args.shape}, random weights (seed {args.seed}), {size / 2**30:.2f} GiB of bf16")


if __name__ == "__main__":
    main()
