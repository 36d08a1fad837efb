#!/usr/bin/env python3
"""Reference token ids for dash's tokenizer tests, computed offline by independent
implementations; the output under tests/fixtures/tokenizer/ is committed, so the tests need no
Python.

  smollm2_ids.json                 SmolLM2-135M-Instruct's tokenizer as Hugging Face transformers
                                   builds it from the GGUF, on ~70 varied texts
  stories260K_first_story_ids.json llama2.c's encoder (re-implemented below from run.c's algorithm)
                                   on the first TinyStories story, with tok512.bin
  tiny_*.tokenizer.json            small byte-level BPE tokenizers trained here with the `tokenizers`
                                   library, one per pre-tokenizer style (gpt2, smollm, llama3, qwen2)
  tiny_ids.json                    their ids on the short texts, and the pieces each named
                                   pre-tokenizer cuts the texts into
  seed_*                           small valid and malformed inputs for the fuzzer

Requirements: pip install transformers gguf tokenizers sentencepiece protobuf
Usage: scripts/tokenizer_reference.py [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf]
       [--sotu ../shared/data/sotu] [--stories ../shared/data/tinystories_sample.txt]
       [--tok512 tests/fixtures/stories260K/tok512.bin]
"""
import argparse
import glob
import json
import os
import struct
import sys
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "tokenizer")

