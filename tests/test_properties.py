"""Invariants stated as properties (hypothesis, small budgets): the grid (codes in range,
quantize∘dequantize idempotent, the range and zero point), the Hessian statistics, the bit
packing of the export, equivalent transforms that fold without changing a block's output, and
the keys of every cache (the tokenized-data cache, the run id), which must change with every
input that defines the cached value."""
import copy
import hashlib
import json
import math

import pytest
import torch
from conftest import random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aespa.core.adapters import ModelAdapter
from aespa.core.grid import Grid, grid_from_range, minmax_grid, minmax_range, round_to_nearest
from aespa.core.hessian import HessianAccumulator, RunningSecondMoment, add_damping, prepare_hessian
from aespa.core.pipeline import BlockContext, capture_inputs
from aespa.core.transforms import BlockTransform, ChannelTransform, fold, query_key_channels, query_key_scale
from experiments import data, records
from experiments.export import pack_rows, unpack_rows

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
bits = st.integers(2, 8)


@st.composite
def weights(draw, max_rows=6, max_cols=16):
    rows = draw(st.integers(1, max_rows))
    group = draw(st.sampled_from([-1, 2, 4]))
    cols = draw(st.integers(1, max_cols // 4)) * 4
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = scale * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):
        w[0] = 0.0  # a dead row
    if draw(st.booleans()):
        w = w.abs()  # all positive: the range is clamped at 0
    return w, group


# --------------------------------------------------------------------------- the grid


@FAST
@given(weights(), bits, st.booleans())
def test_codes_are_integers_in_range_and_dequantize_is_idempotent(wg, b, sym):
    w, group = wg
    grid = minmax_grid(w, b, sym, group)
    codes = grid.quantize(w)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 2**b - 1
    once = grid.fake_quantize(w)
    assert torch.equal(grid.quantize(once), codes)  # values on the grid keep their codes
    assert torch.allclose(grid.fake_quantize(once), once, rtol=0, atol=1e-6 * max(1.0, w.abs().max().item()))
    assert torch.equal(round_to_nearest(w, b, sym, group), once)
    # the min-max grid covers the whole row: the error is at most half a step
    scale, _ = grid.expanded(w.shape[1])
    if not sym:  # (a symmetric grid of a row without negatives uses only its upper half, as the reference)
        assert ((once - w).abs() <= scale / 2 * (1 + 1e-5)).all()


@FAST
@given(weights(), bits, st.booleans())
def test_the_range_contains_zero_and_zero_is_exact(wg, b, sym):
    w, group = wg
    rows = w if group == -1 else w.reshape(-1, group)
    lo, hi = minmax_range(rows, sym)
    assert (lo <= 0).all() and (hi >= 0).all() and (hi > lo).all()
    dead = (rows == 0).all(1)
    low, high = rows.min(1).values.clamp(max=0), rows.max(1).values.clamp(min=0)
    if sym:  # as the GPTQ reference: [-max|w|, max|w|], or [0, max w] for a row without negatives
        high = torch.maximum(low.abs(), high)
        low = torch.where(low < 0, -high, low)
    assert torch.equal(lo, torch.where(dead, -1.0, low)) and torch.equal(hi, torch.where(dead, 1.0, high))
    scale, zero = grid_from_range(lo, hi, b, sym)
    assert torch.allclose(scale, (hi - lo) / (2**b - 1))
    assert torch.equal(zero, torch.full_like(zero, 2 ** (b - 1)) if sym else torch.round(-lo / scale))
    grid = minmax_grid(w, b, sym, group)
    assert grid.scale.shape == grid.zero.shape == (w.shape[0], 1 if group == -1 else w.shape[1] // group)
    zeros = torch.zeros_like(w)
    assert torch.equal(grid.fake_quantize(zeros), zeros)  # 0 is on every grid


@FAST
@given(weights(), bits, st.integers(0, 2**16))
def test_column_scale_divides_the_input_and_multiplies_the_step(wg, b, seed):
    w, group = wg
    zeta = 0.5 + torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed))
    plain = minmax_grid(w / zeta, b, False, group)
    folded = Grid(plain.scale, plain.zero, b, group, zeta)
    assert torch.allclose(folded.fake_quantize(w), plain.fake_quantize(w / zeta) * zeta, rtol=1e-5, atol=1e-6)
    back = Grid.from_dict(folded.to_dict())
    assert torch.equal(back.scale, folded.scale) and torch.equal(back.zero, folded.zero)
    assert torch.equal(back.col_scale, zeta) and (back.bits, back.group_size) == (b, group)
    assert "col_scale" not in plain.to_dict() and Grid.from_dict(plain.to_dict()).col_scale is None


# --------------------------------------------------------------------------- the Hessian


@FAST
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.integers(0, 2**16))
def test_hessian_is_the_mean_over_sequences_whatever_the_batches(batches, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, 5, 3, generator=g, dtype=torch.float64) for m in batches]
    acc, moment = HessianAccumulator(), RunningSecondMoment()
    for x in xs:
        acc.add(x)
        moment.add(x)
    tokens = torch.cat(xs).reshape(-1, 3)
    n = sum(batches)
    assert acc.nsamples == n and moment.tokens == tokens.shape[0]
    torch.testing.assert_close(acc.hessian, 2 / n * tokens.T @ tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moment.mean, tokens.T.float() @ tokens.float() / tokens.shape[0], rtol=1e-5,
                               atol=1e-6)


