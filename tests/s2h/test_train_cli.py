"""``python -m s2h prune`` and ``python -m s2h demo`` end to end on digits (tiny runs), resume, errors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import s2h
from s2h import cli
from s2h.cli import prune as prune_cli
from s2h.models import build_model

QUICK = ["--model", "resnet8", "--data", "digits", "--max-train-samples", "128", "--max-test-samples", "64",
         "--batch-size", "32", "--no-progress", "--threads", "1", "--device", "cpu"]
TIME_KEYS = {"epoch_time", "wall_time"}


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_prune_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--epochs", "2", "--out", str(out), "--latency"]) == 0
    text = capsys.readouterr().out
    assert "epoch 2/2" in text and "done:" in text
    log = _log(out)
    assert [h["epoch"] for h in log] == [1, 2]
    for h in log:
        assert {"soft_top1", "hard_top1", "hard_flops_pct", "gap_kl", "gap_js", "lr", "wall_time", "keep",
                "train_loss"} <= set(h)
        assert 0 <= h["soft_top1"] <= 100 and 0 < h["hard_flops_pct"] <= 100 and h["gap_kl"] >= 0 and h["gap_js"] >= 0
    assert log[1]["step"] == 2 * (128 // 32)
    s = json.loads((out / "summary.json").read_text())
    assert s["exported_matches_hard"] and s["exported_top1"] == pytest.approx(s["hard_top1"])
    assert s["hard_flops_pct"] == pytest.approx(log[-1]["hard_flops_pct"])
    assert {"latency_ms_bs1", "latency_ms_bs64"} <= set(s)
    for name in ("trajectory.png", "architecture.png"):
        assert (out / name).stat().st_size > 5000
    # the exported model reloads from the architecture and the saved widths, and is the hard network
    pruned = s2h.load(out / "pruned.pt", lambda: build_model("resnet8", 10, 1, 32))
    assert sum(p.numel() for p in pruned.parameters()) == s["params_pruned"]
    # ... and without a factory: the run's files record the build_model arguments
    small, s2hm = s2h.load(out / "pruned.pt").eval(), s2h.load(out / "s2h_model.pt").eval()
    assert isinstance(s2hm, s2h.S2HModel) and not isinstance(small, s2h.S2HModel)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad(), s2hm.branch("hard"):
        torch.testing.assert_close(small(x), s2hm(x), rtol=1e-4, atol=1e-5)
    assert s2hm.keep_counts() == {k: v["kept"] for k, v in s["widths"].items()}
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and len(ck["history"]) == 2


def _strip_times(log):
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in log]


def test_resume_is_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*QUICK, "--epochs", "3", "--mask-lr", "0.05"]
    assert cli.main(["prune", *args, "--out", str(full)]) == 0
    assert cli.main(["prune", *args, "--out", str(part), "--stop-after", "1"]) == 0
    assert json.loads(json.dumps(torch.load(part / "checkpoint.pt", weights_only=True)["epoch"])) == 1
    assert not (part / "summary.json").exists()
    assert cli.main(["prune", *args, "--out", str(part), "--stop-after", "1", "--resume"]) == 0
    assert cli.main(["prune", *args, "--out", str(part), "--resume"]) == 0
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert str(a["trainer"]) == str(b["trainer"])  # both optimizers' states, the step counter
    assert a["scheduler"] == b["scheduler"]
    assert _strip_times(_log(full)) == _strip_times(_log(part))
    pa = torch.load(full / "pruned.pt", weights_only=True)
    pb = torch.load(part / "pruned.pt", weights_only=True)
    assert pa["widths"] == pb["widths"]
    for k, v in pa["state_dict"].items():
        assert torch.equal(v, pb["state_dict"][k]), k
    # the masks moved during the run (the comparison is not between untouched models)
    assert not torch.equal(a["model"]["u"], torch.zeros_like(a["model"]["u"]))


class _NaNAfter(torch.utils.data.Dataset):
    """Yields NaN images once ``after`` items have been read (a run that diverges mid-epoch)."""

    def __init__(self, ds, after):
        self.ds, self.after, self.reads = ds, after, 0
        self.classes = getattr(ds, "classes", None)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        self.reads += 1
        return (torch.full_like(x, float("nan")) if self.reads > self.after else x), y


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    load = prune_cli.load_datasets

    def patched(cfg, rank):
        tr, te, *rest = load(cfg, rank)
        return (_NaNAfter(tr, after=5 * 32), te, *rest)  # batches 1-5 fine, batch 6 (epoch 2) NaN

    monkeypatch.setattr(prune_cli, "load_datasets", patched)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as ei:
        cli.main(["prune", *QUICK, "--epochs", "3", "--out", str(out)])
    assert ei.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 5 (epoch 2, batch 2/4)" in err
    assert "last good checkpoint" in err and "after epoch 1" in err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [h["epoch"] for h in _log(out)] == [1]
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--num-classes", "5"], r"labels must be in \[0, 5\)"),
    (["--batch-size", "1"], "batch of size 1 cannot train a model with BatchNorm"),
    (["--data", "cifar10"], "cifar-10-batches-py"),
])
def test_bad_input_errors(tmp_path, capsys, extra, message):
    import re

    args = ["prune", *QUICK, "--epochs", "1", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nodata"),
            *extra]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and re.search(message, err), err


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "abc"])
def test_target_flops_outside_unit_interval(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as ei:
        cli.main(["prune", *QUICK, "--out", str(tmp_path / "run"), "--target-flops", value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "--target-flops" in err and ("(0, 1]" in err or "not a number" in err)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        prune_cli.PruneConfig(target_flops=float(value) if value != "abc" else 0.0).validate()


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(out), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(out), "--stop-after", "1"]) == 0
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(out), "--resume", "--lr", "0.3"]) == 1
    assert "different settings for lr" in capsys.readouterr().err


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered checkpoint could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_tampered_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--epochs", "2", "--out", str(out), "--stop-after", "1"]) == 0
    ck_path = out / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)  # what s2h writes needs no pickled object, RNG states included
    assert isinstance(ck["rng"]["numpy"]["keys"], torch.Tensor)
    marker = tmp_path / "code-ran"
    ck["history"].append(_RunsCode(marker))
    torch.save(ck, ck_path)
    assert cli.main(["prune", *QUICK, "--epochs", "2", "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"refusing to load {ck_path}" in err and "without --resume" in err, err
    assert not marker.exists()
    assert not (out / "summary.json").exists()


def test_load_checkpoint_refuses_pickled_objects_and_reads_plain_ones(tmp_path):
    import numpy as np

    from s2h.engine.checkpoints import UnsafeCheckpointError, load_checkpoint

    torch.save({"rng": np.random.get_state()}, tmp_path / "old.pt")  # a NumPy array: a pickled object
    with pytest.raises(UnsafeCheckpointError, match="old.pt"):
        load_checkpoint(tmp_path / "old.pt")
    torch.save({"w": torch.ones(2), "n": [1, 2.5, "x", None]}, tmp_path / "plain.pt")
    got = load_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(got["w"], torch.ones(2)) and got["n"] == [1, 2.5, "x", None]


def test_rng_state_round_trip():
    import random

    import numpy as np

    from s2h.engine.seeding import rng_state, seed_everything, set_rng_state

    seed_everything(5)
    st = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(6)
    set_rng_state(st)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_presets_and_overrides():
    p = argparse.ArgumentParser()
    prune_cli.add_arguments(p)
    cfg = prune_cli.config_from_args(p.parse_args(["--out", "x", "--preset", "cifar100-resnet50"]))
    assert (cfg.data, cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.scheduler) == \
        ("cifar100", "resnet50", 500, 64, 0.05, 3e-4, "cosine")
    cfg = prune_cli.config_from_args(p.parse_args(["--out", "x", "--preset", "cifar100-wrn28-10", "--lr", "0.2"]))
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.weight_decay) == ("wrn28_10", 128, 0.2, 5e-4)
    cfg = prune_cli.config_from_args(p.parse_args(["--out", "x", "--preset", "tiny-imagenet-wrn28-10"]))
    assert cfg.scheduler == "step" and tuple(cfg.milestones) == (100, 150) and cfg.lr == 0.2
    cfg = prune_cli.config_from_args(p.parse_args(["--out", "x"]))
    # the package defaults (those of S2HPruner): reach the FLOPs target in short runs
    assert (cfg.model, cfg.data, cfg.ce_coef, cfg.gap_coef, cfg.balance) == ("resnet56", "digits", 1.0, 1.0, "paper")
    assert (cfg.resource_target, cfg.mask_optimizer, cfg.mask_lr) == ("hard", "adam", 0.02)
    # the paper's presets keep the paper's S2H settings: CNNs 0.5 / 5, Transformers 1 / 1, R on expected FLOPs
    cfg = prune_cli.config_from_args(p.parse_args(["--out", "x", "--preset", "cifar100-resnet50"]))
    assert (cfg.ce_coef, cfg.gap_coef, cfg.resource_target) == (0.5, 5.0, "soft")
    cfg = prune_cli.config_from_args(p.parse_args(["--out", "x", "--preset", "cifar100-vit", "--resource-target",
                                                   "hard"]))
    assert (cfg.ce_coef, cfg.gap_coef, cfg.resource_target) == (1.0, 1.0, "hard")


def test_lr_schedule():
    s = prune_cli.LRSchedule("cosine", 100, 10, 10, (), 0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5) and s(100) == pytest.approx(0.0, abs=1e-12)
    st = prune_cli.LRSchedule("step", 100, 10, 0, (3, 6), 0.1)
    assert (st(29), st(30), st(60)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))


def test_demo_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    quick = ["--model", "resnet8", "--epochs", "1", "--dense-epochs", "1", "--max-train-samples", "128",
             "--threads", "1", "--no-progress"]
    assert cli.main(["demo", *quick, "--out", str(a)]) == 0
    text = capsys.readouterr().out
    for phrase in ("dense resnet8", "S2H soft network", "S2H hard network (exported)", "of the dense FLOPs",
                   "CPU latency", "trajectory.png"):
        assert phrase in text
    assert cli.main(["demo", *quick, "--out", str(b)]) == 0
    ra, rb = (json.loads((d / "demo.json").read_text()) for d in (a, b))
    for k in ("dense_top1", "soft_top1", "hard_top1", "exported_top1", "hard_flops_pct", "params_pruned"):
        assert ra[k] == rb[k], k
    assert ra["exported_top1"] == ra["hard_top1"]
    assert (a / "trajectory.png").is_file() and (a / "architecture.png").is_file()


def test_help_shows_each_default_once(capsys):
    import re

    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    blocks = re.split(r"\n  (?=-)", text)
    for b in blocks:
        assert b.count("default") <= 1, b
    flat = " ".join(text.split())
    for opt, default in (("--epochs EPOCHS", 10), ("--lr LR", 0.05), ("--batch-size BATCH_SIZE", 64),
                         ("--mask-lr MASK_LR", 0.02), ("--resource-target {soft,hard}", "hard")):
        block = flat.rsplit(opt + " ", 1)[1].split(" --", 1)[0]  # the options section, after the usage
        assert f"(default: {default})" in block, (opt, block)


def test_resume_extends_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert cli.main(["prune", *QUICK, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert "extended to 2 epochs" in capsys.readouterr().out
    log = _log(out)
    assert [h["epoch"] for h in log] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    # epoch 2 follows the LR schedule of a 2-epoch run (the finished 1-epoch run had ended at 0)
    per_epoch = 128 // 32
    sched = prune_cli.LRSchedule("cosine", 2 * per_epoch, per_epoch, 0, (), 0.1)
    assert log[0]["lr"] == pytest.approx(0.05 * prune_cli.LRSchedule("cosine", per_epoch, per_epoch, 0, (), 0.1)(
        per_epoch), abs=1e-12)
    assert log[1]["lr"] == pytest.approx(0.05 * sched(2 * per_epoch), abs=1e-12)
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(out), "--resume"]) == 1
    assert "cannot shorten the run" in capsys.readouterr().err


def test_one_epoch_trajectory_shows_its_points(tmp_path):
    import numpy as np

    from s2h.engine.plots import trajectory_figure

    hist = [{"epoch": 1, "hard_flops_pct": 40.0, "soft_flops_pct": 35.0, "hard_top1": 70.0, "soft_top1": 80.0}]
    fig, (ax, ax2) = trajectory_figure(hist, 0.15)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    h = img.shape[0]
    for axes, y, rgb in ((ax, 40.0, (31, 119, 180)), (ax2, 70.0, (214, 39, 40))):  # tab:blue, tab:red
        px, py = axes.transData.transform((1, y))
        patch = img[int(h - py) - 1:int(h - py) + 2, int(px) - 1:int(px) + 2]
        assert (np.abs(patch - np.array(rgb)).sum(-1) < 60).any(), (y, patch.tolist())


def test_failed_run_leaves_no_empty_out_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(out), "--data", "cifar10", "--data-dir",
                     str(tmp_path / "nodata")]) == 1
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()
    keep = tmp_path / "existing"
    keep.mkdir()
    assert cli.main(["prune", *QUICK, "--epochs", "1", "--out", str(keep), "--data", "cifar10", "--data-dir",
                     str(tmp_path / "nodata")]) == 1
    assert keep.is_dir()  # a folder the user made is never removed


def test_ignore_and_strict_reach_convert(tmp_path, monkeypatch):
    seen = {}
    real = prune_cli.convert

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(prune_cli, "convert", spy)
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK, "--epochs", "0", "--out", str(out), "--ignore", "layer1.0.conv1",
                     "--strict"]) == 0
    assert seen["ignored_layers"] == ["layer1.0.conv1"] and seen["strict"] is True
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["ignore"] == ["layer1.0.conv1"] and s["config"]["strict"] is True
    report = (out / "convert_report.md").read_text()  # what convert pruned: not the ignored group
    assert "| conv1 |" in report and "| layer1.0.conv1 | 16 | " not in report.replace("kept", "")
    monkeypatch.setattr(prune_cli, "convert", real)
    parser = argparse.ArgumentParser()
    prune_cli.add_arguments(parser)
    base = prune_cli.config_from_args(parser.parse_args(["--out", "x"]))
    assert (base.ignore, base.strict) == ((), False)
    small = s2h.load(out / "pruned.pt")  # the ignored layer stays unpruned after reloading too
    assert small.layer1[0].conv1.out_channels == 16


def test_timm_model_by_name(tmp_path):
    dense = build_model("timm:resnet10t", 10, 1, 32)
    out = tmp_path / "run"
    assert cli.main(["prune", *QUICK[2:], "--model", "timm:resnet10t", "--epochs", "1", "--out", str(out)]) == 0
    small = s2h.load(out / "pruned.pt")
    assert type(small).__module__.startswith("timm") and type(small) is type(dense)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())
