"""The official ImageCLEFmedical Caption scores, computed locally: concept F1 (primary and
secondary) and the caption metrics (ROUGE-1, BLEU, BERTScore, BLEURT) with the 2026 aggregates.

Concept F1 follows the official evaluator exactly, including how its reader turns a row into
concepts: `ID` alone is no concept, `ID,` is the one empty concept '', `C1;` adds '' as a concept.
Caption metrics use the official preprocessing; only metrics that run offline are computed, and a
metric whose model is not available is skipped and said so, never estimated. evaluate.py is the
command line over this module; fine-tuning's validation and the vision-concept tuning use it too.
"""

from __future__ import annotations

import functools
import re
import string
import sys
from pathlib import Path

from . import errors

# The 2025 secondary-score list: imaging modalities and body regions.
ALLOWED_CUIS_2025 = (
    "C0002978", "C0040405", "C0024485", "C0032743", "C0041618", "C1306645", "C0920367",
    "C1140618", "C0037949", "C0030797", "C0023216", "C0037303", "C0817096", "C0006141", "C0000726",
)


# ---------------------------------------------------------------------------------------------
# Concept scores
# ---------------------------------------------------------------------------------------------


def image_f1(gt: tuple[str, ...], pred: tuple[str, ...]) -> float:
    """The official per-image F1 over the union of upper-cased concepts.

    The official script builds binary vectors over the sorted union and calls sklearn's
    f1_score(average="binary"); that is exactly 2TP / (2TP + FP + FN) on the two sets, which this
    computes directly: sklearn's input checks cost ~4 ms an image, over a minute for a test set.
    tests/test_evaluate.py checks the two agree on real data.
    """
    gt_set = {c.upper() for c in gt}
    pred_set = {c.upper() for c in pred}
    tp = len(gt_set & pred_set)
    denominator = len(gt_set) + len(pred_set)
    return 2 * tp / denominator if denominator else 0.0


def empty_concept_note(gt: tuple[str, ...], pred: tuple[str, ...]) -> str:
    """Why an image's concept count includes the empty concept '' (the official reader's quirk), or ''."""
    notes = []
    for side, concepts in (("ground truth", gt), ("prediction", pred)):
        if concepts == ("",):
            notes.append(f"the {side}'s empty CUIs field counts as one concept ''")
        elif "" in concepts:
            notes.append(f"an empty item (a stray ';') in the {side} counts as a concept ''")
    return "; ".join(notes)


def concept_scores(gt: dict[str, tuple[str, ...]], pred: dict[str, tuple[str, ...]],
                   manual: dict[str, tuple[str, ...]] | None = None,
                   allowed: tuple[str, ...] = ALLOWED_CUIS_2025) -> tuple[dict, list[dict]]:
    """(summary, per-image rows): primary F1 and, with manual ground truth, secondary F1.

    A row's `gt` and `pred` count concepts as the official reader does, the empty concept '' included;
    its `note` says so where that happened.
    """
    per_image: dict[str, dict] = {}
    primary = []
    for image_id, concepts in gt.items():
        if not concepts:  # only a row with no second field is an empty set; it is not counted
            continue
        predicted = pred.get(image_id, ())
        score = image_f1(concepts, predicted)
        primary.append(score)
        per_image[image_id] = {"ID": image_id, "f1": score, "gt": len(concepts), "pred": len(predicted)}
        note = empty_concept_note(concepts, predicted)
        if note:
            per_image[image_id]["note"] = note
    summary: dict = {"f1": sum(primary) / len(primary) if primary else 0.0, "images_scored": len(primary)}
    if manual is not None:
        allowed_set = {c.upper() for c in allowed}
        secondary = []
        for image_id, concepts in manual.items():
            gt_f = tuple(c for c in concepts if c.upper() in allowed_set)
            if not gt_f:
                continue
            pred_f = tuple(c for c in pred.get(image_id, ()) if c.upper() in allowed_set)
            score = image_f1(gt_f, pred_f)
            secondary.append(score)
            per_image.setdefault(image_id, {"ID": image_id})["f1_secondary"] = score
        summary["f1_secondary"] = sum(secondary) / len(secondary) if secondary else 0.0
        summary["images_scored_secondary"] = len(secondary)
    return summary, list(per_image.values())


