"""The Fashion-MNIST studies end to end on a tiny subset (the pipeline, not the accuracy)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_common as fc  # noqa: E402

from s2h.data import fashion_mnist  # noqa: E402

needs_data = pytest.mark.skipif(not (fashion_mnist.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist not installed (make data)")


def test_augment_matches_a_per_sample_crop_and_flip():
    x = torch.randn(6, 1, 28, 28)
    out = fc.augment(x, -0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the order augment makes them
    top, left = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = F.pad(x, (3, 3, 3, 3), value=-0.5)
    for b in range(6):
        want = padded[b, :, top[b]:top[b] + 28, left[b]:left[b] + 28]
        torch.testing.assert_close(out[b], want.flip(-1) if flip[b] else want, rtol=0, atol=0)


def test_epoch_batches_are_a_permutation():
    batches = fc.epoch_batches(1000, seed=1, epoch=2)
    flat = torch.cat(batches)
    assert len(batches) == 1000 // fc.BATCH and len(set(flat.tolist())) == flat.numel()
    assert not torch.equal(flat, torch.cat(fc.epoch_batches(1000, seed=1, epoch=3)))


@needs_data
def test_structured_study_smoke(tmp_path):
    import fashion_structured as fs

    fs.main(["--smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path)])
    rows = [json.loads(p.read_text()) for p in (tmp_path / "work").glob("*.json")]
    by = {r["key"]: r for r in rows}
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "uniform", "tp-magnitude", "tp-taylor", "s2h", "s2h-arch"}
    for r in rows:
        assert 0 <= r["top1"] <= 100 and r["latency_b1_ms"] > 0
        if r["method"] in ("uniform", "tp-magnitude", "tp-taylor"):
            assert abs(r["flops_frac"] - 0.3) < 0.02, r  # the width search and the ratio bisection hit it
    s2h_run = next(r for r in rows if r["method"] == "s2h")
    arch = next(r for r in rows if r["method"] == "s2h-arch")
    assert arch["macs"] == s2h_run["macs"] and arch["params"] == s2h_run["params"]
    # MACs of the exported model recounted here from its layers (3x3 convs, 1x1 shortcuts, linear).
    net = torch.load(tmp_path / "work" / f"{s2h_run['key']}.pt", weights_only=False)
    macs, h = 0, 28
    sizes = {}
    hook = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, o.shape))
            for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    net.eval()(torch.zeros(1, 1, 28, 28))
    for m, shape in sizes.items():
        if isinstance(m, torch.nn.Conv2d):
            macs += m.in_channels // m.groups * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * shape[2] * shape[3]
        else:
            macs += m.in_features * m.out_features
    assert macs == s2h_run["macs"]
    text = (tmp_path / "fashion_structured_smoke.md").read_text()
    assert "5. S2H" in text and "Torch-Pruning, GroupTaylor" in text and "## Protocol" in text
    assert (tmp_path / "fashion_structured_smoke.png").stat().st_size > 10_000
    # The goals are stated from the rows: S2H against the best same-budget peer, recomputed here.
    peers = [r["top1"] for r in rows if r["method"] == "uniform" or (r["method"].startswith("tp-") and r["pretrain"] == 1)]
    goal = next(line for line in text.splitlines() if "best peer at the same budget, 30%" in line)
    assert ("**not met**" in goal) == (s2h_run["top1"] < max(peers)), goal
    flops = next(line for line in text.splitlines() if "within 1% of the target" in line)
    assert ("**not met**" in flops) == (abs(s2h_run["flops_frac"] - 0.3) > 0.003), flops
    # A second call finds every run finished and only rewrites the report.
    before = {k: v["wall_s"] for k, v in by.items()}
    fs.main(["--smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path)])
    after = {json.loads(p.read_text())["key"]: json.loads(p.read_text())["wall_s"] for p in (tmp_path / "work").glob("*.json")}
    assert after == before


@needs_data
def test_budget_curve_smoke(tmp_path):
    import fashion_structured as fs

    args = ["--smoke", "--curve", "2", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]
    fs.main(args)
    rows = {r["key"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "work").glob("*.json"))}
    # every curve method at E = 2 (Torch-Pruning: 1 dense epoch + 1 fine-tuning epoch)
    assert {(r["method"], r["epochs"] + r["pretrain"]) for r in rows.values()} == {
        ("dense", 1), ("uniform", 2), ("tp-magnitude", 2), ("s2h", 2)}
    text = (tmp_path / "fashion_structured_curve.md").read_text()
    for method, label in (("uniform", "uniform width"), ("s2h", "S2H, one stage"), ("tp-magnitude", "Torch-Pruning")):
        top1 = next(r["top1"] for r in rows.values() if r["method"] == method)
        line = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
        assert f"{top1:.2f} (n=1)" in line, (line, top1)
    assert (tmp_path / "fashion_structured_curve.png").stat().st_size > 10_000
    # Finished runs are kept: a second call runs nothing.
    fs.main(args)
    again = {r["key"]: r["wall_s"] for r in (json.loads(p.read_text()) for p in (tmp_path / "work").glob("*.json"))}
    assert again == {k: r["wall_s"] for k, r in rows.items()}


def _square_or_die(x: int) -> int:
    if x == 3:
        os._exit(139)  # what a segfaulting worker looks like to the parent
    return x * x


def test_run_parallel_raises_when_a_worker_dies():
    assert fc.run_parallel(_square_or_die, [1, 2, 4], workers=2) == [1, 4, 16]
    with pytest.raises(RuntimeError, match="worker process died"):
        fc.run_parallel(_square_or_die, [1, 3, 2, 4], workers=2)
