"""Choosing the concept settings on the validation split, by the official primary F1 (scores.image_f1,
computed exactly and vectorised here, then checked by scores.concept_scores).

Two stages. The *sources*: per encoder, k and neighbour weighting of its kNN, its probe, their blend;
with several encoders, their weights (an ensemble); with generated concepts, union, intersection and
a weighted vote. Each source is scored with its best single threshold. Then the *decision* of how many
CUIs an image keeps, for the kNN, probe and best source: one threshold; per-CUI thresholds (the 2025
winner's greedy procedure); a threshold relative to the image's top score; or a count that follows the
scores (the top round(a x score sum) CUIs). Every decision rule is tuned on one half of the images and
scored on the other, both ways: a rule other than the single threshold is kept only where that
held-out F1 is higher, and the methods are compared, and fused chosen, by it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from . import scores
from .embeddings import Embeddings
from .errors import UserError, log
from .fusion import (
    SETTINGS_FORMAT,
    Decision,
    Fusion,
    ImageScores,
    Part,
    Ranked,
    decide,
    describe_settings,
    image_scores,
    predict_from_scores,
    predicted_counts,
    ranked,
    relative_mask,
    settings_of,
)
from .images import id_sort_key
from .index import ConceptIndex
from .model import resolve_device

# The grids. kNN: neighbours, and how much closer neighbours count (0: all the same; else softmax of
# cosine / temperature: CLIP cosines of neighbours sit within a few hundredths).
K_GRID = (1, 2, 3, 5, 10, 20, 30, 50, 100)
TEMPERATURES = (0.0, 0.1, 0.03, 0.01)
BLEND_GRID = (0.25, 0.5, 0.75)  # kNN's share when kNN and probe are blended
GENERATED_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # weight of a generated CUI
# Thresholds are float32, as the scores they are compared with: search and prediction compare alike.
THRESHOLDS = np.round(np.arange(1, 200) * 0.01, 2).astype(np.float32)  # 0.01 .. 1.99: fused scores reach 2
RELATIVE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # share of the image's top score
COUNT_SCALES = tuple(np.round(np.arange(0.5, 1.55, 0.05), 2))  # CUIs kept = round(scale x score sum)
MIN_SUPPORT = 5  # validation images that must carry a CUI before it gets its own threshold
RULES = ("threshold", "per-CUI thresholds", "relative to the top", "count from the scores")


@dataclass(frozen=True)
class Truth:
    """Ground truth of the scored images, laid over a Ranked: what the fast F1 needs."""
    hits: np.ndarray  # (n, M) bool: the ranked CUI is in the image's ground truth
    sizes: np.ndarray  # (n,) size of the ground-truth set (as the evaluator builds it, '' included)
    empty_hit: np.ndarray  # (n,) bool: '' is in the ground truth, so an empty prediction ('ID,') scores

    def subset(self, rows: np.ndarray) -> Truth:
        return Truth(self.hits[rows], self.sizes[rows], self.empty_hit[rows])


def subset(r: Ranked, rows: np.ndarray) -> Ranked:
    return Ranked(r.cols[rows], r.scores[rows])


def truth_for(r: Ranked, s: ImageScores, gt: dict[str, tuple[str, ...]]) -> Truth:
    column = {c: n for n, c in enumerate(s.space)}
    width = len(s.space) + 1
    codes = [n * width + column[c] for n, i in enumerate(s.ids) for c in {x.upper() for x in gt[i]} if c in column]
    hits = np.isin(np.arange(len(s.ids))[:, None] * width + r.cols, np.array(codes, np.int64)) & (r.cols >= 0)
    sizes = np.array([len({x.upper() for x in gt[i]}) for i in s.ids], np.int64)
    return Truth(hits, sizes, np.array(["" in gt[i] for i in s.ids], bool))


def f1_of_chosen(chosen: np.ndarray, t: Truth) -> np.ndarray:
    """scores.image_f1 of every image for the ranked CUIs it keeps. An image that keeps none is written
    as 'ID,', which the official reader takes as ('',)."""
    n_pred, tp = chosen.sum(1), (chosen & t.hits).sum(1)
    none = n_pred == 0
    n_pred, tp = np.where(none, 1, n_pred), np.where(none, t.empty_hit, tp)
    return 2 * tp / (t.sizes + n_pred)


def f1_per_image(r: Ranked, t: Truth, decision: Decision) -> np.ndarray:
    """The F1 of every image under `decision`, exactly as fusion.decide keeps CUIs for the CSV."""
    return f1_of_chosen(decide(r, decision), t)


def best_global_threshold(r: Ranked, t: Truth) -> tuple[float, bool, float]:
    """(threshold, keep_top, mean F1) maximising the mean F1 with one threshold for all CUIs, over THRESHOLDS."""
    if not len(r.cols):
        return float(THRESHOLDS[0]), False, 0.0
    n_rows, n_t = len(r.cols), len(THRESHOLDS)
    # How many thresholds each score reaches (score >= THRESHOLDS[j] in float32 for j below it), then per
    # image the number of CUIs passing each threshold. Scores are sorted best first: those CUIs are a prefix.
    reached = np.searchsorted(THRESHOLDS, r.scores.astype(np.float32), side="right") * ((r.scores > 0) & (r.cols >= 0))
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
            best = (round(float(THRESHOLDS[j]), 2), keep_top, score)
    return best


def best_relative(r: Ranked, t: Truth) -> tuple[Decision, float]:
    """The best threshold with a floor relative to each image's top score, over RELATIVE_GRID."""
    best = (Decision(), -1.0)
    for ratio in RELATIVE_GRID:
        masked = Ranked(r.cols, np.where(relative_mask(r, ratio), r.scores, 0).astype(np.float32))
        threshold, keep_top, f1 = best_global_threshold(masked, t)
        if f1 > best[1] + 1e-12:
            best = (Decision(threshold, keep_top, relative=ratio), f1)
    return best