# ---------------------------------------------------------------------------------------------
# Caption scores
# ---------------------------------------------------------------------------------------------

PUNCTUATION = str.maketrans("", "", string.punctuation)


def preprocess_caption(text: str) -> str:
    """Official preprocessing: lower-case, every run of digits -> 'number', ASCII punctuation removed."""
    return re.sub(r"\d+", "number", text.lower()).translate(PUNCTUATION)


def rouge1_scores(gts: list[str], preds: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    return [1.0 if not g.strip() and not p.strip() else scorer.score(g, p)["rouge1"].fmeasure
            for g, p in zip(gts, preds, strict=True)]


def bleu_scores(gts: list[str], preds: list[str]) -> dict[str, float]:
    """Corpus BLEU-1 and BLEU-4 (sacrebleu, 0-1) on the preprocessed captions."""
    from sacrebleu.metrics import BLEU

    out = {}
    for n in (1, 4):
        out[f"bleu{n}"] = BLEU(max_ngram_order=n, effective_order=True).corpus_score(preds, [gts]).score / 100.0
    return out


def bertscore_f1(gts: list[str], preds: list[str], model: str, num_layers: int | None) -> list[float]:
    """BERTScore F1 of each pair (bert-score package, a local model folder), with idf from every ground-truth
    caption in `gts`, as the organisers' BERTScorer(idf_sents=...) computes it: the pairs scored (those where
    neither caption is empty) do not change the weights, so no image's score depends on another's prediction."""
    import bert_score

    folder = Path(model)
    if not (folder / "config.json").exists():
        raise errors.UserError(f"--bertscore_model {model} is not a local model folder (no config.json)")
    if num_layers is None:
        name = folder.name.lower()
        num_layers = bert_score.utils.model2layers.get(next((k for k in bert_score.utils.model2layers
                                                              if name.endswith(k.split("/")[-1])), ""), None)
        if num_layers is None:
            raise errors.UserError("--bertscore_layers is needed for a model bert-score does not know by name")
    # Empty captions never reach bert-score (it fails on them with transformers 5): both empty scores
    # 1 as officially, one empty scores 0.
    scores = [1.0 if not g.strip() and not p.strip() else 0.0 for g, p in zip(gts, preds, strict=True)]
    todo = [i for i, (g, p) in enumerate(zip(gts, preds, strict=True)) if g.strip() and p.strip()]
    if todo:
        idf = idf_weights(gts, bert_score.utils.get_tokenizer(str(folder), False))  # the tokenizer score() loads
        _, _, f1 = bert_score.score([preds[i] for i in todo], [gts[i] for i in todo], model_type=str(folder),
                                    num_layers=num_layers, idf=idf, lang="en", verbose=False, batch_size=32)
        for i, s in zip(todo, f1.tolist(), strict=True):
            scores[i] = float(s)
    return scores


def idf_weights(sentences: list[str], tokenizer) -> dict:
    """bert-score's idf weights (utils.get_idf_dict) over `sentences`: log((N + 1) / (n + 1)) for a token in n of
    the N sentences, log(N + 1) for one in none. An empty sentence counts as its special tokens alone, as
    bert-score encodes it; bert-score itself cannot encode one on transformers 5 (it calls a tokenizer method
    that is gone), so the empty ones are counted here."""
    import math
    from collections import Counter, defaultdict

    from bert_score.utils import process

    empty = set(tokenizer("")["input_ids"])  # [CLS] [SEP]
    counts = Counter(token for s in sentences for token in (process(s, tokenizer) if s.strip() else empty))
    n = len(sentences)
    weights: dict = defaultdict(lambda: math.log(n + 1))
    weights.update({token: math.log((n + 1) / (c + 1)) for token, c in counts.items()})
    return weights


# bleurt-pytorch 0.0.1 (what the organisers install) was written for transformers 4. On transformers 5 its
# own classes run after three mends, applied only where the name is missing:
# - `transformers.pytorch_utils.find_pruneable_heads_and_indices` is gone and the package imports it
#   (ImportError): it is only used to prune attention heads, which scoring never does, so a stand-in
#   that refuses is enough;
# - `transformers.models.bert.tokenization_bert_fast` is gone (ModuleNotFoundError): BertTokenizerFast
#   now lives in transformers itself, so an alias module provides it;
# - PreTrainedModel lost `get_extended_attention_mask` and `get_head_mask`, which BleurtModel.forward
#   calls (AttributeError): the two transformers-4 helpers are added back to the package's base class,
#   for the encoder case BLEURT is (a padding mask; no head mask).


def refuse_head_pruning(*args, **kwargs):
    raise NotImplementedError("pruning attention heads is not supported here")


def extended_attention_mask(self, attention_mask, input_shape):
    """transformers 4's mask for an encoder: 0 where attended, the dtype's minimum on padding."""
    import torch

    mask = attention_mask[:, None, None, :].to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def no_head_mask(self, head_mask, num_hidden_layers):
    if head_mask is not None:
        raise NotImplementedError("head_mask is not supported here")
    return [None] * num_hidden_layers


def bleurt_classes() -> tuple:
    """(BleurtForSequenceClassification, BleurtSPTokenizer, BleurtTokenizerFast) from bleurt-pytorch, mended."""
    import importlib
    import types

    import transformers
    import transformers.pytorch_utils as pytorch_utils

    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = refuse_head_pruning
    alias = "transformers.models.bert.tokenization_bert_fast"
    try:
        importlib.import_module(alias)
    except ModuleNotFoundError:
        module = types.ModuleType(alias)
        module.BertTokenizerFast = transformers.BertTokenizerFast
        sys.modules[alias] = module
    try:
        from bleurt_pytorch import BleurtForSequenceClassification
        from bleurt_pytorch.bleurt.modeling_bleurt import BleurtPreTrainedModel
        from bleurt_pytorch.bleurt.tokenization_bleurt_fast import BleurtTokenizerFast
        from bleurt_pytorch.bleurt.tokenization_bleurt_sp import BleurtSPTokenizer
    except ImportError as e:
        raise errors.UserError(f"--bleurt_model needs bleurt-pytorch (pip install -r requirements.txt): "
                               f"{errors.first_line(e)}") from None
    if not hasattr(BleurtPreTrainedModel, "get_extended_attention_mask"):
        BleurtPreTrainedModel.get_extended_attention_mask = extended_attention_mask
    if not hasattr(BleurtPreTrainedModel, "get_head_mask"):
        BleurtPreTrainedModel.get_head_mask = no_head_mask
    return BleurtForSequenceClassification, BleurtSPTokenizer, BleurtTokenizerFast


@functools.lru_cache(maxsize=1)
def load_bleurt(model: str):
    """(model, tokenizer) from a local BLEURT folder, e.g. lucadiliello/BLEURT-20-D12. Kept for the next call:
    tune_captions scores every contender with the same model."""
    import torch

    folder = Path(model)
    if not (folder / "config.json").exists():
        raise errors.UserError(f"--bleurt_model {model} is not a local model folder (no config.json)")
    model_class, sentencepiece_class, wordpiece_class = bleurt_classes()
    # The package's BleurtTokenizer tries the WordPiece class and falls back to the sentencepiece one when
    # that raises. On transformers 5 the WordPiece class loads a folder without vocab.txt instead of
    # raising, and maps every word to [UNK]; so choose by the files, as that fallback did.
    if (folder / "vocab.txt").exists() or (folder / "tokenizer.json").exists():
        tokenizer = wordpiece_class.from_pretrained(str(folder))
    elif (folder / "spm.model").exists():
        try:
            tokenizer = sentencepiece_class.from_pretrained(str(folder))
        except (ImportError, ValueError) as e:  # reading spm.model needs sentencepiece and protobuf
            raise errors.UserError(f"cannot read {folder / 'spm.model'} (pip install -r requirements.txt): "
                                   f"{errors.first_line(e)}") from None
    else:
        raise errors.UserError(f"--bleurt_model {model} has no tokenizer (spm.model, vocab.txt or tokenizer.json)")
    # float32 as transformers 4 loaded it; transformers 5 would otherwise follow the checkpoint's dtype.
    net = model_class.from_pretrained(str(folder), dtype=torch.float32).eval()
    return net, tokenizer


def bleurt_scores(gts: list[str], preds: list[str], model: str, batch_size: int = 8) -> list[float]:
    """BLEURT for each (reference, candidate) pair, as the organisers compute it.

    Batches of 8 (their default), padded to the longest pair, truncated at 512 tokens; every pair goes
    through the model, empty captions included (no special case, unlike ROUGE and BERTScore).
    """
    import torch

    net, tokenizer = load_bleurt(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    scores: list[float] = []
    for start in range(0, len(gts), max(1, batch_size)):
        refs, cands = gts[start:start + batch_size], preds[start:start + batch_size]
        with torch.inference_mode():
            inputs = tokenizer(refs, cands, padding="longest", return_tensors="pt", truncation=True, max_length=512)
            logits = net(**{k: v.to(device) for k, v in inputs.items()}).logits
        scores.extend(float(s) for s in logits.flatten().cpu().tolist())
    return scores


# The 2026 aggregates: (summary key, name) of each part, averaged with equal weight.
RELEVANCE_PARTS = (("bertscore_f1", "BERTScore"), ("rouge1", "ROUGE-1"), ("medimageinsight", "MedImageInsight"),
                   ("bleurt", "BLEURT"))
FACTUALITY_PARTS = (("medcat_f1", "MedCAT"), ("alignscore", "AlignScore"))


def aggregate(summary: dict, name: str, parts: tuple[tuple[str, str], ...]) -> dict:
    """The official mean when every part ran; otherwise `<name>_partial`, naming what was left out."""
    present = [key for key, _ in parts if key in summary]
    skipped = [label for key, label in parts if key not in summary]
    if not skipped:
        return {name: sum(summary[k] for k in present) / len(present)}
    return {f"{name}_partial": {"value": sum(summary[k] for k in present) / len(present) if present else None,
                                "parts": f"{len(present)} of {len(parts)}", "skipped": skipped}}


def describe_partial(entry: dict) -> str:
    """How a `<name>_partial` aggregate reads: which parts ran, which were skipped."""
    if entry["value"] is None:
        return f"skipped: {', '.join(entry['skipped'])}"
    return f"partial: {entry['parts']} parts; skipped {', '.join(entry['skipped'])}"


def caption_scores(gt: dict[str, str], pred: dict[str, str], bertscore_model: str | None = None,
                   bertscore_layers: int | None = None, bleurt_model: str | None = None,
                   bleurt_batch_size: int = 8) -> tuple[dict, list[dict]]:
    ids = list(gt)
    gts = [preprocess_caption(gt[i]) for i in ids]
    preds = [preprocess_caption(pred.get(i, "")) for i in ids]
    rouge = rouge1_scores(gts, preds)
    summary: dict = {"images_scored": len(ids), "rouge1": sum(rouge) / max(len(ids), 1), **bleu_scores(gts, preds)}
    rows = [{"ID": i, "rouge1": r} for i, r in zip(ids, rouge, strict=True)]
    per_pair: dict[str, list[float]] = {}
    skipped = []
    if bertscore_model:
        per_pair["bertscore_f1"] = bertscore_f1(gts, preds, bertscore_model, bertscore_layers)
    else:
        skipped.append("bertscore_f1 (give --bertscore_model, a local microsoft/deberta-xlarge-mnli folder)")
    if bleurt_model:
        per_pair["bleurt"] = bleurt_scores(gts, preds, bleurt_model, bleurt_batch_size)
    else:
        skipped.append("bleurt (give --bleurt_model, a local lucadiliello/BLEURT-20-D12 folder)")
    for key, scores in per_pair.items():
        summary[key] = sum(scores) / max(len(ids), 1)
        for row, score in zip(rows, scores, strict=True):
            row[key] = score
    skipped.append("MedImageInsight similarity, UMLS-concept F1 (MedCAT), AlignScore: need models this tool does "
                   "not ship")
    summary.update(aggregate(summary, "relevance", RELEVANCE_PARTS))
    summary.update(aggregate(summary, "factuality", FACTUALITY_PARTS))
    summary["skipped"] = skipped
    return summary, rows
