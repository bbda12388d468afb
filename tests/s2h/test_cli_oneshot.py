"""``python -m s2h oneshot`` end to end on digits (tiny epochs) and on a fake CIFAR folder."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from s2h import cli
from s2h import unstructured as oneshot

QUICK = ["--teacher-epochs", "1", "--distill-epochs", "1", "--retrain-epochs", "1", "--importance-batches", "2",
         "--max-train-samples", "128", "--batch-size", "32", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_oneshot_digits_two_sparsities_three_methods(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["oneshot", "--out", str(out), "--sparsity", "0.5,0.9", "--importance",
                   "magnitude,grad-ce,grad-kd", "--recalibrate-bn", "2", *QUICK])
    assert rc == 0
    text = capsys.readouterr().out
    for phrase in ("teacher small_cnn_teacher: top-1", "dense student small_cnn_student: top-1",
                   "before retraining", "after KD retraining"):
        assert phrase in text
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"]["name"] == "digits" and s["dataset"]["train_samples"] == 128
    assert 0 <= s["teacher"]["top1"] <= 100 and 0 <= s["student_dense"]["top1"] <= 100
    n = s["student_dense"]["prunable_weights"]
    assert len(s["runs"]) == 6
    for r in s["runs"]:
        assert r["pruned"] == round(r["sparsity"] * n) and r["prunable"] == n and r["retrain_kd"]
        assert {"top1_pruned", "top1_pruned_bn_recalibrated", "top1_retrained", "layers"} <= set(r)
        model, masks = oneshot.load_pruned(out / r["path"])  # rebuilt from model.json's spec
        assert sum(int((~m).sum()) for m in masks.values()) == r["pruned"]
        params = dict(model.named_parameters())
        assert all(torch.all(params[k][~m] == 0) for k, m in masks.items())
        assert "features.0.weight" not in masks and "classifier.2.weight" not in masks
        acc = oneshot.evaluate(model, _digits_test())["top1"]
        assert acc == pytest.approx(r["top1_retrained"])  # the saved model is the evaluated one
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 1000 and s["plot"] == "accuracy_vs_sparsity.png"
    assert (out / "teacher.pt").is_file() and (out / "log.txt").read_text().count("top-1") >= 8

    # the same dense student (from its checkpoint, no distillation) gets the same masks, whatever ran before
    # and in whatever order the methods run
    out3 = tmp_path / "run3"
    rc = cli.main(["oneshot", *QUICK, "--out", str(out3), "--sparsity", "0.5,0.9", "--importance",
                   "grad-kd,grad-ce,magnitude", "--teacher-ckpt", str(out / "teacher.pt"), "--student-ckpt",
                   str(out / "student_dense.pt"), "--distill-epochs", "0", "--no-kd-retrain"])
    assert rc == 0
    s3 = json.loads((out3 / "summary.json").read_text())
    assert s3["student_dense"]["top1"] == s["student_dense"]["top1"] and s3["student_dense"]["epochs"] == 0
    for r in s["runs"]:
        m1 = torch.load(out / r["path"] / "masks.pt", weights_only=True)
        m3 = torch.load(out3 / r["path"] / "masks.pt", weights_only=True)
        assert all(torch.equal(m1[k], m3[k]) for k in m1), r["path"]

    # reuse the trained teacher: same teacher accuracy, no teacher training; CE-only retraining
    out2 = tmp_path / "run2"
    rc = cli.main(["oneshot", "--out", str(out2), "--sparsity", "0.8", "--teacher-ckpt", str(out / "teacher.pt"),
                   "--no-kd-retrain", "--scope", "layer", "--exclude", "none", *QUICK])
    assert rc == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["teacher"]["top1"] == s["teacher"]["top1"] and s2["teacher"]["epochs"] == 0
    assert not s2["runs"][0]["retrain_kd"] and "after retraining" in capsys.readouterr().out
    assert "features.0.weight" in s2["runs"][0]["layers"] and not (out2 / "accuracy_vs_sparsity.png").exists()
    for layer_sparsity in s2["runs"][0]["layers"].values():
        assert abs(layer_sparsity - 0.8) < 0.01


def _digits_test():
    from torch.utils.data import DataLoader

    from s2h.data import get_dataset

    return DataLoader(get_dataset("digits", train=False), batch_size=256)


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "0.5,1.2", "abc"])
def test_bad_sparsity_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["oneshot", "--sparsity", bad])
    assert e.value.code == 2 and "--sparsity" in capsys.readouterr().err


def test_bad_importance_and_teacher_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["oneshot", "--importance", "random"])
    assert "unknown importance" in capsys.readouterr().err
    for opt, val in (("--gamma", "1.5"), ("--alpha", "-0.5"), ("--temperature", "0")):
        with pytest.raises(SystemExit):
            cli.main(["oneshot", opt, val])
        assert opt in capsys.readouterr().err
    # a teacher trained for 5 classes cannot teach a 10-class student
    from s2h.models import build_model

    torch.save(build_model("small_cnn_teacher", 5, 1, 8).state_dict(), tmp_path / "t5.pt")
    rc = cli.main(["oneshot", "--out", str(tmp_path / "r"), "--teacher-ckpt", str(tmp_path / "t5.pt"), *QUICK])
    err = capsys.readouterr().err
    assert rc == 1 and "teacher checkpoint" in err and "class count" in err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["oneshot", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"),
                   *QUICK])
    err = capsys.readouterr().err
    assert rc == 1 and str(tmp_path / "cifar-10-batches-py") in err and "--download" in err


def test_oneshot_fake_cifar10_small_cnns(tmp_path, capsys):
    base = tmp_path / "data" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in rng.integers(0, 10, 8)]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    out = tmp_path / "run"
    rc = cli.main(["oneshot", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--teacher",
                   "small_cnn_teacher", "--student", "small_cnn_student", "--out", str(out), "--sparsity", "0.9",
                   *QUICK])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"]["in_channels"] == 3 and s["dataset"]["train_samples"] == 40
    model, masks = oneshot.load_pruned(out / s["runs"][0]["path"])
    assert model.features[0].in_channels == 3


def test_oneshot_torchvision_resnets_on_digits(tmp_path):
    out = tmp_path / "rn"
    rc = cli.main(["oneshot", "--teacher", "resnet18", "--student", "resnet18", "--out", str(out),
                   "--sparsity", "0.95", "--teacher-epochs", "1", "--distill-epochs", "1", "--retrain-epochs", "1",
                   "--importance-batches", "1", "--max-train-samples", "32", "--max-test-samples", "32",
                   "--batch-size", "16", "--no-progress", "--threads", "1"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    r = s["runs"][0]
    assert r["pruned"] == round(0.95 * s["student_dense"]["prunable_weights"])
    assert "conv1.weight" not in r["layers"] and "fc.weight" not in r["layers"]
    meta = json.loads((out / r["path"] / "model.json").read_text())
    assert meta["spec"] == {"arch": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 8}


def test_python_dash_m_help():
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "s2h", "oneshot", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for opt in ("--teacher", "--student", "--data", "--data-dir", "--sparsity", "--alpha", "--temperature",
                "--no-kd-retrain", "--out", "--importance"):
        assert opt in res.stdout
