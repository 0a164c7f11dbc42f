"""Several processes, one run: sharding the sorted image IDs, torch.distributed set-up and
gathering, and --merge_shards for shards run without a launcher (job arrays).

Each shard writes its own journal, so a killed process redoes only its own missing images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import file_identity
from .journal import changed_images, default_journal_path, header_differences, read_journal
from .records import Record


@dataclass(frozen=True)
class Shard:
    """One share of the sorted image IDs: every `count`-th image from `index` on."""

    index: int
    count: int
    distributed: bool = False  # started by torchrun/accelerate: coordinated through torch.distributed

    @property
    def suffix(self) -> str:
        return f".shard-{self.index:05d}-of-{self.count:05d}"

    @property
    def writes_csv(self) -> bool:
        """Under a launcher rank 0 gathers everything and writes; a job-array shard leaves it to the merge."""
        return self.distributed and self.index == 0

    def take(self, items: list) -> list:
        return items[self.index::self.count]


def shard_from(num_shards: int | None, shard_index: int | None, merge: bool = False) -> Shard | None:
    """The launcher's RANK/WORLD_SIZE if there is one, else --num_shards/--shard_index, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if num_shards is not None or merge:
            raise UserError("under torchrun the processes are the shards: drop --num_shards/--merge_shards")
        return Shard(int(os.environ["RANK"]), world, distributed=True)
    if merge:
        return None
    if num_shards is None:
        if shard_index is not None:
            raise UserError("--shard_index needs --num_shards")
        return None
    if num_shards < 1 or shard_index is None or not 0 <= shard_index < num_shards:
        raise UserError(f"--num_shards {num_shards} needs --shard_index between 0 and {max(num_shards, 1) - 1}")
    return Shard(shard_index, num_shards)


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join the launcher's process group for the run and leave it however the run ends.

    Yields the device this process uses: the GPU of its LOCAL_RANK, or the CPU (gloo).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    # Shards finish at different times; the group must wait for the slowest one, for hours.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=72))
    try:
        yield f"cuda:{local_rank}" if cuda else ("cpu" if device == "auto" else device)
    finally:
        dist.destroy_process_group()


def gather_to_rank0(part: dict) -> list[dict] | None:
    """Every process's `part` on rank 0 (in rank order); None on the other ranks."""
    import torch.distributed as dist

    everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, everything, dst=0)
    return everything


def shard_journals(output_csv: str | Path, checkpoint_dir: str | None) -> list[Path]:
    base = default_journal_path(output_csv, checkpoint_dir)
    stem = base.name.removesuffix(".journal.jsonl")
    found = sorted(base.parent.glob(f"{stem}.shard-*-of-*.journal.jsonl"))
    if not found:
        raise UserError(f"no shard journals like {base.parent / stem}.shard-*-of-*.journal.jsonl")
    return found


def merge_shard_records(output_csv: str | Path, checkpoint_dir: str | None, all_ids: list[str],
                        settings: dict, image_dir: str, files: dict[str, str]) -> dict[str, Record]:
    """--merge_shards: every shard's records, refusing a missing, incomplete, mismatched or outdated shard.

    Each shard must have been run with this command's settings on this image folder: stale journals
    from another run with the same shard count are refused, not merged. `files` (ID -> path) are
    checked as a resume checks them: an image changed since its shard ran is refused, naming the
    shard to resume, which generates it again.
    """
    counts = {int(re.search(r"-of-(\d+)\.journal", p.name).group(1)) for p in shard_journals(output_csv,
                                                                                            checkpoint_dir)}
    if len(counts) != 1:
        raise UserError(f"shard journals from runs with different shard counts: {sorted(counts)}; keep one run's")
    count = counts.pop()
    identities = {i: file_identity(p) for i, p in files.items()}
    wanted = set(all_ids)
    records: dict[str, Record] = {}
    problems = []
    journals = {}
    for index in range(count):
        path = default_journal_path(output_csv, checkpoint_dir, Shard(index, count).suffix)
        if not path.exists():
            problems.append(f"shard {index} of {count} is missing ({path.name})")
            continue
        contents = journals[index] = read_journal(path)
        diffs = header_differences(contents.header, settings, image_dir) if contents else []
        if diffs:
            problems.append(f"shard {index} was run with other settings than this command ({'; '.join(diffs)})")
        records.update({i: r for i, r in (contents.records if contents else {}).items() if i in wanted})
    for index in range(count):
        shard = Shard(index, count)
        rerun = f"rerun it with --num_shards {count} --shard_index {index} --resume_from_checkpoint auto"
        # An image is missing only if no shard has it: the merge may select the images (--ids_csv, --limit)
        # other than the shards did, so each shard is judged by what is missing everywhere.
        mine = shard.take(all_ids)
        missing = [i for i in mine if i not in records]
        if missing and index in journals:
            problems.append(f"shard {index} of {count} is incomplete: {len(missing)} of {len(mine)} images missing "
                            f"({rerun}, with the --ids_csv and --limit of this command)")
        contents = journals.get(index)
        changed = sorted(changed_images(contents, files, identities) & wanted) if contents else []
        if changed:
            problems.append(f"shard {index} of {count}: {len(changed)} image(s) changed since it ran "
                            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}; {rerun})")
    if problems:
        raise UserError("cannot merge: " + "; ".join(problems))
    return records


def gather_everywhere(obj) -> list:
    """`obj` from every process of the launcher's group, in rank order, on every process; [obj] without a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