@FAST
@given(st.integers(2, 6), st.floats(1e-3, 1.0), st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_damping_and_dead_channels(n, percdamp, dead_value, seed):
    x = torch.randn(n, 3 * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0] = 0.0  # input channel 0 never fires
    h = x @ x.T
    damped, dead = prepare_hessian(h, percdamp, dead_value)
    assert dead.tolist() == [True] + [False] * (n - 1)
    filled = h.clone()
    filled[0, 0] = dead_value
    mean = filled.diagonal().mean()
    torch.testing.assert_close(damped, filled + percdamp * mean * torch.eye(n, dtype=h.dtype))
    assert torch.equal(h[0, 0], torch.tensor(0.0, dtype=h.dtype))  # the input is not modified
    batched = torch.stack([h, 2 * h])
    torch.testing.assert_close(add_damping(batched.clone(), percdamp)[1], add_damping(2 * h.clone(), percdamp))


# --------------------------------------------------------------------------- packing


@FAST
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 70), st.integers(0, 2**16))
def test_packing_round_trips(b, rows, cols, seed):
    codes = torch.randint(0, 2**b, (rows, cols), generator=torch.Generator().manual_seed(seed))
    codes[0, 0] = 2**b - 1  # the top code uses every bit
    packed = pack_rows(codes, b, chunk_rows=2)
    assert packed.dtype == torch.int32 and packed.shape == (rows, -(-cols * b // 32))
    assert torch.equal(unpack_rows(packed, b, cols), codes)
    # dense: the bitstream of a row is the codes' bits, least significant first
    stream = sum(int(c) << (i * b) for i, c in enumerate(codes[0].tolist()))
    words = [int(v) & 0xFFFFFFFF for v in packed[0].tolist()]
    assert sum(wd << (32 * i) for i, wd in enumerate(words)) == stream


# --------------------------------------------------------------------------- equivalent transforms


def _block(arch):
    model = random_model(arch, layers=1, seed=1)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    inputs, kwargs = capture_inputs(adapter, ids, "cpu", batch_size=2)
    return BlockContext([adapter.block(0)], inputs, kwargs, torch.device("cpu"), torch.float32, batch_size=2)


BLOCKS = {}


@pytest.mark.parametrize("arch", ["opt", "llama"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), norms=st.booleans(), value=st.booleans(), query_key=st.booleans())
def test_folded_transform_leaves_the_block_output_unchanged(arch, seed, norms, value, query_key):
    if arch not in BLOCKS:
        BLOCKS[arch] = _block(arch)
    ctx = BLOCKS[arch]
    before = ctx.run(ctx.inputs)
    block, geometry = ctx.block, ctx.block.geometry
    g = torch.Generator().manual_seed(seed)
    positive = lambda n: 0.5 + torch.rand(n, generator=g)  # noqa: E731
    hidden = block.linear("q").in_features
    kv = geometry.num_kv_heads * geometry.head_dim
    shift = arch == "opt"  # LayerNorm has a bias; RMSNorm cannot take a shift
    transform = BlockTransform(
        norms={feeder: ChannelTransform(positive(hidden), 0.1 * torch.randn(hidden, generator=g) if shift else None)
               for feeder in ("attn_norm", "mlp_norm")} if norms else {},
        value=ChannelTransform(positive(kv), 0.1 * torch.randn(kv, generator=g) if shift else None) if value else None,
        query_key=query_key_scale(positive(query_key_channels(geometry)), geometry) if query_key else None)
    saved = copy.deepcopy(block.module.state_dict())
    try:
        fold(block, transform)
        changed = [k for k, v in block.module.state_dict().items() if k in saved and not torch.equal(v, saved[k])]
        assert bool(changed) == (norms or value or query_key)
        torch.testing.assert_close(ctx.run(ctx.inputs), before, rtol=1e-4, atol=1e-4)
    finally:
        extra = set(block.module.state_dict()) - set(saved)
        for name in extra:  # biases a shift created on bias-free linears
            module, _, attr = name.rpartition(".")
            setattr(block.module.get_submodule(module), attr, None)
        block.module.load_state_dict(saved)


# --------------------------------------------------------------------------- cache keys


class FakeTokenizer:
    """Just what the cache key reads (no backend: the vocabulary is hashed)."""

    backend_tokenizer = None

    def __init__(self, vocab=None, bos="<s>", eos="</s>"):
        self.vocab, self.bos_token, self.eos_token = vocab or {"a": 0, "b": 1}, bos, eos

    def get_vocab(self):
        return self.vocab


class KeyRecorder(data.DataCache):
    def __init__(self):
        super().__init__(None)
        self.keys = []

    def get(self, key):
        self.keys.append(key)
        return torch.zeros(8192, dtype=torch.long)


def calibration_key(monkeypatch, tmp_path, name, nsamples, seqlen, seed, content, tokenizer):
    """The key calibration_windows reads the cache with (the set itself is never built)."""
    local = tmp_path / "local.txt"
    local.write_text(content)
    cache = KeyRecorder()
    monkeypatch.setattr(data, "_build_calibration", lambda *a: pytest.fail("the cache answered"))
    data.calibration_windows(name, tokenizer, nsamples, seqlen, seed, cache,
                             paths={"wikitext2": str(local)} if name == "wikitext2" else None)
    return cache.keys[-1]


FIELDS = {"name": st.sampled_from(["wikivital", "wikitext2"]), "nsamples": st.integers(1, 512),
          "seqlen": st.integers(2, 4096), "seed": st.integers(0, 2**31), "content": st.sampled_from(["x y", "x z"]),
          "tokenizer": st.sampled_from(["a", "b", "bos", "eos"])}
TOKENIZERS = {"a": FakeTokenizer(), "b": FakeTokenizer({"a": 0, "c": 1}), "bos": FakeTokenizer(bos="<bos>"),
              "eos": FakeTokenizer(eos="<eos>")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries(FIELDS), st.sampled_from(sorted(FIELDS)), st.data())
def test_calibration_cache_key_changes_with_every_field(monkeypatch, tmp_path, base, field, draw):
    other = dict(base, **{field: draw.draw(FIELDS[field].filter(lambda v: v != base[field]))})
    if field == "content" and base["name"] != "wikitext2":
        other["name"] = base["name"] = "wikitext2"  # the content of local files only defines a local set

    def key(f):
        return calibration_key(monkeypatch, tmp_path, f["name"], f["nsamples"], f["seqlen"], f["seed"], f["content"],
                               TOKENIZERS[f["tokenizer"]])

    assert key(base) != key(other)
    assert key(base) == key(dict(base))  # and only with them


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["wikivital", "wikitext2"]), st.integers(2, 4096), st.integers(2, 4096),
       st.sampled_from(["a", "b", "bos"]), st.sampled_from(["a", "b", "bos"]))
