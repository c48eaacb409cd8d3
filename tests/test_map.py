"""mAP against a slow, obviously-correct reference."""
import math

import pytest
import torch

from mclfir_dist.evaluation.metrics import average_precision, continual_metrics, mean_average_precision


def reference_ap(q_emb, q_lab, c_emb, c_lab):
    aps = []
    for i in range(len(q_emb)):
        scores = [float(sum(a * b for a, b in zip(q_emb[i].tolist(), c_emb[j].tolist()))) for j in range(len(c_emb))]
        ranking = sorted(range(len(c_emb)), key=lambda j: (-scores[j], j))  # ties: candidate order
        hits, precisions = 0, []
        for r, j in enumerate(ranking, start=1):
            if int(c_lab[j]) == int(q_lab[i]):
                hits += 1
                precisions.append(hits / r)
        aps.append(sum(precisions) / len(precisions) if precisions else float("nan"))
    return aps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_matches_reference_with_ties_and_empty_queries(seed):
    g = torch.Generator().manual_seed(seed)
    # integer-valued embeddings in {-1,0,1}: dot products are exact, so ties are real ties
    q = torch.randint(-1, 2, (23, 4), generator=g).float()
    c = torch.randint(-1, 2, (57, 4), generator=g).float()
    c[10:20] = c[0]  # duplicated candidates => tied scores with different labels
    ql = torch.randint(0, 4, (23,), generator=g)
    cl = torch.randint(0, 4, (57,), generator=g)  # value 4 never among candidates: queries with no relevant one
    ql[:3] = 4
    got = average_precision(q, ql, c, cl, chunk=5)
    ref = reference_ap(q, ql, c, cl)
    for a, b in zip(got.tolist(), ref):
        if math.isnan(b):
            assert math.isnan(a)
        else:
            assert a == pytest.approx(b, abs=1e-12)
    m = mean_average_precision(q, ql, c, cl, chunk=7)
    valid = [b for b in ref if not math.isnan(b)]
    assert m["map"] == pytest.approx(sum(valid) / len(valid), abs=1e-12)
    assert m["queries_without_relevant"] == 3 and m["queries"] == 20


def test_perfect_and_worst_ranking():
    c = torch.eye(4)
    cl = torch.tensor([0, 1, 2, 3])
    assert mean_average_precision(torch.eye(4), cl, c, cl)["map"] == 1.0
    # relevant item ranked last of 4 => AP = 1/4
    q = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert average_precision(q, torch.tensor([0]), c, cl).item() == pytest.approx(0.25)


def test_continual_metrics():
    R = [{"a": 0.8}, {"a": 0.7, "b": 0.6}, {"a": 0.75, "b": 0.5, "c": 0.9}]
    m = continual_metrics(R, {"a": 0, "b": 1, "c": 2})
    assert m["average_map"] == pytest.approx((0.75 + 0.5 + 0.9) / 3)
    assert m["forgetting"] == pytest.approx({"a": 0.05, "b": 0.1})
    assert m["bwt"] == pytest.approx(((0.75 - 0.8) + (0.5 - 0.6)) / 2)


def test_forgetting_is_unknown_when_old_attributes_were_never_evaluated():
    """static_final_only: earlier increments are not run, so forgetting and BWT are NaN, not 0."""
    from mclfir_dist.evaluation.metrics import continual_metrics
    m = continual_metrics([{}, {"a": 0.7, "b": 0.6}], {"a": 0, "b": 1})
    assert m["average_map"] == pytest.approx(0.65)
    assert math.isnan(m["average_forgetting"]) and math.isnan(m["bwt"])
    one = continual_metrics([{"a": 0.7}], {"a": 0})
    assert one["average_forgetting"] == 0.0 and one["bwt"] == 0.0


def test_dataset_map_is_query_weighted_per_dataset():
    from mclfir_dist.evaluation.metrics import dataset_maps
    details = {"a": {"map": 0.9, "queries": 10}, "b": {"map": 0.3, "queries": 30}, "c": {"map": 0.5, "queries": 5}}
    out = dataset_maps(details, {"a": "fashionai", "b": "fashionai", "c": "darn"})
    assert out == pytest.approx({"fashionai": (0.9 * 10 + 0.3 * 30) / 40, "darn": 0.5})


class _Manifest:
    """The parts of a Manifest that attribute_leakage reads."""

    def __init__(self, names, query, candidate, query_draw=0):
        self.attributes, self._sets = names, {"query": query, "candidate": candidate}
        self.query_draw = query_draw

    def attribute_index(self, name):
        return self.attributes.index(name)

    def eval_set(self, split, attribute):
        return self._sets


