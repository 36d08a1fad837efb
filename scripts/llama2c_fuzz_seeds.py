"""Writes tests/fixtures/llama2c/: tiny llama2.c checkpoints (legacy format, as run.c reads it)
used as seeds by tests/fuzz/fuzz_llama2c.cpp.

  tiny_tied.bin     dim 8, hidden 12, 1 layer, 2 heads / 1 KV head, vocab 6, seq_len 4
  tiny_untied.bin   the same with vocab_size stored as -6 and a classifier after the RoPE tables
  truncated.bin     tiny_tied.bin cut inside wk
  bad_header.bin    tiny_tied.bin with n_heads = 3 (does not divide dim)

Requires numpy. Run from the repository root: python3 scripts/llama2c_fuzz_seeds.py
"""
import struct
from pathlib import Path

import numpy as np

OUT = Path("tests/fixtures/llama2c")


def checkpoint(dim, hidden, layers, heads, kv_heads, vocab, seq_len, separate_classifier, seed):
    rng = np.random.default_rng(seed)
    head = dim // heads
    kv = kv_heads * head
    sizes = [vocab * dim, layers * dim, layers * dim * dim, layers * kv * dim, layers * kv * dim,
             layers * dim * dim, layers * dim, layers * hidden * dim, layers * dim * hidden,
             layers * hidden * dim, dim, seq_len * head // 2, seq_len * head // 2]
    if separate_classifier:
        sizes.append(vocab * dim)
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab if separate_classifier else vocab, seq_len)
    return header + rng.standard_normal(sum(sizes)).astype("<f4").tobytes()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tied = checkpoint(8, 12, 1, 2, 1, 6, 4, False, 1)
    (OUT / "tiny_tied.bin").write_bytes(tied)
    (OUT / "tiny_untied.bin").write_bytes(checkpoint(8, 12, 1, 2, 1, 6, 4, True, 2))
    offset_wk = 28 + 4 * (6 * 8 + 8 + 64)
    (OUT / "truncated.bin").write_bytes(tied[: offset_wk + 10])
    (OUT / "bad_header.bin").write_bytes(tied[:12] + struct.pack("<i", 3) + tied[16:])


if __name__ == "__main__":
    main()