def test_test_set_cache_key_changes_with_every_field(monkeypatch, tmp_path, name, seqlen, seqlen2, tok, tok2):
    local = tmp_path / "test.txt"
    local.write_text("some text")
    monkeypatch.setattr(data, "_build_test_ids", lambda *a: pytest.fail("the cache answered"))
    paths = {"wikitext2": str(local)}

    def key(dataset, n, t):
        cache = KeyRecorder()
        data.evaluation_windows(dataset, TOKENIZERS[t], n, cache, paths=paths)
        return cache.keys[-1]

    base = key(name, seqlen, tok)
    assert base == key(name, seqlen, tok)
    assert (base == key(name, seqlen2, tok)) == (seqlen == seqlen2)
    assert (base == key(name, seqlen, tok2)) == (tok == tok2)
    assert base != key("wikitext2" if name == "wikivital" else "wikivital", seqlen, tok)
    local.write_text("other text")  # a local file edited in place
    assert (key(name, seqlen, tok) == base) == (name == "wikivital")
    # the split is part of the key: the calibration windows of the same set never share it
    assert base not in {calibration_key(monkeypatch, tmp_path, name, 1, seqlen, 0, "some text", TOKENIZERS[tok])}


def test_cache_key_is_the_hash_of_its_fields():
    cache = data.DataCache(None)
    tok = TOKENIZERS["a"]
    fingerprint = data.tokenizer_fingerprint(tok)
    payload = json.dumps({"tokenizer": fingerprint, "dataset": "d", "seed": 1}, sort_keys=True)
    assert cache.key(tok, dataset="d", seed=1) == hashlib.sha256(payload.encode()).hexdigest()[:24]
    assert len(fingerprint) == 16 and fingerprint == data.tokenizer_fingerprint(FakeTokenizer())


# --------------------------------------------------------------------------- the run id

QUANTIZED = {"model": {"name": "tiny-opt"}, "method": {"name": "gptq", "percdamp": 0.01}, "bits": 3,
             "group_size": -1, "sym": False, "act_bits": 16, "nsamples": 128, "seed": 0, "calib": {"name": "wikivital"},
             "seqlen": 512, "eval": {"datasets": ["wikivital"]}}
SEMANTIC_VALUES = {"model": {"name": "tiny-llama"}, "method": {"name": "gptq", "percdamp": 0.02}, "bits": 2,
                   "group_size": 32, "sym": True, "act_bits": 8, "nsamples": 64, "seed": 1,
                   "calib": {"name": "c4"}, "seqlen": 256, "eval": {"datasets": ["c4"]}}


@FAST
@given(st.sampled_from(sorted(SEMANTIC_VALUES)), st.sampled_from(sorted(records.NON_SEMANTIC)))
def test_run_id_changes_with_every_semantic_key_and_no_other(key, ignored):
    rid = records.run_id(QUANTIZED)
    assert len(rid) == 12 and rid == records.run_id(dict(QUANTIZED))
    assert records.run_id(dict(QUANTIZED, **{key: SEMANTIC_VALUES[key]})) != rid
    assert records.run_id(dict(QUANTIZED, **{ignored: "anything"})) == rid
    full_precision = dict(QUANTIZED, bits=16, act_bits=16)
    fp_id = records.run_id(full_precision)
    changed = records.run_id(dict(full_precision, **{key: SEMANTIC_VALUES[key]}))
    # a full-precision run is one run whatever its quantization keys (unless they make it quantized)
    assert (changed == fp_id) == (key in records.QUANTIZATION_ONLY and key not in ("bits", "act_bits"))


@pytest.mark.parametrize("config,quantized", [
    ({"method": {"name": "rtn"}, "bits": 4, "act_bits": 16}, True),
    ({"method": {"name": "rtn"}, "bits": 16, "act_bits": 8}, True),
    ({"method": {"name": "rtn"}, "bits": 16, "act_bits": 16}, False),
    ({"method": {"name": "none"}, "bits": 4, "act_bits": 16}, False),
    ({"bits": 4}, False),
    ({"method": {"name": "rtn"}}, False),
    ({"method": {"name": "rtn"}, "bits": 15}, True),
])
def test_is_quantized(config, quantized):
    assert records.is_quantized(config) == quantized


# --------------------------------------------------------------------------- activations


@FAST
@given(st.integers(2, 8), st.integers(0, 2**16))
def test_activation_quantizer_is_per_token_over_the_last_dimension(b, seed):
    from aespa.core.grid import quantize_activation

    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1.0, 10.0, 100.0])[:, None]
    y = quantize_activation(x, b)
    for i in range(2):
        for t in range(3):
            row = x[i, t]
            scale = ((row.max() - row.min()) / (2**b - 1)).clamp(1e-5, 1e4)
            zero = torch.round(-row.min() / scale)
            expected = (torch.clamp(torch.round(row / scale) + zero, 0, 2**b - 1) - zero) * scale
            assert torch.equal(y[i, t], expected)
    assert torch.equal(quantize_activation(y, b), y) or torch.allclose(quantize_activation(y, b), y, atol=1e-5)


