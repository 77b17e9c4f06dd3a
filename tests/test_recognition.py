"""Tests for recognition.py against a brute-force pure-Python reference (sorting, double loops, math.comb) on small
random data with ties, single-image identities and unlabelled rows, plus hand-computed cases and the error paths."""
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recognition  # noqa: E402
from recognition import SIM_DECIMALS, chance_hit, probe_ranks, recognition_metrics, verification  # noqa: E402


# ---------------------------------------------------------------------------------------------- reference

def ref_cos(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    return round(dot / (math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))),
                 SIM_DECIMALS)


def ref_metrics(mu: np.ndarray, labels: np.ndarray) -> dict:
    """Pure Python: sort each probe's gallery by similarity, impostors first among equals (pessimistic); AUC by
    comparing every genuine with every impostor pair; EER by walking the thresholds one by one."""
    rows = [(list(map(float, m)), int(y)) for m, y in zip(mu, labels) if y != -1]
    n = len(rows)
    sim = [[ref_cos(rows[i][0], rows[j][0]) for j in range(n)] for i in range(n)]
    ranks, chance = [], {1: [], 5: []}
    for i in range(n):
        gallery = [(sim[i][j], rows[j][1] == rows[i][1]) for j in range(n) if j != i]
        g = sum(same for _, same in gallery)
        if g == 0:
            continue
        order = sorted(gallery, key=lambda t: (-t[0], t[1]))  # equal similarity: impostor (False) first
        ranks.append(1 + [same for _, same in order].index(True))
        for k in chance:
            chance[k].append(1 - math.comb(n - 1 - g, k) / math.comb(n - 1, k))
    pairs = [(sim[i][j], rows[i][1] == rows[j][1]) for i in range(n) for j in range(i + 1, n)]
    gen = [s for s, same in pairs if same]
    imp = [s for s, same in pairs if not same]
    auc = sum((g > x) + 0.5 * (g == x) for g in gen for x in imp) / (len(gen) * len(imp))
    points = []
    for t in sorted({s for s, _ in pairs}) + [math.inf]:
        points.append((sum(x >= t for x in imp) / len(imp), sum(g < t for g in gen) / len(gen)))
    for (far0, frr0), (far1, frr1) in zip(points, points[1:]):
        if far1 - frr1 <= 0:
            a = (far0 - frr0) / ((far0 - frr0) - (far1 - frr1))
            eer = far0 + a * (far1 - far0)
            break
    return {"rank1": sum(r <= 1 for r in ranks) / len(ranks), "rank5": sum(r <= 5 for r in ranks) / len(ranks),
            "chance_rank1": sum(chance[1]) / len(ranks), "chance_rank5": sum(chance[5]) / len(ranks),
            "n_probes": len(ranks), "n_single": n - len(ranks), "n_genuine_pairs": len(gen),
            "n_impostor_pairs": len(imp), "eer": eer, "roc_auc": auc, "ranks": ranks}


def tied_data(seed: int, n: int = 40, d: int = 3):
    """Small-integer embeddings (many exactly tied similarities), 8 identities of 1..9 images, 3 unlabelled rows."""
    rng = np.random.default_rng(seed)
    mu = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    mu[(mu == 0).all(axis=1)] = 1.0  # no zero embedding
    labels = rng.choice(8, size=n, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.025, 0.025])
    labels[rng.choice(n, 3, replace=False)] = -1
    return mu, labels


