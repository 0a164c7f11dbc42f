"""Tuning decides as prediction does: the F1 the search reports is the F1 the settings give, at ties too;
decision rules beyond one threshold are kept only where they raise the F1 on held-out halves."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_matrix

from jjvmed.fusion import Decision, Fusion, ImageScores, MemberScores, Part, Ranked, decide, predict_from_scores
from jjvmed.scores import concept_scores, image_f1
from jjvmed.tuning import (
    COUNT_SCALES,
    RELATIVE_GRID,
    THRESHOLDS,
    best_count_scale,
    best_relative,
    f1_per_image,
    gt_columns,
    held_out_f1,
    scored,
    truth_for,
)

SPACE = [f"C{n:07d}" for n in range(6)]


class OneMember:
    """The little of a ConceptIndex that settings_of needs: one member's label."""

    class Member:
        label = "llava"

    members = [Member()]


def uniform_knn_scores(n: int, k: int, seed: int) -> tuple[ImageScores, dict]:
    """kNN over k neighbours, each counting 1/k: a CUI carried by j of them scores j x float32(1/k), so scores
    sit exactly on the threshold grid (one vote of 100 is float32(0.01))."""
    rng = np.random.default_rng(seed)
    train_labels = (rng.random((k * 2, len(SPACE))) < 0.3).astype(np.float32)
    labels = csr_matrix(train_labels)
    neighbours = np.stack([rng.permutation(k * 2)[:k] for _ in range(n)])
    ids = [f"img_{i}" for i in range(n)]
    gt = {i: tuple(c for c, on in zip(SPACE, rng.random(len(SPACE)) < 0.35, strict=True) if on) or ("",)
          for i in ids}
    member = MemberScores(np.ones((n, k), np.float32), neighbours, None)
    return ImageScores(ids, SPACE, np.ones(n, bool), [member], None, labels), gt


def test_the_f1_the_threshold_search_reports_is_the_f1_of_the_written_predictions_at_ties():
    from jjvmed.fusion import settings_of

    s, gt = uniform_knn_scores(n=300, k=100, seed=0)
    fusion = Fusion((Part(knn=1.0, k=100),))
    cand, r, _ = scored("knn", s, fusion, gt)
    assert np.isin(r.scores[r.scores > 0], THRESHOLDS).any()  # ties with the grid do occur here
    pred = predict_from_scores(s, settings_of(fusion, cand.decision, SPACE, OneMember, "knn"))
    official = concept_scores(gt, {i: tuple(c) or ("",) for i, c in pred.items()})[0]["f1"]
    assert official == pytest.approx(cand.f1, abs=1e-9)


def test_every_decision_rule_scores_as_the_official_f1_of_what_it_keeps():
    rng = np.random.default_rng(1)
    n = 200
    ids = [f"img_{i}" for i in range(n)]
    gt = {i: tuple(rng.choice(SPACE, size=int(rng.integers(1, 4)), replace=False)) for i in ids}
    scores = np.sort(rng.choice(THRESHOLDS[:60], size=(n, 6)) * (rng.random((n, 6)) < 0.8), 1)[:, ::-1]
    cols = np.argsort(rng.random((n, 6)), 1)
    cols[scores <= 0] = -1
    r = Ranked(cols, scores.astype(np.float32))
    s = ImageScores(ids, SPACE, np.ones(n, bool), [], None, None)
    t = truth_for(r, s, gt)
    decisions = [Decision(0.2, True), Decision(0.3, False, relative=0.6), Decision(count_scale=0.8)]
    for decision in decisions:
        chosen = decide(r, decision)
        for row in range(n):
            pred = tuple(SPACE[c] for c in r.cols[row][chosen[row]]) or ("",)
            assert f1_per_image(r, t, decision)[row] == pytest.approx(image_f1(gt[ids[row]], pred))
    # the fast searches report the F1 that deciding with their choice gives, and the best on their grid
    for search, grid, make in ((best_relative, RELATIVE_GRID, lambda x: Decision(0.01, True, relative=x)),
                               (best_count_scale, COUNT_SCALES, lambda x: Decision(count_scale=x))):
        decision, f1 = search(r, t)
        assert f1 == pytest.approx(f1_per_image(r, t, decision).mean())
        assert f1 >= max(f1_per_image(r, t, make(x)).mean() for x in grid) - 1e-9