def test_activation_quantizer_clamps_scale_and_zero_as_the_references():
    from aespa.core.grid import quantize_activation

    # constant tokens: the step is clamped to 1e-5 and the zero point to ±1e4
    assert torch.equal(quantize_activation(torch.full((1, 4), -1.0), 4), (torch.zeros(1, 4) - 1e4) * 1e-5)
    assert torch.equal(quantize_activation(torch.full((1, 4), 1.0), 4), (torch.full((1, 4), 15.0) + 1e4) * 1e-5)
    # a range beyond 1e4 steps: the step is clamped to 1e4
    assert torch.equal(quantize_activation(torch.tensor([[0.0, 2e5]]), 4), torch.tensor([[0.0, 1.5e5]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_round_to_nearest_keeps_the_dtype(dtype):
    w = torch.randn(4, 8).to(dtype)
    assert round_to_nearest(w, 3).dtype == dtype


# --------------------------------------------------------------------------- what each key is made of


def key_fields(monkeypatch, call):
    """The fields a data function hands to DataCache.key (besides the tokenizer)."""
    seen = []
    monkeypatch.setattr(data.DataCache, "key", lambda self, tokenizer, **fields: seen.append(fields) or "k")
    monkeypatch.setattr(data.DataCache, "get", lambda self, key: torch.zeros(8192, dtype=torch.long))
    call()
    return seen[-1]


def test_each_key_holds_every_field_that_defines_its_windows(monkeypatch, tmp_path):
    local = tmp_path / "train.txt"
    local.write_text("text")
    tok = TOKENIZERS["a"]
    calibration = key_fields(monkeypatch, lambda: data.calibration_windows(
        "wikitext2", tok, 8, 32, 5, paths={"wikitext2": str(local)}))
    assert calibration == {"dataset": "wikitext2", "split": "train", "nsamples": 8, "seqlen": 32, "seed": 5,
                           "paths": str(local), "files": data.files_fingerprint([str(local)])}
    hub = key_fields(monkeypatch, lambda: data.calibration_windows("c4", tok, 8, 32, 5))
    assert hub["paths"] is None and hub["files"] is None and hub["hub"].endswith("c4-train.00000-of-01024.json.gz")
    test = key_fields(monkeypatch, lambda: data.evaluation_windows("c4-new", tok, 32))
    assert test == {"dataset": "c4-new", "split": "test", "seqlen": 32, "paths": None, "files": None,
                    "hub": hub["hub"].replace("train.00000-of-01024", "validation.00000-of-00008")}
    # c4 and c4-new read the same file: only the dataset name tells their windows apart
    assert key_fields(monkeypatch, lambda: data.evaluation_windows("c4", tok, 32)) == dict(test, dataset="c4")


def test_unknown_sets_name_the_allowed_ones():
    from aespa.core.errors import UserError

    with pytest.raises(UserError, match="unknown calibration set 'ptb'; allowed: c4, wikitext2, wikivital$"):
        data.calibration_windows("ptb", TOKENIZERS["a"], 1, 8, 0)
    with pytest.raises(UserError, match="unknown dataset 'x'; allowed: wikitext2, c4, c4-new, ptb, ptb-new, wikivital$"):
        data.evaluation_windows("x", TOKENIZERS["a"], 8)


def test_run_id_ignores_key_order_and_takes_any_value():
    from pathlib import Path

    reordered = dict(reversed(list(QUANTIZED.items())))
    assert records.run_id(reordered) == records.run_id(QUANTIZED)
    with_path = dict(QUANTIZED, data_paths={"c4": Path("/data/c4")})
    assert records.run_id(with_path) == records.run_id(dict(QUANTIZED, data_paths={"c4": "/data/c4"}))


def test_tokenizer_fingerprint_reads_the_whole_definition():
    class Backend:
        def __init__(self, text):
            self.text = text

        def to_str(self):
            return self.text

    def with_backend(text):
        tok = FakeTokenizer()
        tok.backend_tokenizer = Backend(text)
        return tok

    # the same vocabulary with other merges is another tokenizer; a vocabulary's order is not
    assert data.tokenizer_fingerprint(with_backend("merges a")) != data.tokenizer_fingerprint(with_backend("merges b"))
    assert data.tokenizer_fingerprint(FakeTokenizer({"a": 0, "b": 1})) == \
        data.tokenizer_fingerprint(FakeTokenizer({"b": 1, "a": 0}))
    assert data.tokenizer_fingerprint(with_backend("m")) != data.tokenizer_fingerprint(FakeTokenizer())


class CharTokenizer(FakeTokenizer):
    """One id per character: windows are checkable by hand."""

    def __call__(self, text, return_attention_mask=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


@FAST
@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 99))
def test_calibration_windows_are_the_seeded_cuts_and_come_back_from_the_cache(nsamples, seqlen, seed):
    import random
    import tempfile

    text = "the quick brown fox jumps over the lazy dog " * 3
    with tempfile.TemporaryDirectory() as folder:
        local = f"{folder}/train.txt"
        with open(local, "w") as f:
            f.write(text)
        cache = data.DataCache(f"{folder}/cache")
        ids = data.calibration_windows("wikitext2", CharTokenizer(), nsamples, seqlen, seed, cache,
                                       paths={"wikitext2": local})
        stream = torch.tensor([ord(c) % 97 for c in "\n\n".join(data._texts("wikitext2", "train",
                                                                              {"wikitext2": local}))])
        rng = random.Random(seed)
        starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
        assert torch.equal(ids, torch.stack([stream[s:s + seqlen] for s in starts]))
        stored = sorted(p for p in __import__("os").listdir(f"{folder}/cache") if p.endswith(".safetensors"))
        assert len(stored) == 1
        assert torch.equal(cache.get(stored[0][: -len(".safetensors")]), ids)


# --------------------------------------------------------------------------- the Hessian, entry by entry


def test_hessian_accumulator_counts_sequences_per_batch_and_keeps_fp64():
    x1 = torch.arange(24.0).reshape(2, 4, 3) / 7  # 2 sequences of 4 tokens
    x2 = torch.arange(6.0).reshape(2, 3) - 2.5  # a 2-D batch: one sequence
    x3 = torch.linspace(-1, 1, 24).reshape(2, 2, 2, 3)  # 4-D: its first dimension counts
    acc = HessianAccumulator()
    assert acc.hessian is None and acc.nsamples == 0
    tokens = []
    for x, n in ((x1, 2), (x2, 3), (x3, 5)):
        acc.add(x)
        tokens.append(x.reshape(-1, 3))
        t = torch.cat(tokens)
        assert acc.nsamples == n and acc.hessian.dtype == torch.float32
        torch.testing.assert_close(acc.hessian, 2 / n * t.T @ t, rtol=1e-6, atol=1e-6)
    double = HessianAccumulator()
    double.add(x1.double())
    assert double.hessian.dtype == torch.float64
    half = HessianAccumulator()
    half.add(x1.half())
    assert half.hessian.dtype == torch.float32


def test_second_moment_keeps_leading_dimensions_apart_and_pairs_x_with_y():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 3, 5, 4, generator=g) for _ in range(2)]  # [heads, batch, tokens, d]
    y = [torch.randn(2, 3, 5, 6, generator=g) for _ in range(2)]
    m = RunningSecondMoment()
    assert m.mean is None and m.tokens == 0
    for a, b in zip(x, y):
        m.add(a, b, leading=1)
    xs, ys = torch.cat(x, 1).reshape(2, 30, 4), torch.cat(y, 1).reshape(2, 30, 6)
    assert m.tokens == 30 and m.mean.shape == (2, 4, 6)
    torch.testing.assert_close(m.mean, xs.transpose(1, 2) @ ys / 30)
    flat = RunningSecondMoment()  # leading=0 by default: every dimension but the last counts tokens
    flat.add(x[0].double())
    t = x[0].reshape(-1, 4)
    assert flat.tokens == 30 and flat.mean.dtype == torch.float32
    torch.testing.assert_close(flat.mean, t.T @ t / 30)


