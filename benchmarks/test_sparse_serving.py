"""benchmarks/sparse_serving.py and sparse_serving_layers.py on tiny inputs (the plumbing, not the speed)."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_serving as ss  # noqa: E402
import sparse_serving_layers as sl  # noqa: E402


def _student_run(root: Path, key: str, sparsity: float, top1: float) -> Path:
    from s2h.models import small_cnn_student
    from s2h.unstructured import save_pruned

    torch.manual_seed(0)
    net = ss.global_prune(small_cnn_student(10, 1).eval(), sparsity)
    masks = {n + ".weight": m.weight != 0 for n, m in ss.prunable(net)}
    save_pruned(root / key, net, masks,
                spec={"arch": "small_cnn_student", "num_classes": 10, "in_channels": 1, "image_size": 28})
    (root / f"{key}.json").write_text(json.dumps({"key": key, "top1": top1}))
    return root / key


def test_find_student_falls_back_and_says_so(tmp_path):
    _student_run(tmp_path, "gmp-ce-p900-s1", 0.9, 70.0)
    _student_run(tmp_path, "magnitude-kd-p950-s0", 0.95, 50.0)
    _student_run(tmp_path, "torch-l1-kd-p950-s0", 0.95, 60.0)
    path, note = ss.find_student(str(tmp_path), "gmp-ce", 0.9)
    assert path.endswith("gmp-ce-p900-s1") and "missing" in note
    path, note = ss.find_student(str(tmp_path), "gmp-ce", 0.95)
    assert path.endswith("torch-l1-kd-p950-s0") and "most accurate" in note
    path, note = ss.find_student(str(tmp_path), "gmp-ce", 0.98)
    assert path is None and "no student at 98%" in note
    model, shape, info = ss.build("fashion:gmp-ce", 0.99, str(tmp_path))
    assert model is None and "missing" in info


def test_student_rows_report_top1_and_identical_predictions(tmp_path):
    run = _student_run(tmp_path, "gmp-ce-p900-s0", 0.9, 70.0)
    model, shape, info = ss.build("fashion:gmp-ce", 0.9, str(tmp_path))
    assert info["run"] == run.name and shape == (1, 28, 28)
    assert ss.layer_sparsities(model)[0] > 0.5
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(4))
    jsonl = tmp_path / "rows.jsonl"
    rows = ss.bench_model("fashion:gmp-ce", model, shape, batches=(1, 4), threads=(1,), rounds=lambda b: 2,
                          peers=False, sparsity=0.9, clock="cpu", eval_data=(x, y), info=info, jsonl=str(jsonl))
    assert [(r["batch"], r["threads"], r["clock"]) for r in rows] == [(1, 1, "cpu"), (4, 1, "cpu")]
    assert all(2 <= r["rounds"] == len(r["times"]["s2h"]) for r in rows)
    for r in rows:
        assert r["top1"]["s2h"] == r["top1"]["dense"] == r["top1"]["dense_bn"] == r["top1"]["dense_cl"]
        assert r["top1"]["s2h pred diff"] == 0 and r["run"] == run.name
        assert "_s2h_runner" not in r and set(r["times"]) == {"dense", "dense_bn", "dense_cl", "s2h"}
    assert len(ss.read_jsonl(str(jsonl))) == 2
    out = tmp_path / "out.md"
    ss.write_markdown(ss.read_jsonl(str(jsonl)) + [dict(kind="missing", model="fashion:gmp-ce", sparsity=0.95,
                                                        missing="no student at 95%")], str(out))
    text = out.read_text()
    assert "## Fashion-MNIST students" in text and "no student at 95%" in text and "gmp-ce-p900-s0" in text


def test_predictions_pad_the_last_chunk():
    calls = []

    def fixed_batch(xb):
        calls.append(len(xb))
        return xb.flatten(1)[:, :3]
    x = torch.randn(7, 1, 2, 2)
    assert torch.equal(ss.predictions(fixed_batch, x, chunk=3), x.flatten(1)[:, :3].argmax(1))
    assert calls == [3, 3, 3]


def test_row_clock_is_cpu_only_on_one_thread():
    assert ss.row_clock("cpu", 1) == "cpu" and ss.row_clock("cpu", 2) == "wall" and ss.row_clock("wall", 1) == "wall"


def test_grids_cover_the_final_table():
    quiet = ss.GRIDS["quiet"]
    for arch in ("resnet18", "resnet50", "fashion:gmp-ce"):
        for s in (0.9, 0.95):
            cases = [(b, t) for a, sp, bs, ts in quiet if (a, sp) == (arch, s) for b in bs for t in ts]
            assert sorted(cases) == [(1, 1), (1, 2), (32, 1), (32, 2)], (arch, s)


def test_onnx_names_map_to_modules_and_blocks():
    assert sl.onnx_module_path("/layer2/layer2.0/downsample/downsample.0/Conv_output_0") == "layer2.0.downsample.0"
    assert sl.onnx_module_path("/layer1/layer1.0/Add") == "layer1.0"
    assert sl.onnx_module_path("/conv1/Conv_output_0") == "conv1"
    assert sl.onnx_module_path("y") == "head"
    assert sl.block_of("layer3.1.conv2") == "layer3.1" and sl.block_of("maxpool") == "stem"
    assert sl.block_of("fc") == "head" and sl.block_of("features.3") == "features"


def test_torch_node_times_cover_every_node():
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x) + x)
    times = sl.torch_node_times(Block().eval(), torch.randn(1, 2, 5, 5), rounds=2, clock=time.perf_counter)
    assert [(t["node"], t["target"]) for t in times] == [("conv", "Conv2d"), ("add", "add"), ("relu", "ReLU")]
    assert all(t["ms"] >= 0 for t in times)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_set_malloc_default_is_a_no_op():
    assert ss.set_malloc("default") in ss.MALLOC
    with pytest.raises(ValueError, match="unknown mode"):
        ss.set_malloc("jemalloc")
