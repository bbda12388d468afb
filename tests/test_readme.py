"""The README's Python examples run as written (with a two-batch loader and packed u/offsets)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_ten_line_example_trains_prunes_and_saves(tmp_path, monkeypatch):
    ten_lines = next(b for b in python_blocks() if "S2HPruner" in b)
    assert len(ten_lines.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_ten_lines(ten_lines, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run_ten_lines(ten_lines, tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    scope = {"loader": loader}
    exec(compile(ten_lines, "README.md", "exec"), scope)
    stats, pruned, small = scope["stats"], scope["pruned"], scope["small"]
    assert set(stats["keep"]) == {g.name for g in pruned.groups}
    with torch.no_grad():  # the exported model is the hard network
        pruned.eval()
        with pruned.branch("hard"):
            want = pruned(loader[0][0])
        small.eval()
        torch.testing.assert_close(small(loader[0][0]), want, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "pruned.pt").is_file()


def test_kernel_example_matches_the_reference():
    block = next(b for b in python_blocks() if "s2h_kernels.channel_masks" in b)
    u = torch.randn(12, dtype=torch.float64)
    offsets = torch.tensor([0, 5, 12])
    scope = {"u": u, "offsets": offsets}
    exec(compile(block, "README.md", "exec"), scope)
    from s2h_kernels import reference

    w, e, k = reference.channel_masks(u, offsets)
    torch.testing.assert_close(scope["w"], w)
    torch.testing.assert_close(scope["expected"], e)
    assert scope["keep"].tolist() == k.tolist()
