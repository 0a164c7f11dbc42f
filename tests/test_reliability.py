"""A run nothing can spoil: locks, stale results, bad paths, huge images, signals, OS failures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, ROOT, fill_the_disk, read_csv, run_in_process, run_script, tiny_args

from jjvmed.images import load_image


def copy_images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(REAL_IMAGES.glob("*.png"))[:count]:
        shutil.copy(src, folder / src.name)
    return folder


def slow_args(tiny_model: Path, out: Path) -> list[str]:
    """A run slow enough (batch 1, long answers) to be interrupted half-way."""
    return tiny_args(tiny_model, out, REAL_IMAGES, "--max_new_tokens", "48", "--batch_size", "1")


def slow_run(tiny_model: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [*slow_args(tiny_model, out), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "generate_captions.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(journal: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if journal.exists() and journal.read_bytes().count(b"\n") > count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not get to {count} records: {proc.poll()}")


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    first = slow_run(tiny_model, out)
    try:
        wait_for_records(out.with_name("captions.journal.jsonl"), first, 1)
        second = run_in_process("generate_captions.py", *slow_args(tiny_model, out), "--resume_from_checkpoint", "auto")
        assert second.returncode == 2
        assert f"another run (PID {first.pid}) is using" in second.stderr
    finally:
        first.kill()
        first.wait()
    # the lock died with the killed process: the same command now resumes
    again = run_in_process("generate_captions.py", *slow_args(tiny_model, out), "--resume_from_checkpoint", "auto")
    assert again.returncode == 0, again.stderr
    assert len(read_csv(out)) == 19


def test_sigterm_stops_after_the_batch_with_exit_143_and_the_resume_command(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    proc = slow_run(tiny_model, out)
    wait_for_records(out.with_name("captions.journal.jsonl"), proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "--resume_from_checkpoint auto" in stderr and "Traceback" not in stderr


def test_a_second_ctrl_c_stops_at_once_with_exit_130(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    log = tmp_path / "stderr.txt"
    long_answers = ["--max_new_tokens", "400", "--generation_kwargs", '{"min_new_tokens": 400}']
    args = [*slow_args(tiny_model, out), *long_answers]  # batches long enough to stop inside one
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "generate_captions.py"), *args],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=err, stdout=subprocess.DEVNULL)
        wait_for_records(out.with_name("captions.journal.jsonl"), proc, 1)
        time.sleep(1)  # well inside the second batch, which takes several seconds
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while "stopping after the current batch" not in log.read_text() and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 130, stderr
    assert "--resume_from_checkpoint auto" in stderr and "Traceback" not in stderr
    assert "images: 18" not in stderr  # it did not wait for the batch to end


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    proc = slow_run(tiny_model, out)
    time.sleep(2.5)  # importing torch and loading the model: no batch has run yet
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr


def test_a_killed_decoding_worker_is_one_line_with_the_resume_command(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    proc = slow_run(tiny_model, out, "--num_workers", "1")
    wait_for_records(out.with_name("captions.journal.jsonl"), proc, 1)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "worker died" in stderr and "--resume_from_checkpoint auto" in stderr and "Traceback" not in stderr


def test_disk_full_is_one_line_and_the_finished_batches_are_kept(tiny_model, tmp_path, monkeypatch):
    from jjvmed import journal

    out = tmp_path / "captions.csv"
    real_append = journal.Journal.append

    def append_until_full(self, records, identities):
        if self.batches >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_append(self, records, identities)

    monkeypatch.setattr(journal.Journal, "append", append_until_full)
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, REAL_IMAGES, "--batch_size", "2"))
    assert result.returncode == 2
    assert "disk full" in result.stderr and "--resume_from_checkpoint auto" in result.stderr
    monkeypatch.undo()
    resumed = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, REAL_IMAGES, "--batch_size", "2"),
                             "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0 and "done before: 4" in resumed.stderr


@pytest.mark.parametrize("output", ["folder", "/proc/jj-vmed/captions.csv"])
def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, output):
    out = tmp_path if output == "folder" else Path(output)
    args = tiny_args(tmp_path / "no-model-here", out, REAL_IMAGES, "--checkpoint_dir", str(tmp_path / "ck"))
    result = run_script("generate_captions.py", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "output" in result.stderr and "no-model-here" not in result.stderr
    assert not (tmp_path / "ck").exists()


def test_a_failed_start_leaves_nothing_that_blocks_the_plain_rerun(tmp_path):
    out = tmp_path / "captions.csv"
    args = tiny_args(tmp_path / "no-model-here", out)
    for _ in range(2):
        result = run_in_process("generate_captions.py", *args)
        assert result.returncode == 2 and "no-model-here: no such folder" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no journal, no lock side file: nothing at all


def test_changed_image_files_are_generated_again_not_reused(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images")
    out = tmp_path / "captions.csv"
    assert run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images)).returncode == 0
    first = dict(read_csv(out)[1:])
    name = sorted(images.iterdir())[0]
    shutil.copy(REAL_IMAGES / "REAL_DICOM_010.png", name)  # same file name, other picture
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images), "--resume_from_checkpoint",
                            "auto")
    assert result.returncode == 0
    assert "1 image(s) changed" in result.stderr and "generated now: 1" in result.stderr
    assert dict(read_csv(out)[1:])[name.stem] != first[name.stem]


def test_a_journal_from_another_image_folder_is_refused(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    first = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, copy_images(tmp_path / "a")))
    assert first.returncode == 0
    other = copy_images(tmp_path / "b")
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, other), "--resume_from_checkpoint",
                            "auto")
    assert result.returncode == 2 and "image folder" in result.stderr


def test_dtype_auto_and_the_dtype_it_picks_resume_each_other(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "2")
    assert run_in_process("generate_captions.py", *args).returncode == 0
    result = run_in_process("generate_captions.py", *args, "--dtype", "float32", "--resume_from_checkpoint", "auto")
    assert result.returncode == 0, result.stderr


def test_subfolders_metadata_files_and_odd_names_are_reported_not_silent(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images", 2)
    (images / "more").mkdir()
    shutil.copy(REAL_IMAGES / "REAL_DICOM_003.png", images / "more" / "deep.png")
    (images / "._REAL_DICOM_001.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    shutil.copy(REAL_IMAGES / "REAL_DICOM_004.png", images / "two\nlines.png")
    out = tmp_path / "captions.csv"
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images))
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in read_csv(out)[1:]] == ["REAL_DICOM_001", "REAL_DICOM_002"]
    assert "subfolders (not searched): 1 ('more')" in result.stderr
    assert "macOS metadata" in result.stderr and "line break" in result.stderr


def test_a_folder_with_only_subfolders_says_so(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    shutil.copy(REAL_IMAGES / "REAL_DICOM_003.png", tmp_path / "images" / "train" / "a.png")
    result = run_in_process("generate_captions.py", *tiny_args(tmp_path / "m", tmp_path / "c.csv", tmp_path / "images"))
    assert result.returncode == 2 and "subfolder" in result.stderr and "train" in result.stderr


def test_a_broken_symlink_named_like_an_image_gets_a_row_and_an_error(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images", 2)
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "captions.csv"
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images))
    assert result.returncode == 0
    assert dict(read_csv(out)[1:])["gone"] == ""
    assert "warning: gone:" in result.stderr
    assert [r[0] for r in read_csv(tmp_path / "captions.errors.csv")[1:]] == ["gone"]


def write_huge_png(path: Path, width: int, height: int) -> None:
    """A valid grey PNG of width x height zeros, written without ever holding the pixels in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_budget_fails_alone_and_fast(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images", 2)
    write_huge_png(images / "huge.png", 20000, 20000)  # 400 megapixels, a few hundred KB on disk
    out = tmp_path / "captions.csv"
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images))
    assert result.returncode == 0
    rows = dict(read_csv(out)[1:])
    assert rows["huge"] == "" and rows["REAL_DICOM_001"]
    assert "20000x20000" in dict(read_csv(tmp_path / "captions.errors.csv")[1:])["huge"]


