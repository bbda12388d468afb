"""The one registration path (s2h_kernels/_registration.py) and triton as an optional import.

* The generic autograd path (``torch.library.register_autograd``, forced with S2H_LEAN_AUTOGRAD=0,
  in a subprocess: registration happens once per process) gives bit-identical results and
  gradients to the lean path this process runs, for every differentiable op and variant, and both
  match the pure-PyTorch references.
* Without triton (a subprocess whose import system refuses it), ``import s2h_kernels`` and every
  CPU op work, and ``backend="triton"`` raises an ImportError that says to install triton.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import s2h_kernels
from s2h_kernels import _registration, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",  # the Triton interpreter's masked lanes
)

# Runs every differentiable op on fixed inputs, forward and backward, on the CPU (C++) and Triton
# (interpreter) variants; saves outputs and gradients. Used in-process and in the subprocess.
CASES = textwrap.dedent(
    """
    import torch, s2h_kernels

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(6, 11, generator=g, dtype=torch.float64), torch.randn(6, 11, generator=g, dtype=torch.float64)

    def run_cases():
        out = {}
        for backend in ("cpu", "triton"):
            s0, h0 = inputs(1)
            s, h = s0.clone().requires_grad_(), h0.clone().requires_grad_()
            loss = s2h_kernels.kl_gap(s, h, 1.5, "sum", backend=backend)
            loss.backward()
            out[f"kl_gap/{backend}"] = (loss.detach(), s.grad, h.grad)
            s = s0.clone().requires_grad_()
            loss = s2h_kernels.ca_kld(s, h0, 2.0, None, True, "batchmean", backend=backend)
            loss.backward()
            out[f"ca_kld/{backend}"] = (loss.detach(), s.grad)
            out[f"kl_gap_with_grads/{backend}"] = s2h_kernels.kl_gap_with_grads(s0, h0, 1.5, "mean", backend=backend)
            u = torch.linspace(-1, 2, 9, dtype=torch.float64).requires_grad_()
            w, e, k = s2h_kernels.channel_masks(u, [0, 4, 9], 0.7, [1, 2], backend=backend)
            (w * torch.arange(14.0, dtype=torch.float64)).sum().add(e.sum()).backward()
            out[f"channel_masks/{backend}"] = (w.detach(), e.detach(), k, u.grad)
        g = torch.Generator().manual_seed(3)
        xs = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
        xh = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        wt = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
        ys, yh = s2h_kernels.dual_linear(xs, xh, wt, b, 3, 5, backend="triton")
        (ys.sum() + 2 * yh.sum()).backward()
        out["dual_linear/triton"] = (ys.detach(), yh.detach(), xs.grad, xh.grad, wt.grad, b.grad)
        return out
    """
)


def _cases():
    namespace = {}
    exec(CASES, namespace)  # noqa: S102 (our own text, shared with the subprocess)
    return namespace["run_cases"]()


def _subprocess(script: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TRITON_INTERPRET": "1", **env}
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=600)


def test_generic_autograd_path_is_identical_to_lean(tmp_path):
    if not _registration.LEAN:
        pytest.skip("this process already runs the generic path (torch outside LEAN_TORCH)")
    lean = _cases()
    path = tmp_path / "generic.pt"
    script = CASES + textwrap.dedent(
        f"""
        from s2h_kernels import _registration
        from s2h_kernels.kl_gap import gap_op
        assert not _registration.LEAN
        assert gap_op("cpu") is torch.ops.s2h.kl_gap.default  # the op itself: register_autograd's kernel
        torch.save(run_cases(), {str(path)!r})
        """
    )
    res = _subprocess(script, S2H_LEAN_AUTOGRAD="0")
    assert res.returncode == 0, res.stderr[-3000:]
    generic = torch.load(path)
    assert generic.keys() == lean.keys()
    for name in lean:
        for a, b in zip(lean[name], generic[name]):
            assert torch.equal(a, b), name


def test_lean_path_matches_the_references():
    """What the comparison above checks against, itself checked against the eager references."""
    out = _cases()
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(6, 11, generator=g, dtype=torch.float64)
    h0 = torch.randn(6, 11, generator=g, dtype=torch.float64)
    s, h = s0.clone().requires_grad_(), h0.clone().requires_grad_()
    loss = reference.kl_gap(s, h, 1.5, "sum")
    loss.backward()
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(out[f"kl_gap/{backend}"], (loss.detach(), s.grad, h.grad))
        torch.testing.assert_close(out[f"kl_gap_with_grads/{backend}"], reference.kl_gap_with_grads(s0, h0, 1.5, "mean"))
    s = s0.clone().requires_grad_()
    loss = reference.ca_kld(s, h0, 2.0, None, True, "batchmean")
    loss.backward()
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(out[f"ca_kld/{backend}"], (loss.detach(), s.grad))
    u = torch.linspace(-1, 2, 9, dtype=torch.float64).requires_grad_()
    w, e, k = reference.channel_masks(u, [0, 4, 9], 0.7, [1, 2])
    (w * torch.arange(14.0, dtype=torch.float64)).sum().add(e.sum()).backward()
    for backend in ("cpu", "triton"):
        torch.testing.assert_close(out[f"channel_masks/{backend}"], (w.detach(), e.detach(), k, u.grad))
    ys, yh, gxs, gxh, gw, gb = out["dual_linear/triton"]
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    xh = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    rs, rh = reference.dual_linear(xs, xh, wt, b, 3, 5)
    (rs.sum() + 2 * rh.sum()).backward()
    torch.testing.assert_close((ys, yh, gxs, gxh, gw, gb), (rs.detach(), rh.detach(), xs.grad, xh.grad, wt.grad, b.grad))


@pytest.mark.parametrize(("version", "env", "want"), [
    ("2.14.1", "", True), ("2.14.0+cu128", "", True), ("2.13.0", "", False), ("2.15.0", "", False),
    ("3.0.0", "", False), ("2.14.1", "0", False), ("2.13.0", "1", True),
])
def test_lean_path_only_on_known_torch_versions(monkeypatch, version, env, want):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setenv(_registration.LEAN_ENV, env)
    assert _registration.lean_autograd_enabled() is want


def test_lean_env_rejects_unknown_values():
    res = _subprocess("import s2h_kernels", S2H_LEAN_AUTOGRAD="yes")
    assert res.returncode != 0
    assert "S2H_LEAN_AUTOGRAD='yes' is not one of" in res.stderr


def test_register_op_needs_setup_context_with_backward():
    with pytest.raises(ValueError, match="setup_context and backward"):
        _registration.register_op(("kl_gap",), fake=lambda *a: None, backward=lambda ctx, *g: g)


# A meta-path finder that refuses triton (and its submodules), installed before anything imports it.
NO_TRITON = textwrap.dedent(
    """
    import sys
    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None
    sys.meta_path.insert(0, NoTriton())
    """
)


def test_cpu_paths_work_without_triton():
    script = NO_TRITON + textwrap.dedent(
        """
        import torch, torch.nn.functional as F, s2h_kernels
        from s2h_kernels import reference, SparseWeight
        assert not s2h_kernels._triton.available()
        g = torch.Generator().manual_seed(0)
        s = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
        h = torch.randn(5, 9, generator=g, dtype=torch.float64)
        loss = s2h_kernels.kl_gap(s, h, 2.0)
        (gs,) = torch.autograd.grad(loss, s)
        ref = reference.kl_gap(s, h, 2.0)
        (rgs,) = torch.autograd.grad(ref, s)
        torch.testing.assert_close((loss, gs), (ref, rgs))
        torch.testing.assert_close(s2h_kernels.ca_kld(s, h), reference.ca_kld(s, h))
        torch.testing.assert_close(s2h_kernels.kl_gap_with_grads(s, h), reference.kl_gap_with_grads(s, h))
        u = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(s2h_kernels.channel_masks(u, [0, 5, 12]), reference.channel_masks(u, [0, 5, 12]))
        torch.autograd.gradcheck(lambda v: s2h_kernels.channel_masks(v, [0, 5, 12])[:2], (u,))
        xs, xh, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        torch.testing.assert_close(s2h_kernels.dual_linear(xs, xh, w, k_out=3, k_in=2),
                                   reference.dual_linear(xs, xh, w, k_out=3, k_in=2))
        dense = torch.randn(16, 24, generator=g) * (torch.rand(16, 24, generator=g) > 0.7)
        sw = SparseWeight.from_dense(dense)
        for n in (1, 5, 40):
            x = torch.randn(24, n, generator=g)
            torch.testing.assert_close(s2h_kernels.spmm(sw, x), dense @ x)
        wc = torch.randn(8, 3, 3, 3, generator=g) * (torch.rand(8, 3, 3, 3, generator=g) > 0.5)
        x = torch.randn(2, 3, 9, 9, generator=g)
        torch.testing.assert_close(s2h_kernels.spmm_conv2d(SparseWeight.from_dense(wc.reshape(8, -1)), x, 3, padding=1),
                                   F.conv2d(x, wc, padding=1))
        calls = {
            "kl_gap": lambda: s2h_kernels.kl_gap(s, h, backend="triton"),
            "ca_kld": lambda: s2h_kernels.ca_kld(s, h, backend="triton"),
            "kl_gap_with_grads": lambda: s2h_kernels.kl_gap_with_grads(s, h, backend="triton"),
            "channel_masks": lambda: s2h_kernels.channel_masks(u, [0, 5, 12], backend="triton"),
            "dual_linear": lambda: s2h_kernels.dual_linear(xs, xh, w, k_out=3, k_in=2, backend="triton"),
            "spmm": lambda: s2h_kernels.spmm(sw, torch.randn(24, 3), backend="triton"),
            "s2h::kl_gap_triton": lambda: torch.ops.s2h.kl_gap_triton(s.detach(), h, 1.0),
        }
        for name, call in calls.items():
            try:
                call()
            except ImportError as e:
                assert name in str(e) and "pip install triton" in str(e), str(e)
            else:
                raise AssertionError(f"{name}: backend='triton' ran without triton")
        assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
        print("ok")
        """
    )
    res = _subprocess(script)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_the_blocker_really_blocks_triton():
    """The finder above must make a triton import fail, or the test before proves nothing."""
    res = _subprocess(NO_TRITON + "import triton")
    assert res.returncode != 0 and "blocked by the test" in res.stderr
