"""Length-batched, chunked NLL (tokens.length_buckets / sequence_nll, deactivation.language_nll) and the
length-bucketed statistics pass, against batch-of-one references with full logits."""
import random

import pytest
import torch
import torch.nn.functional as F

from xlkernels.analysis.neurons import deactivation as D
from xlkernels.analysis import heads, tokens
from xlkernels.analysis import neurons as N

SEED = random.randrange(2**31)   # fresh inputs each run; printed on failure


def _rng(k=0):
    return random.Random(SEED + k)


def _ref_sums(model, seqs):
    """Per sequence, batch of one, full logits: summed float64 NLL of tokens 1..n-1 and their count."""
    sums, counts = [], []
    with torch.no_grad():
        for s in seqs:
            if len(s) < 2:
                sums.append(0.0)
                counts.append(0)
                continue
            ids = torch.tensor([s])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            sums.append(F.cross_entropy(logits, ids[0, 1:], reduction="sum").item())
            counts.append(len(s) - 1)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def _cost(batches, lengths, overhead):
    return sum(len(b) * max(max(lengths[i] for i in b), 1) + overhead for b in batches)


def _brute_best(lengths, bs, mt, overhead):
    """Cheapest split of the sorted order into runs within the limits (all 2**(n-1) cut sets)."""
    lens = sorted(max(x, 1) for x in lengths)
    n, best = len(lens), float("inf")
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        runs = [lens[a:b] for a, b in zip(cuts, cuts[1:])]
        if all((bs is None or len(r) <= bs) and (mt is None or len(r) == 1 or len(r) * r[-1] <= mt) for r in runs):
            best = min(best, sum(len(r) * r[-1] + overhead for r in runs))
    return best


def test_length_buckets():
    rng = _rng()
    lengths = [rng.randrange(0, 40) for _ in range(rng.randrange(50, 90))]
    for bs, mt in ((None, None), (7, None), (None, 97), (5, 61), (1, 1), (None, 20)):
        out = tokens.length_buckets(lengths, bs, mt)
        flat = [i for b in out for i in b]
        assert sorted(flat) == list(range(len(lengths))), f"seed {SEED}"
        assert [lengths[i] for i in flat] == sorted(lengths)           # sorted by length
        for b in out:
            n, longest = len(b), max(lengths[i] for i in b)
            assert n <= (bs or tokens.MAX_BATCH_SEQS)
            assert mt is None or n == 1 or n * longest <= mt
    # the cuts are the cheapest within the limits (padded tokens + overhead per batch)
    for trial in range(6):
        small = [rng.randrange(0, 12) for _ in range(rng.randrange(1, 11))]
        bs, mt, ov = rng.choice([None, 3]), rng.choice([None, 24]), rng.choice([0, 5, 64])
        out = tokens.length_buckets(small, bs, mt, overhead=ov)
        assert _cost(out, small, ov) == _brute_best(small, bs, mt, ov), f"seed {SEED} {small} {bs} {mt} {ov}"
    # a short tail is not padded to one long sequence; equal lengths share one batch
    assert tokens.length_buckets([3, 3, 3, 3, 40], None, 512, overhead=8) == [[0, 1, 2, 3], [4]]
    assert tokens.length_buckets([5] * 9, None, 512) == [list(range(9))]
    assert tokens.length_buckets([], 4, 8) == []
    with pytest.raises(ValueError, match="max_tokens"):
        tokens.length_buckets([3], 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        tokens.length_buckets([3], -1, None)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])   # gemma2: final logit softcapping
def test_sequence_nll_vs_batch_of_one(arch):
    from xlkernels.models import tiny_model
    model, _ = tiny_model(arch, seed=5)
    rng = _rng(1)
    seqs = [[rng.randrange(4, 260) for _ in range(rng.choice([0, 1, 2, 3, rng.randrange(4, 30)]))]
            for _ in range(23)]
    seqs[rng.randrange(23)] = [rng.randrange(4, 260) for _ in range(31)]
    want, wcount = _ref_sums(model, seqs)
    for bs, mt, chunk in ((None, None, None), (4, 45, 7), (None, 64, 1), (1, None, 1000)):
        got, count = tokens.sequence_nll(model, seqs, pad_id=0, batch_size=bs, max_tokens=mt, chunk_tokens=chunk)
        assert got.dtype == torch.float64 and torch.equal(count, wcount), f"seed {SEED}"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {SEED} {bs} {mt} {chunk}")



