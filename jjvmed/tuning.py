"""Choosing the concept settings on the validation split: k, neighbour weighting, the probe/kNN
blend, the generated-concept weight, a global threshold, keeping the top CUI and per-CUI thresholds,
each by the official primary F1 (scores.image_f1, computed exactly and vectorised here), then
checked by scores.concept_scores. This is what the 2025 winner did with CNN features: retrieval,
per-label thresholds, ensembles.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import scores
from .embeddings import Embeddings
from .errors import UserError, log
from .fusion import (
    SETTINGS_FORMAT,
    Fusion,
    ImageScores,
    Ranked,
    image_scores,
    predict_from_scores,
    ranked,
    threshold_matrix,
)
from .images import id_sort_key
from .index import ConceptIndex, resolve_device

# The tuning grids. kNN: neighbours, and how much closer neighbours count (0: all the same; else
# softmax of cosine / temperature: CLIP cosines of neighbours sit within a few hundredths).
# The grids. kNN: neighbours, and how much closer neighbours count (0: all the same; else softmax of
# cosine / temperature: CLIP cosines of neighbours sit within a few hundredths).
K_GRID = (1, 2, 3, 5, 10, 20, 30, 50, 100)
TEMPERATURES = (0.0, 0.1, 0.03, 0.01)
BLEND_GRID = (0.25, 0.5, 0.75)  # kNN's share when kNN and probe are blended
GENERATED_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # weight of a generated CUI
THRESHOLDS = np.round(np.arange(1, 200) * 0.01, 2)  # 0.01 .. 1.99: fused scores reach 2
MIN_SUPPORT = 5  # validation images that must carry a CUI before it gets its own threshold


@dataclass(frozen=True)
class Truth:
    """Ground truth of the scored images, laid over a Ranked: what the fast F1 needs."""
    hits: np.ndarray  # (n, M) bool: the ranked CUI is in the image's ground truth
    sizes: np.ndarray  # (n,) size of the ground-truth set (as the evaluator builds it, '' included)
    empty_hit: np.ndarray  # (n,) bool: '' is in the ground truth, so an empty prediction ('ID,') scores


def truth_for(r: Ranked, s: ImageScores, gt: dict[str, tuple[str, ...]]) -> Truth:
    column = {c: n for n, c in enumerate(s.space)}
    width = len(s.space) + 1
    codes = [n * width + column[c] for n, i in enumerate(s.ids) for c in {x.upper() for x in gt[i]} if c in column]
    hits = np.isin(np.arange(len(s.ids))[:, None] * width + r.cols, np.array(codes, np.int64)) & (r.cols >= 0)
    sizes = np.array([len({x.upper() for x in gt[i]}) for i in s.ids], np.int64)
    return Truth(hits, sizes, np.array(["" in gt[i] for i in s.ids], bool))


def f1_per_image(r: Ranked, t: Truth, thresholds, keep_top: bool) -> np.ndarray:
    """scores.image_f1 of every image for a threshold per ranked position (or one for all): exact,
    vectorised. An image with no CUI is written as 'ID,', which the official reader takes as ('',)."""
    chosen = (r.scores >= thresholds) & (r.cols >= 0)
    return f1_from_counts(chosen.sum(1), (chosen & t.hits).sum(1), r, t, keep_top)


def f1_from_counts(n_pred: np.ndarray, tp: np.ndarray, r: Ranked, t: Truth, keep_top: bool,
                   rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    n_pred, tp = n_pred.copy(), tp.copy()
    none = n_pred == 0
    if keep_top:
        top = none & (r.cols[rows, 0] >= 0)
        n_pred[top], tp[top] = 1, t.hits[rows, 0][top]
        none = none & ~top
    n_pred[none], tp[none] = 1, t.empty_hit[rows][none]
    return 2 * tp / (t.sizes[rows] + n_pred)


def best_global_threshold(r: Ranked, t: Truth) -> tuple[float, bool, float]:
    """(threshold, keep_top, mean F1) maximising the mean F1 with one threshold for all CUIs, over THRESHOLDS."""
    if not len(r.cols):
        return float(THRESHOLDS[0]), False, 0.0
    n_rows, n_t = len(r.cols), len(THRESHOLDS)
    # How many thresholds each score reaches (score >= THRESHOLDS[j] for j below it), then per image the
    # number of CUIs passing each threshold. Scores are sorted best first, so those CUIs are a prefix.
    reached = np.searchsorted(THRESHOLDS, r.scores, side="right") * ((r.scores > 0) & (r.cols >= 0))
    hist = np.bincount((np.arange(n_rows)[:, None] * (n_t + 1) + reached).ravel(), minlength=n_rows * (n_t + 1))
    n_pred = np.cumsum(hist.reshape(n_rows, n_t + 1)[:, ::-1], 1)[:, ::-1][:, 1:]  # (images, thresholds)
    cum_hits = np.concatenate([np.zeros((n_rows, 1), np.int64), np.cumsum(t.hits, 1)], 1)
    tp = np.take_along_axis(cum_hits, n_pred, 1)
    none = n_pred == 0
    n_counted = np.where(none, 1, n_pred)  # an empty prediction is the one concept ''
    totals = {}
    for keep_top in (False, True):
        top = none & (r.cols[:, :1] >= 0) if keep_top else np.zeros_like(none)
        hits = np.where(top, t.hits[:, :1], np.where(none, t.empty_hit[:, None], tp))
        totals[keep_top] = (2 * hits / (t.sizes[:, None] + n_counted)).sum(0)
    best = (float(THRESHOLDS[0]), False, -1.0)
    for keep_top in (False, True):
        j = int(np.argmax(totals[keep_top]))  # the lowest threshold among equals
        score = float(totals[keep_top][j] / n_rows)
        if score > best[2] + 1e-12:
            best = (float(THRESHOLDS[j]), keep_top, score)
    return best


def tune_cui_thresholds(r: Ranked, t: Truth, threshold: float, keep_top: bool, support: np.ndarray,
                        rows: np.ndarray | None = None) -> dict[int, float]:
    """Greedy per-CUI thresholds (the 2025 winner's procedure, searched both ways): for each CUI with
    enough support, most frequent first, pick the threshold that most raises the summed F1 of the
    images it ranks, the others fixed. Returns {space column: threshold} for the CUIs that changed."""
    rows = np.arange(len(r.cols)) if rows is None else rows
    cols, scores, hits = r.cols[rows], r.scores[rows], t.hits[rows]
    chosen = (scores >= threshold) & (cols >= 0)
    n_pred, tp = chosen.sum(1), (chosen & hits).sum(1)
    sub = Truth(hits, t.sizes[rows], t.empty_hit[rows])
    sub_r = Ranked(cols, scores)
    flat = cols.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(len(support) + 1))
    out: dict[int, float] = {}
    for c in np.argsort(-support, kind="stable"):
        if support[c] < MIN_SUPPORT:
            break
        where = order[bounds[c]:bounds[c + 1]]
        if not len(where):
            continue
        img, pos = np.divmod(where, cols.shape[1])
        s, h, now = scores[img, pos], hits[img, pos], chosen[img, pos]
        take = s[:, None] >= THRESHOLDS[None, :]
        delta = take.astype(np.int64) - now[:, None]
        old = f1_from_counts(n_pred[img], tp[img], sub_r, sub, keep_top, img)
        new_n = (n_pred[img][:, None] + delta).ravel()
        new_tp = (tp[img][:, None] + delta * h[:, None]).ravel()
        new = f1_from_counts(new_n, new_tp, sub_r, sub, keep_top, np.repeat(img, len(THRESHOLDS)))
        gain = (new.reshape(len(img), -1) - old[:, None]).sum(0)
        best = int(np.argmax(gain))
        if gain[best] > 1e-9 and THRESHOLDS[best] != threshold:
            out[int(c)] = float(THRESHOLDS[best])
            chosen[img, pos] = take[:, best]
            n_pred[img] += delta[:, best]
            tp[img] += delta[:, best] * h
    return out


@dataclass
class Candidate:
    name: str
    fusion: Fusion
    threshold: float
    keep_top: bool
    f1: float  # mean F1 on the tuning images (fast path; the report recomputes it with scores.py)
    cui_thresholds: dict[str, float] = field(default_factory=dict)
    note: str = ""


def fit_thresholds(name: str, s: ImageScores, fusion: Fusion, t_gt: dict) -> tuple[Candidate, Ranked, Truth]:
    r = ranked(s, fusion)
    t = truth_for(r, s, t_gt)
    threshold, keep_top, f1 = best_global_threshold(r, t)
    return Candidate(name, fusion, threshold, keep_top, f1), r, t


def gt_columns(s: ImageScores, gt: dict) -> list[np.ndarray]:
    """Per image, the score columns of its ground-truth CUIs."""
    column = {x: n for n, x in enumerate(s.space)}
    return [np.array(sorted({column[x.upper()] for x in gt[i] if x.upper() in column}), np.int64) for i in s.ids]


def support_of(gt_cols: list[np.ndarray], rows: np.ndarray, width: int) -> np.ndarray:
    """How many of the images `rows` carry each column."""
    picked = [gt_cols[n] for n in rows]
    return np.bincount(np.concatenate(picked) if picked else np.zeros(0, np.int64), minlength=width)


def with_cui_thresholds(c: Candidate, s: ImageScores, r: Ranked, t: Truth, gt: dict) -> Candidate:
    """Add per-CUI thresholds if they raise the F1 on held-out halves (tuned on one half, scored on the other)."""
    gt_cols = gt_columns(s, gt)
    halves = [np.arange(0, len(s.ids), 2), np.arange(1, len(s.ids), 2)]
    gains = []
    for tune_rows, test_rows in (halves, halves[::-1]):
        if not len(tune_rows) or not len(test_rows):
            continue
        per_col = tune_cui_thresholds(r, t, c.threshold, c.keep_top, support_of(gt_cols, tune_rows, len(s.space)),
                                      tune_rows)
        sub_r = Ranked(r.cols[test_rows], r.scores[test_rows])
        sub_t = Truth(t.hits[test_rows], t.sizes[test_rows], t.empty_hit[test_rows])
        tuned = f1_per_image(sub_r, sub_t, threshold_matrix(sub_r, c.threshold, per_col), c.keep_top).mean()
        plain = f1_per_image(sub_r, sub_t, c.threshold, c.keep_top).mean()
        gains.append(float(tuned - plain))
    gain = sum(gains) / len(gains) if gains else 0.0
    if gain <= 0:
        return replace(c, note=f"no per-CUI thresholds ({gain:+.4f} F1 on held-out halves)")
    support = support_of(gt_cols, np.arange(len(s.ids)), len(s.space))
    per_col = tune_cui_thresholds(r, t, c.threshold, c.keep_top, support)
    f1 = float(f1_per_image(r, t, threshold_matrix(r, c.threshold, per_col), c.keep_top).mean())
    return replace(c, f1=f1, cui_thresholds={s.space[k]: v for k, v in per_col.items()},
                   note=f"{len(per_col)} per-CUI thresholds ({gain:+.4f} F1 on held-out halves)")


def tune(index: ConceptIndex, valid: Embeddings, gt: dict[str, tuple[str, ...]],
         generated: dict[str, list[str]] | None = None, manual: dict[str, tuple[str, ...]] | None = None,
         device: str = "cpu", per_cui: bool = True) -> tuple[dict, list[dict]]:
    """Choose k, weights, thresholds and fusion by maximising the official F1 on the validation split.

    Returns (settings, table): settings["methods"] holds knn, probe and fused, each usable by
    predict_concepts; table has one row per candidate with its official F1 (scores.concept_scores;
    secondary F1 too with `manual`). Fused is the best of all candidates, single methods included,
    so on the tuning images it is never worse than the best single method.
    """
    device = resolve_device(device)
    embedded = set(valid.ids)
    ids = sorted((i for i in gt if gt[i] and i in embedded), key=id_sort_key)
    if not ids:
        raise UserError("no validation image has both a ground-truth row and an embedding (do the IDs match?)")
    left_out = sum(1 for i in gt if gt[i]) - len(ids)
    if left_out:
        log(f"tuning on {len(ids)} images; {left_out} ground-truth images have no embedding and are left out")
    s = image_scores(index, valid, ids, generated, max(K_GRID), device)
    gt = {i: gt[i] for i in ids}

    found: dict[str, tuple[Candidate, Ranked, Truth]] = {}
    for k in (k for k in K_GRID if k <= len(index.ids)):
        for temperature in TEMPERATURES if k > 1 else (0.0,):
            entry = fit_thresholds("knn", s, Fusion(knn=1.0, k=k, temperature=temperature), gt)
            if "knn" not in found or entry[0].f1 > found["knn"][0].f1 + 1e-12:
                found["knn"] = entry
    if index.probe is not None:
        found["probe"] = fit_thresholds("probe", s, Fusion(probe=1.0), gt)
        blends = [fit_thresholds("knn+probe", s, replace(found["knn"][0].fusion, knn=a, probe=1 - a), gt)
                  for a in BLEND_GRID]
        found["knn+probe"] = max(blends, key=lambda e: e[0].f1)
    vision = max(found.values(), key=lambda e: e[0].f1)[0]
    if generated is not None:
        # The generated CUIs as they are: weight 1, threshold 1.
        alone, r, t = fit_thresholds("generated", s, Fusion(generated=1.0), gt)
        found["generated"] = (replace(alone, threshold=1.0, keep_top=False,
                                      f1=float(f1_per_image(r, t, 1.0, False).mean())), r, t)
        both = replace(vision.fusion, generated=1.0)
        r = ranked(s, both)
        t = truth_for(r, s, gt)
        union = Candidate("union", both, vision.threshold, vision.keep_top,
                          float(f1_per_image(r, t, vision.threshold, vision.keep_top).mean()))
        inter_threshold = round(1 + vision.threshold, 2)
        inter = Candidate("intersection", both, inter_threshold, False,
                          float(f1_per_image(r, t, inter_threshold, False).mean()))
        found["union"], found["intersection"] = (union, r, t), (inter, r, t)
        votes = [fit_thresholds("weighted vote", s, replace(vision.fusion, generated=b), gt) for b in GENERATED_GRID]
        found["weighted vote"] = max(votes, key=lambda e: e[0].f1)
    fused_name = max(found, key=lambda n: found[n][0].f1)

    chosen: dict[str, Candidate] = {}
    for method, name in (("knn", "knn"), ("probe", "probe"), ("fused", fused_name)):
        if name not in found:
            continue
        cand, r, t = found[name]
        chosen[method] = with_cui_thresholds(cand, s, r, t, gt) if per_cui and (cand.fusion.knn or cand.fusion.probe) \
            else cand
    # Per-CUI thresholds can lift a single method past the fused choice: fused is then that method.
    best = max(chosen.values(), key=lambda c: c.f1)
    if best.f1 > chosen["fused"].f1 + 1e-12:
        chosen["fused"] = best

    table = [report_row(name, cand, s, gt, manual) for name, (cand, _, _) in found.items()]
    table += [report_row(f"{m} (chosen)", c, s, gt, manual) for m, c in chosen.items()]
    methods = {}
    for m, c in chosen.items():
        row = next(r for r in table if r["method"] == f"{m} (chosen)")
        methods[m] = settings_of(c) | {k: v for k, v in row.items() if k.startswith("f1")}
    settings = {
        "format": SETTINGS_FORMAT,
        "index": {k: index.meta.get(k) for k in ("images", "cuis", "dim", "fingerprint", "embeddings")},
        "tuned_on": {"images": len(ids), "left_out": left_out, "generated": generated is not None,
                     "manual": manual is not None},
        "methods": methods,
        "table": table,
    }
    return settings, table


def settings_of(c: Candidate) -> dict:
    return {"source": c.name, "weights": {"knn": c.fusion.knn, "probe": c.fusion.probe,
                                          "generated": c.fusion.generated},
            "k": c.fusion.k, "temperature": c.fusion.temperature, "threshold": c.threshold, "keep_top": c.keep_top,
            "cui_thresholds": c.cui_thresholds, "note": c.note}


def report_row(name: str, c: Candidate, s: ImageScores, gt: dict, manual: dict | None) -> dict:
    """One table row, scored by scores.concept_scores on the predictions as the CSV would hold them."""
    pred = predict_from_scores(s, settings_of(c))
    as_read = {i: tuple(cuis) if cuis else ("",) for i, cuis in pred.items()}  # 'ID,' reads as ('',)
    manual_sub = {i: manual[i] for i in s.ids if i in manual} if manual is not None else None
    summary, _ = scores.concept_scores(gt, as_read, manual_sub)
    row = {"method": name, "f1": round(summary["f1"], 4), "settings": describe(c)}
    if manual_sub is not None:
        row["f1_secondary"] = round(summary["f1_secondary"], 4)
    return row


def describe(c: Candidate) -> str:
    f = c.fusion
    parts = []
    if f.knn:
        parts.append(f"knn {f.knn:g} (k={f.k}, " + (f"T={f.temperature:g})" if f.temperature else "uniform)"))
    if f.probe:
        parts.append(f"probe {f.probe:g}")
    if f.generated:
        parts.append(f"generated {f.generated:g}")
    text = " + ".join(parts) + f", threshold {c.threshold:g}" + (", keep top" if c.keep_top else "")
    return text + (f"; {c.note}" if c.note else "")


def format_table(table: list[dict]) -> str:
    secondary = any("f1_secondary" in row for row in table)
    lines = [f"{'method':<18} {'F1':>7}" + (f" {'F1 sec.':>8}" if secondary else "") + "  settings"]
    for row in table:
        sec = f" {row.get('f1_secondary', float('nan')):>8.4f}" if secondary else ""
        lines.append(f"{row['method']:<18} {row['f1']:>7.4f}{sec}  {row['settings']}")
    return "\n".join(lines)
