"""Ear recognition from embeddings: closed-set identification (rank-1, rank-5) and verification (EER, ROC AUC).

One split, all-vs-all, cosine similarity. Every labelled image is a probe against all *other* labelled images as
the gallery (leave-one-out), so no enrolment split is needed:

    mu (N, D), labels (N,) int, -1 = unlabelled
      -> drop unlabelled rows (counted in "n_unlabelled")
      -> S = cosine similarity (N', N'), rounded to SIM_DECIMALS
      -> identification: per probe, the rank of its best genuine match among the other images
      -> verification: every unordered pair (i < j), genuine = same identity

Conventions (tested in tests/test_recognition.py):
- Ties are pessimistic: an impostor whose similarity equals the probe's best genuine similarity ranks *ahead* of
  it. rank = 1 + #{impostors j : S[i, j] >= max genuine S[i, g]}. A probe whose embedding equals every other
  image's (all similarities tied) therefore never counts as a rank-1 hit. Verification ties count half in the AUC
  (Mann-Whitney) and lie on one ROC point for the EER.
- Similarities are rounded to SIM_DECIMALS decimals before any comparison, so that two similarities that differ
  only by floating-point summation order (identical embeddings at different positions in the matrix product) tie
  instead of being ordered by rounding noise.
- A probe whose identity has no other image cannot be identified: it is excluded from rank-k and counted in
  "n_single"; it still takes part in verification (as impostor pairs) and in every other probe's gallery.
- Chance level of rank-k: the expected hit rate of a uniformly random gallery ranking, per probe
  1 - C(M - g, k) / C(M, k) (M = gallery size, g = genuine images in it), averaged over the probes.
- EER: the point where the ROC segment between the two operating points that bracket FAR == FRR crosses the
  diagonal (linear interpolation). Accept a pair when S >= threshold.
- TAR at FAR x (face recognition's operating points, IJB-C; 1 - TAR is the FNMR at FMR x): the highest TAR of an
  operating point whose FAR is at most x, no interpolation (scikit-learn's roc_curve gives the same points). None
  where fewer than 1 / x impostor pairs exist: no threshold can measure a FAR that small.
"""
from __future__ import annotations

import numpy as np

SIM_DECIMALS = 9  # cosine similarities are compared after rounding to 1e-9
RANKS = (1, 5)  # identification ranks reported
FARS = (1e-2, 1e-3)  # verification operating points reported: TAR at these FARs
UNLABELLED = -1  # label of an image whose identity is unknown
CHUNK = 1024  # probe rows per block of the similarity matrix (a (CHUNK, N) float64 block at a time)


def recognition_metrics(mu: np.ndarray, labels: np.ndarray) -> dict:
    """mu: (N, D) embeddings, labels: (N,) integer identities (UNLABELLED = -1 for unknown) -> a JSON-ready dict:

        n_images, n_unlabelled (dropped), n_identities (among the labelled),
        n_probes (identifiable: identity with >= 2 images), n_single (probes excluded: identity with 1 image),
        rank1, rank5, chance_rank1, chance_rank5 (fractions of n_probes),
        n_genuine_pairs, n_impostor_pairs, eer, roc_auc, tar@far=0.01, tar@far=0.001 (None: too few impostor pairs)
        warning (only where the embedding collapsed: spread_problem)

    Raises ValueError (naming the value and what is expected) for bad shapes, non-finite or zero embeddings,
    labels below -1, and sets with nothing to identify (every identity has one image) or to verify against
    (one identity only).
    """
    emb, ids, n_unlabelled = _labelled(mu, labels)
    ranks = _ranks(emb, ids)  # (N',) 0 = not a probe
    probes = ranks > 0
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    gallery = len(ids) - 1  # M: every other labelled image
    genuine = counts[inverse][probes] - 1  # (P,) g: the probe's other images
    out = {"n_images": int(len(mu)), "n_unlabelled": n_unlabelled, "n_identities": int(len(counts)),
           "n_probes": int(probes.sum()), "n_single": int((~probes).sum())}
    for k in RANKS:
        out[f"rank{k}"] = float(np.mean(ranks[probes] <= k))
    for k in RANKS:
        out[f"chance_rank{k}"] = float(np.mean(chance_hit(gallery, genuine, k)))
    scores, same = pair_scores(emb, ids)
    out.update(n_genuine_pairs=int(same.sum()), n_impostor_pairs=int((~same).sum()), **verification(scores, same))
    if problem := spread_problem(emb):
        out["warning"] = problem
    return out