@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 3.0)])
def test_blocked_nll_odd_blocks_target_in_last_partial_block(bias, softcap):
    g = torch.Generator().manual_seed(SEED)
    V, E, n = 1013, 37, 29
    head = torch.nn.Linear(E, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, E, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    h = torch.randn(n, E, generator=g) * 4   # logits of tens: the max must be subtracted
    for block in (1, 7, 100, 1012, 1013, 5000):
        last = V - (V % block or block)   # first id of the last (partial) block
        tgt = torch.randint(0, V, (n,), generator=g)
        tgt[::2] = torch.randint(last, V, (len(tgt[::2]),), generator=g)
        tgt[1] = V - 1
        with torch.no_grad():
            want = F.cross_entropy(_capped(head(h).double(), softcap), tgt, reduction="none")   # float64 reference
            got = tokens._blocked_nll(head, softcap, h, tgt, block)
        assert got.dtype == torch.float32 and got.shape == (n,)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"seed {SEED} block {block}")
    with pytest.raises(ValueError, match="target"):
        tokens._blocked_nll(head, softcap, h, torch.full((n,), V), 7)


def _capped(logits, softcap):
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])   # gemma2: final logit softcapping
def test_sequence_nll_blocked_over_a_small_vocabulary_block(arch, monkeypatch):
    from xlkernels.models import tiny_model
    model, _ = tiny_model(arch, seed=7)
    V = model.get_output_embeddings().weight.shape[0]
    block = 41 if V % 41 else 43
    monkeypatch.setattr(tokens, "VOCAB_BLOCK", block)
    rng = _rng(3)
    seqs = [[rng.randrange(V - V % block, V) if k % 2 else rng.randrange(4, V) for k in range(rng.randrange(2, 25))]
            for _ in range(11)]
    want, wcount = _ref_sums(model, seqs)
    for chunk in (None, 5):
        got, count = tokens.sequence_nll(model, seqs, chunk_tokens=chunk)
        assert torch.equal(count, wcount)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {SEED} {chunk}")


def test_sequence_nll_through_a_patched_model_and_a_steerer():
    import xlkernels
    from xlkernels.models import tiny_model
    ref, _ = tiny_model("gemma3", seed=6)
    model, _ = tiny_model("gemma3", seed=6)
    st = xlkernels.patch(model)
    rng = _rng(2)
    seqs = [[rng.randrange(4, 260) for _ in range(rng.randrange(2, 20))] for _ in range(9)]
    want, _ = _ref_sums(ref, seqs)
    for m in (model, st):
        got, _ = tokens.sequence_nll(m, seqs, max_tokens=40)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {SEED}")


CORPUS = {
    "en": ["The cat sat on the mat.", "Open the file", "Save changes?", "Delete this user permanently", "Ok"],
    "de": ["Die Katze saß auf der Matte.", "Datei öffnen", "Änderungen speichern?"],
    "fr": ["Le chat était assis sur le tapis.", "Ouvrir le fichier", "Oui", "Non, merci beaucoup !"],
}


def _lang_ref(model, tok, corpus, max_length):
    out = []
    for texts in corpus.values():
        s, c = _ref_sums(model, [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts])
        out.append(s.sum() / c.sum())
    return torch.stack(out)


def test_language_nll_matches_per_text_reference():
    """Per-language means of the full-logits batch-of-one reference, for batch budgets that cut the corpus
    differently; a dropped last token, counted padding or a lost text moves the means by far more than 1e-6."""
    from xlkernels.models import tiny_model
    model, tok = tiny_model("gemma2", seed=7)
    want = _lang_ref(model, tok, CORPUS, 20)
    for bs, mt in ((1, None), (3, None), (2, 17), (64, None)):
        got = D.language_nll(model, tok, CORPUS, bs, 20, max_tokens=mt)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the means differ from what the usual slips give
    seqs = [tok(t, truncation=True, max_length=20)["input_ids"] for t in CORPUS["en"]]
    s, c = _ref_sums(model, [x[:-1] for x in seqs])
    assert abs(float(s.sum() / c.sum()) - float(want[0])) > 1e-3


