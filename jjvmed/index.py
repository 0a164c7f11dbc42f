"""The concept index: the training images' CUIs and, per encoder, their vectors (for nearest neighbours)
and the probe trained on them (probe.py), saved in one folder by `fit_index`.

An index of several encoders (an ensemble) holds one member per encoder, all over the same images and
CUIs; tuning.py weighs their scores. Fitted with the training captions too (`fit --train_captions`), it
also knows each training image's caption, for the caption methods (retrieval.py); fitted with captions
alone, it has no CUIs and no probe.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import files
from .embeddings import Embeddings, EmbedOptions
from .encoders import check_recorded, encoder_label
from .errors import UserError, first_line, log
from .probe import Probe, ProbeOptions, train_probe

INDEX_FORMAT = "jj-vmed-concept-index/2"
OLD_INDEX_FORMAT = "jj-vmed-concept-index/1"  # one LLaVA encoder, read as such
PROBE_FILES = ("probe.safetensors", "probe.json")  # the probes' weights and what they were trained on


@dataclass(frozen=True)
class Member:
    """One encoder's part of the index: its vectors of the training images and the probe trained on them."""
    encoder: dict  # encoders.Encoder.describe() of the encoder that made the vectors
    vectors: np.ndarray  # (images, dim) float32, L2-normalised
    probe: Probe | None

    @property
    def label(self) -> str:
        return encoder_label(self.encoder)

    def queries(self, emb: Embeddings, what: str) -> np.ndarray:
        """`emb`'s vectors of this member's encoder, refused in one line if their size is not the index's."""
        vectors = emb.member(self.encoder, what)
        if vectors.size and vectors.shape[1] != self.vectors.shape[1]:
            raise UserError(f"the embeddings of {self.label} have {vectors.shape[1]} dimensions, the index "
                            f"{self.vectors.shape[1]}")
        return vectors


@dataclass(frozen=True)
class ConceptIndex:
    cuis: list[str]  # the label space: every CUI of the training images
    ids: list[str]  # training images
    label_ptr: np.ndarray  # CSR: image i carries cuis[label_idx[label_ptr[i]:label_ptr[i + 1]]]
    label_idx: np.ndarray
    members: list[Member]  # one per encoder
    meta: dict
    captions: list[str] | None = None  # each training image's caption, when fitted with them

    def label_matrix(self):
        from scipy.sparse import csr_matrix

        data = np.ones(len(self.label_idx), np.float32)
        return csr_matrix((data, self.label_idx, self.label_ptr), shape=(len(self.ids), len(self.cuis)))


def fit_index(train: Embeddings, concepts: dict[str, list[str]] | None, output_dir: str | Path,
              probe_options: ProbeOptions | None = ProbeOptions(), captions: dict[str, str] | None = None
              ) -> ConceptIndex:
    """Index the training vectors of every encoder with their CUIs and train a probe on each; with `captions`
    (ID -> caption) the index keeps each image's caption too. Either may be None, not both. The index's
    images are the embedded ones with a row in every file given. Saved in output_dir."""
    labelled = [(name, rows) for name, rows in (("concepts", concepts), ("captions", captions)) if rows is not None]
    if not labelled:
        raise UserError("give the training concepts, the training captions, or both")
    keep = [n for n, i in enumerate(train.ids) if all(i in rows for _, rows in labelled)]
    if not keep:
        raise UserError(f"no training image has a row in the {' and '.join(n for n, _ in labelled)} file "
                        "(do the IDs match?)")
    for encoder in train.encoders:
        check_recorded(encoder, "the training embeddings file", "embed the training images again")
    ids = [train.ids[n] for n in keep]
    concepts = concepts if concepts is not None else {}
    cuis = sorted({c for i in ids for c in concepts.get(i, [])})
    if labelled[0][0] == "concepts" and not cuis:
        raise UserError("the training concepts name no CUI")
    column = {c: n for n, c in enumerate(cuis)}
    label_idx = np.array([column[c] for i in ids for c in concepts.get(i, [])], np.int64)
    label_ptr = np.concatenate([[0], np.cumsum([len(concepts.get(i, [])) for i in ids])]).astype(np.int64)
    kept_captions = [captions[i] for i in ids] if captions is not None else None
    index = ConceptIndex(cuis, ids, label_ptr, label_idx, [], {}, kept_captions)  # its members come below
    train_probes = bool(probe_options and probe_options.epochs > 0 and cuis)
    labels = index.label_matrix() if train_probes else None  # the images x CUIs matrix every probe learns
    members = []
    for encoder, all_vectors in zip(train.encoders, train.vectors, strict=True):
        vectors = np.ascontiguousarray(all_vectors[keep])
        probe = None
        if train_probes:
            start = time.perf_counter()
            probe = train_probe(vectors, labels, probe_options)
            info = probe.info
            f1s = ", ".join(f"{x:.4f}" for x in info["held_out_f1"])
            steps = info["steps"] // info["passes"]
            # A pass is at least probe.MIN_STEPS_PER_PASS steps: over a small set it sees each image several times.
            seen = steps * info["batch_size"] / info["train_images"]
            log(f"probe ({encoder_label(encoder)}): {info['passes']} passes of {steps} steps of {info['batch_size']} "
                f"images (each of the {info['train_images']} training images about {seen:.0f} times a pass) in "
                f"{time.perf_counter() - start:.1f} s"
                + (f"; kept pass {info['best_pass']}, held-out F1 per pass: {f1s}" if f1s else ""))
        members.append(Member({k: v for k, v in encoder.items() if k not in ("device",)}, vectors, probe))
    left_out = {f"embedded images without a {name} row": len(train.ids) - sum(1 for i in train.ids if i in rows)
                for name, rows in labelled}
    left_out |= {f"{name} rows without an embedded image": len(set(rows) - set(train.ids)) for name, rows in labelled}
    meta = {"images": len(ids), "cuis": len(cuis), "dims": [int(m.vectors.shape[1]) for m in members],
            "images_without_concepts_row": left_out.get("embedded images without a concepts row", 0),
            "concept_rows_without_image": left_out.get("concepts rows without an embedded image", 0),
            "encoders": [m.encoder for m in members],
            "fingerprint": fingerprint(ids, cuis, label_idx, members, kept_captions)}
    if kept_captions is not None:
        meta["captions"] = len(kept_captions)
    index = replace(index, members=members, meta=meta)
    save_index(index, output_dir)
    if any(left_out.values()):
        log("left out: " + ", ".join(f"{n} {what}" for what, n in left_out.items() if n))
    return index


