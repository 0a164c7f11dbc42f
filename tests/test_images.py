"""Image discovery and decoding: every kind of file a figure folder holds."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import REAL_IMAGES
from PIL import Image

from jjvmed import errors, prompts
from jjvmed.files import file_digest
from jjvmed.images import SKIPPED_NOT_UTF8, Collate, ImageDataset, list_images, load_image, make_loader, scan_folder
from jjvmed.model import load_processor


def test_real_images_decode_to_rgb():
    for _, path in list_images(REAL_IMAGES):
        img = load_image(path)
        assert img.mode == "RGB" and min(img.size) > 0


def test_ids_are_file_stems_in_natural_order_and_extensions_any_case(tmp_path):
    for name in ("img_10.PNG", "img_2.jpeg", "img_1.Tif", "notes.txt", "img_3.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert [i for i, _ in list_images(tmp_path)] == ["img_1", "img_2", "img_3", "img_10"]


def test_two_files_with_one_id_is_an_error_naming_both(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(errors.UserError, match=r"a\.(png|jpg) and a\.(png|jpg)"):
        list_images(tmp_path)


def test_folder_without_images_is_an_error(tmp_path):
    with pytest.raises(errors.UserError, match="no images"):
        list_images(tmp_path)


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "palette.gif")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "gray.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_image(tmp_path / "palette.gif").mode == "RGB"
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red


def test_transparency_is_flattened_onto_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (0, 0, 255, 255))
    img.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)


def test_16_bit_images_are_stretched_to_the_full_8_bit_range(tmp_path):
    arr = np.linspace(1000, 3000, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "ct16.png")
    out = np.asarray(load_image(tmp_path / "ct16.png"))
    assert out.min() == 0 and out.max() == 255 and out.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored landscape is shown as portrait
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (10, 20)


def test_a_broken_file_becomes_an_error_entry_not_an_exception(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = ImageDataset([("bad", tmp_path / "bad.png")])
    image_id, image, error = dataset[0]
    assert image_id == "bad" and image is None and error


def test_an_image_the_processor_rejects_fails_alone_and_its_batch_goes_on(tiny_model):
    processor = load_processor(str(tiny_model))

    class Picky:  # the real processor, refusing one image size as a broken file would make it fail
        tokenizer = processor.tokenizer

        def __call__(self, images, **kwargs):
            if any(img.size == (7, 7) for img in images):
                raise ValueError("cannot process this image")
            return processor(images=images, **kwargs)

    collate = Collate(Picky(), prompts.build_prompt("vicuna", "x"))
    samples = [("a", Image.new("RGB", (40, 30)), None), ("bad", Image.new("RGB", (7, 7)), None),
               ("c", Image.new("RGB", (30, 40)), None), ("gone", None, "OSError: truncated")]
    batch = collate(samples)
    assert batch.ids == ["a", "c"] and batch.inputs["pixel_values"].shape[0] == 2
    assert [i for i, _ in batch.failures] == ["gone", "bad"]


def test_links_in_a_loop_are_listed_as_images_that_fail_alone(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "a.png").symlink_to("b.png")  # two links pointing at each other
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "self.jpg").symlink_to("self.jpg")  # a link to itself
    (tmp_path / "here").symlink_to(".")  # a link to its own folder
    (tmp_path / "up.png").symlink_to("..")  # a link to a folder, named like an image
    scan = scan_folder(tmp_path)
    assert [i for i, _ in scan.items] == ["a", "b", "good", "self"]
    assert sorted(scan.skipped["subfolders (not searched)"]) == ["here", "up.png"]
    dataset = ImageDataset(scan.items)
    assert [dataset[n][2] is None for n in range(4)] == [False, False, True, False]
    assert "Too many levels of symbolic links" in dataset[0][2]


def test_names_that_are_not_utf8_are_left_out_and_reported(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "caf\u00e9.png")  # UTF-8: an ID like any other
    Image.new("RGB", (8, 8)).save(os.fsencode(tmp_path) + b"/r\xe9sum\xe9.png")  # Latin-1 bytes
    scan = scan_folder(tmp_path)
    assert [i for i, _ in scan.items] == ["caf\u00e9"]
    assert scan.skipped == {SKIPPED_NOT_UTF8: ["r\udce9sum\udce9.png"]}


def test_a_fifo_named_like_an_image_is_not_listed(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait forever for a writer
    assert [i for i, _ in list_images(tmp_path)] == ["good"]


def test_each_decoded_image_reaches_the_batch_with_the_digest_of_its_file(tiny_model, tmp_path):
    for n, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"img_{n}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    items = list_images(tmp_path)
    loader = make_loader(items, load_processor(str(tiny_model)), prompts.build_prompt("vicuna", "x"), 2, 0)
    batches = list(loader)
    assert [b.ids for b in batches] == [["img_0"], ["img_1"]]  # "bad" sorts first and fails alone
    assert [i for i, _ in batches[0].failures] == ["bad"]
    assert loader.digests == {i: file_digest(p) for i, p in items if i != "bad"}
    assert batches[1].digests == {"img_1": file_digest(tmp_path / "img_1.png")}
