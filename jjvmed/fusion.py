"""From an image's vectors to its CUIs: what each method says (nearest training images and probe, per
encoder of the index; generated CUIs), fused with weights, ranked, and kept as tuned settings decide.

The score of CUI c for an image is
    sum over encoders e of  knn_e * (weighted share of its k_e nearest training images that carry c)
                          + probe_e * (probe_e probability of c)
  + generated * (1 if the generated text mapped to c)
and c is kept if its score reaches its threshold (one per CUI where validation support allowed, else
the global one), and, with `relative`, at least that share of the image's top score; or, with
`count_scale`, the image keeps its top round(count_scale * sum of its scores) CUIs (a count that
follows the scores: a kNN score sums to the mean number of CUIs of the neighbours). With `keep_top`
an image that keeps nothing keeps its best CUI. Scores and thresholds are compared in float32, in
tuning and in prediction alike. Union (generated weight 1, vision threshold) and intersection (weight
1, threshold 1 + vision threshold) of vision and generated concepts are corners of this weighted vote.
tuning.py chooses the settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embeddings import Embeddings
from .encoders import PACKAGES, encoder_label, parse_spec
from .errors import UserError, first_line
from .images import id_sort_key
from .index import ConceptIndex, nearest, used_members
from .model import resolve_device
from .submission import MAX_CONCEPTS

SETTINGS_FORMAT = "jj-vmed-concept-settings/2"
METHODS = ("knn", "probe", "fused")
ROWS_PER_CHUNK = 2048  # images scored at once: bounds the dense (images x CUIs) block in memory


@dataclass(frozen=True)
class MemberScores:
    """What one encoder's part of the index says about the images."""
    sims: np.ndarray  # (n, K) cosine of the nearest training images, nearest first
    neighbours: np.ndarray  # (n, K) their index rows
    probe: np.ndarray | None  # (n, index CUIs) probabilities


@dataclass(frozen=True)
class ImageScores:
    """What each method says about a set of images, before weights and thresholds."""
    ids: list[str]
    space: list[str]  # score columns: the index's CUIs, then generated CUIs the index does not know
    embedded: np.ndarray  # (n,) bool: images with vectors (the others have only generated CUIs)
    members: list[MemberScores | None]  # per index member; None for one the settings do not use
    generated: object | None  # scipy csr (n, space) of 0/1, or None
    labels: object  # scipy csr (training images, index CUIs)


def image_scores(index: ConceptIndex, emb: Embeddings, ids: list[str], generated: dict[str, list[str]] | None,
                 max_k: int, device: str = "cpu", members: list[int] | None = None) -> ImageScores:
    """Neighbours, probe probabilities and generated CUIs for `ids` (embedded or not), for the index
    members `members` (all by default); each member's vectors are taken from `emb` by their encoder."""
    from scipy.sparse import csr_matrix

    members = list(range(len(index.members))) if members is None else members
    position = {i: n for n, i in enumerate(emb.ids)}
    embedded = np.array([i in position for i in ids], bool)
    rows = [position[i] for i, e in zip(ids, embedded, strict=True) if e]
    scores: list[MemberScores | None] = [None] * len(index.members)
    for m in members:
        member = index.members[m]
        vectors = member.queries(emb, "the concept index")
        queries = np.zeros((len(ids), member.vectors.shape[1]), np.float32)
        if rows:
            queries[embedded] = vectors[rows]
        sims, neighbours = nearest(member.vectors, queries, max_k, device)
        probe = member.probe.predict(queries, device) if member.probe is not None else None
        if probe is not None:
            probe[~embedded] = 0.0
        scores[m] = MemberScores(sims, neighbours, probe)
    space = list(index.cuis)
    gen = None
    if generated is not None:
        per_image = [list(dict.fromkeys(c.strip().upper() for c in generated.get(i, []) if c.strip())) for i in ids]
        known = set(space)
        space += sorted({c for row in per_image for c in row if c not in known})
        column = {c: n for n, c in enumerate(space)}
        cols = [[column[c] for c in row] for row in per_image]
        ptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int64)
        flat = np.array([c for row in cols for c in row], np.int64)
        gen = csr_matrix((np.ones(len(flat), np.float32), flat, ptr), shape=(len(ids), len(space)))
    return ImageScores(ids, space, embedded, scores, gen, index.label_matrix())