def best_count_scale(r: Ranked, t: Truth) -> tuple[Decision, float]:
    """The best `count_scale` (each image keeps its top round(scale x score sum) CUIs), over COUNT_SCALES."""
    n_rows = len(r.cols)
    cum_hits = np.concatenate([np.zeros((n_rows, 1), np.int64), np.cumsum(t.hits, 1)], 1)
    best = (Decision(count_scale=COUNT_SCALES[0]), -1.0)
    for scale in COUNT_SCALES:
        m = predicted_counts(r, scale)
        tp = np.where(m == 0, t.empty_hit, cum_hits[np.arange(n_rows), m])
        f1 = float((2 * tp / (t.sizes + np.maximum(m, 1))).mean()) if n_rows else 0.0
        if f1 > best[1] + 1e-12:
            best = (Decision(count_scale=float(scale)), f1)
    return best


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


def tune_cui_thresholds(r: Ranked, t: Truth, threshold: float, keep_top: bool, support: np.ndarray) -> dict[int, float]:
    """Greedy per-CUI thresholds (the 2025 winner's procedure, searched both ways): for each CUI with
    enough support, most frequent first, pick the threshold that most raises the summed F1 of the
    images it ranks, the others fixed. Returns {space column: threshold} for the CUIs that changed."""
    cols, scores, hits = r.cols, r.scores, t.hits
    chosen = (scores >= np.float32(threshold)) & (cols >= 0)
    n_pred, tp = chosen.sum(1), (chosen & hits).sum(1)
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
        old = f1_from_counts(n_pred[img], tp[img], r, t, keep_top, img)
        new_n = (n_pred[img][:, None] + delta).ravel()
        new_tp = (tp[img][:, None] + delta * h[:, None]).ravel()
        new = f1_from_counts(new_n, new_tp, r, t, keep_top, np.repeat(img, len(THRESHOLDS)))
        gain = (new.reshape(len(img), -1) - old[:, None]).sum(0)
        best = int(np.argmax(gain))
        if gain[best] > 1e-9 and round(float(THRESHOLDS[best]), 2) != threshold:
            out[int(c)] = round(float(THRESHOLDS[best]), 2)
            chosen[img, pos] = take[:, best]
            n_pred[img] += delta[:, best]
            tp[img] += delta[:, best] * h
    return out


