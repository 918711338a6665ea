"""The hub loaders, offline, on fixtures laid out like the pinned hub files.

``tests/fixtures/hub/<repo>/<path>`` holds, for each of WikiText-2, PTB and C4, the files the
loaders fetch (same paths in the repository, formats and columns; a few made-up rows,
written by ``make_fixtures.py``). They reach the loaders two ways: through ``data_paths`` (a
folder laid out like the repository) and through the hub client, against a local endpoint
that serves the folder at the pinned revisions. The windows must be those the reference
codes' protocol gives on the same rows, computed here from the files read directly.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import random
import shutil
import threading
import urllib.parse

import pyarrow.parquet as pq
import pytest
import torch

from aespa.core.errors import UserError
from experiments import data

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hub")
MIRRORS = {key: os.path.join(FIXTURES, *source.repo.split("/")) for key, source in data.HUB_SOURCES.items()}
SEQLEN = 32


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """The datasets and hub caches of each test in its own folder, never the user's."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def rows(key: str, split: str) -> list[str]:
    """The text column of a fixture file, read without the datasets library."""
    source = data.HUB_SOURCES[key]
    path = os.path.join(MIRRORS[key], source.files[split])
    if path.endswith(".parquet"):
        return pq.read_table(path).column(source.column).to_pylist()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[source.column] for line in f]