@dataclass(frozen=True)
class Part:
    """One encoder's weights and kNN neighbourhood."""
    knn: float = 0.0
    probe: float = 0.0
    k: int = 30
    temperature: float = 0.0  # 0: every neighbour counts the same; else softmax(cosine / temperature)


@dataclass(frozen=True)
class Fusion:
    """Weights of every encoder's kNN and probe (one Part per index member) and of the generated CUIs."""
    parts: tuple[Part, ...]
    generated: float = 0.0


def dense_scores(s: ImageScores, fusion: Fusion, rows: slice) -> np.ndarray:
    """(rows, space) fused scores of a block of images."""
    from scipy.sparse import csr_matrix

    n = len(s.ids[rows])
    n_index = s.labels.shape[1]
    out = np.zeros((n, len(s.space)), np.float32)
    for part, member in zip(fusion.parts, s.members, strict=True):
        if part.knn and member is not None and member.sims.shape[1]:
            k = min(part.k, member.sims.shape[1])
            sims, nb = member.sims[rows, :k], member.neighbours[rows, :k]
            if part.temperature > 0:
                weights = np.exp((sims - sims[:, :1]) / part.temperature)
            else:
                weights = np.ones_like(sims)
            weights = weights / weights.sum(1, keepdims=True) * s.embedded[rows, None]
            w = csr_matrix((weights.ravel(), nb.ravel(), np.arange(0, n * k + 1, k)), shape=(n, s.labels.shape[0]))
            out[:, :n_index] += np.float32(part.knn) * (w @ s.labels).toarray()
        if part.probe and member is not None and member.probe is not None:
            out[:, :n_index] += np.float32(part.probe) * member.probe[rows]
    if fusion.generated and s.generated is not None:
        out += np.float32(fusion.generated) * s.generated[rows].toarray()
    return out


@dataclass(frozen=True)
class Ranked:
    """The best `MAX_CONCEPTS` CUIs of every image by fused score, best first (column -1 / score 0 pads)."""
    cols: np.ndarray  # (n, M) int64 columns of ImageScores.space
    scores: np.ndarray  # (n, M) float32


def ranked(s: ImageScores, fusion: Fusion) -> Ranked:
    m = min(MAX_CONCEPTS, len(s.space))
    cols = np.full((len(s.ids), m), -1, np.int64)
    scores = np.zeros((len(s.ids), m), np.float32)
    for start in range(0, len(s.ids), ROWS_PER_CHUNK):
        block = dense_scores(s, fusion, slice(start, start + ROWS_PER_CHUNK))
        top = np.argpartition(-block, m - 1, axis=1)[:, :m] if m < block.shape[1] else \
            np.tile(np.arange(block.shape[1]), (len(block), 1))
        values = np.take_along_axis(block, top, 1)
        order = np.lexsort((top, -values), axis=-1)  # best first; ties by column, so results are reproducible
        top, values = np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1)
        top[values <= 0] = -1
        cols[start:start + len(block)], scores[start:start + len(block)] = top, np.maximum(values, 0)
    return Ranked(cols, scores)


@dataclass(frozen=True)
class Decision:
    """Which ranked CUIs an image keeps (see the module docstring)."""
    threshold: float = 0.5
    keep_top: bool = False
    per_column: dict[int, float] = field(default_factory=dict)  # space column -> its own threshold
    relative: float = 0.0  # > 0: also at least this share of the image's top score
    count_scale: float = 0.0  # > 0: the top round(count_scale * sum of scores) CUIs instead of thresholds


def threshold_matrix(r: Ranked, threshold: float, per_column: dict[int, float]) -> np.ndarray:
    table = np.full(int(r.cols.max(initial=-1)) + 2, threshold, np.float32)
    for col, value in per_column.items():
        if col < len(table) - 1:
            table[col] = value
    return table[r.cols]  # column -1 (padding) reads the last entry: the global threshold


def relative_mask(r: Ranked, relative: float) -> np.ndarray:
    """Scores at least `relative` times the image's top score (float32, as everywhere)."""
    return r.scores >= np.float32(relative) * r.scores[:, :1]


def predicted_counts(r: Ranked, count_scale: float) -> np.ndarray:
    """How many CUIs each image keeps under the count rule: round(scale * sum of its ranked scores), at least 1,
    at most the CUIs it has a score for."""
    total = r.scores.sum(1, dtype=np.float64)
    available = (r.cols >= 0).sum(1)
    return np.minimum(np.maximum(np.rint(count_scale * total).astype(np.int64), 1), available)