def test_a_threshold_relative_to_the_top_score_is_kept_where_no_single_threshold_works():
    """Half the images score their true CUIs 0.3 and wrong ones 0.1; the other half 0.9 and 0.35: no threshold
    separates both (0.3 true, 0.35 wrong), half the top score does, and the held-out halves confirm it."""
    rng = np.random.default_rng(2)
    n = 120
    ids = [f"img_{i}" for i in range(n)]
    rows, gt = [], {}
    for i in ids:
        true = list(rng.choice(6, size=2, replace=False))
        wrong = [c for c in range(6) if c not in true][:2]
        high = rng.random() < 0.5
        rows.append((true + wrong, [0.9, 0.9, 0.35, 0.35] if high else [0.3, 0.3, 0.1, 0.1]))
        gt[i] = tuple(SPACE[c] for c in true)
    r = Ranked(np.array([c for c, _ in rows]), np.array([v for _, v in rows], np.float32))
    s = ImageScores(ids, SPACE, np.ones(n, bool), [], None, None)
    t = truth_for(r, s, gt)
    cols = gt_columns(s, gt)
    plain = held_out_f1("threshold", r, t, cols, len(SPACE))
    relative = held_out_f1("relative to the top", r, t, cols, len(SPACE))
    assert plain < 0.9 and relative == pytest.approx(1.0)


def test_tuned_knn_settings_predict_what_tuning_scored_when_training_images_tie(tmp_path):
    """Every training vector five times over (duplicated images), each copy with other CUIs: at k < 100 the
    k nearest include some copies of a vector and leave others out. Tuning reads k neighbours off its search
    at k = 100, prediction searches at k: both must pick the same copies, so the F1 tuning reports is the F1
    of the settings' predictions."""
    from jjvmed.embeddings import Embeddings
    from jjvmed.fusion import image_scores, predict_concepts, settings_of
    from jjvmed.index import fit_index
    from jjvmed.tuning import K_GRID

    rng = np.random.default_rng(0)
    encoder = {"family": "timm", "name": "stand-in", "source": "timm:/models/stand-in", "pooling": "default",
               "weights": "w", "image_size": [224, 224]}
    base = rng.normal(size=(60, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    train_vectors = np.repeat(base, 5, axis=0)
    train_ids = [f"t{i}" for i in range(len(train_vectors))]
    cuis = [f"C{n:07d}" for n in range(8)]
    concepts = {i: list(rng.choice(cuis, size=2, replace=False)) for i in train_ids}
    index = fit_index(Embeddings(train_ids, [train_vectors], [encoder]), concepts, tmp_path / "index", None)
    queries = base[rng.integers(0, 60, 400)] + 0.3 * rng.normal(size=(400, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    valid_ids = [f"v{i}" for i in range(400)]
    valid = Embeddings(valid_ids, [queries], [encoder])
    gt = {i: tuple(rng.choice(cuis, size=2, replace=False)) for i in valid_ids}
    searched = image_scores(index, valid, sorted(valid_ids), None, max(K_GRID))
    for k in (1, 2, 3, 5, 10):
        fusion = Fusion((Part(knn=1.0, k=k),))
        cand, _, _ = scored("knn", searched, fusion, gt)
        settings = settings_of(fusion, cand.decision, searched.space, index, "knn")
        predicted = predict_concepts(index, settings, valid)
        assert predicted == predict_from_scores(searched, settings), k
        official = concept_scores(gt, {i: tuple(c) or ("",) for i, c in predicted.items()})[0]["f1"]
        assert official == pytest.approx(cand.f1, abs=1e-9), k
