"""The evaluation report: Hoiem error types on hand-made cases, eval_data.json, `spp-det report`,
and the page in a real browser (headless Chromium; skipped visibly when it is not installed)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spp_det.data.voc import ImageRecord, load_voc
from spp_det.detection.postprocess import Detections
from spp_det.errors import UserError
from spp_det.evaluation.analysis import ERROR_TYPES, ImageOutcome, analyse, best_and_worst
from spp_det.evaluation.report import DATA_FILE, build_report, read_eval_data
from spp_det.stages.report import main
from spp_det.stages.evaluate import score_detections

CLASSES = ["cat", "dog", "car"]  # VOC names: cat and dog are similar (Hoiem's animals), car is not
CAT, DOG, CAR = [10, 10, 50, 50], [60, 10, 100, 50], [10, 60, 50, 100]


def record(image_id, boxes, labels, difficult=None) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 120, 120, boxes, np.asarray(labels, np.int64),
                       np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool), np.zeros(n, bool))


def hand_made():
    """Six images with a cat, a dog and a car each (image 5's cat difficult and a second, normal
    cat); cat detections whose Hoiem type is known by construction (score: type)."""
    records = [record(f"im{i}", [CAT, DOG, CAR], [1, 2, 3]) for i in range(5)]
    records.append(record("im5", [CAT, DOG, CAR, [70, 70, 110, 110]], [1, 2, 3, 1], difficult=[1, 0, 0, 0]))
    cat = lambda box, score: (box, score, 1)  # noqa: E731
    shifted = [30, 30, 70, 70]  # IoU with CAT: 400 / 2800 = 0.14 (>= 0.1, < 0.5)
    per_image = {
        "im0": [cat(CAT, 0.9), cat([11, 10, 51, 50], 0.85)],  # correct, duplicate (localisation)
        "im1": [cat(shifted, 0.8)],  # localisation
        "im2": [cat(DOG, 0.7)],  # on the dog: similar class
        "im3": [cat(CAR, 0.6), cat(CAT, 0.1)],  # on the car: other class; a hit ranked 7th: not top-ranked
        "im4": [cat([100, 100, 118, 118], 0.5)],  # nothing there: background
        "im5": [cat(CAT, 0.95)],  # on the difficult cat: ignored, takes no top-ranked place
    }
    detections = {image_id: Detections(np.array([d[0] for d in ds], np.float32), [d[1] for d in ds], [d[2] for d in ds])
                  for image_id, ds in per_image.items()}
    return records, detections


def test_hoiem_error_types_of_hand_made_detections():
    records, detections = hand_made()
    result = analyse(records, CLASSES, detections)
    # 6 non-difficult cats -> the 6 top-ranked cat detections, the ignored 0.95 not among them
    assert result.errors["cat"] == {"correct": 1, "localisation": 2, "similar": 1, "other": 1, "background": 1}
    assert result.errors["dog"] == dict.fromkeys(ERROR_TYPES, 0)
    # without similar groups the dog is just another class
    plain = analyse(records, CLASSES, detections, similar=[])
    assert plain.errors["cat"]["similar"] == 0 and plain.errors["cat"]["other"] == 2


def test_confusion_matrix_counts_every_object_once_and_every_top_ranked_detection_once():
    records, detections = hand_made()
    m = analyse(records, CLASSES, detections).confusion  # rows cat, dog, car, background; columns ..., missed
    expected = np.array([
        [1, 0, 0, 5],  # one cat found; five never found (the difficult one is not counted)
        [1, 0, 0, 5],  # the dog in im2 taken for a cat; the other five dogs missed
        [1, 0, 0, 5],  # the car in im3 taken for a cat
        [3, 0, 0, 0],  # duplicate, localisation and background: no object of another class
    ])
    np.testing.assert_array_equal(m, expected)
    assert m[:3].sum() == sum(int((~r.difficult).sum()) for r in records)


def test_per_image_outcomes_and_best_and_worst():
    records, detections = hand_made()
    images = analyse(records, CLASSES, detections).images
    im0 = images[0]
    assert (im0.tp, im0.fp, im0.missed) == (1, 1, 2)  # the cat, its duplicate; dog and car missed
    assert sorted(it.kind for it in im0.items) == ["fp", "miss", "miss", "tp"]
    assert images[4].score == 0.0 and images[0].score == pytest.approx(1 / 4)
    outcomes = [ImageOutcome(0, tp=2), ImageOutcome(1, tp=1), ImageOutcome(2, fp=3), ImageOutcome(3, missed=1),
                ImageOutcome(4)]
    best, worst = best_and_worst(outcomes, 2)
    assert [o.index for o in best] == [0, 1] and [o.index for o in worst] == [2, 3]  # 4 has nothing: no score
    best, worst = best_and_worst(outcomes[:3], 2)
    assert [o.index for o in worst] == [2]  # never the same image in both


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """An eval run directory as `spp-det eval` leaves it: noisy detections on a synthetic set."""
    from spp_det.data.synth import write_synthetic

    from test_evaluation import noisy_detections

    root = tmp_path_factory.mktemp("synth")
    classes = ["circle", "triangle", "square", "star", "cross", "ring"]
    write_synthetic(root, {"num_images": 12, "pretrain_images": 0, "min_side": 96, "max_side": 160, "fractions": {"test": 1.0},
                           "objects_per_image": [2, 4], "seed": 5}, classes, progress=False)
    records, _ = load_voc(root, "test", classes, year=None)
    detections = noisy_detections(records, len(classes), seed=1)
    run = tmp_path_factory.mktemp("run")
    metrics = score_detections(records, classes, detections, "test", run,
                               extra={"seconds_per_image": {"conv5": 0.25, "fc": 0.05, "total": 0.35}},
                               run_info={"config": {"eval": {"nms_iou": 0.3}}, "checkpoint": {"path": "model.pt"}})
    build_report(run)
    return run, records, classes, detections, metrics


def test_eval_data_reads_back_exactly(eval_run):
    run, records, classes, detections, _ = eval_run
    info, back_records, back = read_eval_data(run)
    assert info["classes"] == classes and info["split"] == "test" and info["run"]["checkpoint"] == {"path": "model.pt"}
    for r, b in zip(records, back_records):
        assert b.image_id == r.image_id and b.path == r.path.resolve()
        np.testing.assert_array_equal(b.boxes, r.boxes)
        np.testing.assert_array_equal(b.difficult, r.difficult)
        np.testing.assert_array_equal(back[r.image_id].boxes, detections[r.image_id].boxes)
        np.testing.assert_array_equal(back[r.image_id].scores, detections[r.image_id].scores)
        np.testing.assert_array_equal(back[r.image_id].labels, detections[r.image_id].labels)


def test_report_table_matches_metrics_and_coco_per_class_averages_to_coco_ap(eval_run):
    run, _, classes, _, metrics = eval_run
    page = (run / "report.html").read_text()
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td><td>(\d+)</td><td>([\d.]+)</td><td>([\d.]+)</td>", page)
    assert [r[0] for r in rows] == classes
    for name, n_gt, n_det, ap07, ap10 in rows:
        assert int(n_gt) == metrics["num_gt"][name] and int(n_det) == metrics["num_det"][name]
        assert float(ap07) == pytest.approx(100 * metrics["ap_voc07"][name], abs=0.05)
    # pycocotools' AP is the mean over classes (each with ground truth at every IoU / recall point)
    per_class = [v["AP"] for v in metrics["coco_per_class"].values() if v is not None]
    assert np.mean(per_class) == pytest.approx(metrics["coco"]["AP"])


def test_spp_det_report_rebuilds_the_page_without_a_model(eval_run, capsys):
    run = eval_run[0]
    (run / "report.html").unlink()
    from conftest import spp_det_cli

    done = spp_det_cli("report", str(run))  # through the CLI's main(argv), in this process
    assert done.returncode == 0, done.stderr
    assert "report.html" in done.stdout and (run / "report.html").stat().st_size > 10_000
    assert main([str(run / "nowhere")]) == 1
    assert DATA_FILE in capsys.readouterr().err


def test_report_names_a_damaged_data_file(tmp_path):
    (tmp_path / DATA_FILE).write_text('{"format": "something else"}')
    with pytest.raises(UserError, match=f"{DATA_FILE}: not a spp-det-eval-data file"):
        build_report(tmp_path)


# ------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                    "(apt-get install -y chromium chromium-driver; .ci/run installs it)")
# Loads the page from disk and counts images that did not load (broken or missing files).
IMAGE_CHECK = ("<script>window.addEventListener('load', () => { const all = Array.from(document.images); "
               "document.body.setAttribute('data-images', all.length + '/' + all.filter(i => !i.complete || "
               "i.naturalWidth === 0).length); });</script>")


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` (file://) with a fresh profile, offline, console to stderr."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def load(page: Path, tmp_path: Path) -> tuple[str, list[str], str]:
    """(DOM after load, console messages, ``loaded/broken`` image counts) of ``page`` in Chromium."""
    checked = page.with_name(page.stem + ".checked.html")
    checked.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    done = chromium(checked, tmp_path / "profile-dom", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    counts = re.search(r'data-images="(\d+/\d+)"', done.stdout)
    return done.stdout, console, counts.group(1) if counts else ""


@needs_chromium
def test_the_checks_catch_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>console.error("boom")</script></body></html>')
    _, console, counts = load(page, tmp_path)
    assert counts == "1/1" and any("boom" in line for line in console)


@needs_chromium
def test_report_in_headless_chromium(eval_run, tmp_path):
    run, _, classes, _, _ = eval_run
    dom, console, counts = load(run / "report.html", tmp_path)
    assert console == [], console
    total, broken = map(int, counts.split("/"))
    assert broken == 0 and total >= 3 + 2  # PR curves, error types, confusion matrix, drawn examples
    for element in ('id="per-class"', 'id="pr-curves"', 'id="error-types"', 'id="confusion-matrix"',
                    'id="best-images"', 'id="worst-images"', 'id="timing"', 'class="example"'):
        assert element in dom, element
    table = dom[dom.index('id="per-class"'):]
    table = table[:table.index("</table>")]
    assert all(f"<td>{c}</td>" in table for c in classes) and "<td>mean</td>" in table
    shot = tmp_path / "report.png"  # kept under the test's tmp dir for a person to look at
    done = chromium(run / "report.html", tmp_path / "profile-shot", "--window-size=1200,3000", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500  # plots and photos, not a blank page
