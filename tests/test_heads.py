"""Task heads: pooling, the classifiers' shapes and init, the span head, and the CRF against brute-force
enumeration of every tag path (log-partition, path scores, Viterbi) on small random batches with masks
of several lengths; constraints respected; the nll gradient finite and equal to the brute-force one."""
from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models.heads import CRF, SequenceClassifier, SpanHead, TokenClassifier, iob2_constraints, pool


def random_crf(L, constraints=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    crf = CRF(L, constraints)
    with torch.no_grad():
        for p in (crf.start, crf.end, crf.transitions):
            p.copy_(torch.randn(p.shape, generator=g))
    return crf


def batch(B, T, L, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    em = torch.randn(B, T, L, generator=g) * 2
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return em, mask


def path_score(crf, em, path):
    """s(y) written out from the definition, with the constraints' penalties."""
    start, trans, end = crf._scores()
    s = start[path[0]] + em[0, path[0]]
    for t in range(1, len(path)):
        s = s + trans[path[t - 1], path[t]] + em[t, path[t]]
    return s + end[path[-1]]


def brute_force(crf, em, n):
    """(log Z, best path) over all L^n paths of one sequence of length n."""
    paths = list(itertools.product(range(crf.n_labels), repeat=n))
    scores = torch.stack([path_score(crf, em, p) for p in paths])
    return torch.logsumexp(scores, 0), list(paths[int(scores.argmax())]), scores


LENGTHS = [4, 1, 3, 2, 4]


@pytest.mark.parametrize("L, seed", [(3, 0), (4, 1), (2, 2)])
def test_crf_log_partition_score_and_viterbi_equal_brute_force(L, seed):
    crf = random_crf(L, seed=seed)
    em, mask = batch(len(LENGTHS), max(LENGTHS), L, LENGTHS, seed=seed + 10)
    logz = crf.log_partition(em, mask)
    paths = crf.decode(em, mask)
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(0, L, mask.shape, generator=g).masked_fill(~mask, -100)  # junk where padded
    scores = crf.score(em, tags, mask)
    for b, n in enumerate(LENGTHS):
        ref_logz, ref_path, _ = brute_force(crf, em[b], n)
        torch.testing.assert_close(logz[b], ref_logz, rtol=1e-5, atol=1e-5)
        assert paths[b] == ref_path
        torch.testing.assert_close(scores[b], path_score(crf, em[b], tags[b, :n].tolist()), rtol=1e-5, atol=1e-5)
    nll = crf.nll(em, tags, mask, reduction="none")
    torch.testing.assert_close(nll, logz - scores)
    torch.testing.assert_close(crf.nll(em, tags, mask), nll.mean())
    torch.testing.assert_close(crf.nll(em, tags, mask, reduction="sum"), nll.sum())
    torch.testing.assert_close(crf.nll(em, tags, mask, reduction="token_mean"), nll.sum() / sum(LENGTHS))


def test_crf_padding_changes_nothing():
    crf = random_crf(3)
    em, mask = batch(2, 3, 3, [3, 2])
    longer = torch.cat([em, torch.randn(2, 4, 3) * 50], dim=1)  # extra padded steps with wild values
    lmask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(crf.log_partition(longer, lmask), crf.log_partition(em, mask))
    assert crf.decode(longer, lmask) == crf.decode(em, mask)
    alone = crf.decode(em[1:, :2], None)
    assert crf.decode(em, mask)[1] == alone[0]


def test_crf_nll_gradient_finite_and_equal_to_brute_force():
    L = 3
    crf = random_crf(L, seed=3)
    em, mask = batch(3, 3, L, [3, 2, 1], seed=4)
    tags = torch.tensor([[0, 2, 1], [1, 1, 0], [2, 0, 0]])
    em1 = em.clone().requires_grad_(True)
    crf.nll(em1, tags, mask).backward()
    got = [p.grad.clone() for p in (crf.start, crf.end, crf.transitions)] + [em1.grad]
    assert all(torch.isfinite(g).all() for g in got)
    crf.zero_grad()
    em2 = em.clone().requires_grad_(True)
    ref = []
    for b, n in enumerate([3, 2, 1]):
        logz, _, _ = brute_force(crf, em2[b], n)
        ref.append(logz - path_score(crf, em2[b], tags[b, :n].tolist()))
    torch.stack(ref).mean().backward()
    want = [p.grad for p in (crf.start, crf.end, crf.transitions)] + [em2.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_iob2_constraints_matrix():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    c = iob2_constraints(labels)
    S, E = 5, 6
    assert c.shape == (7, 7)
    assert not c[S, 2] and not c[S, 4] and c[S, 0] and c[S, 1]  # no I- first
    assert not c[0, 2] and c[1, 2] and c[2, 2] and not c[3, 2] and not c[4, 2]  # I-PER after B/I-PER only
    assert c[2, 0] and c[2, 3] and c[4, 1]  # leaving a chunk is free
    assert c[:5, E].all() and not c[:, S].any() and not c[E].any()


def valid_iob2(tags):
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        prev = t
    return True


def test_crf_constraints_respected():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    L = len(labels)
    g = torch.Generator().manual_seed(5)
    em = torch.randn(16, 6, L, generator=g) * 3
    em[:, :, 2] += 4  # emissions shout I-PER everywhere
    em[:, :, 4] += 3
    mask = torch.arange(6)[None, :] < torch.randint(1, 7, (16,), generator=g)[:, None]
    plain = CRF(L)
    assert any(not valid_iob2([labels[i] for i in p]) for p in plain.decode(em, mask))
    crf = random_crf(L, iob2_constraints(labels), seed=6)
    decoded = crf.decode(em, mask)
    assert all(valid_iob2([labels[i] for i in p]) for p in decoded)
    for b in range(4):  # and the constrained Viterbi is the best valid path
        n = int(mask[b].sum())
        _, ref, _ = brute_force(crf, em[b], n)
        assert decoded[b] == ref and valid_iob2([labels[i] for i in ref])
    tags = torch.tensor([[1, 2, 0, 3, 4, 4]])
    assert torch.isfinite(crf.nll(em[:1], tags, None))
    # a (L, L) matrix constrains only tag-to-tag transitions
    inner = CRF(L, iob2_constraints(labels)[:L, :L])
    assert inner._penalty[L, :L].eq(0).all() and inner._penalty[0, 2] < -1e3


def test_crf_errors():
    with pytest.raises(ConfigError, match="shape"):
        CRF(3, torch.ones(4, 4, dtype=torch.bool))
    crf = CRF(3)
    em = torch.zeros(2, 4, 3)
    with pytest.raises(ConfigError, match="reduction"):
        crf.nll(em, torch.zeros(2, 4, dtype=torch.long), None, reduction="avg")
    with pytest.raises(ValueError, match="mask shape"):
        crf.log_partition(em, torch.ones(2, 3, dtype=torch.bool))


def test_crf_state_dict_has_only_the_parameters():
    crf = CRF(4, iob2_constraints(["O", "B-X", "I-X", "B-Y"]))
    assert sorted(crf.state_dict()) == ["end", "start", "transitions"]


def test_pool():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    torch.testing.assert_close(pool(h, mask, "mean")[0], h[0, :3].mean(0))
    torch.testing.assert_close(pool(h, mask, "mean")[1], h[1].mean(0))
    torch.testing.assert_close(pool(h, None, "mean"), h.mean(1))
    with pytest.raises(ConfigError, match="'max'"):
        pool(h, mask, "max")


def test_sequence_classifier_is_dropout_then_linear_on_the_pooled_vector():
    torch.manual_seed(0)
    head = SequenceClassifier(8, 3, dropout=0.1, pooling="mean").eval()
    h, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = head(h, mask)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, head.classifier(pool(h, mask, "mean")))
    cls = SequenceClassifier(8, 3)
    torch.testing.assert_close(cls.eval()(h, mask), cls.classifier(h[:, 0]))
    assert cls.classifier.bias.eq(0).all() and 0.01 < cls.classifier.weight.std() < 0.04
    assert cls.train()(h, mask).shape == (2, 3)
    with pytest.raises(ConfigError):
        SequenceClassifier(8, 3, pooling="max")


def test_token_classifier_and_span_head():
    h = torch.randn(2, 5, 8)
    tok = TokenClassifier(8, 4).eval()
    torch.testing.assert_close(tok(h), h @ tok.classifier.weight.T + tok.classifier.bias)
    span = SpanHead(8)
    start, end = span(h)
    assert start.shape == end.shape == (2, 5)
    both = span.qa_outputs(h)
    torch.testing.assert_close(start, both[..., 0])
    torch.testing.assert_close(end, both[..., 1])