def decide(r: Ranked, d: Decision) -> np.ndarray:
    """(n, M) bool: the ranked CUIs each image keeps."""
    if d.count_scale > 0:
        chosen = np.arange(r.cols.shape[1])[None, :] < predicted_counts(r, d.count_scale)[:, None]
    else:
        chosen = r.scores >= threshold_matrix(r, d.threshold, d.per_column)
        if d.relative > 0:
            chosen &= relative_mask(r, d.relative)
    chosen &= r.cols >= 0
    if d.keep_top:
        none = ~chosen.any(1) & (r.cols[:, 0] >= 0)
        chosen[none, 0] = True
    return chosen


def load_settings(path: str | Path, method: str, index: ConceptIndex | None = None) -> dict:
    """One method's settings ('knn', 'probe' or 'fused') from a file written by tune; with `index`,
    also check that they were tuned on that index and that it has what they use."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"concept settings {path} do not exist (make them with: concept_index.py tune)")
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e)})") from None
    if isinstance(settings, dict) and settings.get("format") == "jj-vmed-concept-settings/1":
        raise UserError(f"{path} was written by an older version of concept_index.py tune: run tune again")
    if not isinstance(settings, dict) or settings.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{path} is not a settings file written by concept_index.py tune")
    if method not in settings["methods"]:
        raise UserError(f"{path} has no settings for --method {method} (it has: {', '.join(settings['methods'])})")
    chosen = settings["methods"][method]
    if index is not None:
        tuned = settings.get("index", {})
        differ = [k for k in ("fingerprint", "images", "cuis", "dims")
                  if tuned.get(k) is not None and index.meta.get(k) is not None and tuned[k] != index.meta[k]]
        if differ:
            what = ", ".join(f"{k} {tuned[k]} there, {index.meta[k]} here" for k in differ if k != "fingerprint")
            raise UserError(f"{path} was tuned on another concept index ({what or 'it was fitted again since'}): "
                            "run concept_index.py tune on this one")
        check_usable(index, chosen)
    return chosen


def check_usable(index: ConceptIndex, method_settings: dict) -> None:
    parts = method_settings["members"]
    if len(parts) != len(index.members):
        raise UserError(f"these settings weigh {len(parts)} encoders, the concept index has {len(index.members)}: "
                        "run concept_index.py tune on this index")
    for part, member in zip(parts, index.members, strict=True):
        if part.get("probe") and member.probe is None:
            raise UserError(f"these settings use the probe of {member.label}, but the concept index has none (fit it "
                            "with --probe_epochs > 0)")


def check_model_matches(base_model_path: str, index: ConceptIndex, method_settings: dict | None = None) -> None:
    """Before any model loads: every encoder the settings use must be there to embed the run's images like
    the index's. LLaVA's tower: the model's config (when it is on disk) must give the index's features;
    other encoders: their package is installed and a local folder still exists."""
    import importlib.util

    for m in used_members(index, method_settings):
        made = index.members[m].encoder
        family, source = parse_spec(made.get("source") or "llava")
        if family == "llava":
            check_llava_config(base_model_path, index.members[m])
            continue
        # the optional packages (timm, open_clip) import as their family's name; transformers is required
        if family in PACKAGES and importlib.util.find_spec(family) is None:
            raise UserError(f"the concept index uses encoder {encoder_label(made)}, which needs the package "
                            f"{PACKAGES[family]} (not installed)")
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
            raise UserError(f"the concept index was built with encoder {made['source']}, and {source} does not exist "
                            "here: put the model there (the index records where it was)")


def check_llava_config(base_model_path: str, member) -> None:
    from .model import check_model_source

    check_model_source(base_model_path, "--base_model_path")  # a folder that is not there: one line, not a traceback
    config_file = Path(base_model_path).expanduser() / "config.json"
    if not config_file.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model_path, "config.json")
        if not isinstance(cached, str):
            return  # not on disk: the model load says what is wrong
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    dim = config.get("vision_config", {}).get("hidden_size")
    layer = config.get("vision_feature_layer")
    made = member.encoder
    if dim is not None and dim != member.vectors.shape[1]:
        raise UserError(f"the vision tower of {base_model_path} gives {dim}-dimensional features, the concept index "
                        f"has {member.vectors.shape[1]}: it was built with another model")
    if layer is not None and made.get("feature_layer") not in (None, layer):
        raise UserError(f"{base_model_path} feeds its projector layer {layer}, the concept index was built from layer "
                        f"{made['feature_layer']}: embed with the same model")


def uses_generated(method_settings: dict) -> bool:
    """True if the method needs the generated CUIs (fused settings that kept them)."""
    return bool(method_settings.get("generated"))


def fusion_of(method_settings: dict) -> Fusion:
    parts = tuple(Part(float(p.get("knn", 0.0)), float(p.get("probe", 0.0)), int(p.get("k", 30)),
                       float(p.get("temperature", 0.0))) for p in method_settings["members"])
    return Fusion(parts, float(method_settings.get("generated", 0.0)))


def decision_of(method_settings: dict, space: list[str]) -> Decision:
    column = {c: n for n, c in enumerate(space)}
    per_col = {column[c]: v for c, v in method_settings.get("cui_thresholds", {}).items() if c in column}
    return Decision(float(method_settings["threshold"]), bool(method_settings["keep_top"]), per_col,
                    float(method_settings.get("relative", 0.0)), float(method_settings.get("count_scale", 0.0)))


def settings_of(fusion: Fusion, decision: Decision, space: list[str], index: ConceptIndex, source: str,
                note: str = "") -> dict:
    """One method's settings as tune writes them and predict_concepts reads them."""
    members = [{"encoder": m.label, "knn": p.knn, "probe": p.probe, "k": p.k, "temperature": p.temperature}
               for p, m in zip(fusion.parts, index.members, strict=True)]
    return {"source": source, "members": members, "generated": fusion.generated,
            "threshold": round(float(decision.threshold), 4), "keep_top": decision.keep_top,
            "cui_thresholds": {space[c]: round(float(v), 4) for c, v in decision.per_column.items()},
            "relative": decision.relative, "count_scale": decision.count_scale, "note": note}