# Pre-tokenizer definitions of the Hugging Face tokenizers the GGUF names stand for.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(style):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as P
    byte_level = P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if style == "gpt2":
        return byte_level
    if style == "smollm":
        return P.Sequence([P.Digits(individual_digits=True), byte_level])
    pattern = {"llama3": LLAMA3, "qwen2": QWEN2}[style]
    return P.Sequence([P.Split(Regex(pattern), behavior="isolated", invert=False),
                       P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def byte_decoder():
    """GPT-2's byte alphabet, symbol -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    symbols, n = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(0x100 + n)] = b
            n += 1
    return symbols


def sotu_excerpts(sotu):
    """Sentence-aligned excerpts of every 12th address: one around the first number after the
    opening, one from the opening, and two long ones."""
    files = sorted(glob.glob(os.path.join(sotu, "*.txt")))
    out = []
    for k, path in enumerate(files[::12]):
        text = open(path, encoding="utf-8").read()
        digit = next((i for i in range(1500, len(text)) if text[i].isdigit()), 1500)
        start = text.rfind(". ", 0, digit)
        start = 0 if start < 0 else start + 2
        end = text.find(". ", start + (2500 if k % 7 == 3 else 500))
        out.append(text[start:end + 1 if end > 0 else len(text)])
        if k % 5 == 0:
            out.append(text[:text.find(". ", 300) + 1])
    return out


def varied_texts():
    return [
        "",
        "Hello world",
        "Hello, world! How are you today?",
        "I'm sure you're right: he's here, they've gone, we'll see, she'd know, don't.",
        "I'M SURE YOU'RE RIGHT, HE'S HERE AND THEY'VE GONE.",
        # digits, dates, amounts
        "1234567890",
        "In 1790, the debt was $75,463,476.52 (about 40% of GDP).",
        "Call 555-0123 or +1 (800) 555-0199 before 12:30:45 on 2024-01-15.",
        "pi = 3.14159265358979323846, e = 2.718281828",
        "00000000000000000000 and 1,000,000,000",
        "x2y3z4 a1b22c333d4444",
        " 42  7   1999",
        # Unicode
        "Crème brûlée à la française, naïve café, Ærøskøbing, straße, İstanbul.",
        "Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир!",
        "中文：你好，世界！日本語：こんにちは世界。한국어: 안녕하세요 세계",
        "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇺🇸 ❤️ 🎉🎉🎉",
        "العربية: مرحبا بالعالم. עברית: שלום עולם.",
        "हिन्दी: नमस्ते दुनिया। தமிழ்: வணக்கம்",
        "Decomposed: e\u0301 a\u0300 o\u0308 n\u0303 vs composed: é à ö ñ",
        "Math: ∑ᵢ xᵢ² ≤ ∫₀^∞ f(x) dx, α→β, ∀x∃y, √2 ≈ 1.414",
        "Superscripts x² y³ z¹ and fractions ½ ¼ ¾, Roman Ⅻ, circled ①②",
        "Full-width １２３ and Arabic-Indic ٣٤٥ digits, Devanagari ४२",
        "No-break\u00a0space, next\u0085line, zero\u200bwidth, BOM\ufeff, sep\u2028line, mongolian\u180evowel",
        "Separators x\u180e\u180ey a \u180e b \u0085\u0085 c\u3000\u3000d \u2028\u2028",
        "Controls: \x00\x01\x07\x1b[31m red \x1b[0m \x7f end",
        # whitespace
        "   leading spaces",
        "trailing spaces   ",
        "\t\ttabs\tand\tspaces  \t mixed",
        "line\n\nbreaks\r\n\r\nwindows\rold mac",
        "   \n   \n\n\t\n",
        "a  b   c    d     e",
        " ",
        "\n",
        "                                        ",
        # code
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
        "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n\treturn v.size() == 3 ? 0 : 1;\n}\n",
        '{"name": "dash", "version": [0, 1, 0], "ok": true, "pi": 3.14}',
        "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
        "for f in *.txt; do wc -l \"$f\" | awk '{print $1}'; done 2>/dev/null",
        "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#top user@example.com",
        "| a | b |\n|---|---|\n| 1 | 2 |",
        "if (x != y && y >= z || !w) { a->b = c::d[e]; }  // comment /* block */",
        # literal tokens
        "<|im_start|>user\nHi<|im_end|>",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><|endoftext|>text<|endoftext|>",
        "almost <|im_start| and <|im_start|>> and <|im_end|>",
        " <|im_end|> spaced <|im_start|> ",
        "<repo_name>dash<file_sep>main.cpp<filename>a.py<gh_stars>10",
    ]


def write_json(name, value):
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(path, REPO)} ({os.path.getsize(path)} bytes)")


def smollm2(gguf, texts):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf))
    backend = json.loads(hf.backend_tokenizer.to_str())
    print("transformers builds pre_tokenizer", json.dumps(backend["pre_tokenizer"]), "from the GGUF")
    # The same vocabulary and merges with llama.cpp's "smollm" pre-tokenizer (Digits individually,
    # then ByteLevel), which is SmolLM2's own tokenizer.json definition.
    smollm_def = dict(backend)
    smollm_def["pre_tokenizer"] = json.loads(pre_tokenizer("smollm").__getstate__())
    smollm = Tokenizer.from_str(json.dumps(smollm_def))
    cases, differ = [], []
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        case = {"text": text, "ids": ids}
        other = smollm.encode(text, add_special_tokens=False).ids
        if other != ids:
            case["ids_smollm_pre"] = other
            differ.append(text)
        cases.append(case)
    print(f"{len(differ)} of {len(cases)} texts tokenise differently with the smollm pre-tokenizer:")
    for text in differ:
        print("   ", repr(text[:80]))
    write_json("smollm2_ids.json", {
        "description": "SmolLM2-135M-Instruct token ids from Hugging Face transformers "
                       "AutoTokenizer.from_pretrained(dir, gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf), "
                       "encoded with add_special_tokens=False (no BOS). transformers builds the pre-tokenizer "
                       "below from the GGUF, ignoring tokenizer.ggml.pre = \"smollm\"; where llama.cpp's smollm "
                       "pre-tokenizer (Digits(individual_digits) then ByteLevel, as SmolLM2's own tokenizer.json) "
                       "gives other ids, they are in ids_smollm_pre (computed with the tokenizers library).",
        "generator": "scripts/tokenizer_reference.py",
        "transformers_pre_tokenizer": backend["pre_tokenizer"],
        "smollm_pre_tokenizer": smollm_def["pre_tokenizer"],
        "cases": cases,
    })


def read_llama2c_tokenizer(path, vocab_size):
    data = open(path, "rb").read()
    offset = 4
    tokens, scores = [], []
    for _ in range(vocab_size):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        tokens.append(data[offset:offset + length])
        offset += length
        scores.append(score)
    assert offset == len(data)
    return tokens, scores


def llama2c_encode(text, tokens, scores, bos):
    """run.c's encode, written from its description: BOS, dummy-prefix " ", per-character lookup
    with byte fallback, then greedy best-score merges of adjacent pairs (leftmost on ties)."""
    lookup = {}
    for i, t in enumerate(tokens):
        lookup.setdefault(t, i)
    ids = [1] if bos else []
    if text:
        ids.append(lookup[b" "])
    i = 0
    while i < len(text):
        n = 1
        while n < 4 and i + n < len(text) and (text[i + n] & 0xC0) == 0x80:
            n += 1
        char = text[i:i + n]
        ids.extend([lookup[char]] if char in lookup else [b + 3 for b in char])
        i += n
    while True:
        best, best_i = -1e10, -1
        for k in range(len(ids) - 1):
            merged = lookup.get(tokens[ids[k]] + tokens[ids[k + 1]])
            if merged is not None and scores[merged] > best:
                best, best_i, best_id = scores[merged], k, merged
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [best_id]


def stories260K(stories, tok512):
    raw = open(stories, encoding="utf-8").read()
    story = raw.split("<|endoftext|>")[0].strip()
    tokens, scores = read_llama2c_tokenizer(tok512, 512)
    ids = llama2c_encode(story.encode("utf-8"), tokens, scores, bos=True)
    write_json("stories260K_first_story_ids.json", {
        "description": "The first story of tinystories_sample.txt (the text before the first <|endoftext|>, "
                       "leading and trailing whitespace removed), encoded with tok512.bin by a Python "
                       "re-implementation of llama2.c's run.c encoder: BOS (1), the dummy-prefix \" \" token, "
                       "per-character lookup with byte fallback (byte + 3), greedy best-score merges.",
        "generator": "scripts/tokenizer_reference.py",
        "text": story,
        "ids": ids,
    })


def tiny_tokenizers(sotu, texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as P
    files = sorted(glob.glob(os.path.join(sotu, "*.txt")))[::40]
    corpus = [open(f, encoding="utf-8").read() for f in files]
    decode = byte_decoder()
    specials = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
    result = {"description": "ids of the tiny tokenizers (trained on a few SOTU addresses by this script with the "
                             "tokenizers library) with add_special_tokens=False, and the pieces Hugging Face's "
                             "pre-tokenizer for each GGUF pre name cuts each text into (as raw text). The qwen2 "
                             "tokenizer has an NFC normalizer, so only texts NFC leaves unchanged are listed for it.",
              "generator": "scripts/tokenizer_reference.py", "tokenizers": {}, "pieces": {}}
    for style in ["gpt2", "smollm", "llama3", "qwen2"]:
        tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
        tok.pre_tokenizer = pre_tokenizer(style)
        tok.decoder = decoders.ByteLevel()
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
        if style == "llama3":
            tok.post_processor = processors.TemplateProcessing(
                single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
        trainer = trainers.BpeTrainer(vocab_size=256 + len(specials) + 150, special_tokens=specials,
                                      initial_alphabet=P.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        definition = json.loads(tok.to_str())
        if style == "gpt2":  # the older "a b" form of merges
            definition["model"]["merges"] = [" ".join(m) for m in definition["model"]["merges"]]
        name = f"tiny_{style}.tokenizer.json"
        write_json(name, definition)
        tok = Tokenizer.from_str(json.dumps(definition))
        usable = [t for t in texts if style != "qwen2" or unicodedata.normalize("NFC", t) == t]
        result["tokenizers"][style] = {"file": name, "bos": 1 if style == "llama3" else None, "cases": [
            {"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in usable]}
        pre = pre_tokenizer(style)
        result["pieces"][style] = [
            {"text": t, "pieces": [bytes(decode[c] for c in piece).decode("utf-8")
                                   for piece, _ in pre.pre_tokenize_str(t)]} for t in texts]
    write_json("tiny_ids.json", result)


def seeds(tok512):
    """Inputs for the fuzzer: a valid tokenizer.bin of 300 tokens cut from tok512.bin, the same
    truncated and with a bad length, and short texts."""
    data = open(tok512, "rb").read()
    offset, count = 4, 0
    while count < 300:
        _, length = struct.unpack_from("<fi", data, offset)
        offset += 8 + length
        count += 1
    small = data[:offset]
    files = {
        "seed_tok300.bin": small,
        "seed_tok300_truncated.bin": small[:len(small) // 2 + 3],
        "seed_tok300_bad_length.bin": small[:8] + struct.pack("<i", -5) + small[12:],
        "seed_text_chat.txt": "<|im_start|>user\nCrème brûlée costs $12.50 😀<|im_end|>\n".encode("utf-8"),
        "seed_text_invalid_utf8.txt": b"ab\xff\xfe \xe2\x82 \xc3\x28 \xf0\x9f\x98 1234 \t\n",
    }
    for name, content in files.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(content)
        print(f"wrote tests/fixtures/tokenizer/{name} ({len(content)} bytes)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--sotu", default=os.path.join(REPO, "..", "shared", "data", "sotu"))
    parser.add_argument("--stories", default=os.path.join(REPO, "..", "shared", "data", "tinystories_sample.txt"))
    parser.add_argument("--tok512", default=os.path.join(REPO, "tests", "fixtures", "stories260K", "tok512.bin"))
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    texts = varied_texts()
    smollm2(args.gguf, texts + sotu_excerpts(args.sotu))
    stories260K(args.stories, args.tok512)
    tiny_tokenizers(args.sotu, texts)
    seeds(args.tok512)


if __name__ == "__main__":
    sys.exit(main())