def check_against_reference(mu, labels):
    got, ref = recognition_metrics(mu, labels), ref_metrics(mu, labels)
    for key in ("n_probes", "n_single", "n_genuine_pairs", "n_impostor_pairs"):
        assert got[key] == ref[key], key
    for key in ("rank1", "rank5", "chance_rank1", "chance_rank5", "eer", "roc_auc"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    ranks = probe_ranks(mu, labels)
    assert sorted(ranks[ranks > 0].tolist()) == sorted(ref["ranks"])
    return got


# ---------------------------------------------------------------------------------------------- against reference

@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_brute_force_reference_with_many_ties(seed):
    mu, labels = tied_data(seed)
    got = check_against_reference(mu, labels)
    assert got["n_unlabelled"] == 3 and got["n_images"] == 40


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_brute_force_reference_on_gaussian_embeddings_with_singletons(seed):
    rng = np.random.default_rng(100 + seed)
    labels = np.concatenate([np.repeat(np.arange(6), rng.integers(2, 6, size=6)), np.arange(6, 11)])  # 5 singles
    centres = rng.normal(size=(11, 16))
    mu = centres[labels] + rng.normal(scale=1.0, size=(len(labels), 16))
    got = check_against_reference(mu, labels)
    assert got["n_single"] == 5


def test_chunked_similarity_gives_the_same_result(monkeypatch):
    mu, labels = tied_data(7, n=50)
    whole = recognition_metrics(mu, labels)
    ranks = probe_ranks(mu, labels)
    monkeypatch.setattr(recognition, "CHUNK", 7)  # 50 rows in 8 blocks, the last one short
    assert recognition_metrics(mu, labels) == whole
    np.testing.assert_array_equal(probe_ranks(mu, labels), ranks)


def test_results_do_not_depend_on_row_order():
    mu, labels = tied_data(3)
    perm = np.random.default_rng(0).permutation(len(labels))
    # equal up to the summation order of the means
    assert recognition_metrics(mu[perm], labels[perm]) == pytest.approx(recognition_metrics(mu, labels), abs=1e-15)
    np.testing.assert_array_equal(probe_ranks(mu[perm], labels[perm]), probe_ranks(mu, labels)[perm])


# ---------------------------------------------------------------------------------------------- conventions

def test_tie_between_genuine_and_impostor_is_pessimistic():
    # probe a; its genuine b and the impostor c have identical embeddings, so S[a, b] == S[a, c]
    mu = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    labels = np.array([0, 0, 1, 1])
    ranks = probe_ranks(mu, labels)
    assert ranks[0] == 2  # c ranks ahead of b
    assert ranks[1] == 2  # b's nearest (similarity 1) is c, an impostor, then a
    assert ranks[2] == 3  # c's genuine d points away: b and a rank ahead of it


def test_identical_embeddings_far_apart_in_a_large_matrix_tie():
    # rows 0 and 1028 are identical; the similarity of probe 1026 to them comes from different parts of the matrix
    # product (with OpenBLAS here it differs by 1.4e-17). The rounding must make them tie, so the pessimistic
    # rank holds: 0 is probe 1026's genuine, 1028 an impostor that ties with it.
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(1030, 1024)).astype(np.float32)
    mu[1028] = mu[0]
    labels = np.arange(1030)
    labels[1026] = 0
    x = mu.astype(np.float64) / np.linalg.norm(mu.astype(np.float64), axis=1, keepdims=True)
    s = np.round(x[1026] @ x.T, SIM_DECIMALS)  # one row: a matrix-vector product
    better = int((s > s[0]).sum() - 1)  # impostors strictly ahead of the genuine, minus the probe itself
    assert probe_ranks(mu, labels)[1026] == better + 2  # + 1 for rank, + 1 for the tied impostor ahead of it


def test_all_embeddings_equal_give_no_rank1_hit_and_chance_auc():
    mu = np.ones((6, 4))
    labels = np.array([0, 0, 1, 1, 2, 2])
    m = recognition_metrics(mu, labels)
    assert m["rank1"] == 0.0 and m["rank5"] == 1.0  # 4 impostors tie ahead of the genuine: rank 5
    assert m["roc_auc"] == 0.5 and m["eer"] == 0.5
    assert m["chance_rank1"] == pytest.approx(1 / 5)


def test_perfectly_separated_identities_give_rank1_one_eer_zero_auc_one():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 3)
    mu = np.eye(5)[labels] * 10 + rng.normal(scale=0.01, size=(15, 5))
    m = recognition_metrics(mu, labels)
    assert (m["rank1"], m["eer"], m["roc_auc"]) == (1.0, 0.0, 1.0)
    assert m["n_genuine_pairs"] == 5 * 3 and m["n_impostor_pairs"] == 15 * 14 // 2 - 15


def test_verification_hand_computed_example():
    # genuine 0.9, 0.6; impostor 0.7, 0.1. AUC: 3 of the 4 (genuine, impostor) pairs are ordered right.
    # thresholds 0.1, 0.6, 0.7, 0.9, inf: FAR 1, .5, .5, 0, 0; FRR 0, 0, .5, .5, 1 -> they meet at t = 0.7: EER 0.5
    m = verification(np.array([0.9, 0.7, 0.6, 0.1]), np.array([True, False, True, False]))
    assert m == {"eer": 0.5, "roc_auc": 0.75, "tar@far=0.01": None, "tar@far=0.001": None}  # 2 impostor pairs


def test_verification_eer_interpolates_between_operating_points():
    # genuine 0.8, 0.4; impostor 0.6, 0.2, 0.1, 0.0. Points at t = 0.4: FAR 1/4, FRR 0; t = 0.6: FAR 1/4, FRR 1/2
    # -> segment crossing at FAR = FRR = 1/4
    m = verification(np.array([0.8, 0.4, 0.6, 0.2, 0.1, 0.0]), np.array([True, True, False, False, False, False]))
    assert m["eer"] == pytest.approx(0.25) and m["roc_auc"] == pytest.approx(7 / 8)