def test_language_nll_bad_input():
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="batch_size"):
        D.language_nll(model, tok, CORPUS, 0)
    with pytest.raises(ValueError, match="max_tokens"):
        D.language_nll(model, tok, CORPUS, 2, 16, max_tokens=0)
    with pytest.raises(ValueError, match="max_length"):
        D.language_nll(model, tok, CORPUS, 2, 1)
    with pytest.raises(ValueError, match="no predicted token"):
        D.language_nll(model, tok, {"en": ["a b c"], "xx": [""]}, 2, 16)


def test_token_budget():
    assert tokens.token_budget(8, 128, None, "cpu") == tokens.CPU_MAX_TOKENS
    assert tokens.token_budget(2, 24, None, "cpu") == 48
    assert tokens.token_budget(8, 128, 4096, "cpu") == 4096
    assert tokens.token_budget(8, 128, None, "meta") == 1024
    assert tokens.token_budget(None, None, None, "meta") == tokens.GPU_MAX_TOKENS


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_collect_stats_bucketed_equals_corpus_order(arch):
    """Length-sorted batches give the same counts as batch_size texts in corpus order, and the batches
    really are sorted and pad less."""
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model(arch, seed=8)
    st = xlkernels.patch(model)
    a = N.collect_stats(st, tok, CORPUS, batch_size=3, max_length=24, progress=False, bucket=False)
    for mt in (None, 30):
        b = N.collect_stats(st, tok, CORPUS, batch_size=3, max_length=24, progress=False, max_tokens=mt)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positive, b.positive)
        torch.testing.assert_close(a.sum, b.sum, rtol=1e-5, atol=1e-5)
    old = list(N.text_batches(tok, CORPUS, 3, 24))
    new = list(N.bucketed_batches(tok, CORPUS, 30, 24))
    assert sum(int((g == -1).sum()) for _, _, g in new) < sum(int((g == -1).sum()) for _, _, g in old)
    lens = [int(m.sum(1).min()) for _, m, _ in new]
    assert lens == sorted(lens) and all(m.numel() <= 30 or m.shape[0] == 1 for _, m, _ in new)
    # shards partition the same batches
    r0 = list(N.bucketed_batches(tok, CORPUS, 30, 24, shard=(0, 2)))
    r1 = list(N.bucketed_batches(tok, CORPUS, 30, 24, shard=(1, 2)))
    key = lambda bs: [g.tolist() for _, _, g in bs]  # noqa: E731
    assert len(new) > 2 and key(r0) == key(new[0::2]) and key(r1) == key(new[1::2])


@pytest.mark.model
def test_real_model_nll_and_deactivation_vs_batch_of_one():
    """Gemma-3-270M (262k vocabulary): language_nll and one deactivation row against the full-logits batch-of-one
    hook pipeline (act_fn output index_fill_ 0), within fp32 rounding."""
    import xlkernels
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models import load_default
    model, tok = load_default(progress=False)
    corpus = {k: v[:3] for k, v in parallel_corpus(["en", "de", "ru"], n=40).items()}
    g = torch.Generator().manual_seed(SEED)
    idx = [torch.randperm(model.config.intermediate_size, generator=g)[:200].sort().values
           for _ in range(model.config.num_hidden_layers)]
    base_ref = _lang_ref(model, tok, corpus, 64)
    hs = [layer.mlp.act_fn.register_forward_hook(lambda m, i, o, ix=ix: o.index_fill_(-1, ix, 0))
          for layer, ix in zip(model.model.layers, idx)]
    try:
        off_ref = _lang_ref(model, tok, corpus, 64)
    finally:
        for h in hs:
            h.remove()
    st = xlkernels.patch(model)
    try:
        res = D.deactivation_matrix(st, tok, corpus, {"en": idx}, batch_size=8, max_length=64, progress=False)
    finally:
        xlkernels.unpatch(model)
    torch.testing.assert_close(res["base"], base_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(res["loss"][0], off_ref, rtol=2e-5, atol=2e-5)
    assert (res["delta"].abs() > 1e-3).all()
