"""Render an error-analysis report from the real test images and take a headless-browser screenshot.

    python benchmarks/screenshot_report.py [--output_png docs/report_screenshot.png] [--keep DIR]

A dev tool, not run in CI: it needs chromium (Debian: apt-get install chromium) and the MIT-licensed
images in tests/data/real_images. The ground truth and predictions are crafted here (modality and
body-region CUIs from the images' DICOM tags, captions written for them, predictions with deliberate
misses, wrong concepts, a caption holding markup and a file that cannot be decoded), so the page shows
every kind of mark.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from jjvmed import files  # noqa: E402

REAL_IMAGES = ROOT / "tests" / "data" / "real_images"
MAX_PNG_BYTES = 300_000

CAPTIONS = {  # ID: (ground truth, prediction)
    "REAL_DICOM_001": ("Posteroanterior chest radiograph showing clear lung fields and a normal cardiac silhouette.",
                       "Chest X-ray showing clear lungs and a normal heart size."),
    "REAL_DICOM_002": ("Radiograph of the distal tibia showing a non-ossifying fibroma.",
                       "X-ray of the knee showing a lytic lesion of the distal femur."),
    "REAL_DICOM_003": ("Coronal MRI of the shoulder.", "Axial CT of the abdomen showing the liver."),
    "REAL_DICOM_004": ("Axial non-contrast CT of the head, 5 mm slices.", "Axial CT scan of the brain."),
    "REAL_DICOM_005": ("Contrast-enhanced CT of the pancreas.", "CT of the abdomen showing the pancreas."),
    "REAL_DICOM_007": ("Obstetric ultrasound image.", "Ultrasound image of the fetus."),
    "REAL_DICOM_008": ("Transesophageal echocardiogram with colour Doppler.", "Echocardiography showing the heart."),
    "REAL_DICOM_009": ("Whole-body bone scintigraphy, anterior view.", "Whole body bone scan."),
    "REAL_DICOM_011": ("MRI of the abdomen with a marked liver lesion.", "Abdominal MRI showing a liver lesion."),
    "REAL_DICOM_014": ("Small CT test image.", 'CT image <script>alert("x")</script> & "quoted" text'),
    "REAL_DICOM_017": ("Abdominal MRI with an overlay marking a lesion <MPR Collection>.", ""),
}


def crafted_rows(manifest: list[dict]) -> tuple[list, list, list, list]:
    """Ground truth from the DICOM tags; predictions drop, add or swap concepts on some images."""
    concepts_gt, concepts_pred, captions_gt, captions_pred = [], [], [], []
    swaps = {"C0024485": "C0040405", "C0041618": "C1306645"}  # MRI read as CT, ultrasound as X-ray
    for i, row in enumerate(manifest):
        image_id, gt = row["ID"], row["dicom_derived_cuis_NOT_ground_truth"].split(";")
        if i % 4 == 1:
            pred = [swaps.get(c, c) for c in gt] + ["C0817096"]
        elif i % 4 == 2:
            pred = gt[:1] + ["C0000726"]
        else:
            pred = list(gt)
        concepts_gt.append([image_id, ";".join(gt)])
        concepts_pred.append([image_id, ";".join(pred)])
        gt_caption, pred_caption = CAPTIONS.get(image_id, (f"{row['modality_tag']} image.", "Medical image."))
        captions_gt.append([image_id, gt_caption])
        captions_pred.append([image_id, pred_caption])
    broken = "REAL_BROKEN_019"
    concepts_gt.append([broken, "C0040405;C0817096"])
    concepts_pred.append([broken, "C0040405"])
    captions_gt.append([broken, "Axial CT of the chest."])
    captions_pred.append([broken, "CT of the chest."])
    return concepts_gt, concepts_pred, captions_gt, captions_pred


def screenshot(page: Path, out_png: Path, width: int, height: int) -> bytes:
    """A PNG of the page's top `height` pixels (the window is taller: headless chromium leaves its bottom blank)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={out_png}",
                        f"--window-size={width},{height + 200}", "--virtual-time-budget=3000", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    return out_png.read_bytes()


def shrink_png(data: bytes, height: int, limit: int) -> bytes:
    """The top `height` pixels; a screenshot's few hundred colours fit a palette: quantize until under `limit` bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.crop((0, 0, image.width, min(height, image.height)))
    for colours in (256, 128, 64):
        buffer = io.BytesIO()
        image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
        if buffer.tell() <= limit:
            break
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_png", default=str(ROOT / "docs" / "report_screenshot.png"),
                        help="the screenshot to write (default: docs/report_screenshot.png)")
    parser.add_argument("--keep", help="also keep the report and its inputs in this folder")
    parser.add_argument("--window", default="1280,1600", help="browser window, WIDTH,HEIGHT")
    args = parser.parse_args()
    if not REAL_IMAGES.is_dir():
        sys.exit(f"{REAL_IMAGES} is missing")
    with open(REAL_IMAGES / "manifest.csv", newline="", encoding="utf-8") as fh:
        manifest = list(csv.DictReader(fh))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        images = work / "images"
        images.mkdir(parents=True, exist_ok=True)
        for row in manifest:
            link = images / f"{row['ID']}.png"
            if not link.exists():
                link.symlink_to(REAL_IMAGES / f"{row['ID']}.png")
        files.write_bytes_atomic(images / "REAL_BROKEN_019.png", b"\x89PNG\r\n\x1a\n not really a PNG")
        concepts_gt, concepts_pred, captions_gt, captions_pred = crafted_rows(manifest)
        files.write_csv_atomic(work / "concepts_gt.csv", ["ID", "CUIs"], concepts_gt)
        files.write_csv_atomic(work / "concepts_pred.csv", ["ID", "CUIs"], concepts_pred)
        files.write_csv_atomic(work / "captions_gt.csv", ["ID", "Caption"], captions_gt)
        files.write_csv_atomic(work / "captions_pred.csv", ["ID", "Caption"], captions_pred)
        page = work / "report.html"
        with contextlib.chdir(work):  # short relative paths in the page's "run" table
            evaluate.main(["report", "--output_html", page.name, "--image_dir", "images",
                           "--gt", "concepts_gt.csv", "--pred", "concepts_pred.csv",
                           "--gt", "captions_gt.csv", "--pred", "captions_pred.csv",
                           "--title", "Error analysis: crafted predictions on the real test images"])
        width, height = (int(v) for v in args.window.split(","))
        png = shrink_png(screenshot(page, work / "screenshot-raw.png", width, height), height, MAX_PNG_BYTES)
    files.write_bytes_atomic(args.output_png, png)
    print(f"{args.output_png}: {len(png) / 1000:.0f} KB")


if __name__ == "__main__":
    main()