def fit_rule(rule: str, r: Ranked, t: Truth, support: np.ndarray) -> Decision:
    """The decision of `rule` tuned on these images (support: how many of them carry each column)."""
    if rule == "relative to the top":
        return best_relative(r, t)[0]
    if rule == "count from the scores":
        return best_count_scale(r, t)[0]
    threshold, keep_top, _ = best_global_threshold(r, t)
    if rule == "per-CUI thresholds":
        return Decision(threshold, keep_top, tune_cui_thresholds(r, t, threshold, keep_top, support))
    return Decision(threshold, keep_top)


def held_out_f1(rule: str, r: Ranked, t: Truth, gt_cols: list[np.ndarray], width: int) -> float:
    """The mean F1 of `rule` tuned on one half of the images (even rows, then odd) and scored on the other."""
    halves = [np.arange(0, len(r.cols), 2), np.arange(1, len(r.cols), 2)]
    results = []
    for tune_rows, test_rows in (halves, halves[::-1]):
        if not len(tune_rows) or not len(test_rows):
            continue
        decision = fit_rule(rule, subset(r, tune_rows), t.subset(tune_rows), support_of(gt_cols, tune_rows, width))
        results.append(float(f1_per_image(subset(r, test_rows), t.subset(test_rows), decision).mean()))
    return sum(results) / len(results) if results else 0.0


def gt_columns(s: ImageScores, gt: dict) -> list[np.ndarray]:
    """Per image, the score columns of its ground-truth CUIs."""
    column = {x: n for n, x in enumerate(s.space)}
    return [np.array(sorted({column[x.upper()] for x in gt[i] if x.upper() in column}), np.int64) for i in s.ids]


def support_of(gt_cols: list[np.ndarray], rows: np.ndarray, width: int) -> np.ndarray:
    """How many of the images `rows` carry each column."""
    picked = [gt_cols[n] for n in rows]
    return np.bincount(np.concatenate(picked) if picked else np.zeros(0, np.int64), minlength=width)


@dataclass
class Candidate:
    name: str
    fusion: Fusion
    decision: Decision
    f1: float  # mean F1 on all tuning images (fast path; the table recomputes it with scores.py)
    held_out: float | None = None  # the held-out-halves estimate of the decision rule
    note: str = ""


def scored(name: str, s: ImageScores, fusion: Fusion, gt: dict) -> tuple[Candidate, Ranked, Truth]:
    """A source with its best single threshold."""
    r = ranked(s, fusion)
    t = truth_for(r, s, gt)
    threshold, keep_top, f1 = best_global_threshold(r, t)
    return Candidate(name, fusion, Decision(threshold, keep_top), f1), r, t


def best_of(entries: list[tuple[Candidate, Ranked, Truth]]) -> tuple[Candidate, Ranked, Truth]:
    best = entries[0]
    for entry in entries[1:]:
        if entry[0].f1 > best[0].f1 + 1e-12:
            best = entry
    return best


def simplex(members: int) -> list[tuple[float, ...]]:
    """Weights over the encoders, summing to 1: steps of 0.1 for up to 3 encoders, 0.25 beyond."""
    steps = 10 if members <= 3 else 4
    return [tuple(c / steps for c in combo) for combo in itertools.product(range(steps + 1), repeat=members)
            if sum(combo) == steps]


def weighted(parts: list[Part], weights: tuple[float, ...]) -> tuple[Part, ...]:
    return tuple(replace(p, knn=p.knn * w, probe=p.probe * w) for p, w in zip(parts, weights, strict=True))


