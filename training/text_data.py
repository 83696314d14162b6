"""
training/text_data.py: train_gpt.py's data preparation, from text files to a token cache.

Text (Parquet with a `text` column, JSON Lines with a `text` field, optionally .gz, plain
.txt, or a directory of them) is read into documents, split into train and val by a
seeded permutation of whole documents, tokenized once (GPT-2 BPE through tiktoken, or
UTF-8 bytes) and written as uint16 train.bin / val.bin plus meta.json, which marks a
complete cache and says what made it. train_gpt.py maps the two files and draws windows.
"""

import gzip
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.runs import ReportedError, write_atomic

CACHE_VERSION = 2  # bump when the cache layout or the split rule changes


SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")


def text_files(path):
    """The files --data names: the file itself, or the readable files in a directory."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.name.endswith(SUFFIXES))
    if not files:
        raise ReportedError(f"--data {path}: no .parquet, .jsonl, .jsonl.gz or .txt files in it")
    if not files[0].name.endswith(SUFFIXES):
        raise ReportedError(f"--data {path}: unknown format; use .parquet (with a `text` column), "
                            ".jsonl or .jsonl.gz (a `text` field per line) or .txt")
    return files


def read_documents(file):
    """The documents in one file, as a list of str."""
    if file.name.endswith(".parquet"):
        import pyarrow.parquet as pq  # only needed for Parquet, the format the hub serves
        try:
            schema = pq.read_schema(file)
        except Exception as e:  # pyarrow raises its own error types for bad files
            raise ReportedError(f"{file}: not a readable Parquet file ({e})") from None
        if "text" not in schema.names:
            raise ReportedError(f"{file}: no `text` column (columns: {', '.join(schema.names)})")
        return [t for t in pq.read_table(file, columns=["text"]).column("text").to_pylist() if t]
    try:
        if file.name.endswith(".txt"):
            return [text] if (text := file.read_text(encoding="utf-8")) else []
        with (gzip.open if file.name.endswith(".gz") else open)(file, "rt", encoding="utf-8") as f:
            records = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise ReportedError(f"{file}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ReportedError(f"{file}: a line is not JSON ({e})") from None
    for line_number, record in records:
        if not isinstance(record, dict) or "text" not in record:
            raise ReportedError(f"{file}, line {line_number}: no `text` field")
    return [record["text"] for _, record in records if record["text"]]


class ByteTokenizer:
    """Each UTF-8 byte is a token (0-255), 256 ends a document. With 257 symbols the
    embedding and head are tiny, so nearly every weight is a hidden matrix that the matrix
    optimizers train, and a CPU spends its time in the blocks rather than in a 50k-way
    softmax: the setting in which optimizers of hidden matrices can be compared on a CPU.
    Losses are per byte, so they are not comparable with GPT-2 BPE losses (per token)."""
    name, n_vocab, eot_token = "bytes", 257, 256

    def encode_ordinary_batch(self, texts):
        return [list(text.encode("utf-8")) for text in texts]


def load_tokenizer(bpe_dir=None, kind="gpt2"):
    """--tokenizer bytes, or GPT-2 BPE through tiktoken as nanoGPT does. tiktoken downloads
    its two files on first use; offline, --bpe-dir names a folder with encoder.json and
    vocab.bpe (byte-identical copies, e.g. ../shared/data/gpt2-bpe)."""
    if kind == "bytes":
        return ByteTokenizer()
    import tiktoken
    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken surfaces network failures as assorted errors
            raise ReportedError(f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). "
                                "Offline? Pass --bpe-dir DIR with encoder.json and vocab.bpe, "
                                "e.g. --bpe-dir ../shared/data/gpt2-bpe") from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    for name in ("encoder.json", "vocab.bpe"):
        if not (Path(bpe_dir) / name).is_file():
            raise ReportedError(f"--bpe-dir {bpe_dir}: {name} is missing")
    ranks = data_gym_to_mergeable_bpe_ranks(str(Path(bpe_dir) / "vocab.bpe"), str(Path(bpe_dir) / "encoder.json"))
    return tiktoken.Encoding(name="gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def prepare(files, cache_dir, tokenizer, val_fraction, seed):
    """Tokenize `files` into cache_dir/{train,val}.bin (uint16) plus meta.json, or reuse a
    cache that matches. Documents are split into train and val by a seeded permutation,
    with <|endoftext|> after every document. A single document (one .txt) is split by
    position instead: its last `val_fraction` of tokens is val, as nanoGPT does for
    Shakespeare. Exact duplicate documents are dropped (a copy in val would be in train)."""
    cache_dir = Path(cache_dir)
    sources = [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files]
    want = dict(version=CACHE_VERSION, sources=sources, tokenizer=tokenizer.name,
                n_vocab=tokenizer.n_vocab, val_fraction=val_fraction, seed=seed)
    if (cache_dir / "meta.json").exists():
        meta = json.loads((cache_dir / "meta.json").read_text())
        if {k: meta.get(k) for k in want} != json.loads(json.dumps(want)):
            print(f"cache {cache_dir} is stale (the data or settings changed): tokenizing again")
        elif not all((cache_dir / f"{s}.bin").exists() and
                     (cache_dir / f"{s}.bin").stat().st_size == 2 * meta[f"{s}_tokens"] for s in ("train", "val")):
            print(f"cache {cache_dir} is truncated or incomplete: tokenizing again")
        else:
            return meta
    docs = [d for f in tqdm(files, desc="read", disable=len(files) < 2) for d in read_documents(f)]
    if not docs:
        raise ReportedError(f"no text in {', '.join(map(str, files))}")
    if len(unique := list(dict.fromkeys(docs))) < len(docs):
        print(f"dropped {len(docs) - len(unique):,} exact duplicate documents of {len(docs):,}")
        docs = unique
    n_val = 0 if len(docs) == 1 else max(1, round(val_fraction * len(docs)))
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(docs))[:n_val]] = True
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "meta.json").unlink(missing_ok=True)  # written last: it marks a complete cache
    tmp = {s: cache_dir / f"{s}.bin.tmp" for s in ("train", "val")}
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
        for start in tqdm(range(0, len(docs), 256), desc="tokenize", unit="256 docs"):
            for i, ids in enumerate(tokenizer.encode_ordinary_batch(docs[start:start + 256])):
                ids.append(tokenizer.eot_token)
                (f_val if is_val[start + i] else f_train).write(np.asarray(ids, dtype=np.uint16).tobytes())
    if n_val == 0:  # one document: the tail of its tokens is val
        tokens = np.fromfile(tmp["train"], dtype=np.uint16)
        cut = len(tokens) - max(1, round(val_fraction * len(tokens)))
        tokens[:cut].tofile(tmp["train"])
        tokens[cut:].tofile(tmp["val"])
    counts = {s: path.stat().st_size // 2 for s, path in tmp.items()}
    for split, path in tmp.items():
        os.replace(path, cache_dir / f"{split}.bin")
    meta = dict(want, n_docs=len(docs), n_val_docs=n_val, eot=tokenizer.eot_token,
                train_tokens=counts["train"], val_tokens=counts["val"])
    write_atomic(cache_dir / "meta.json", json.dumps(meta, indent=1))
    print(f"tokenized {len(docs):,} documents: {counts['train']:,} train and {counts['val']:,} "
          f"val tokens in {cache_dir}")
    return meta