def test_prepare_hessian_per_head_dead_channels():
    h = torch.stack([torch.diag(torch.tensor([2.0, 0.0, 4.0])), torch.diag(torch.tensor([0.0, 3.0, 6.0]))])
    damped, dead = prepare_hessian(h, 0.5)
    assert dead.tolist() == [[False, True, False], [True, False, False]]
    torch.testing.assert_close(damped[0], torch.diag(torch.tensor([2.0, 1.0, 4.0]) + 0.5 * 7 / 3))
    torch.testing.assert_close(damped[1], torch.diag(torch.tensor([1.0, 3.0, 6.0]) + 0.5 * 10 / 3))
    assert prepare_hessian(torch.diag(torch.tensor([0.0, 2.0])), 0.0)[0].tolist() == [[1.0, 0.0], [0.0, 2.0]]


def test_zero_dead_columns_per_head_and_for_a_residual():
    from aespa.core.hessian import zero_dead_columns

    w = torch.arange(1.0, 13.0).reshape(4, 3)  # 2 heads of 2 rows
    dead = torch.tensor([[False, True, False], [True, False, False]])
    expected = w.clone()
    expected[:2, 1] = 0
    expected[2:, 0] = 0
    assert torch.equal(zero_dead_columns(w, dead), expected)
    assert torch.equal(zero_dead_columns(w, torch.tensor([False, False, True])), w * torch.tensor([1.0, 1.0, 0.0]))
    residual = torch.ones(2, 3, 3)
    out = zero_dead_columns(residual, dead)
    assert out[0, :, 1].eq(0).all() and out[1, :, 0].eq(0).all() and out.sum() == 18 - 6
    assert torch.equal(w, torch.arange(1.0, 13.0).reshape(4, 3))  # a copy


def _diag(values, damp=0.0):
    return torch.diag(torch.tensor(values, dtype=torch.float64)) + damp * torch.eye(len(values), dtype=torch.float64)


def _check_factor(upper, h):
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(h))
    # bit for bit the reference's chain on exactly this matrix (a damping added in another precision is not)
    assert torch.equal(upper, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True))


def test_inverse_cholesky_upper_factor_and_its_damping_retries():
    from aespa.core.hessian import inverse_cholesky_upper

    h = _diag([4.0, 1.0, 2.0]) + 0.5
    upper, used = inverse_cholesky_upper(h)
    assert used == 0.0
    _check_factor(upper, h)
    assert inverse_cholesky_upper(h, 0.37)[1] == 0.37  # succeeded at once: the damping it was given
    # without damping the retries add 1e-3 · mean(diag) · 10^k, k = 1, 2, 3
    for values, k in (([1.0, 1.0, -1e-4], 1), ([1.0, 1.0, -0.05], 2), ([1.0] * 9 + [-0.5], 3)):
        h = _diag(values)
        upper, used = inverse_cholesky_upper(h)
        assert used == 1e-3 * h.diagonal().mean().item() * 10**k, values
        _check_factor(upper, h + used * torch.eye(len(values), dtype=h.dtype))
    # with damping d already on the diagonal: d · 10^k in all, so (d · 10^k - d) is added
    h = _diag([1.0, 1.0, -0.05], 0.01)
    upper, used = inverse_cholesky_upper(h, 0.01)
    assert used == 0.01 * 10
    _check_factor(upper, h + (used - 0.01) * torch.eye(3, dtype=h.dtype))
    # four attempts in all: a fifth (10^4) would have succeeded here
    upper, used = inverse_cholesky_upper(_diag([1.0] * 9 + [-2.0]))
    assert used == math.inf
    assert inverse_cholesky_upper(_diag([1.0] * 9 + [-2.0]), tries=5)[1] == 1e-3 * 0.7 * 10**4
    # every attempt failed: 1/sqrt of the usable diagonal, 1 where it is not finite or not positive
    h = _diag([4.0, float("nan"), -1.0, 0.0, 0.25])
    h[0, 1] = float("nan")
    upper, used = inverse_cholesky_upper(h)
    assert used == math.inf and torch.equal(upper, torch.diag(torch.tensor([0.5, 1, 1, 1, 2], dtype=h.dtype)))


def test_inverse_cholesky_upper_batched_is_matrix_by_matrix():
    from aespa.core.hessian import inverse_cholesky_upper

    good, retried = _diag([4.0, 1.0, 2.0]) + 0.5, _diag([1.0, 1.0, -0.05])
    stacked = torch.stack([torch.stack([good, retried]), torch.stack([retried, good])])  # [2, 2, 3, 3]
    upper, used = inverse_cholesky_upper(stacked)
    assert upper.shape == stacked.shape and used == inverse_cholesky_upper(retried)[1] > 0
    assert torch.equal(upper[0, 0], inverse_cholesky_upper(good)[0])
    assert torch.equal(upper[0, 1], inverse_cholesky_upper(retried)[0])
    assert torch.equal(upper[1, 0], upper[0, 1]) and torch.equal(upper[1, 1], upper[0, 0])
    three = inverse_cholesky_upper(torch.stack([good, retried]))
    assert three[1] == used and torch.equal(three[0][1], upper[0, 1])
    late = _diag([1.0] * 9 + [-2.0])  # factors at the fifth attempt only
    assert inverse_cholesky_upper(torch.stack([late, late]), tries=5)[1] == 1e-3 * 0.7 * 10**4  # tries reach each


def _one_block_context(nan=False):
    model = random_model("opt", layers=1)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (3, 8), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_inputs(adapter, ids, "cpu", batch_size=3)
    if nan:
        inputs[0, 0, 0] = float("nan")
    return adapter, inputs, BlockContext([adapter.block(0)], inputs, kwargs, torch.device("cpu"), torch.float32,
                                         batch_size=3)