def tune(index: ConceptIndex, valid: Embeddings, gt: dict[str, tuple[str, ...]],
         generated: dict[str, list[str]] | None = None, manual: dict[str, tuple[str, ...]] | None = None,
         device: str = "cpu", per_cui: bool = True) -> tuple[dict, list[dict]]:
    """Choose k, weights, fusion and the decision rule by maximising the official F1 on the validation split.

    Returns (settings, table): settings["methods"] holds knn, probe and fused, each usable by
    predict_concepts; table has one row per candidate with its official F1 (scores.concept_scores;
    secondary F1 too with `manual`) and, for the decision rules, the held-out-halves F1. Fused is the
    method with the best held-out F1, so it is never worse there than kNN or the probe alone.
    """
    device = resolve_device(device)
    embedded = set(valid.ids)
    ids = sorted((i for i in gt if gt[i] and i in embedded), key=id_sort_key)
    if not ids:
        raise UserError("no validation image has both a ground-truth row and an embedding (do the IDs match?)")
    left_out = sum(1 for i in gt if gt[i]) - len(ids)
    if left_out:
        log(f"tuning on {len(ids)} images; {left_out} ground-truth images have no embedding and are left out")
    k_grid = [k for k in K_GRID if k <= len(index.ids)]
    s = image_scores(index, valid, ids, generated, max(k_grid), device)
    gt = {i: gt[i] for i in ids}
    n_members = len(index.members)
    labels = [m.label for m in index.members]
    nothing = tuple(Part() for _ in range(n_members))

    def alone(m: int, part: Part) -> Fusion:
        return Fusion(nothing[:m] + (part,) + nothing[m + 1:])

    found: dict[str, tuple[Candidate, Ranked, Truth]] = {}
    best_knn, best_probe, best_vision = [], [], []
    for m, label in enumerate(labels):
        tag = f" [{label}]" if n_members > 1 else ""
        knn = best_of([scored(f"knn{tag}", s, alone(m, Part(knn=1.0, k=k, temperature=temp)), gt)
                       for k in k_grid for temp in (TEMPERATURES if k > 1 else (0.0,))])
        found[knn[0].name] = knn
        best_knn.append(knn[0].fusion.parts[m])
        vision = knn
        if index.members[m].probe is not None:
            probe = scored(f"probe{tag}", s, alone(m, Part(probe=1.0)), gt)
            found[probe[0].name] = probe
            best_probe.append(probe[0].fusion.parts[m])
            blend = best_of([scored(f"knn+probe{tag}", s, alone(m, replace(best_knn[m], knn=a, probe=1 - a)), gt)
                             for a in BLEND_GRID])
            found[blend[0].name] = blend
            vision = best_of([knn, probe, blend])
        else:
            best_probe.append(Part())
        best_vision.append(vision[0].fusion.parts[m])
    methods = {"knn": "knn", "probe": "probe", "fused": None}
    if n_members > 1:
        found["ensemble knn"] = best_of([scored("ensemble knn", s, Fusion(weighted(best_knn, w)), gt)
                                         for w in simplex(n_members)])
        methods["knn"] = "ensemble knn"
        if all(m.probe is not None for m in index.members):
            found["ensemble probe"] = best_of([scored("ensemble probe", s, Fusion(weighted(best_probe, w)), gt)
                                               for w in simplex(n_members)])
            methods["probe"] = "ensemble probe"
        found["ensemble"] = best_of([scored("ensemble", s, Fusion(weighted(best_vision, w)), gt)
                                     for w in simplex(n_members)])
    vision = best_of(list(found.values()))[0]
    if generated is not None:
        # The generated CUIs as they are: weight 1, threshold 1.
        _, r, t = scored("generated", s, Fusion(nothing, generated=1.0), gt)
        as_they_are = Decision(1.0, False)
        found["generated"] = (Candidate("generated", Fusion(nothing, generated=1.0), as_they_are,
                                        float(f1_per_image(r, t, as_they_are).mean())), r, t)
        both = replace(vision.fusion, generated=1.0)
        r = ranked(s, both)
        t = truth_for(r, s, gt)
        union = replace(vision.decision, per_column={})
        found["union"] = (Candidate("union", both, union, float(f1_per_image(r, t, union).mean())), r, t)
        inter = Decision(round(1 + vision.decision.threshold, 2), False)
        found["intersection"] = (Candidate("intersection", both, inter, float(f1_per_image(r, t, inter).mean())), r, t)
        found["weighted vote"] = best_of([scored("weighted vote", s, replace(vision.fusion, generated=b), gt)
                                          for b in GENERATED_GRID])
    methods["fused"] = best_of(list(found.values()))[0].name

    gt_cols = gt_columns(s, gt)
    width = len(s.space)
    everything = support_of(gt_cols, np.arange(len(ids)), width)
    rule_rows: list[tuple[str, Candidate]] = []
    chosen: dict[str, Candidate] = {}
    for method, name in methods.items():
        if name not in found:
            continue
        cand, r, t = found[name]
        if name == "generated" or name == "intersection":  # the generated CUIs as they are: nothing to decide
            chosen[method] = replace(cand, held_out=cand.f1)
            continue
        rules = [rule for rule in RULES if per_cui or rule != "per-CUI thresholds"]
        estimates = {rule: held_out_f1(rule, r, t, gt_cols, width) for rule in rules}
        best_rule = "threshold"
        for rule in rules:
            if estimates[rule] > estimates[best_rule] + 1e-9:
                best_rule = rule
        fitted = {}
        for rule in rules:
            decision = fit_rule(rule, r, t, everything)
            fitted[rule] = Candidate(name, cand.fusion, decision, float(f1_per_image(r, t, decision).mean()),
                                     estimates[rule])
            rule_rows.append((f"{method}: {rule}", fitted[rule]))
        gain = estimates[best_rule] - estimates["threshold"]
        note = "" if best_rule == "threshold" else f"{best_rule} ({gain:+.4f} F1 on held-out halves)"
        chosen[method] = replace(fitted[best_rule], note=note)
    # A single method with a better decision rule can beat the fused source held-out: fused is then that method.
    best = max(chosen.values(), key=lambda c: c.held_out)
    if best.held_out > chosen["fused"].held_out + 1e-12:
        chosen["fused"] = best

    def row(name: str, c: Candidate) -> dict:
        return report_row(name, c, s, gt, manual, index)

    def held_out(name: str, cand: Candidate, r: Ranked, t) -> float:
        """A source's F1 on held-out halves with its own rule (one threshold), as the rule rows are estimated."""
        if name in ("generated", "intersection"):  # the generated CUIs as they are: nothing tuned
            return cand.f1
        return held_out_f1("threshold", r, t, gt_cols, width)

    table = [row(name, replace(cand, held_out=held_out(name, cand, r, t))) for name, (cand, r, t) in found.items()]
    table += [row(name, c) for name, c in rule_rows]
    table += [row(f"{m} (chosen)", c) for m, c in chosen.items()]
    out_methods = {}
    for m, c in chosen.items():
        picked = next(r for r in table if r["method"] == f"{m} (chosen)")
        out_methods[m] = settings_of(c.fusion, c.decision, s.space, index, c.name, c.note) | {
            k: v for k, v in picked.items() if k.startswith("f1")}
    settings = {
        "format": SETTINGS_FORMAT,
        "index": {k: index.meta.get(k) for k in ("images", "cuis", "dims", "fingerprint", "encoders")},
        "tuned_on": {"images": len(ids), "left_out": left_out, "generated": generated is not None,
                     "manual": manual is not None},
        "methods": out_methods,
        "table": table,
    }
    return settings, table


