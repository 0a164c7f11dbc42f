"""Sources of a run's records (pipeline.run): where each image's answer comes from.

- `GenerateSource`: the language model writes it, into the journal (resume, shards, the merge); with
  retrieval, each image's prompt holds its nearest training captions (--method rag); with N candidates
  per image, an image-text model scores them against the image and the best is kept (best of N);
- `EmbedSource`: an image encoder's vector, into the embedding store (the vision concept methods);
- `GenerateThenEmbed`: both, with one model load (--method fused);
- `AnswersFileSource`: the answers of an earlier run, read from a file (--from_natural_csv);
- `EmbeddingsFileSource`: vectors an earlier `concept_index.py embed` made (concept_index.py predict);
- `NearestCaptionSource`: the caption of the nearest training image(s), no text generation (--method knn).

The raw text of every generated image goes to the journal before anything else happens to it, so
the CSVs can always be rebuilt from it. torch and transformers are imported where they are needed,
so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import RESUME_HINT, UserError, log
from .files import lock_exclusive
from .journal import default_journal_path, open_journal
from .model import ModelSpec, load_model, resolve_device_and_dtype
from .pipeline import RunConfig, RunResult, Selection, worker_died
from .records import Record
from .shards import gather_to_rank0, merge_shard_records, process_group
from .signals import StopSignals
from .tables import read_id_table


@dataclass(frozen=True)
class Generation:
    """What decides the generated text, and how fast it is made."""

    task: str  # caption | concepts
    model: ModelSpec
    prompt: str  # the full prompt text, <image> included
    gen_kwargs: dict
    batch_size: int | None = None  # None: auto
    compile: bool = False  # static cache + compiled decoding step
    num_workers: int | None = None  # None: see cpu_split()
    seed: int = 0
    # --method rag: `prompt` is the RAG template, each image's nearest training captions go in its place for them
    retrieval: object | None = None  # retrieval.Retrieval
    # best of N (gen_kwargs num_return_sequences N > 1): the image-text model that picks the candidate kept
    rerank_model: str | None = None  # --rerank_model: a folder or hub ID (rerank.py); None keeps the first

    def settings(self, dtype: str) -> dict:
        """What decides the generated text; a resume with different settings is refused. The reranker is not
        among them: it chooses among the candidates, and another one scores them again without generating.
        A model is recorded as given; a resume compares local folders by where they resolve
        (journal.settings_differences).

        `dtype` is the resolved one, so `--dtype auto` and the dtype it picks count as the same.
        """
        model = {k: v for k, v in asdict(self.model).items() if k not in ("device", "merged_cache_dir", "dtype")}
        settings = {"task": self.task, **model, "dtype": dtype, "prompt": self.prompt, "generation": self.gen_kwargs}
        if self.retrieval is not None:
            settings["retrieval"] = self.retrieval.settings()
        return settings

    def resolved_settings(self) -> dict:
        _, dtype = resolve_device_and_dtype(self.model.device, self.model.dtype)
        return self.settings(str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------
# Generation into the journal
# ---------------------------------------------------------------------------------------------


class GenerateSource:
    """The model's answer for every image, appended to the journal after every batch.

    `bundle` is a loaded (model, processor, device) to use instead of loading one; after `produce`,
    `loaded` holds the bundle the run used (None if it generated nothing), so a later step can reuse it.
    """

    def __init__(self, generation: Generation, bundle=None):
        self.generation = generation
        self.bundle = bundle
        self.loaded = None
        self.reranker = None  # rerank.Reranker, loaded when first needed

    def outputs(self) -> list[str]:
        return self.generation.retrieval.outputs() if self.generation.retrieval is not None else []

    def check(self) -> None:
        if self.generation.retrieval is not None:
            self.generation.retrieval.check()
        if self.generation.rerank_model:
            from .rerank import check_source

            check_source(self.generation.rerank_model)

    def ids(self) -> None:
        return None  # the run's images: the image folder

    def produce(self, cfg: RunConfig, selection: Selection) -> RunResult:
        if cfg.merge:
            merged = merge_shards(cfg, self.generation, selection)
            return replace(merged, records=self.chosen(merged.records, merged=True))
        items = cfg.shard.take(selection.items) if cfg.shard else selection.items
        if not (cfg.shard and cfg.shard.distributed):
            return self.into_journal(cfg, items, self.generation.model)
        with process_group(self.generation.model.device) as device:
            mine = self.into_journal(cfg, items, replace(self.generation.model, device=device))
            parts = gather_to_rank0({"records": {i: mine.records[i] for i, _ in items if i in mine.records},
                                     "done": mine.done_now, "stopped": mine.stopped, "seconds": mine.seconds,
                                     "working": mine.working_seconds})
        if parts is None:
            return mine
        records: dict[str, Record] = {}
        for part in parts:
            records.update(part["records"])
        stopped = next((p["stopped"] for p in parts if p["stopped"] is not None), None)
        return replace(mine, ids=selection.ids, records=records, seconds=max(p["seconds"] for p in parts),
                       done_now=sum(p["done"] for p in parts), stopped=stopped,
                       working_seconds=max(p["working"] for p in parts))

    def into_journal(self, cfg: RunConfig, items: list[tuple[str, str]], spec: ModelSpec) -> RunResult:
        """Open this process's journal and generate what it lacks; the result counts this process's images."""
        settings = replace(self.generation, model=spec).resolved_settings()
        journal_path = cfg.journal_path
        remedy = "give this run another --checkpoint_dir" if cfg.resume in (None, "auto") else "resume another journal"

        def hint() -> str:
            return RESUME_HINT if journal_path.exists() else "nothing was generated yet: rerun the same command"

        distributed = cfg.shard is not None and cfg.shard.distributed
        with lock_exclusive(journal_path, remedy), \
                StopSignals("after the current batch", distributed, hint=hint) as stop:
            journal = open_journal(journal_path, settings, os.path.abspath(cfg.image_dir), dict(items), cfg.resume,
                                   cfg.force_resume, cfg.overwrite, cfg.checkpoint_interval)
            todo = [(i, p) for i, p in items if not (i in journal.records and journal.records[i].ok)]
            start = time.perf_counter()
            done, detail, working, phases = 0, "", 0.0, ()
            try:
                if todo:
                    with ExitStack() as retrieving:
                        if self.generation.retrieval is not None:  # its conflicts refused before the model loads
                            retrieving.enter_context(self.generation.retrieval.prepared(items))
                        done, detail, working, phases = self.generate(todo, items, spec, journal, stop)
                if self.generation.rerank_model and stop.signum is None:
                    rerank_detail, rerank_seconds = self.rerank(items, spec, journal, stop)
                    detail = ", ".join(d for d in (detail, rerank_detail) if d)
                    phases += (("reranking", rerank_seconds),) if rerank_seconds else ()
            finally:
                journal.close()
            # A stopped run writes no CSV: nothing to choose, and no reranker to load on the way out.
            records = journal.records if stop.signum is not None else self.chosen(journal.records)
            kept = (("journal", cfg.journal_path),)
            if self.generation.retrieval is not None:
                kept += (("embeddings", self.generation.retrieval.embeddings),)
            return RunResult([i for i, _ in items], records, kept, time.perf_counter() - start, done, stop.signum,
                             detail, working, phases)

    def generate(self, todo: list[tuple[str, str]], items: list[tuple[str, str]], spec: ModelSpec, journal,
                 stop: StopSignals) -> tuple[int, str, float, tuple[tuple[str, float], ...]]:
        """Load the model and append the records of every batch to the journal; returns how many were written,
        how (batch size), the seconds spent generating (model loading, retrieval and the batch-size probe
        left out) and the other timed steps (embedding the images, for retrieval). `items`: every image of this
        process (retrieval embeds them all, so a resume reads them)."""
        import torch
        from tqdm import tqdm

        from .generation import auto_batch_size, generate_batches
        from .images import make_loader

        g = self.generation
        torch.manual_seed(g.seed)
        self.loaded = self.bundle or load_model(spec)
        model, processor, device = self.loaded
        prompt, phases = g.prompt, ()
        if g.retrieval is not None:
            prompt, phases = self.rag_prompts(items, todo)
        longest = prompt if isinstance(prompt, str) else max(prompt.values(), key=len)  # the batch-size probe's
        batch_size = g.batch_size or auto_batch_size(model, processor, longest, g.gen_kwargs, len(todo),
                                                     static_cache=g.compile).size
        done = 0
        start = time.perf_counter()
        with cpu_split(device.type, g.num_workers) as workers:
            loader = make_loader(todo, processor, prompt, batch_size, workers, pin_memory=device.type == "cuda")
            with tqdm(total=len(todo), unit="img", desc=g.task, dynamic_ncols=True, file=sys.stderr) as bar, \
                    stop.armed_for():
                for records in generate_batches(model, processor, guarded(loader), g.gen_kwargs,
                                                "inductor" if g.compile else None, batch_size):
                    journal.append(records, loader.digests)
                    for r in records:
                        if not r.ok:
                            bar.write(f"warning: {r.id}: {r.error}", file=sys.stderr)
                    done += len(records)
                    bar.update(len(records))
                    if stop.signum is not None:
                        break
        detail = f"batch size {batch_size}" + (" (auto)" if g.batch_size is None else "") + \
            (", compiled" if g.compile else "")
        return done, detail, time.perf_counter() - start, phases

    def rag_prompts(self, items: list[tuple[str, str]], todo: list[tuple[str, str]]
                    ) -> tuple[dict[str, str], tuple[tuple[str, float], ...]]:
        """ID -> prompt of every image to generate: the RAG template with the captions of its nearest training
        images. The vectors of the process's images are made first (those --embeddings holds of unchanged images
        are reused); the index's 'llava' encoder is the tower of the model just loaded, so the checkpoint is read
        once. Also returns the embedding as a timed step, when it embedded any image."""
        from .prompts import rag_prompt

        g = self.generation
        made = g.retrieval.vectors(items, llava_tower(g.retrieval.options, self.loaded))
        captions = g.retrieval.captions(made.embeddings, [i for i, _ in todo])
        # An image without a vector could not be read: it fails to load in the loader too, whatever its prompt.
        prompts = {i: rag_prompt(g.prompt, captions.get(i, [])) for i, _ in todo}
        return prompts, embedding_phase(made.embedded, made.seconds)

    def load_reranker(self, device: str):
        from .rerank import load_reranker

        if self.reranker is None:
            self.reranker = load_reranker(self.generation.rerank_model, device, self.generation.model.dtype)
        return self.reranker

    def rerank(self, items: list[tuple[str, str]], spec: ModelSpec, journal, stop: StopSignals) -> tuple[str, float]:
        """Score, with the reranker, the candidates of every image whose record lacks its scores, appending the
        scored records to the journal; returns how (for the summary) and the seconds it took (0 if none needed it)."""
        from tqdm import tqdm

        from .rerank import rerank_batches

        reranker = self.load_reranker(spec.device)
        todo = [(i, p) for i, p in items if i in journal.records and journal.records[i].ok
                and journal.records[i].candidates and reranker.key not in journal.records[i].scores]
        start = time.perf_counter()
        if todo:
            workers = min(4, self.generation.num_workers if self.generation.num_workers is not None else 2)
            with tqdm(total=len(todo), unit="img", desc="rerank", dynamic_ncols=True, file=sys.stderr) as bar, \
                    stop.armed_for():
                for records, digests in rerank_batches(reranker, todo, journal.records, workers):
                    journal.append(records, digests)
                    bar.update(len(records))
                    if stop.signum is not None:
                        break
        seconds = time.perf_counter() - start if todo else 0.0  # nothing scored: no reranking step to time
        return f"best of {self.candidates()} by {reranker.key} (scored now: {len(todo)})", seconds

    def candidates(self) -> int:
        return int(self.generation.gen_kwargs.get("num_return_sequences", 1))

    def chosen(self, records: dict[str, Record], merged: bool = False) -> dict[str, Record]:
        """Every record with the text the run keeps: with candidates, the one the reranker scores highest (the
        generation's first without a reranker). The merge scores nothing: a shard lacking the scores is rerun."""
        from .rerank import chosen

        if not self.generation.rerank_model:
            return {i: chosen(r, None) for i, r in records.items()}
        key = self.load_reranker(self.generation.model.device).key
        if merged:
            unscored = [i for i, r in records.items() if r.ok and r.candidates and key not in r.scores]
            if unscored:
                raise UserError(f"{len(unscored)} images of the shards have candidates not scored by {key} (first: "
                                f"{', '.join(unscored[:3])}): rerun each shard with this --rerank_model and "
                                "--resume_from_checkpoint auto (it scores them, no generation), then merge")
        return {i: chosen(r, key) for i, r in records.items()}


def merge_shards(cfg: RunConfig, generation: Generation, selection: Selection) -> RunResult:
    """--merge_shards: all shards' journals -> one result, refusing a missing or incomplete shard."""
    records = merge_shard_records(cfg.output_csv, cfg.checkpoint_dir, selection.ids, generation.resolved_settings(),
                                  os.path.abspath(cfg.image_dir), dict(selection.items))
    log(f"merged the shards: {len(selection.ids)} images")
    folder = default_journal_path(cfg.output_csv, cfg.checkpoint_dir).parent
    return RunResult(selection.ids, records, (("shard journals in", folder),))


def llava_tower(options, loaded) -> object | None:
    """The 'llava' encoder of the embedding options (embeddings.EmbedOptions), as the vision tower of a loaded
    generate model (model, processor, device), pooled as the options say; None if the options have no 'llava'
    encoder or nothing is loaded (then it is loaded alone, if needed)."""
    from .encoders import vision_encoder_from

    pooling = next((p for spec, p in options.choices() if spec == "llava"), None)
    return vision_encoder_from(loaded[0], loaded[1], pooling) if loaded and pooling else None


def guarded(loader) -> Iterator:
    """The loader's batches; a failure of the loader itself becomes one line with what to do.

    Bad images never raise out of the dataset (they come back as failures), so anything raised
    here is the machinery: a worker killed for lack of memory, /dev/shm full.
    """
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise worker_died(e) from None
        yield batch


@contextmanager
def cpu_split(device_type: str, num_workers: int | None) -> Iterator[int]:
    """Decode workers, and on CPU the model's threads: the two share the cores. Yields the workers.

    On a GPU the workers only feed it, so they get up to 4 cores. On CPU, image decoding and the
    model compete; the model's threads are set to the cores the workers leave, because
    oversubscribed cores made both slower (benchmarks/throughput.py). The thread count is
    restored however the run ends.
    """
    import torch

    cores = os.cpu_count() or 1
    if num_workers is None:
        num_workers = min(4, max(1, cores - 1)) if device_type == "cuda" else max(1, cores // 2)
    before = torch.get_num_threads()
    if device_type == "cpu" and num_workers > 0:
        torch.set_num_threads(max(1, cores - num_workers))
    try:
        yield num_workers
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Embedding into the store
# ---------------------------------------------------------------------------------------------


def embedded_result(ids: list[str], emb, where: str | Path, verb: str, seconds: float = 0.0, made=None
                    ) -> RunResult:
    """A run result from embeddings: a record per image (failed images with their error). `where`: the file (or
    files) they are kept in; `made`: what ensure_embeddings did this time (embeddings.Embedded), for the
    summary's counts and rate."""
    records = {i: Record(i) for i in emb.ids}
    records.update({i: Record(i, "", error) for i, error in emb.failed.items()})
    done, working = (made.embedded, made.seconds) if made is not None else (0, 0.0)
    return RunResult(ids, records, (("embeddings", where),), seconds, done, working_seconds=working, embeddings=emb,
                     verb=verb)


def embedding_phase(count: int, seconds: float) -> tuple[tuple[str, float], ...]:
    """Embedding `count` images as a timed step of a run whose work is something else (rag, fused), for the
    summary; nothing when every vector was reused."""
    if not count:
        return ()
    return ((f"embedding {count} image{'s' if count != 1 else ''}", seconds),)


class EmbedSource:
    """Every image's vector from an image encoder, kept up to date at `path` (embeddings.ensure_embeddings)."""

    def __init__(self, path: str | Path, options):
        self.path = Path(path)
        self.options = options  # embeddings.EmbedOptions

    def outputs(self) -> list[str]:
        return [str(self.path)]

    def check(self) -> None:
        from .embeddings import check_embed_options

        check_embed_options(self.options)

    def ids(self) -> None:
        return None  # the run's images: the image folder

    def produce(self, cfg: RunConfig, selection: Selection, encoder=None, locked: bool = False) -> RunResult:
        """`encoder`: LLaVA's tower already loaded; `locked`: the caller holds the file's lock."""
        from .embeddings import ensure_embeddings

        start = time.perf_counter()
        made = ensure_embeddings(selection.items, self.path, self.options, encoder, locked)
        return embedded_result(selection.ids, made.embeddings, self.path, "embedded", time.perf_counter() - start,
                               made)


class GenerateThenEmbed:
    """--method fused: generate the text (journal), then embed the same images with the model that
    generated (one load), or with the vision tower alone when this process generated nothing. The
    embeddings file is locked, and a conflict there refused, before the model loads."""

    def __init__(self, generate: GenerateSource, embed: EmbedSource):
        self.generate = generate
        self.embed = embed

    def outputs(self) -> list[str]:
        return self.generate.outputs() + self.embed.outputs()

    def check(self) -> None:
        self.generate.check()
        self.embed.check()

    def ids(self) -> None:
        return None  # the run's images: the image folder

    def produce(self, cfg: RunConfig, selection: Selection) -> RunResult:
        from .embeddings import plan_embeddings

        if not cfg.writes_csv:  # a shard: the process that writes the CSVs embeds
            return self.generate.produce(cfg, selection)
        with lock_exclusive(self.embed.path, "give this run another --embeddings"):
            plan_embeddings(selection.items, self.embed.path, self.embed.options).check(self.embed.path)
            result = self.generate.produce(cfg, selection)
            if result.stopped is not None:
                return result
            # Under a launcher each process loaded its own model on its own device; rank 0 then loads the tower
            # alone. The generating model's tower serves the index's 'llava' encoder; others are loaded.
            tower = llava_tower(self.embed.options, self.generate.loaded) if cfg.shard is None else None
            embedded = self.embed.produce(cfg, selection, tower, locked=True)
        # the embedding is a step of its own: the rate stays the generation's
        return replace(result, embeddings=embedded.embeddings, kept=result.kept + embedded.kept,
                       seconds=result.seconds + embedded.seconds,
                       phases=result.phases + embedding_phase(embedded.done_now, embedded.working_seconds))


# ---------------------------------------------------------------------------------------------
# Reading what an earlier run made
# ---------------------------------------------------------------------------------------------


class AnswersFileSource:
    """Answers read back from a CSV an earlier run wrote (format A: ID,Concepts), one record per row.

    With `embeddings` (the run's `<stem>.embeddings.npz`), the vectors come too, for fusing again. With
    `image_dir`, the rows are those of the folder's images, in its order, as in every run on a folder; an image
    of the folder without a row is refused (the file is another run's).
    """

    def __init__(self, path: str, column: str, embeddings: str | None = None, image_dir: str | None = None):
        self.path = path
        self.column = column
        self.embeddings = embeddings
        self.image_dir = image_dir
        self.rows: dict[str, str] | None = None
        self.selected: list[str] | None = None

    def outputs(self) -> list[str]:
        return []

    def check(self) -> None:
        from .images import list_images

        self.rows = read_id_table(self.path, self.column)
        self.selected = list(self.rows)
        if self.image_dir is None:
            return
        folder = [i for i, _ in list_images(self.image_dir)]  # none: the "no images" error with its hints
        lacking = [i for i in folder if i not in self.rows]
        if lacking:
            raise UserError(f"{self.path} has no row for {len(lacking)} of the {len(folder)} images in --image_dir "
                            f"{self.image_dir} (first: {', '.join(lacking[:3])}): is it another run's file? Drop "
                            "--image_dir to map every row of the file")
        self.selected = folder

    def ids(self) -> list[str]:
        return list(self.selected)

    def produce(self, cfg: RunConfig, selection: Selection) -> RunResult:
        records = {i: Record(i, self.rows[i]) for i in selection.ids}
        emb = None
        if self.embeddings:
            from .embeddings import check_has_ids, load_embeddings

            emb = load_embeddings(self.embeddings)
            check_has_ids(emb, selection.ids, self.embeddings, f"IDs of {self.path}", "the embeddings of another run?")
        kept = (("embeddings", self.embeddings),) if self.embeddings else ()
        return RunResult(selection.ids, records, kept, embeddings=emb, verb="read")


class EmbeddingsFileSource:
    """Vectors earlier embedding runs made (concept_index.py embed: one file, or one per encoder of an ensemble),
    one record per image; `extra_ids`: images without a vector that still get a row (they have generated CUIs).
    Every encoder the method's settings use must be in the files: checked before any work."""

    def __init__(self, paths: list[str], vision=None, extra_ids: list[str] = ()):
        self.paths = list(paths)
        self.vision = vision  # writers.VisionMethod
        self.extra_ids = list(extra_ids)
        self.emb = None

    def outputs(self) -> list[str]:
        return []

    def check(self) -> None:
        from .embeddings import load_ensemble
        from .index import used_members

        self.emb = load_ensemble(self.paths)
        if self.vision is not None:
            for m in used_members(self.vision.index, self.vision.settings):
                self.emb.member(self.vision.index.members[m].encoder, "the concept index")

    def ids(self) -> list[str]:
        return ids_of(self.emb, self.extra_ids)

    def produce(self, cfg: RunConfig, selection: Selection) -> RunResult:
        return embedded_result(selection.ids, self.emb, ", ".join(self.paths), "read")


def ids_of(emb, extra: list[str] = ()) -> list[str]:
    """Every image of embeddings (embedded or failed) and `extra`, in natural ID order: the rows of a run that
    reads its images from an embeddings file."""
    from .images import id_sort_key

    return sorted({*emb.ids, *emb.failed, *extra}, key=id_sort_key)


# ---------------------------------------------------------------------------------------------
# Captions of the nearest training images
# ---------------------------------------------------------------------------------------------


class NearestCaptionSource:
    """--method knn: each image's caption is its nearest training image's, or the consensus of its k nearest
    (retrieval.py); no text generation. The vectors of the image folder's images are kept up to date in the
    embeddings file (unchanged images reused); without a folder, the rows are the images of the embeddings file."""

    def __init__(self, retrieval, reads_images: bool):
        self.retrieval = retrieval  # retrieval.Retrieval (read_only without an image folder)
        self.reads_images = reads_images  # False: the rows are the images of the embeddings file
        self.emb = None

    def outputs(self) -> list[str]:
        return self.retrieval.outputs()

    def check(self) -> None:
        from .embeddings import load_embeddings

        self.retrieval.check()
        if not self.reads_images:
            if not self.retrieval.embeddings.exists():
                raise UserError(f"--embeddings {self.retrieval.embeddings} does not exist: give --image_dir to embed "
                                "the images, or the file concept_index.py embed wrote")
            self.emb = load_embeddings(self.retrieval.embeddings)

    def ids(self) -> list[str] | None:
        return None if self.reads_images else ids_of(self.emb)

    def produce(self, cfg: RunConfig, selection: Selection) -> RunResult:
        from .retrieval import consensus

        start = time.perf_counter()
        emb, embedded, working = self.emb, 0, 0.0
        if self.reads_images:
            with self.retrieval.prepared(selection.items):
                made = self.retrieval.vectors(selection.items)
            emb, embedded, working = made.embeddings, made.embedded, made.seconds
        searching = time.perf_counter()
        neighbours = self.retrieval.captions(emb, selection.ids)
        records = {}
        for i in selection.ids:
            if i in neighbours:
                records[i] = Record(i, consensus(neighbours[i]))
            else:
                records[i] = Record(i, "", emb.failed.get(i, "no vector for this image"))
        now = time.perf_counter()
        how = "nearest caption" if self.retrieval.neighbours == 1 else \
            f"consensus of the {self.retrieval.neighbours} nearest captions"
        # the rate is the embedding's (none when every vector was there); the search is a step of its own,
        # reading files and loading an encoder are the rest
        return RunResult(selection.ids, records, (("embeddings", self.retrieval.embeddings),), now - start,
                         embedded, detail=how, working_seconds=working, phases=(("searching", now - searching),),
                         embeddings=emb, verb="retrieved", doing="embedding")
