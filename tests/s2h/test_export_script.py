"""Exported Transformers (s2h's ViT/Swin, torchvision's, timm's) script with torch.jit.script and export
to ONNX like the CNNs, computing what the hard branch computes (onnxruntime checks it when installed)."""
import importlib.util
import io
import warnings

import pytest
import torch
import torchvision

import s2h

pytestmark = pytest.mark.usefixtures("one_thread")


def _models():
    yield "vit_cifar", lambda: s2h.models.vit_cifar(num_classes=10, depth=2)
    yield "swin_cifar", lambda: s2h.models.swin_cifar(num_classes=10, depths=(2, 2), num_heads=(2, 4))
    yield "tv_vit", lambda: torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    yield "tv_swin", lambda: torchvision.models.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10)
    yield "tv_resnet18", lambda: torchvision.models.resnet18(num_classes=10)
    if importlib.util.find_spec("timm") is not None:
        import timm

        yield "timm_vit", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                    num_classes=10, depth=2)


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    out = {}
    for name, build in _models():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = s2h.convert(build().eval(), x)
        with torch.no_grad():
            model.u.uniform_(-2, 2)
            with model.branch("hard"):
                yh = model(x)
        out[name] = (model.export().eval(), yh)
    return x, out


@pytest.mark.parametrize("name", [n for n, _ in _models()])
def test_exported_model_scripts(exported, name):
    x, models = exported
    small, yh = models[name]
    scripted = torch.jit.script(small)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), yh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n, _ in _models()])
def test_exported_model_exports_to_onnx(exported, name):
    x, models = exported
    small, yh = models[name]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, (x,), f, dynamo=False, input_names=["x"], output_names=["y"])
    assert len(f.getvalue()) > 1000
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed: the ONNX file is written, not run")
    import onnxruntime as ort

    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), yh, rtol=1e-4, atol=1e-4)