def test_a_large_jpeg_is_decoded_smaller_within_the_budget(tmp_path):
    from PIL import Image

    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(tmp_path / "big.jpg", quality=80)
    image = load_image(tmp_path / "big.jpg", max_pixels=2_000_000)
    assert image.size[0] * image.size[1] <= 2_000_000 and image.size[0] >= 1000
    Image.new("L", (2000, 2000)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="budget"):  # a PNG cannot be decoded smaller: it fails alone
        load_image(tmp_path / "big.png", max_pixels=1_000_000)


def test_outputs_are_readable_by_others_and_stale_temp_files_are_cleaned(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    stale = tmp_path / ".captions.csv.abc123.tmp"
    stale.write_text("left by a kill during the final write")
    old = os.umask(0o022)
    try:
        assert run_in_process("generate_captions.py", *tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "2")) \
            .returncode == 0
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert not stale.exists()


def test_format_a_defaults_beside_the_format_b_output(tiny_model, tmp_path):
    out = tmp_path / "exp1" / "concepts.csv"
    result = run_in_process("generate_concepts.py", *tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "2"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "exp1" / "concepts_natural.csv").exists()


def test_a_mapping_file_with_no_rows_is_refused(tiny_model, tmp_path):
    mapping = tmp_path / "map.csv"
    mapping.write_text("CUI,Name\n")
    result = run_in_process("generate_concepts.py", *tiny_args(tiny_model, tmp_path / "c.csv"),
                            "--cui_mapping_file", str(mapping))
    assert result.returncode == 2 and "no CUI rows" in result.stderr