def fingerprint(ids: list[str], cuis: list[str], label_idx: np.ndarray, members: list[Member],
                captions: list[str] | None = None) -> str:
    """Which fit this is: settings tuned on one index are refused with another (a refit changes the probe), and
    a caption run's journal records it, so a resume with another index is refused."""
    h = hashlib.sha256("\n".join(ids).encode() + b"\0" + "\n".join(cuis).encode() + label_idx.tobytes())
    for m in members:
        h.update(json.dumps(m.encoder, sort_keys=True).encode())
        for name, tensor in sorted((m.probe.tensors if m.probe else {}).items()):
            h.update(name.encode() + np.ascontiguousarray(tensor).tobytes())
    if captions is not None:  # an index without captions keeps the fingerprint it always had
        h.update(b"\0captions\0" + "\0".join(captions).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def save_index(index: ConceptIndex, output_dir: str | Path) -> Path:
    from safetensors.numpy import save

    out = Path(output_dir)
    buffer = io.BytesIO()
    vectors = {f"vectors_{m}": member.vectors for m, member in enumerate(index.members)}
    # Captions are optional arrays: an index without them is the same file as before.
    captions = captions_arrays(index.captions) if index.captions is not None else {}
    np.savez(buffer, format=np.array(INDEX_FORMAT), ids=np.array(index.ids, dtype=str),
             cuis=np.array(index.cuis, dtype=str), label_ptr=index.label_ptr, label_idx=index.label_idx,
             meta=np.array(json.dumps(index.meta)), **vectors, **captions)
    files.write_bytes_atomic(out / "index.npz", buffer.getvalue())
    probes = {m: member.probe for m, member in enumerate(index.members) if member.probe is not None}
    if probes:
        tensors = {f"{m}.{k}": v for m, probe in probes.items() for k, v in probe.tensors.items()}
        files.write_bytes_atomic(out / "probe.safetensors", save(tensors))
        info = {"members": {str(m): probe.info for m, probe in probes.items()}, "cuis": index.cuis}
        files.write_text_atomic(out / "probe.json", json.dumps(info, indent=1))
    else:
        (out / "probe.safetensors").unlink(missing_ok=True)
        (out / "probe.json").unlink(missing_ok=True)
    return out


def captions_arrays(captions: list[str]) -> dict[str, np.ndarray]:
    """Captions as one UTF-8 byte array and their end offsets: a fixed-width unicode array would give every
    caption the longest one's width (ROCO has captions of 2,000+ characters; 80,000 x 4 bytes x that)."""
    encoded = [c.encode("utf-8", "surrogatepass") for c in captions]
    return {"captions_utf8": np.frombuffer(b"".join(encoded), np.uint8),
            "captions_end": np.cumsum([len(e) for e in encoded], dtype=np.int64)}


def captions_from_arrays(data) -> list[str]:
    blob, ends = data["captions_utf8"].tobytes(), data["captions_end"].tolist()
    return [blob[a:b].decode("utf-8", "surrogatepass") for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def load_index(index_dir: str | Path) -> ConceptIndex:
    folder = Path(index_dir)
    path = folder / "index.npz"
    if not path.is_file():
        raise UserError(f"no index.npz in {folder} (make it with: concept_index.py fit)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != INDEX_FORMAT:
                old = str(data["format"]) == OLD_INDEX_FORMAT
                raise ValueError(f"format {data['format']}" + ("; it was fitted by an older version: fit it again"
                                                               if old else ""))
            cuis = data["cuis"].tolist()
            ids = data["ids"].tolist()
            label_ptr, label_idx = data["label_ptr"], data["label_idx"]
            meta = json.loads(str(data["meta"]))
            vectors = [data[f"vectors_{m}"].reshape(len(ids), -1) for m in range(len(meta["encoders"]))]
            captions = captions_from_arrays(data) if "captions_utf8" in data.files else None
            if captions is not None and len(captions) != len(ids):
                raise ValueError(f"{len(captions)} captions for {len(ids)} images")
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # damaged, cut short, or not ours
        raise UserError(f"{path} is not a concept index written by concept_index.py fit ({first_line(e)}); fit it "
                        "again") from None
    for encoder in meta["encoders"]:
        check_recorded(encoder, f"the concept index {folder}", "embed the training images again and fit it again")
    probes = load_probes(folder, cuis)
    members = [Member(e, v, probes.get(m)) for m, (e, v) in enumerate(zip(meta["encoders"], vectors, strict=True))]
    return ConceptIndex(cuis, ids, label_ptr, label_idx, members, meta, captions)


def load_probes(folder: Path, cuis: list[str]) -> dict[int, Probe]:
    """Member -> its probe, from probe.safetensors and probe.json (fit writes both or neither)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    present = [name for name in PROBE_FILES if (folder / name).is_file()]
    if not present:
        return {}
    if len(present) < len(PROBE_FILES):
        missing = next(name for name in PROBE_FILES if name not in present)
        raise UserError(f"{folder} has {present[0]} but no {missing}: the index is incomplete; fit it again")
    try:
        info = json.loads((folder / "probe.json").read_text(encoding="utf-8"))
        if info.pop("cuis") != cuis:
            raise UserError(f"{folder}/probe.json lists other CUIs than index.npz; fit the index again")
        tensors = load_file(folder / "probe.safetensors")
        probes = {}
        for m, member_info in info["members"].items():
            own = {k.partition(".")[2]: v for k, v in tensors.items() if k.partition(".")[0] == m}
            probes[int(m)] = Probe(own, member_info)
        return probes
    except (OSError, KeyError, ValueError, AttributeError, SafetensorError) as e:
        raise UserError(f"the probe files in {folder} are damaged ({first_line(e)}); fit the index again") from None


def embed_options_for(index: ConceptIndex, method_settings: dict | None = None, **options) -> EmbedOptions:
    """How a run embeds its images for this index: with each encoder the settings use (every encoder of the
    index without settings), pooled as at fit time. `options`: the other EmbedOptions fields."""
    used = used_members(index, method_settings)
    encoders = tuple((index.members[m].encoder.get("source") or "llava", index.members[m].encoder["pooling"])
                     for m in used)
    return EmbedOptions(encoders=encoders, **options)


def used_members(index: ConceptIndex, method_settings: dict | None) -> list[int]:
    """The members whose kNN or probe weight is not zero in these settings (all of them without settings)."""
    if method_settings is None:
        return list(range(len(index.members)))
    return [m for m, part in enumerate(method_settings["members"]) if part.get("knn") or part.get("probe")]


def nearest(keys: np.ndarray, queries: np.ndarray, k: int, device: str = "cpu",
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, key rows) of the k nearest keys per query, nearest first: exact search,
    chunked matrix products (rows are L2-normalised, so the dot product is the cosine).

    Keys at equal cosine (duplicated training images) are taken lowest row first, so the k nearest are
    always the first k of the K nearest: tuning searches once at its largest k and reads every smaller k
    from that list, prediction searches at the tuned k, and both must pick the same neighbours.
    """
    import torch

    k = min(k, len(keys))
    sims = np.zeros((len(queries), k), np.float32)
    rows = np.zeros((len(queries), k), np.int64)
    if not len(queries) or not k:
        return sims, rows
    key_t = torch.from_numpy(np.ascontiguousarray(keys)).to(device)
    for start in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + chunk])).to(device)
        values, indices = top_k_lowest_row_first(q @ key_t.T, k)
        sims[start:start + len(q)] = values.cpu().numpy()
        rows[start:start + len(q)] = indices.cpu().numpy()
    return sims, rows


def top_k_lowest_row_first(scores, k: int):
    """torch.topk over each row of `scores`, with ties broken by the lower column (topk's own order among
    equal values is unspecified, and a tie can straddle the k-th place). Rows without ties, nearly all
    of them, cost one topk of k + 1."""
    import torch

    width = scores.shape[1]
    values, indices = torch.topk(scores, min(k + 1, width), dim=1)
    straddles = values[:, k - 1] == values[:, k] if k < width else torch.zeros(len(values), dtype=torch.bool)
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    inside = (values[:, :-1] == values[:, 1:]).any(1)
    if inside.any():  # the same k keys, put in order: by row, then stably by value, best first
        rows = inside.nonzero().squeeze(1)
        by_row, order = torch.sort(indices[rows], dim=1)
        by_value = torch.sort(values[rows].gather(1, order), dim=1, descending=True, stable=True)
        values[rows], indices[rows] = by_value.values, by_row.gather(1, by_value.indices)
    if straddles.any():  # which of the tied keys are in the k: a stable sort of the whole row
        rows = straddles.nonzero().squeeze(1)
        ranked = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], indices[rows] = ranked.values[:, :k], ranked.indices[:, :k]
    return values, indices