def predict_from_scores(s: ImageScores, method_settings: dict) -> dict[str, list[str]]:
    r = ranked(s, fusion_of(method_settings))
    chosen = decide(r, decision_of(method_settings, s.space))
    return {image_id: [s.space[c] for c in r.cols[n][chosen[n]][:MAX_CONCEPTS]] for n, image_id in enumerate(s.ids)}


def predict_concepts(index: ConceptIndex, method_settings: dict, emb: Embeddings,
                     generated: dict[str, list[str]] | None = None, device: str = "cpu") -> dict[str, list[str]]:
    """ID -> final CUIs (best first, at most 100, no repeats) for every image of `emb` (embedded or
    failed) and of `generated`, in ID order. An image without a vector gets only generated CUIs.
    `emb` must hold the vectors of every encoder the settings use (any others are ignored)."""
    fusion = fusion_of(method_settings)
    if fusion.generated and generated is None:
        raise UserError("these settings fuse the generated concepts: give the generated CUIs too")
    check_usable(index, method_settings)
    ids = sorted(set(emb.ids) | set(emb.failed) | set(generated or {}), key=id_sort_key)
    max_k = max([p.k for p in fusion.parts if p.knn] or [1])
    s = image_scores(index, emb, ids, generated if fusion.generated else None, max_k=max_k,
                     device=resolve_device(device), members=used_members(index, method_settings))
    return predict_from_scores(s, method_settings)


def describe_settings(method_settings: dict) -> str:
    """'knn llava (k=30, uniform) 0.5 + probe hf:rad-dino 0.5, threshold 0.3, keep top'."""
    parts = []
    for p in method_settings["members"]:
        if p["knn"]:
            parts.append(f"knn {p['encoder']} {p['knn']:g} (k={p['k']}, "
                         + (f"T={p['temperature']:g})" if p["temperature"] else "uniform)"))
        if p["probe"]:
            parts.append(f"probe {p['encoder']} {p['probe']:g}")
    if method_settings.get("generated"):
        parts.append(f"generated {method_settings['generated']:g}")
    if method_settings.get("count_scale"):
        rule = f"top round({method_settings['count_scale']:g} x score sum) CUIs"
    else:
        rule = f"threshold {method_settings['threshold']:g}"
        if method_settings.get("relative"):
            rule += f" and {method_settings['relative']:g} x the top score"
        if method_settings.get("cui_thresholds"):
            rule += f", {len(method_settings['cui_thresholds'])} per-CUI thresholds"
    text = " + ".join(parts) + ", " + rule + (", keep top" if method_settings["keep_top"] else "")
    return text + (f"; {method_settings['note']}" if method_settings.get("note") else "")