def test_resume_counts_images_not_done_as_not_done(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    proc = slow_run(tiny_model, out)
    wait_for_records(out.with_name("captions.journal.jsonl"), proc, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    summary = stderr[stderr.index("images: 18"):]
    done = json.loads("[" + ",".join(out.with_name("captions.journal.jsonl").read_text().splitlines()[1:]) + "]")
    assert f"not done yet: {18 - len(done)}" in summary


def test_the_progress_bar_and_the_summary_give_one_rate_of_generation(tiny_model, tmp_path):
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, tmp_path / "c.csv", REAL_IMAGES,
                                                                "--limit", "3"))
    assert result.returncode == 0
    assert "img_s=" not in result.stderr  # the bar shows tqdm's own rate only
    assert "images/s while generating" in result.stderr and "s loading)" in result.stderr


def test_sigterm_to_the_whole_job_still_stops_cleanly_with_143(tiny_model, tmp_path):
    """Schedulers signal every process of the job, the decoding workers too."""
    out = tmp_path / "captions.csv"
    args = [*slow_args(tiny_model, out), "--num_workers", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate_captions.py"), *args], start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_records(out.with_name("captions.journal.jsonl"), proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "stopped early" in stderr and "worker died" not in stderr


def test_symlink_loops_in_the_image_folder_get_a_row_and_an_error(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images", 2)
    (images / "a.png").symlink_to("b.png")  # two links pointing at each other
    (images / "b.png").symlink_to("a.png")
    (images / "self.png").symlink_to("self.png")  # a link to itself
    (images / "here").symlink_to(".")  # a link to its own folder
    out = tmp_path / "captions.csv"
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images))
    assert result.returncode == 0, result.stderr
    rows = dict(read_csv(out)[1:])
    assert rows["a"] == rows["b"] == rows["self"] == "" and rows["REAL_DICOM_001"]
    assert sorted(r[0] for r in read_csv(tmp_path / "captions.errors.csv")[1:]) == ["a", "b", "self"]
    assert "subfolders (not searched): 1 ('here')" in result.stderr


def test_a_file_name_that_is_not_utf8_is_skipped_and_its_batch_kept(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images", 3)
    latin1 = os.fsencode(images) + b"/caf\xe9.png"  # a name from an old archive, not valid UTF-8
    shutil.copy(REAL_IMAGES / "REAL_DICOM_004.png", latin1)
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, images, "--batch_size", "2")
    result = run_in_process("generate_captions.py", *args)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)[1:]
    assert [r[0] for r in rows] == ["REAL_DICOM_001", "REAL_DICOM_002", "REAL_DICOM_003"] and all(r[1] for r in rows)
    assert "not valid UTF-8" in result.stderr and "'caf\\udce9.png'" in result.stderr
    resumed = run_in_process("generate_captions.py", *args, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0 and "generated now: 0" in resumed.stderr


def test_an_image_folder_whose_name_is_not_utf8_runs_and_resumes(tiny_model, tmp_path):
    images = Path(os.fsdecode(os.fsencode(tmp_path) + b"/im\xe1genes"))  # the folder's name in Latin-1
    copy_images(images, 2)
    out = tmp_path / "captions.csv"
    assert run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images)).returncode == 0
    resumed = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images), "--resume_from_checkpoint",
                             "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "generated now: 0" in resumed.stderr and len(read_csv(out)) == 3