def reference_leakage(emb, labels, q, c, head_col, k):
    out = []
    for col in range(labels.shape[1]):
        shares, chances = [], []
        for i in q:
            if labels[i, col] < 0:
                continue
            scores = sorted(((float(emb[i] @ emb[j]), j) for j in c if j != i), key=lambda t: -t[0])[:k]
            shares.append(sum(labels[j, col] == labels[i, col] for _, j in scores) / min(k, len(c)))
            chances.append(sum(labels[j, col] == labels[i, col] for j in c) / len(c))
        out.append((float(sum(shares)) / len(shares), float(sum(chances)) / len(chances)))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_attribute_leakage_matches_a_plain_reference(seed):
    from mclfir_dist.evaluation.metrics import SplitEmbeddings, attribute_leakage
    g = torch.Generator().manual_seed(seed)
    n = 60
    labels = torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(-1, 4, (n,), generator=g)], dim=1)
    emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    keys = [f"k{i:03d}" for i in range(n)]
    q, c = list(range(0, 20)), list(range(15, 60))   # 5 queries are also candidates: never their own neighbour
    manifest = _Manifest(["colour", "pattern"], [keys[i] for i in q], [keys[i] for i in c])
    se = SplitEmbeddings(keys, labels, emb[:, None], emb, ["colour"], 0.0)
    got = attribute_leakage(manifest, "test", se, "colour", emb, k=10, chunk=7)
    want = reference_leakage(emb, labels, q, c, 0, 10)
    for name, (share, chance) in zip(["colour", "pattern"], want):
        assert got[name]["share"] == pytest.approx(share, abs=1e-4)
        assert got[name]["chance"] == pytest.approx(chance, abs=1e-4)


def test_a_head_that_only_sees_one_attribute_leaks_nothing_else():
    """Embeddings that encode colour alone: the colour head's top-10 share the colour (precision 1) and share
    the pattern at the chance rate, because pattern is drawn independently of colour."""
    from mclfir_dist.evaluation.metrics import SplitEmbeddings, attribute_leakage
    from mclfir_dist.evaluation.record import leakage_table, mean_excess_leakage
    n = 400
    g = torch.Generator().manual_seed(0)
    colour = torch.arange(n) % 4
    pattern = torch.randint(0, 4, (n,), generator=g)   # independent of colour
    emb = torch.nn.functional.one_hot(colour, 4).float() + 1e-3 * torch.randn(n, 4, generator=g)
    keys = [f"k{i:03d}" for i in range(n)]
    manifest = _Manifest(["colour", "pattern"], keys[:40], keys[40:])
    se = SplitEmbeddings(keys, torch.stack([colour, pattern], 1), emb[:, None], emb, ["colour"], 0.0)
    leak = attribute_leakage(manifest, "test", se, "colour", emb)
    assert leak["colour"]["share"] == 1.0
    assert abs(leak["pattern"]["share"] - leak["pattern"]["chance"]) < 0.08   # 400 neighbours: sd about 0.02
    results = {"map_details": [{"colour": {"map": 1.0, "leakage": leak}}]}
    assert "**100.0** (" in leakage_table(results)
    assert abs(mean_excess_leakage(results)) < 0.08


def test_a_query_draw_chooses_other_queries_among_the_same_images_per_value():
    from collections import Counter

    from mclfir_dist.evaluation.metrics import SplitEmbeddings, query_candidate_rows
    g = torch.Generator().manual_seed(3)
    n = 80
    labels = torch.randint(0, 4, (n, 1), generator=g)
    keys = [f"k{i:03d}" for i in range(n)]
    q = [i for i in range(n) if i % 4 == 0]
    c = [i for i in range(n) if i % 4 != 0 and i < 70]          # 70..79 are in neither set
    se = SplitEmbeddings(keys, labels, torch.zeros(n, 1, 2), torch.zeros(n, 2), ["colour"], 0.0)

    def rows(draw):
        manifest = _Manifest(["colour"], [keys[i] for i in q], [keys[i] for i in c], draw)
        dq, dc = query_candidate_rows(manifest, "test", "colour", se)
        return dq.tolist(), dc.tolist()

    assert rows(0) == (q, c)                                     # draw 0: the shard set's own sets
    values = labels[:, 0].tolist()
    for draw in (1, 2):
        dq, dc = rows(draw)
        assert rows(draw) == (dq, dc)                            # the same draw gives the same sets
        assert not set(dq) & set(dc) and sorted(dq + dc) == sorted(q + c)
        assert Counter(values[i] for i in dq) == Counter(values[i] for i in q)
        assert dq != q
    assert rows(1)[0] != rows(2)[0]