def spread_problem(emb: np.ndarray) -> str | None:
    """Why figures measured on these unit-norm embeddings (N, D) describe no embedding at all, or None: every image
    has the same vector (to SIM_DECIMALS), or the vectors vary along one direction only (their centred matrix has
    rank 1: the similarity orders images by one number). A collapsed model (a student whose BatchNorm statistics
    were never estimated) gives the first."""
    centred = emb - emb.mean(axis=0)  # (N, D)
    s = np.linalg.svd(centred, compute_uv=False)  # singular values, descending
    if s[0] < 10.0 ** -SIM_DECIMALS * np.sqrt(len(emb)):
        return "collapsed embedding: every image has the same vector"
    if len(s) < 2 or s[1] < 1e-6 * s[0]:
        return "collapsed embedding: the vectors vary along one direction only (rank 1)"
    return None


def _labelled(mu: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate; drop unlabelled rows -> (unit-norm float64 embeddings (N', D), labels (N',), n_unlabelled)."""
    mu, labels = np.asarray(mu), np.asarray(labels)
    if mu.ndim != 2 or labels.shape != (len(mu),):
        raise ValueError(f"embeddings {mu.shape} and labels {labels.shape}: expected (N, D) and (N,)")
    if problem := label_problem(labels):
        raise ValueError(problem)
    keep = labels != UNLABELLED
    mu, labels = mu[keep].astype(np.float64), labels[keep]
    bad = ~np.isfinite(mu).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(mu)} labelled embeddings hold NaN or inf")
    norm = np.linalg.norm(mu, axis=1, keepdims=True)  # (N', 1)
    if (norm == 0).any():
        raise ValueError(f"{int((norm == 0).sum())} of {len(mu)} labelled embeddings are all zero: "
                         f"cosine similarity is undefined for them")
    return mu / norm, labels, int((~keep).sum())


def label_problem(labels: np.ndarray) -> str | None:
    """Why identity labels (N,) cannot be scored by recognition_metrics whatever the embeddings, or None: not integers,
    below UNLABELLED, fewer than 2 identities, or no identity with 2 labelled images. Cheap: eval.py asks it before
    the pass over the images."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        return f"labels of dtype {labels.dtype}: expected integer identities ({UNLABELLED} = unlabelled)"
    if (labels < UNLABELLED).any():
        return (f"{int((labels < UNLABELLED).sum())} labels below {UNLABELLED}: expected identities >= 0, or "
                f"{UNLABELLED} for an unlabelled image")
    labelled = labels[labels != UNLABELLED]
    n_dropped, n_ids = len(labels) - len(labelled), len(np.unique(labelled))
    if n_ids < 2:
        return (f"{len(labelled)} labelled images ({n_dropped} unlabelled dropped) of {n_ids} identities: "
                f"verification needs at least 2 identities")
    if n_ids == len(labelled):
        return (f"all {len(labelled)} labelled images have distinct identities ({n_dropped} unlabelled dropped): "
                f"nothing to identify or verify; at least one identity needs 2 images")
    return None


def _similarity(emb: np.ndarray, rows: slice) -> np.ndarray:
    """Cosine similarity of unit-norm emb[rows] against all of emb, rounded to SIM_DECIMALS -> (R, N) float64."""
    return np.round(emb[rows] @ emb.T, SIM_DECIMALS)


def probe_ranks(mu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image identification ranks, aligned with the input rows (e.g. for a per-image CSV): mu (N, D), labels
    (N,) as in recognition_metrics -> (N,) int64, the 1-based rank of each probe's best genuine match among the
    other labelled images (pessimistic ties); 0 for an unlabelled image or one whose identity has no other image.
    Raises the same ValueErrors as recognition_metrics."""
    emb, ids, _ = _labelled(mu, labels)
    ranks = np.zeros(len(labels), dtype=np.int64)
    ranks[np.asarray(labels) != UNLABELLED] = _ranks(emb, ids)
    return ranks


def _ranks(emb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """emb: (N, D) unit-norm, ids: (N,) identities >= 0 -> (N,) int64 ranks (0: not a probe), see probe_ranks."""
    n = len(ids)
    ranks = np.zeros(n, dtype=np.int64)
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        s = _similarity(emb, rows)  # (R, N)
        r = np.arange(rows.stop - rows.start)  # (R,)
        own = np.zeros_like(s, dtype=bool)
        own[r, r + start] = True  # the probe itself is not in its gallery
        genuine = (ids[rows, None] == ids[None, :]) & ~own  # (R, N)
        best = np.where(genuine, s, -np.inf).max(axis=1)  # (R,) -inf: no genuine match
        ahead = (~genuine & ~own & (s >= best[:, None])).sum(axis=1)  # (R,) impostors at or above it
        ranks[rows] = np.where(genuine.any(axis=1), 1 + ahead, 0)
    return ranks


def chance_hit(gallery: int, genuine: np.ndarray, k: int) -> np.ndarray:
    """P(at least one of `genuine` (P,) images is among the first k of a uniformly random ordering of `gallery`
    images) = 1 - C(M - g, k) / C(M, k) -> (P,) float64."""
    miss = np.ones(len(genuine))
    for t in range(min(k, gallery)):
        miss *= np.maximum(gallery - genuine - t, 0) / (gallery - t)  # t-th draw is an impostor too
    return 1.0 - miss


def pair_scores(emb: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair i < j -> (similarities (N(N-1)/2,) float64, same identity (N(N-1)/2,) bool)."""
    n = len(ids)
    scores, same = [], []
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        s = _similarity(emb, rows)  # (R, N)
        upper = np.arange(n)[None, :] > np.arange(rows.start, rows.stop)[:, None]  # (R, N) j > i
        scores.append(s[upper])
        same.append((ids[rows, None] == ids[None, :])[upper])
    return np.concatenate(scores), np.concatenate(same)


def verification(scores: np.ndarray, same: np.ndarray) -> dict[str, float | None]:
    """scores (P,), same (P,) bool, both classes present -> {"eer", "roc_auc", "tar@far=X" for X in FARS}.

    AUC = P(genuine score > impostor score) + 0.5 P(equal). EER: over the thresholds t = each distinct score and
    +inf, FAR(t) = P(impostor >= t) falls from 1 to 0 and FRR(t) = P(genuine < t) rises from 0 to 1; between the
    last t with FAR > FRR and the next one the ROC segment is interpolated to FAR == FRR."""
    values, inverse = np.unique(scores, return_inverse=True)  # ascending distinct scores
    gen = np.bincount(inverse, weights=same, minlength=len(values))  # (U,) genuine pairs at each score
    imp = np.bincount(inverse, weights=~same, minlength=len(values))  # (U,) impostor pairs at each score
    n_gen, n_imp = gen.sum(), imp.sum()
    imp_below = np.cumsum(imp) - imp  # (U,) impostors strictly below each score
    auc = (gen * (imp_below + 0.5 * imp)).sum() / (n_gen * n_imp)
    # operating points at t = values[0], ..., values[-1], +inf
    far = np.append(imp[::-1].cumsum()[::-1], 0.0) / n_imp  # (U + 1,) impostors >= t
    frr = np.append(0.0, gen.cumsum()) / n_gen  # (U + 1,) genuine < t
    d = far - frr  # non-increasing, from 1 to -1
    k = int(np.argmax(d <= 0))  # first point at or past the crossing; k >= 1 since d[0] == 1
    a = d[k - 1] / (d[k - 1] - d[k])  # where the segment (k - 1, k) crosses the diagonal
    eer = far[k - 1] + a * (far[k] - far[k - 1])
    out = {"eer": float(eer), "roc_auc": float(auc)}
    for x in FARS:  # the highest TAR = 1 - FRR among the points with FAR <= x (far falls to 0 at t = +inf)
        out[f"tar@far={x:g}"] = float(1.0 - frr[far <= x].min()) if n_imp * x >= 1 else None
    return out