def test_chance_level_equals_exhaustive_enumeration_of_rankings():
    gallery, genuine = 6, np.array([1, 2, 3])
    for k in (1, 2, 5, 6, 9):
        expected = []
        for g in genuine:
            items = [True] * g + [False] * (gallery - g)
            orders = list(itertools.permutations(items))
            expected.append(sum(any(o[:k]) for o in orders) / len(orders))
        np.testing.assert_allclose(chance_hit(gallery, genuine, k), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- input checks

def test_unlabelled_rows_are_dropped_and_counted():
    mu, labels = tied_data(5)
    keep = labels != -1
    with_unlabelled, without = recognition_metrics(mu, labels), recognition_metrics(mu[keep], labels[keep])
    assert with_unlabelled.pop("n_unlabelled") == 3 and without.pop("n_unlabelled") == 0
    assert with_unlabelled.pop("n_images") == 40 and without.pop("n_images") == 37
    assert with_unlabelled == without
    assert (probe_ranks(mu, labels)[~keep] == 0).all()


@pytest.mark.parametrize("labels, match", [
    ([0, 1, 2, 3], "all 4 labelled images have distinct identities"),
    ([0, 1, 2, -1, -1], r"distinct identities \(2 unlabelled dropped\)"),
    ([4, 4, 4, 4], "at least 2 identities"),
    ([-1, -1, -1, -1], "at least 2 identities"),
    ([0, 0, 1, -2], "1 labels below -1"),
])
def test_sets_that_cannot_be_evaluated_raise_a_clear_error(labels, match):
    labels = np.array(labels)
    with pytest.raises(ValueError, match=match):
        recognition_metrics(np.random.default_rng(0).normal(size=(len(labels), 3)), labels)


def test_bad_embeddings_and_shapes_raise_a_clear_error():
    mu, labels = np.random.default_rng(0).normal(size=(4, 3)), np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"expected \(N, D\) and \(N,\)"):
        recognition_metrics(mu, labels[:3])
    with pytest.raises(ValueError, match="expected integer identities"):
        recognition_metrics(mu, labels.astype(float))
    bad = mu.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 4 labelled embeddings hold NaN or inf"):
        recognition_metrics(bad, labels)
    bad[2] = 0.0
    with pytest.raises(ValueError, match="1 of 4 labelled embeddings are all zero"):
        recognition_metrics(bad, labels)
    bad[2] = np.nan  # an unlabelled row is dropped before the checks
    assert recognition_metrics(np.vstack([mu, bad[2:3]]), np.append(labels, -1))["n_unlabelled"] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_at_far_equals_scikit_learns_roc_curve_with_ties(seed):
    """TAR at FAR x against an independent implementation used only here: scikit-learn's roc_curve (a pair is
    accepted when score >= threshold; every distinct score is a threshold), the highest TPR with FPR <= x."""
    from sklearn.metrics import roc_curve
    rng = np.random.default_rng(seed)
    scores = np.round(np.concatenate([rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 5000)]), 2)  # many ties
    same = np.arange(len(scores)) < 400
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    m = verification(scores, same)
    for x in recognition.FARS:
        assert m[f"tar@far={x:g}"] == pytest.approx(tpr[fpr <= x].max(), abs=1e-12), x
    assert 0 < m["tar@far=0.001"] < m["tar@far=0.01"] < 1


def test_tar_at_far_is_none_where_too_few_impostor_pairs_measure_it():
    scores, same = np.linspace(0, 1, 300), np.arange(300) >= 150  # 150 impostor pairs: FAR steps of 1/150
    m = verification(scores, same)
    assert m["tar@far=0.01"] == 1.0 and m["tar@far=0.001"] is None


def test_a_collapsed_embedding_is_named_a_healthy_one_is_not():
    labels = np.repeat(np.arange(6), 3)
    rng = np.random.default_rng(0)
    same = recognition_metrics(np.tile(rng.normal(size=8), (18, 1)) + 1e-13 * rng.normal(size=(18, 8)), labels)
    assert same["warning"] == "collapsed embedding: every image has the same vector" and same["rank1"] == 0.0
    v = rng.normal(size=8)
    two = recognition_metrics(np.outer(np.where(np.arange(18) % 2, 1.0, -1.0), v), labels)  # +v and -v only
    assert two["warning"] == "collapsed embedding: the vectors vary along one direction only (rank 1)"
    assert "warning" not in recognition_metrics(rng.normal(size=(18, 8)), labels)


def test_the_eval_report_shows_tar_at_far_and_the_collapse_warning():
    import eval as ev
    m = {"tar@far=0.01": 0.5, "tar@far=0.001": None, "warning": "collapsed embedding: every image has the same vector"}
    assert ev.tar_text(m) == "TAR@FAR=1e-02 0.500  TAR@FAR=1e-03 -"
    assert ev.warning_lines(m) == ["  warning: collapsed embedding: every image has the same vector: these figures "
                                   "describe no embedding"]
    assert ev.warning_lines({}) == []