def test_collect_hessians_hands_every_role_its_own_tensor_and_names_bad_roles():
    from aespa.core.errors import NumericalError
    from aespa.core.hessian import collect_hessians

    adapter, inputs, ctx = _one_block_context()
    hessians = collect_hessians(ctx, ["k", "v", "q"])
    x = adapter.block(0).norm("attn_norm")(inputs).reshape(-1, 64)
    torch.testing.assert_close(hessians["q"], 2 / 3 * x.T @ x, rtol=1e-4, atol=1e-4)
    assert len({id(h) for h in hessians.values()}) == 3 and all(torch.equal(h, hessians["k"]) for h in hessians.values())
    alone = collect_hessians(ctx, ["v"])  # one role of a group
    assert list(alone) == ["v"] and torch.equal(alone["v"], hessians["v"])
    with pytest.raises(ValueError, match=r"roles \['x'\] are not linears of this block; known: \['q', 'k', 'v', 'o'"):
        collect_hessians(ctx, ["q", "x"])
    *_, bad = _one_block_context(nan=True)
    with pytest.raises(NumericalError, match=r"^NaN in block 0: Hessian of the q input$"):
        collect_hessians(bad, ["q"])


def test_evaluation_windows_cut_the_stream_and_store_it(tmp_path):
    from aespa.core.errors import UserError

    text = "abcdefghij" * 2
    local = tmp_path / "test.txt"
    local.write_text(text)
    paths = {"wikitext2": str(local)}
    cache = data.DataCache(str(tmp_path / "cache"))
    stream = torch.tensor([ord(c) % 97 for c in "\n\n".join(data._texts("wikitext2", "test", paths))])
    ids = data.evaluation_windows("wikitext2", CharTokenizer(), 6, cache, paths=paths)
    assert torch.equal(ids, stream[:18].view(3, 6))
    key = cache.key(CharTokenizer(), dataset="wikitext2", split="test", seqlen=6,
                    **data._origin("wikitext2", "test", paths))
    assert torch.equal(cache.get(key), stream)  # the whole stream is stored under its key
    assert torch.equal(data.evaluation_windows("wikitext2", CharTokenizer(), stream.numel(), paths=paths),
                       stream[None])  # exactly one window
    with pytest.raises(UserError, match=rf"^dataset 'wikitext2' has {stream.numel()} tokens, fewer than one window "
                                        rf"of seqlen={stream.numel() + 1}$"):
        data.evaluation_windows("wikitext2", CharTokenizer(), stream.numel() + 1, paths=paths)


def test_c4_new_is_cut_at_its_windows_of_seqlen(monkeypatch):
    monkeypatch.setattr(data, "C4_WINDOWS", 2)
    monkeypatch.setattr(data, "_texts", lambda name, split, paths: ["abcd", "efgh", "ijkl"])
    ids = data.evaluation_windows("c4-new", CharTokenizer(), 3)
    stream = torch.tensor([ord(c) % 97 for c in "abcd efgh ijkl"])
    assert torch.equal(ids, stream[:6].view(2, 3))  # C4_WINDOWS · seqlen tokens of the stream


# --------------------------------------------------------------------------- aespa's grids (qparams), by brute force


def _reference_search(weight, hessian, bits, sym, group_size, zeta):
    """hessian_weighted_grid with loops: group after group, each row's candidates (ratio by ratio, zero
    point floor then ceil) scored with the whole row's loss (the other groups at their current grids);
    the first strictly smallest wins."""
    from aespa.qparams import CLIP_RATIOS

    out, cols = weight.shape
    heads = hessian.shape[0] if hessian.dim() == 3 else 1
    h3 = hessian if hessian.dim() == 3 else hessian[None]
    w = weight / zeta
    size = cols if group_size == -1 else group_size
    maxq = 2**bits - 1
    start = minmax_grid(w, bits, sym, group_size)
    scale, zero = start.scale.to(w.dtype), start.zero.to(w.dtype)
    lo, hi = minmax_range(w.reshape(-1, size), sym)
    lo, hi = lo.reshape(out, -1), hi.reshape(out, -1)
    for g in range(cols // size):
        for r in range(out):
            h = h3[r // (out // heads)]
            best = (float("inf"), None, None)
            for ratio in CLIP_RATIOS.tolist():
                step = (hi[r, g] * ratio - lo[r, g] * ratio) / maxq
                zeros = [torch.tensor((maxq + 1) / 2, dtype=w.dtype)] if sym else \
                    [torch.floor(-lo[r, g] * ratio / step), torch.ceil(-lo[r, g] * ratio / step)]
                for z in zeros:
                    s, zz = scale[r].clone(), zero[r].clone()
                    s[g], zz[g] = step, z
                    row = Grid(s[None], zz[None], bits, group_size, zeta)
                    d = (row.fake_quantize(weight[r:r + 1]) - weight[r:r + 1])[0]
                    score = (d @ h @ d).item()
                    if score < best[0]:
                        best = (score, step, z)
            scale[r, g], zero[r, g] = best[1], best[2]
    return scale, zero


@pytest.mark.parametrize("sym,group_size,heads,zeta", [(False, 4, 1, False), (True, 4, 2, True), (False, -1, 2, True),
                                                        (False, 6, 1, True)])
def test_hessian_weighted_grid_is_the_reference_search(sym, group_size, heads, zeta):
    from aespa.qparams import hessian_weighted_grid, weighted_error

    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64)
    x = torch.randn(heads, 40, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                                   dtype=torch.float64)
    h = (x.transpose(1, 2) @ x / 40)
    h = h if heads > 1 else h[0]
    col = torch.rand(12, generator=g, dtype=torch.float64) + 0.5 if zeta else None
    grid = hessian_weighted_grid(w, h, 2, sym, group_size, col)
    scale, zero = _reference_search(w, h, 2, sym, group_size, torch.ones(12, dtype=w.dtype) if col is None else col)
    torch.testing.assert_close(grid.scale, scale, rtol=1e-12, atol=0)
    assert torch.equal(grid.zero, zero) and grid.bits == 2 and grid.group_size == group_size
    assert grid.col_scale is col and grid.scale.dtype == torch.float64
    # the loss it minimises, rows split by head
    d = (grid.fake_quantize(w) - w).reshape(heads, -1, 12)
    h3 = h if heads > 1 else h[None]
    torch.testing.assert_close(weighted_error(w, grid, h), torch.einsum("hri,hij,hrj->", d, h3, d))


def test_hessian_weighted_grid_defaults_and_chunks(monkeypatch):
    from aespa import qparams

    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 8, generator=g)
    x = torch.randn(30, 8, generator=g)
    h = x.T @ x
    grid = qparams.hessian_weighted_grid(w, h, 3)
    assert grid.col_scale is None and grid.group_size == -1 and grid.scale.dtype == torch.float32
    assert torch.equal(grid.zero, grid.zero.round()) and not (grid.zero == 4).all()  # asymmetric by default
    # 3 bits: 2^3 - 1 = 7 steps (exactly the reference, in fp64)
    w64, h64 = w.double(), h.double()
    scale, zero = _reference_search(w64, h64, 3, False, -1, torch.ones(8, dtype=torch.float64))
    grid64 = qparams.hessian_weighted_grid(w64, h64, 3)
    assert torch.equal(grid64.zero, zero) and grid64.zero.max() > 3
    torch.testing.assert_close(grid64.scale, scale, rtol=1e-12, atol=0)
    monkeypatch.setattr(qparams, "CHUNK_ELEMENTS", 3 * 5 * 8)  # three candidates at a time: the same grid
    chunked = qparams.hessian_weighted_grid(w, h, 3)
    assert torch.equal(chunked.scale, grid.scale) and torch.equal(chunked.zero, grid.zero)