def encode(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer(text, return_tensors="pt").input_ids``, as the reference codes tokenize: ``[1, n]``."""
    return tokenizer(text, return_tensors="pt").input_ids


def legacy_c4_draws(tokenizer, docs: list[str], seqlen: int) -> tuple[list[tuple[int, int]], int]:
    """The reference codes' legacy C4 test set: ``random.seed(0)``, then 256 times: draw a document
    index until the document has at least ``seqlen`` tokens, then draw a window start in
    ``[0, n - seqlen - 1]``. Returns the (document, start) pairs and the number of documents drawn."""
    rng = random.Random(0)  # the sequence of random.seed(0); random.randint(...)
    picks, drawn = [], 0
    for _ in range(256):
        while True:
            i = rng.randint(0, len(docs) - 1)
            drawn += 1
            n = encode(tokenizer, docs[i]).shape[1]
            if n >= seqlen:
                break
        picks.append((i, rng.randint(0, n - seqlen - 1)))
    return picks, drawn


def reference_windows(name: str, tokenizer, seqlen: int) -> torch.Tensor:
    """The test windows of the reference protocol on the fixture rows: the stream cut into
    ``numel // seqlen`` windows of ``seqlen`` tokens (the tail dropped)."""
    if name == "wikitext2":
        enc = encode(tokenizer, "\n\n".join(rows("wikitext2", "test")))
    elif name == "ptb":
        enc = encode(tokenizer, "\n\n".join(rows("ptb", "validation")))
    elif name == "ptb-new":
        enc = encode(tokenizer, " ".join(rows("ptb", "test")))
    elif name == "c4-new":
        enc = encode(tokenizer, " ".join(rows("c4", "validation")[:1100]))[:, : 256 * seqlen]
    else:
        docs = rows("c4", "validation")
        picks, _ = legacy_c4_draws(tokenizer, docs, seqlen)
        enc = torch.hstack([encode(tokenizer, docs[i])[:, s : s + seqlen] for i, s in picks])
    n = enc.numel() // seqlen
    return enc[0, : n * seqlen].view(n, seqlen)


# --------------------------------------------------------------------------- the fixtures


def test_the_fixtures_have_the_pinned_files_formats_and_columns():
    for key, source in data.HUB_SOURCES.items():
        for split, path in source.files.items():
            file = os.path.join(MIRRORS[key], path)
            assert os.path.isfile(file) and os.path.getsize(file) < 8192, file
            if source.kind(split) == "parquet":
                assert pq.read_schema(file).names == [source.column]
            else:
                with gzip.open(file, "rt", encoding="utf-8") as f:
                    assert all(list(json.loads(line)) == ["text", "timestamp", "url"] for line in f)
    assert rows("wikitext2", "test")[:2] == ["", " = Aldwick His = \n"]  # raw lines, blank ones included


# --------------------------------------------------------------------------- the protocol, through data_paths


@pytest.mark.parametrize("name, windows, start", [
    ("wikitext2", 21, "\n\n = Aldwick His = \n\n\n\n\n Song that tower announced"),
    ("ptb", 18, "old early it N large lake public <unk> for large of\n\nserved lake early"),
    ("ptb-new", 17, "church at won game <unk> their as for and army late was station south"),
    ("c4-new", 62, "Istrand player before released around named. Final Istrand"),  # 2009 tokens: no cut
], ids=["wikitext2", "ptb", "ptb-new", "c4-new"])
def test_stream_sets_give_the_reference_windows(tokenizer, name, windows, start):
    paths = {k: MIRRORS[k] for k in data.HUB_DATASETS}
    w = data.evaluation_windows(name, tokenizer, SEQLEN, paths=paths)
    assert w.shape == (windows, SEQLEN)
    assert torch.equal(w, reference_windows(name, tokenizer, SEQLEN))
    assert w[0, 0].item() == tokenizer.bos_token_id  # one BOS, at the start of the stream
    assert tokenizer.decode(w[0, 1:]).startswith(start)


def test_c4_new_keeps_the_first_documents_and_cuts_the_stream(tokenizer, monkeypatch):
    paths = {"c4": MIRRORS["c4"]}
    docs = rows("c4", "validation")
    monkeypatch.setattr(data, "C4_NEW_DOCUMENTS", 3)  # the fixture has 16 documents, the shard 45 576
    w = data.evaluation_windows("c4-new", tokenizer, 8, paths=paths)
    stream = encode(tokenizer, " ".join(docs[:3]))[0]
    assert torch.equal(w.flatten(), stream[: w.numel()]) and w.numel() == stream.numel() // 8 * 8
    monkeypatch.setattr(data, "C4_NEW_DOCUMENTS", 1100)
    w = data.evaluation_windows("c4-new", tokenizer, 4, paths=paths)
    assert w.shape == (256, 4)  # 256 * seqlen tokens, of a longer stream
    assert torch.equal(w.flatten(), encode(tokenizer, " ".join(docs))[0, :1024])


def test_legacy_c4_draws_the_reference_documents_and_offsets(tokenizer):
    docs = rows("c4", "validation")
    lengths = [encode(tokenizer, d).shape[1] for d in docs]
    assert SEQLEN not in lengths  # a document of exactly seqlen tokens makes the reference code fail
    assert sum(n < SEQLEN for n in lengths) == 7  # 7 of the 17 documents are short: the draw rejects them
    picks, drawn = legacy_c4_draws(tokenizer, docs, SEQLEN)
    assert picks[:4] == [(12, 107), (1, 33), (16, 497), (12, 77)]  # documents of 224, 135 and 651 tokens
    assert drawn == 457  # 201 short documents drawn and passed over
    w = data.evaluation_windows("c4", tokenizer, SEQLEN, paths={"c4": MIRRORS["c4"]})
    assert w.shape == (256, SEQLEN)
    for k, (i, s) in enumerate(picks):
        assert torch.equal(w[k], encode(tokenizer, docs[i])[0, s : s + SEQLEN])


def test_calibration_windows_follow_the_reference_draws(tokenizer):
    paths = {k: MIRRORS[k] for k in data.HUB_DATASETS}
    # C4 train shard 0: a random document with more than seqlen tokens, then a random window in it
    docs = rows("c4", "train")
    rng, expected = random.Random(7), []
    for _ in range(5):
        while True:
            enc = encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if enc.shape[1] > SEQLEN:
                break
        s = rng.randint(0, enc.shape[1] - SEQLEN - 1)
        expected.append(enc[0, s : s + SEQLEN])
    assert torch.equal(data.calibration_windows("c4", tokenizer, 5, SEQLEN, 7, paths=paths), torch.stack(expected))
    # WikiText-2 train: random windows of the tokenized split, rows joined with "\n\n"
    enc = encode(tokenizer, "\n\n".join(rows("wikitext2", "train")))[0]
    rng = random.Random(2)
    starts = [rng.randint(0, enc.numel() - SEQLEN - 1) for _ in range(5)]
    got = data.calibration_windows("wikitext2", tokenizer, 5, SEQLEN, 2, paths=paths)
    assert torch.equal(got, torch.stack([enc[s : s + SEQLEN] for s in starts]))


def test_the_fixtures_serve_the_tiny_models_windows(tokenizer):
    """512 tokens (the embedded models' seqlen): one window or more of every set, and calibration."""
    paths = {k: MIRRORS[k] for k in data.HUB_DATASETS}
    shapes = {n: tuple(data.evaluation_windows(n, tokenizer, 512, paths=paths).shape)
              for n in ("wikitext2", "ptb", "ptb-new", "c4", "c4-new")}
    assert shapes == {"wikitext2": (1, 512), "ptb": (1, 512), "ptb-new": (1, 512), "c4": (256, 512), "c4-new": (3, 512)}
    for name in data.CALIBRATION_SETS[:2]:
        assert data.calibration_windows(name, tokenizer, 4, 512, 0, paths=paths).shape == (4, 512)


def test_a_mirror_without_the_split_names_the_file_to_fetch(tokenizer, tmp_path):
    mirror = tmp_path / "c4"
    shutil.copytree(MIRRORS["c4"], mirror)
    (mirror / data.HUB_SOURCES["c4"].files["train"]).unlink()
    assert data.evaluation_windows("c4-new", tokenizer, SEQLEN, paths={"c4": str(mirror)}).shape[1] == SEQLEN
    with pytest.raises(UserError, match=r"lacks en/c4-train\.00000-of-01024\.json\.gz .*`hf download allenai/c4 "):
        data.calibration_windows("c4", tokenizer, 2, SEQLEN, 0, paths={"c4": str(mirror)})


def test_the_cache_key_follows_the_source(tokenizer, tmp_path):
    cache = data.DataCache(str(tmp_path / "cache"))
    mirror = tmp_path / "ptb"
    shutil.copytree(MIRRORS["ptb"], mirror)
    a = data.evaluation_windows("ptb-new", tokenizer, SEQLEN, cache, {"ptb": str(mirror)})
    test_file = mirror / data.HUB_SOURCES["ptb"].files["test"]
    shutil.copy(mirror / data.HUB_SOURCES["ptb"].files["validation"], test_file)  # other rows, same name
    b = data.evaluation_windows("ptb-new", tokenizer, SEQLEN, cache, {"ptb": str(mirror)})
    assert a.shape != b.shape or not torch.equal(a, b)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    hub_key = data._origin("ptb-new", "test", None)["hub"]
    assert hub_key == "ptb-text-only/ptb_text_only@refs/convert/parquet/penn_treebank/test/0000.parquet"


# --------------------------------------------------------------------------- through the hub client


class FakeHub(http.server.BaseHTTPRequestHandler):
    """``{endpoint}/datasets/<repo>/resolve/<revision>/<path>`` from the fixture folder, for the
    pinned revisions only, with the headers the hub client needs (commit, ETag, size)."""

    requests: list[tuple[str, str, str, str]] = []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body: bool):
        parts = urllib.parse.urlsplit(self.path).path.split("/")  # "", datasets, org, name, resolve, rev, path...
        if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
            parts = ["", "", "", "", "", "", ""]
        repo, revision, path = "/".join(parts[2:4]), urllib.parse.unquote(parts[5]), "/".join(parts[6:])
        file = os.path.join(FIXTURES, repo, *parts[6:])
        pinned = {s.repo: s.revision for s in data.HUB_SOURCES.values()}
        FakeHub.requests.append((self.command, repo, revision, path))
        if not (pinned.get(repo) == revision and os.path.isfile(file)):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(file, "rb") as f:
            content = f.read()
        commit = revision if len(revision) == 40 else hashlib.sha1(revision.encode()).hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.requests = []
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()
    server.server_close()