def report_row(name: str, c: Candidate, s: ImageScores, gt: dict, manual: dict | None, index: ConceptIndex) -> dict:
    """One table row, scored by scores.concept_scores on the predictions as the CSV would hold them."""
    method_settings = settings_of(c.fusion, c.decision, s.space, index, c.name, c.note)
    pred = predict_from_scores(s, method_settings)
    as_read = {i: tuple(cuis) if cuis else ("",) for i, cuis in pred.items()}  # 'ID,' reads as ('',)
    manual_sub = {i: manual[i] for i in s.ids if i in manual} if manual is not None else None
    summary, _ = scores.concept_scores(gt, as_read, manual_sub)
    row = {"method": name, "f1": round(summary["f1"], 4)}
    if c.held_out is not None:
        row["f1_heldout"] = round(c.held_out, 4)
    if manual_sub is not None:
        row["f1_secondary"] = round(summary["f1_secondary"], 4)
    row["settings"] = describe_settings(method_settings)
    return row


def format_table(table: list[dict]) -> str:
    secondary = any("f1_secondary" in row for row in table)
    width = max([len(row["method"]) for row in table] + [6])
    # Headers and values start in the same column (values are all 0.xxxx or 1.0000, the same width).
    lines = [f"{'method':<{width}}  {'F1':<6}  {'held-out':<8}" + (f"  {'F1 sec.':<7}" if secondary else "")
             + "  settings"]
    for row in table:
        held = f"{row['f1_heldout']:<8.4f}" if "f1_heldout" in row else f"{'':<8}"
        sec = f"  {row.get('f1_secondary', float('nan')):<7.4f}" if secondary else ""
        lines.append(f"{row['method']:<{width}}  {row['f1']:<6.4f}  {held}{sec}  {row['settings']}")
    return "\n".join(lines)