def test_disk_full_at_the_first_journal_write_leaves_nothing_that_blocks_the_resume(tiny_model, tmp_path,
                                                                                      monkeypatch):
    from jjvmed import journal

    def open_on_a_full_disk(path, mode="r", *a, **k):
        fh = open(path, mode, *a, **k)
        if "r" not in mode:  # the file is created; every byte written to it then fails as on a full disk
            fill_the_disk(fh)
        return fh

    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "3")
    monkeypatch.setattr(journal, "open", open_on_a_full_disk, raising=False)
    result = run_in_process("generate_captions.py", *args)
    assert result.returncode == 2 and "disk full" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.undo()
    resumed = run_in_process("generate_captions.py", *args, "--resume_from_checkpoint", "auto")  # the advice given
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_csv(out)) == 4


def test_an_image_replaced_by_one_of_the_same_size_with_its_time_restored_is_generated_again(tiny_model, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name in ("REAL_DICOM_001", "REAL_DICOM_010"):  # BMP: the same dimensions give the same file size
        Image.open(REAL_IMAGES / f"{name}.png").convert("RGB").resize((64, 64)).save(images / f"{name}.bmp")
    out = tmp_path / "captions.csv"
    assert run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images)).returncode == 0
    target = images / "REAL_DICOM_001.bmp"
    before = target.stat()
    target.write_bytes((images / "REAL_DICOM_010.bmp").read_bytes())  # other picture, same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old modification time
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images), "--resume_from_checkpoint",
                            "auto")
    assert result.returncode == 0, result.stderr
    assert "1 image(s) changed" in result.stderr and "generated now: 1" in result.stderr


def test_an_image_folder_copied_back_with_its_times_kept_is_reused(tiny_model, tmp_path):
    images = copy_images(tmp_path / "images", 3)
    out = tmp_path / "captions.csv"
    assert run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images)).returncode == 0
    shutil.copytree(images, tmp_path / "backup")  # copy2: the same bytes and modification times
    shutil.rmtree(images)
    shutil.copytree(tmp_path / "backup", images)
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, images), "--resume_from_checkpoint",
                            "auto")
    assert result.returncode == 0, result.stderr
    assert "generated now: 0" in result.stderr and "3 image(s) kept their size" in result.stderr
    assert "changed since the journal" not in result.stderr


def test_a_second_ctrl_c_ends_the_decoding_workers_with_the_run(tiny_model, tmp_path):
    """Workers ignore Ctrl-C (the main process decides); left running, they print into the terminal."""
    out = tmp_path / "captions.csv"
    long_answers = ["--max_new_tokens", "400", "--generation_kwargs", '{"min_new_tokens": 400}']
    proc = slow_run(tiny_model, out, "--num_workers", "2", *long_answers)  # batches of seconds: still running below
    wait_for_records(out.with_name("captions.journal.jsonl"), proc, 1)
    time.sleep(1)  # the workers have filled the prefetch queue and wait for more work
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)

    def running(pid: str) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    time.sleep(0.5)
    assert proc.returncode == 130
    assert not [pid for pid in workers if running(pid)]
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr


def test_two_runs_sharing_a_checkpoint_dir_are_told_about_it(tiny_model, tmp_path):
    checkpoints = ["--checkpoint_dir", str(tmp_path / "ck")]
    first = slow_run(tiny_model, tmp_path / "a" / "captions.csv", *checkpoints)
    try:
        wait_for_records(tmp_path / "ck" / "captions.journal.jsonl", first, 1)
        second = run_in_process("generate_captions.py", *slow_args(tiny_model, tmp_path / "b" / "captions.csv"),
                                *checkpoints)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"(PID {first.pid})" in second.stderr and "--checkpoint_dir" in second.stderr
    assert "another --output_csv" not in second.stderr