def test_find_zeta_is_the_least_squares_factor_and_one_for_a_dead_column():
    from aespa.qparams import find_zeta

    w = torch.tensor([[0.3, 0.0, -1.2], [0.7, 0.0, 0.4]])
    grid = Grid(torch.tensor([[0.5], [0.25]]), torch.tensor([[2.0], [1.0]]), 2, -1, torch.full((3,), 9.0))
    zeta = torch.tensor([1.0, 2.0, 0.5])
    values = Grid(grid.scale, grid.zero, 2).fake_quantize(w / zeta)  # col_scale of the grid is ignored
    expected = (values * w).sum(0) / ((values * values).sum(0) + 1e-10)
    expected[1] = 1.0
    assert torch.equal(find_zeta([w], [grid], zeta), expected)
    halves = find_zeta([w[:1], w[1:]], [Grid(grid.scale[:1], grid.zero[:1], 2), Grid(grid.scale[1:], grid.zero[1:], 2)],
                       zeta)
    assert torch.equal(halves, expected)  # rows of several layers are stacked


def test_zfold_rounds_losses_and_what_it_returns():
    from aespa.qparams import find_zeta, hessian_weighted_grid, weighted_error, zfold

    g = torch.Generator().manual_seed(7)  # two rounds accepted, the third one stops it
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    h = x.T @ x / 64
    col = torch.rand(8, generator=g, dtype=torch.float64).add(0.3)
    weights = [torch.randn(6, 8, generator=g, dtype=torch.float64) * col,
               torch.randn(4, 8, generator=g, dtype=torch.float64) * col]
    seen = []
    result = zfold(weights, [h, 2 * h], bits=2, max_rounds=4, on_round=lambda i, loss: seen.append((i, loss)))
    # the same loop by hand
    zeta = torch.ones(8, dtype=torch.float64)
    grids = [minmax_grid(w, 2) for w in weights]
    best = initial = sum(weighted_error(w, Grid(gr.scale, gr.zero, 2, -1, zeta), hh)
                         for w, gr, hh in zip(weights, grids, [h, 2 * h])).item()
    expected, accepted, kept = [], 0, (grids, zeta)
    for i in range(4):
        zeta = find_zeta(weights, grids, zeta)
        grids = [hessian_weighted_grid(w, hh, 2, False, -1, zeta) for w, hh in zip(weights, [h, 2 * h])]
        loss = sum(weighted_error(w, gr, hh) for w, gr, hh in zip(weights, grids, [h, 2 * h])).item()
        expected.append((i + 1, loss))
        if loss > best:
            break
        best, accepted, kept = loss, accepted + 1, (grids, zeta)
    assert len(seen) == 3 and accepted == 2
    assert seen == expected and result.rounds == accepted and result.initial_loss == initial and result.loss == best
    assert torch.equal(result.zeta, kept[1]) and all(torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
                                                     for a, b in zip(result.grids, kept[0]))
    assert result.zeta.dtype == torch.float64


def test_zfold_goes_on_through_ties_and_starts_from_the_given_grids():
    from aespa.qparams import weighted_error, zfold

    w = torch.tensor([[0.0, 0.5, 1.0, 1.5], [0.0, -1.0, 1.0, 2.0]])  # on their min-max grids: no error
    h = torch.eye(4)
    result = zfold([w], [h], bits=2, max_rounds=3)
    assert result.rounds == 3 and result.loss == 0.0 and result.initial_loss == 0.0  # equal losses continue
    assert torch.equal(result.zeta, torch.ones(4))
    start = Grid(torch.tensor([[0.4], [0.9]]), torch.tensor([[0.0], [1.0]]), 2)
    given = zfold([w], [h], bits=2, max_rounds=0, initial_grids=[start])
    assert given.rounds == 0 and given.initial_loss == weighted_error(w, start, h).item() > 0
    assert torch.equal(given.grids[0].scale, start.scale) and torch.equal(given.grids[0].col_scale, torch.ones(4))
    sym = zfold([w], [h], bits=2, sym=True, max_rounds=0)
    assert (sym.grids[0].zero == 2).all()
    grouped = zfold([w], [h], bits=2, group_size=2, max_rounds=1)
    assert grouped.grids[0].scale.shape == (2, 2) and grouped.grids[0].group_size == 2


def test_statistics_and_grids_stay_on_the_inputs_device_and_dtype():
    """The meta device stands in for an accelerator (a CPU tensor mixed in fails or stays on the CPU)."""
    from aespa.qparams import hessian_weighted_grid

    acc = HessianAccumulator()
    acc.add(torch.empty(2, 3, 4, device="meta"))
    assert acc.hessian.device.type == "meta"
    grid = hessian_weighted_grid(torch.empty(4, 8, device="meta"), torch.empty(8, 8, device="meta"), 2, group_size=4)
    assert grid.scale.device.type == "meta" and grid.zero.device.type == "meta"
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    half = hessian_weighted_grid(w.half(), (x.T @ x / 40).half(), 2, group_size=8)
    assert half.scale.dtype == torch.float16 and half.zero.dtype == torch.float16


