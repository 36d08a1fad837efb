#!/usr/bin/env python3
"""Reference logits of SmolLM2-135M-Instruct from Hugging Face transformers, loading the same
GGUF that dash loads, as a test fixture (tests/fixtures/smollm2/logits_reference.safetensors).

Four windows of 256 tokens (the first 256 tokens of four State of the Union addresses, tokenised
by transformers) are run in float32 on the CPU with eager attention. The vocabulary is too large
to store every logit, so for each position the fixture keeps: log-sum-exp over the vocabulary,
the argmax, and the logits at 128 vocabulary entries (the reference's top 32, then 96 drawn at
random). With --compare FILE (raw float32 logits [4, 256, vocab] written by dash), it also
compares every logit and prints the statistics.

    python3 scripts/smollm2_logits_reference.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/sotu --out tests/fixtures/smollm2
"""
import argparse
import json
import os
import struct

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ADDRESSES = ["1934_franklin_d_roosevelt_d.txt", "1962_john_f_kennedy_d.txt",
             "1990_george_bush_r.txt", "2014_barack_obama_d.txt"]
WINDOW = 256
TOP = 32
RANDOM = 96


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--data", required=True, help="folder of SOTU addresses")
    p.add_argument("--out", required=True)
    p.add_argument("--compare", help="raw float32 logits [4, 256, vocab] from dash")
    args = p.parse_args()

    folder, name = os.path.split(os.path.abspath(args.gguf))
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = []
    for address in ADDRESSES:
        with open(os.path.join(args.data, address), encoding="utf-8") as f:
            tokens = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
        assert len(tokens) >= WINDOW, address
        ids.append(tokens[:WINDOW])
    ids = torch.tensor(ids)
    with torch.no_grad():
        logits = model(ids).logits.double().numpy()  # [4, 256, vocab]
    vocab = logits.shape[-1]

    rng = np.random.default_rng(20261122)
    index = np.empty((len(ADDRESSES), WINDOW, TOP + RANDOM), dtype=np.int64)
    for b in range(len(ADDRESSES)):
        for t in range(WINDOW):
            top = np.argsort(-logits[b, t])[:TOP]
            rest = rng.choice(np.setdiff1d(np.arange(vocab), top), RANDOM, replace=False)
            index[b, t] = np.concatenate([top, rest])
    values = np.take_along_axis(logits, index, axis=-1)
    m = logits.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
    os.makedirs(args.out, exist_ok=True)
    write_safetensors(os.path.join(args.out, "logits_reference.safetensors"), {
        "ids": ids.numpy(), "logsumexp": lse, "argmax": logits.argmax(-1),
        "index": index, "values": values,
    }, {"model": name, "addresses": ",".join(ADDRESSES), "transformers": __import__("transformers").__version__,
        "torch": torch.__version__, "dtype": "float32", "device": "cpu", "attention": "eager"})
    print(f"wrote {args.out}/logits_reference.safetensors: {len(ADDRESSES)} × {WINDOW} positions, vocab {vocab}")

    if args.compare:
        ours = np.fromfile(args.compare, dtype=np.float32).reshape(logits.shape).astype(np.float64)
        diff = np.abs(ours - logits)
        same = (ours.argmax(-1) == logits.argmax(-1)).mean()
        print(json.dumps({"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                          "argmax_agreement": float(same), "positions": int(ours.shape[0] * ours.shape[1])}))


if __name__ == "__main__":
    main()