def test_hub_files_at_the_pinned_revisions_then_offline_from_the_cache(tokenizer, fake_hub, monkeypatch):
    import huggingface_hub

    names = ("wikitext2", "ptb", "ptb-new", "c4", "c4-new")
    assert data.cached_hub_file("ptb-new", "test") is None
    online = {n: data.evaluation_windows(n, tokenizer, SEQLEN) for n in names}
    for n in names:
        assert torch.equal(online[n], reference_windows(n, tokenizer, SEQLEN)), n
    got = {(repo, rev, path) for method, repo, rev, path in FakeHub.requests if method == "GET"}
    assert got == {("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3",
                    "wikitext-2-raw-v1/test-00000-of-00001.parquet"),
                   ("ptb-text-only/ptb_text_only", "refs/convert/parquet", "penn_treebank/validation/0000.parquet"),
                   ("ptb-text-only/ptb_text_only", "refs/convert/parquet", "penn_treebank/test/0000.parquet"),
                   ("allenai/c4", "1ddc917116b730e1859edef32896ec5c16be51d0",
                    "en/c4-validation.00000-of-00008.json.gz")}
    # the hub unreachable and offline: the same windows, from the hub cache
    assert all(data.cached_hub_file(n, data.TEST_SPLITS[n]) for n in names)
    assert data.cached_hub_file("c4", "train") is None
    fake_hub.shutdown()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for n in names:
        assert torch.equal(data.evaluation_windows(n, tokenizer, SEQLEN), online[n]), n
    # a file never fetched is one line naming data_paths
    with pytest.raises(UserError, match=r"could not fetch dataset 'c4' .*en/c4-train.*\+\+data_paths\.c4="):
        data.calibration_windows("c4", tokenizer, 2, SEQLEN, 0)
