"""The command line: the subcommand table, `eval`, `crf-search` and `--report`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _evaluation_helpers import CAFFE, random_dataset, run_cli, tiny_weights, write_folder_dataset


def test_help_lists_every_subcommand_and_each_help_works(capsys):
    from deeplab.cli import _COMMANDS, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in _COMMANDS:
        assert name in text, name
    for name in _COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert "usage: deeplab " + name in capsys.readouterr().out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "deeplab", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "segment" in out.stdout and "crf-search" in out.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ds = random_dataset(n=3, sizes=((24, 32), (32, 40), (21, 29)))
    data = write_folder_dataset(root / "data", ds)
    weights = tiny_weights(root / "tiny.safetensors")
    return root, data, weights, ds


def _eval_args(data: Path, weights: Path, *extra: str) -> list[str]:
    return ["eval", "--dataset", "folder", "--data-root", str(data), "--split", "all",
            "--weights", str(weights), *extra]


def test_eval_json_report_and_agreement_with_the_api(setup, tmp_path, capsys):
    from deeplab.data import build_dataset
    from deeplab.engine.evaluate import evaluate
    from deeplab.weights import build_from_weights

    root, data, weights, ds = setup
    out_json = tmp_path / "r.json"
    rc = run_cli(_eval_args(data, weights, "--json", str(out_json), "--report", str(tmp_path / "rep")))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "green" in printed  # the per-class table
    r = json.loads(out_json.read_text())
    model, _ = build_from_weights(weights)
    ref = evaluate(model, build_dataset("folder", data, "all"), normalization=CAFFE)
    assert r["miou"] == pytest.approx(ref["miou"]) and r["num_images"] == 3
    assert list(r["per_class_iou"]) == ["bg", "red", "green", "blue"]
    assert [r["per_class_iou"][n] for n in ds.class_names] == pytest.approx(ref["per_class_iou"])
    for key in ("pixel_acc", "mean_acc", "fwiou"):
        assert r[key] == pytest.approx(ref[key])
    s = r["settings"]
    from deeplab.models import resolve_precision

    ran = resolve_precision("auto", "cpu")  # the default precision, as this CPU resolves it
    assert s["precision"] == ran == ref["precision"] and s["crf"] is None and s["split"] == "all"
    assert "3 images," in printed and f"images/s ({ran})" in printed
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 + 3 * 2  # 2 charts + image triplets
    assert "per-class IoU" in page and "Worst" in page and "Best" in page


def test_report_without_matplotlib_falls_back_to_tables(setup):
    from deeplab.engine.report import render_report

    _, _, _, ds = setup
    mat = np.array([[5, 1, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0], [1, 0, 0, 2]])
    from deeplab.engine.metrics import metrics_from_matrix

    result = metrics_from_matrix(mat) | {"num_images": 1}
    page = render_report(result, dataset=ds, class_names=ds.class_names, palette=ds.palette,
                         use_matplotlib=False)
    assert "matplotlib is not installed" in page and "<table>" in page
    assert "83" in page  # 5/6 of the bg row, in the heat-map table


def test_eval_crf_equals_crf_on_saved_probs_and_crf_search_reuses_them(setup, tmp_path, capsys):
    from deeplab.crf import DenseCRF
    from deeplab.engine.evaluate import probs_path
    from deeplab.engine.metrics import ConfusionMatrix

    root, data, weights, ds = setup
    probs_dir = tmp_path / "probs"
    params = "bi_w=5,bi_xy_std=20,bi_rgb_std=5,pos_w=3,pos_xy_std=3"
    rc = run_cli(_eval_args(data, weights, "--crf", "--crf-params", params, "--save-probs",
                            str(probs_dir), "--json", str(tmp_path / "crf.json")))
    assert rc == 0
    r = json.loads((tmp_path / "crf.json").read_text())
    assert r["settings"]["crf"]["bi_xy_std"] == 20
    # the same CRF on the saved probabilities, applied directly
    crf = DenseCRF(bi_w=5, bi_xy_std=20, bi_rgb_std=5, pos_w=3, pos_xy_std=3)
    cm = ConfusionMatrix(4)
    for sid, image, mask in zip(ds.ids, ds.images, ds.masks):
        cm.update(crf(image, np.load(probs_path(probs_dir, sid))).argmax(0), mask)
    assert r["confusion_matrix"] == cm.mat.tolist()
    # ... and through the `deeplab crf` command on the saved files
    crf_out = tmp_path / "crf_labels"
    assert run_cli(["crf", "--images", str(data / "images"), "--probs", str(probs_dir), "--out",
                    str(crf_out), "--palette", "none", "--bi-w", "5", "--bi-xy-std", "20",
                    "--bi-rgb-std", "5", "--pos-w", "3", "--pos-xy-std", "3", "--workers", "1",
                    "--no-progress"]) == 0
    cm = ConfusionMatrix(4)
    for sid, mask in zip(ds.ids, ds.masks):
        cm.update(np.asarray(Image.open(crf_out / f"{sid}.png")), mask)
    assert r["confusion_matrix"] == cm.mat.tolist()

    # crf-search on the saved probabilities: its number for this setting is eval --crf's
    out = tmp_path / "search.json"
    rc = run_cli(["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
                  "--probs", str(probs_dir), "--bi-w", "3,5", "--bi-xy-std", "20", "--bi-rgb-std", "5",
                  "--pos-w", "3", "--pos-xy-std", "3", "--no-refine", "--json", str(out)])
    assert rc == 0
    assert "best: --crf-params" in capsys.readouterr().out
    s = json.loads(out.read_text())
    row = next(x for x in s["settings"] if x["bi_w"] == 5)
    assert row["miou"] == pytest.approx(r["miou"], abs=1e-12)
    assert s["best_miou"] == max(x["miou"] for x in s["settings"]) and len(s["settings"]) == 2


def test_crf_search_computes_probabilities_once_and_refines(setup, tmp_path, monkeypatch, capsys):
    import deeplab.engine.inference as inference

    root, data, weights, ds = setup
    calls = []
    real = inference.predict_probs

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(inference, "predict_probs", counting)
    out = tmp_path / "s.json"
    rc = run_cli(["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
                  "--weights", str(weights), "--limit", "2", "--bi-w", "3:2:5",
                  "--bi-xy-std", "10,30", "--bi-rgb-std", "4", "--iterations", "2", "--json", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    assert len(calls) == 2  # once per image, not once per setting
    rounds = [x["round"] for x in s["settings"]]
    assert rounds.count("coarse") == 4 and rounds.count("fine") > 0
    keys = {(x["bi_w"], x["bi_xy_std"], x["bi_rgb_std"]) for x in s["settings"]}
    assert len(keys) == len(s["settings"])  # no setting measured twice


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--crf", "--crf-params", "bi_q=3"], "unknown parameter 'bi_q'"),
        (["--crf-params", "bi_w=3"], "without --crf"),
        (["--crf", "--crf-params", "bi_w"], "KEY=VALUE"),
        (["--limit", "0"], "--limit"),
        (["--sliding-window", "4"], "--sliding-window"),
    ],
)
def test_eval_bad_options(setup, capsys, extra, message):
    _, data, weights, _ = setup
    assert run_cli(_eval_args(data, weights, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_eval_bad_data_and_weights(setup, tmp_path, capsys):
    root, data, weights, _ = setup
    assert run_cli(["eval", "--dataset", "nope", "--data-root", str(data), "--weights", str(weights)]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    assert run_cli(["eval", "--dataset", "camvid", "--data-root", str(tmp_path / "x"),
                    "--weights", str(weights)]) == 2
    assert "error:" in capsys.readouterr().err
    w5 = tiny_weights(tmp_path / "five.safetensors", num_classes=5)
    # 5-class weights on a 4-class data set: folder data set reads classes.txt (4 classes)
    assert run_cli(_eval_args(data, w5)) == 2
    assert "5 classes" in capsys.readouterr().err
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert run_cli(_eval_args(data, weights, "--json", str(blocker / "r.json"))) == 2
    assert "--json" in capsys.readouterr().err
    assert run_cli(["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
                    "--probs", str(tmp_path / "none")]) == 2
    assert "--save-probs" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
                    "--probs", str(empty)]) == 2
    assert "missing" in capsys.readouterr().err


def test_eval_inference_options_reach_evaluate(setup, tmp_path):
    from deeplab.data import build_dataset
    from deeplab.engine.evaluate import evaluate
    from deeplab.weights import build_from_weights

    _, data, weights, _ = setup
    out = tmp_path / "r.json"
    assert run_cli(_eval_args(data, weights, "--msc", "0.5", "--flip", "--sliding-window", "32",
                              "--overlap", "0.5", "--precision", "fp32", "--limit", "1",
                              "--json", str(out))) == 0
    r = json.loads(out.read_text())
    model, _ = build_from_weights(weights)
    ds = build_dataset("folder", data, "all")
    ref = evaluate(model, ds, normalization=CAFFE, msc_scales=(0.5,), flip=True, sliding_window=32,
                   overlap=0.5, precision="fp32", limit=1)
    plain = evaluate(model, ds, normalization=CAFFE, precision="fp32", limit=1)
    assert r["confusion_matrix"] == ref["confusion_matrix"] != plain["confusion_matrix"]
    s = r["settings"]
    assert (s["msc_scales"], s["flip"], s["sliding_window"], s["overlap"], s["precision"], s["limit"]) == (
        [0.5], True, 32, 0.5, "fp32", 1)


def _bad_folder_dataset(root: Path) -> tuple[Path, Path]:
    """A folder data set whose second mask is half the size of its image; returns (root, that image)."""
    data = write_folder_dataset(root, random_dataset(n=2, sizes=((24, 32), (32, 40))))
    mask = data / "masks" / "img01.png"
    Image.open(mask).resize((20, 16), Image.NEAREST).save(mask)
    return data, data / "images" / "img01.png"


@pytest.mark.parametrize("workers", ["0", "1"])
def test_eval_bad_sample_is_one_error_line_also_from_a_worker(setup, tmp_path, capsys, workers):
    _, _, weights, _ = setup
    data, bad = _bad_folder_dataset(tmp_path / "bad")
    assert run_cli(_eval_args(data, weights, "--workers", workers)) == 2
    err = capsys.readouterr().err
    # torch writes the worker's whole traceback into the message it re-raises
    line = err[err.index("error:"):]
    assert line.startswith(f"error: {bad}: image is 32x40 but its mask") and line.count("\n") == 1, err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_unwrap_worker_error_keeps_other_errors():
    from deeplab.data.loader import unwrap_worker_error

    plain = ValueError("x.png: bad")
    assert unwrap_worker_error(plain) is plain
    wrapped = KeyError("Caught KeyError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert unwrap_worker_error(wrapped) is wrapped  # no line to take the message from


def test_crf_search_bad_sample_is_an_error_line(setup, tmp_path, capsys):
    _, _, weights, _ = setup
    data, bad = _bad_folder_dataset(tmp_path / "bad")
    assert run_cli(["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
                    "--weights", str(weights), "--bi-w", "3", "--bi-xy-std", "30", "--bi-rgb-std", "3",
                    "--no-refine", "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: image is 32x40" in err and "Traceback" not in err


def test_save_probs_with_sub_folder_ids_and_crf_search_reads_them(setup, tmp_path, capsys):
    _, _, weights, _ = setup
    data = write_folder_dataset(tmp_path / "flat", random_dataset(n=2, sizes=((24, 32), (32, 40))))
    for kind in ("images", "masks"):  # the documented sub-folder layout: ids "seqA/img00" ...
        (data / kind / "seqA").mkdir()
        for f in list((data / kind).glob("*.png")):
            f.rename(data / kind / "seqA" / f.name)
    probs = tmp_path / "probs"
    assert run_cli(_eval_args(data, weights, "--save-probs", str(probs))) == 0
    assert sorted(p.relative_to(probs).as_posix() for p in probs.rglob("*.npy")) == [
        "seqA/img00.npy", "seqA/img01.npy"]
    assert not list(probs.rglob(".*tmp"))
    assert run_cli(["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
                    "--probs", str(probs), "--bi-w", "3", "--bi-xy-std", "30", "--bi-rgb-std", "3",
                    "--no-refine", "--iterations", "1"]) == 0


@pytest.mark.parametrize("params, message", [
    ("iterations=-1", "iterations must be an int >= 0"),
    ("bi_xy_std=0", "bi_xy_std must be a positive number"),
    ("bi_w=nan", "bi_w"),
    ("iterations=2.7", "whole number"),
])
def test_eval_bad_crf_values_are_error_lines(setup, capsys, params, message):
    _, data, weights, _ = setup
    assert run_cli(_eval_args(data, weights, "--crf", "--crf-params", params)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "--crf-params" in err


def test_json_output_is_checked_before_the_work(setup, tmp_path, capsys, monkeypatch):
    import deeplab.engine.evaluate as engine

    _, data, weights, _ = setup
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    monkeypatch.setattr(engine, "crf_grid_search", lambda *a, **k: pytest.fail("searched before checking --json"))
    folder = tmp_path / "jdir"
    folder.mkdir()
    assert run_cli(_eval_args(data, weights, "--json", str(folder))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --json:") and "is a folder" in err
    search = ["crf-search", "--dataset", "folder", "--data-root", str(data), "--split", "all",
              "--weights", str(weights), "--bi-w", "3", "--bi-xy-std", "30", "--bi-rgb-std", "3", "--no-refine"]
    assert run_cli([*search, "--json", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert run_cli([*search, "--json", str(blocker / "sub" / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --json:") and str(blocker) in err


def test_non_utf8_class_file_names_the_file(setup, tmp_path, capsys):
    _, _, weights, _ = setup
    data = write_folder_dataset(tmp_path / "d", random_dataset(n=1))
    (data / "classes.txt").write_bytes(b"\xff\xfe\n")
    assert run_cli(_eval_args(data, weights)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{data / 'classes.txt'} is not UTF-8 text" in err


def test_missing_listed_file_hint_names_a_real_option(setup, tmp_path, capsys):
    _, _, weights, _ = setup
    data = write_folder_dataset(tmp_path / "d", random_dataset(n=2))
    (data / "masks" / "img01.png").unlink()
    assert run_cli(_eval_args(data, weights)) == 2
    err = capsys.readouterr().err
    assert "img01.png" in err and "data.options: {skip_bad: true}" in err