def test_a_factor_whose_inverse_does_not_factor_is_retried():
    """Nearly singular: H factors, its inverse (cholesky_inverse) does not; the damping is raised."""
    from aespa.core.hessian import inverse_cholesky_upper

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = torch.randn(6, 2, generator=g, dtype=torch.float64)
        h = v @ v.T + 1e-17 * torch.eye(6, dtype=torch.float64)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.any() or not torch.isfinite(lower).all():
            continue
        if torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)[1].any():
            break
    else:
        pytest.skip("this platform's Cholesky factored every inverse drawn")
    upper, used = inverse_cholesky_upper(h)
    assert used > 0  # not the factor of the failed attempt
    _check_factor(upper, h + used * torch.eye(6, dtype=h.dtype))


def test_zfold_runs_at_most_thirty_rounds_by_default_and_keeps_the_weights_dtype():
    from aespa.qparams import zfold

    g = torch.Generator().manual_seed(2)  # the loss decreases at every one of 31 rounds
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    h = x.T @ x / 64
    col = torch.rand(8, generator=g, dtype=torch.float64).add(0.3)
    weights = [torch.randn(6, 8, generator=g, dtype=torch.float64) * col,
               torch.randn(4, 8, generator=g, dtype=torch.float64) * col]
    assert zfold(weights, [h, 2 * h], bits=2).rounds == 30
    none = zfold(weights, [h, 2 * h], bits=2, max_rounds=0)
    assert none.zeta.dtype == torch.float64 and none.grids[0].col_scale.dtype == torch.float64


def test_zfold_groups_of_post_layernorm_opt_skip_what_reads_the_residual_stream():
    from transformers import AutoModelForCausalLM, OPTConfig

    from aespa.core.attention import register_attention
    from aespa.method import zfold_groups

    cfg = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=256,
                    word_embed_proj_dim=64, max_position_embeddings=128, do_layer_norm_before=False)
    cfg._attn_implementation = register_attention()
    adapter = ModelAdapter(AutoModelForCausalLM.from_config(cfg, attn_implementation="ptq"))
    assert adapter.family.name == "opt-postln"
    # q/k/v and fc1 read the residual stream (nothing to fold into); o and fc2 (down) still fold
    assert zfold_groups(adapter.block(0)) == (("o",), ("down",))


def test_find_zeta_adds_its_epsilon_and_the_symmetric_s_step_stays_symmetric():
    from aespa.qparams import find_zeta, hessian_weighted_grid, weighted_error, zfold

    w = torch.tensor([[0.3, 1e-6, -1.2], [0.7, 2e-6, 0.4]], dtype=torch.float64)
    grid = Grid(torch.tensor([[0.5], [0.25]], dtype=torch.float64), torch.tensor([[2.0], [1.0]], dtype=torch.float64),
                2)
    values = grid.fake_quantize(w)
    expected = (values * w).sum(0) / ((values * values).sum(0) + 1e-10)  # fp64: the epsilon shows
    expected = torch.where(expected == 0, torch.ones_like(expected), expected)
    assert torch.equal(find_zeta([w], [grid], torch.ones(3, dtype=torch.float64)), expected)
    # one symmetric Z-Fold round: the ζ-step on the symmetric min-max grids, then the symmetric search
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(4, 8, generator=g, dtype=torch.float64)]
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    h = x.T @ x / 32
    seen = []
    zfold(weights, [h], bits=2, sym=True, max_rounds=1, on_round=lambda i, loss: seen.append(loss))
    zeta = find_zeta(weights, [minmax_grid(weights[0], 2, True)], torch.ones(8, dtype=torch.float64))
    grid = hessian_weighted_grid(weights[0], h, 2, True, -1, zeta)
    assert seen == [weighted_error(weights[0], grid, h).item()]


def test_a_local_folder_laid_out_like_the_hub_keys_each_split_by_its_own_file(tmp_path):
    source = data.HUB_SOURCES[data.hub_source("wikitext2")]
    for split, content in (("train", "train rows"), ("test", "test rows")):
        file = tmp_path / source.files[split]
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(content)
    paths = {"wikitext2": str(tmp_path)}
    for split in ("train", "test"):
        assert data._origin("wikitext2", split, paths) == {
            "paths": str(tmp_path), "files": data.files_fingerprint([str(tmp_path / source.files[split])])}


def test_tokenizer_fingerprint_holds_the_special_tokens_and_the_class():
    class Bare:  # no backend_tokenizer attribute at all: the vocabulary is hashed
        bos_token, eos_token = "<s>", "</s>"

        def get_vocab(self):
            return {"a": 0, "b": 1}

    plain = data.tokenizer_fingerprint(FakeTokenizer())
    assert data.tokenizer_fingerprint(FakeTokenizer(bos="<bos>")) != plain
    assert data.tokenizer_fingerprint(FakeTokenizer(eos="<eos>")) != plain
    assert data.tokenizer_fingerprint(CharTokenizer()) != plain  # the same vocabulary, another class
    assert data.tokenizer_fingerprint(Bare()) not in (plain, None)


def test_grid_to_a_device_moves_every_tensor_and_keeps_the_rest():
    grid = Grid(torch.tensor([[0.5, 0.25]]), torch.tensor([[1.0, 2.0]]), 3, 4, torch.tensor([1.0, 2.0, 3.0, 4.0,
                                                                                           5.0, 6.0, 7.0, 8.0]))
    moved = grid.to("meta")
    assert (moved.scale.device.type, moved.zero.device.type, moved.col_scale.device.type) == ("meta",) * 3
    assert moved.bits == 3 and moved.group_size == 4 and moved.scale.shape == (1, 2)
    back = grid.to("cpu")
    assert torch.equal(back.scale, grid.scale) and torch.equal(back.zero, grid.zero)
    assert torch.equal(back.col_scale, grid.col_scale)
    plain = Grid(grid.scale, grid.zero, 3, 4).to("meta")
    assert plain.col_scale is None and plain.zero.device.type == "meta"


def test_group_size_errors_name_the_layer_and_the_allowed_sizes():
    from aespa.core.errors import UserError
    from aespa.core.grid import check_group_size

    with pytest.raises(UserError, match=r"^group_size=4 does not divide the input width 10 of layer; allowed: -1 "
                                        r"\(per channel\) or a divisor of 10$"):
        check_group_size(10, 4)
    with pytest.raises(UserError, match=r"^group_size=0 does not divide"):
        check_group_size(10, 0)
    check_group_size(12, 4)
    check_group_size(10, 1)  # a group per column divides any width
    check_group_size(10, -1)
