"""Writes tests/fixtures/safetensors/: files written by Hugging Face's own safetensors package,
read by tests/cpu/test_safetensors.cpp and used as seeds by tests/fuzz/fuzz_safetensors.cpp.

  reference.safetensors   F32, F16 and BF16 tensors [2, 3], element i = i - 3; metadata
  config.json             SmolLM2-135M's config (the fuzzer reads input starting with '{' as one)
  tiny_llama.seed         '#' + a tiny Llama's config.json + NUL + its model.safetensors
  truncated.safetensors, bad_dtype.safetensors, overlap.safetensors: malformed variants

Requires numpy and safetensors (pip install numpy safetensors); torch is not needed.
Run from the repository root: python3 scripts/safetensors_fuzz_seeds.py
"""
import json
import struct
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize

OUT = Path("tests/fixtures/safetensors")


def safetensors_bytes(tensors, metadata=None):
    """tensors: name -> (dtype name for safetensors, shape, numpy array holding the raw bits)."""
    specs = {
        name: TensorSpec(dtype=dtype, shape=list(shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, (dtype, shape, a) in tensors.items()
    }
    return bytes(serialize(specs, metadata=metadata))


def as_dtype(values, dtype):
    """Raw bits of float values that are exact in every dtype used here (small integers)."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return f32
    if dtype == "float16":
        return f32.astype(np.float16)
    return (f32.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: the top half, exact here


def reference():
    values = np.arange(6, dtype=np.float32) - 3
    tensors = {n: (d, (2, 3), as_dtype(values, d)) for n, d in [("f32", "float32"), ("f16", "float16"), ("bf16", "bfloat16")]}
    return safetensors_bytes(tensors, {"generator": "safetensors (Python)"})


def tiny_llama():
    config = {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 3, "vocab_size": 5, "max_position_embeddings": 16,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
    shapes = {"model.embed_tokens.weight": (5, 4), "model.norm.weight": (4,)}
    p = "model.layers.0."
    shapes.update({p + "input_layernorm.weight": (4,), p + "post_attention_layernorm.weight": (4,),
                   p + "self_attn.q_proj.weight": (4, 4), p + "self_attn.k_proj.weight": (2, 4),
                   p + "self_attn.v_proj.weight": (2, 4), p + "self_attn.o_proj.weight": (4, 4),
                   p + "mlp.gate_proj.weight": (3, 4), p + "mlp.up_proj.weight": (3, 4),
                   p + "mlp.down_proj.weight": (4, 3)})
    tensors = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        dtype = ["float32", "float16", "bfloat16"][i % 3]
        tensors[name] = (dtype, shape, as_dtype(np.arange(np.prod(shape)) % 7 - 3, dtype))
    return b"#" + json.dumps(config).encode() + b"\0" + safetensors_bytes(tensors)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    ref = reference()
    (OUT / "reference.safetensors").write_bytes(ref)
    n = struct.unpack("<Q", ref[:8])[0]
    (OUT / "truncated.safetensors").write_bytes(ref[: 8 + n // 2])
    header = json.loads(ref[8 : 8 + n])
    data = ref[8 + n :]
    for name, change in [("bad_dtype", lambda h: h["f32"].update(dtype="F17")),
                         ("overlap", lambda h: h["f16"].update(data_offsets=[0, 12]))]:
        h = json.loads(json.dumps(header))
        change(h)
        text = json.dumps(h).encode()
        (OUT / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    smollm2 = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 576,
               "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama",
               "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
               "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
               "vocab_size": 49152}
    (OUT / "config.json").write_text(json.dumps(smollm2, indent=2) + "\n")
    (OUT / "tiny_llama.seed").write_bytes(tiny_llama())


if __name__ == "__main__":
    main()
