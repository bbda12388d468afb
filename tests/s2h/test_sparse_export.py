"""s2h.sparse: dtypes (bfloat16), torch.export, ONNX (a clear refusal, densify as the way out).

Every output is checked against the pruned model computed dense by torch (F.conv2d / F.linear).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2h.sparse import FastMaxPool2d, SparseConv2d, SparseLinear, densify, sparsify


class SmallCNN(nn.Module):
    """The issue's kind of small CNN (28x28, one channel): conv-bn-relu-pool, conv-relu, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 14 * 14, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def small_cnn(sparsity=0.9) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        for m in (model.conv1, model.conv2, model.fc):
            w = m.weight
            w.mul_(w.abs() > w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values)
    return model


def reference(model: SmallCNN, x: torch.Tensor) -> torch.Tensor:
    bn = model.bn1
    y = F.conv2d(x, model.conv1.weight, padding=1)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = F.max_pool2d(F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None]), 2)
    y = F.relu(F.conv2d(y, model.conv2.weight, model.conv2.bias, padding=1))
    return F.linear(y.flatten(1), model.fc.weight, model.fc.bias)


def all_sparse(model):
    return sparsify(model, calibrate=False)


def test_bfloat16_model_runs_and_matches():
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    sparse = all_sparse(model).to(torch.bfloat16)
    assert sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in sparse.modules()) == 3
    with torch.no_grad():
        out = sparse(x.bfloat16())
        ref = reference(model, x.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max().detach()))


def test_bfloat16_before_sparsify():
    model = small_cnn()
    x = torch.randn(1, 1, 28, 28)
    sparse = sparsify(model.to(torch.bfloat16), calibrate=False)
    with torch.no_grad():
        out = sparse(x.bfloat16())
    with torch.no_grad():
        ref = reference(small_cnn(), x.bfloat16().float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max().detach()))


def test_half_input_to_a_float_model_says_what_to_do():
    sparse = all_sparse(small_cnn())
    with pytest.raises(ValueError, match=r"model.to\(torch.bfloat16\)"):
        sparse(torch.randn(1, 1, 28, 28, dtype=torch.bfloat16))
    sparse(torch.randn(1, 1, 28, 28))   # float32 still fine


def test_torch_export_runs_the_sparse_kernels_and_leaves_the_model_working():
    model = small_cnn()
    x = torch.randn(2, 1, 28, 28)
    sparse = all_sparse(model)
    with torch.no_grad():
        sparse(x)                                  # the op cache is filled before export
        ep = torch.export.export(sparse, (x,))
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert "s2h.spmm_conv2d.default" in targets
        ref = reference(model, x)
        torch.testing.assert_close(ep.module()(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sparse(x), ref, rtol=1e-4, atol=1e-4)   # eager still works after export


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_refuses_with_the_way_out(tmp_path, dynamo):
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo ONNX exporter needs onnxscript")
    if not dynamo and importlib.util.find_spec("onnx") is None:
        pytest.skip("the TorchScript ONNX exporter needs onnx")
    sparse = all_sparse(small_cnn())
    with pytest.raises(Exception, match=r"cannot be exported to ONNX(.|\n)*densify"):
        torch.onnx.export(sparse, (torch.randn(1, 1, 28, 28),), str(tmp_path / "m.onnx"), dynamo=dynamo)


def test_densify_gives_the_dense_masked_model():
    model = small_cnn()
    x = torch.randn(3, 1, 28, 28)
    dense = densify(all_sparse(model))
    assert not any(isinstance(m, (SparseConv2d, SparseLinear, FastMaxPool2d)) for m in dense.modules())
    assert any(isinstance(m, nn.Sequential) and isinstance(m[1], nn.ReLU) for m in dense.modules())  # fused ReLU
    with torch.no_grad():
        torch.testing.assert_close(dense(x), reference(model, x), rtol=1e-4, atol=1e-4)
    dense(x.double().float())


def test_densified_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = small_cnn()
    x = torch.randn(1, 1, 28, 28)
    path = str(tmp_path / "dense.onnx")
    torch.onnx.export(densify(all_sparse(model)), (x,), path, dynamo=True, input_names=["x"])
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), reference(model, x), rtol=1e-4, atol=1e-4)
