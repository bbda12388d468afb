"""S2HPruner under DistributedDataParallel: gloo on the CPU, two processes.

Two processes on half a batch each must end where one process on the whole batch ends (θ and u),
and every rank must hold the same u and the same mask-optimizer state.

BatchNorm: train-mode BatchNorm normalises with the statistics of the batch it sees, so two
processes on two halves compute a different function than one process on the whole batch (unless
SyncBatchNorm is used). The equivalence test therefore uses a model without BatchNorm (an MLP),
where the two are mathematically identical; it runs in fp64 so the comparison is tight. The
``torchrun`` smoke test runs a ResNet with BatchNorm (per-rank batch statistics, the usual DDP
semantics) end to end through the CLI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import s2h
from s2h.structured.step import S2HPruner

STEPS = 4
BATCH = 16


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    m = s2h.convert(net, torch.randn(2, 12), target_flops=0.3).double()
    with torch.no_grad():
        m.u.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return m


def _data():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _trainer(m, ddp):
    opt = torch.optim.SGD(m.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    mopt = torch.optim.Adam(m.mask_parameters(), lr=0.05)
    return S2HPruner(m, opt, mopt, ddp=ddp)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = _model()
        if rank == 1:  # different start on rank 1: the trainer must broadcast rank 0's state
            with torch.no_grad():
                m.u.add_(1.0)
                for p in m.weight_parameters():
                    p.add_(0.1)
        tr = _trainer(m, ddp=None)  # auto: torch.distributed is initialised with 2 processes
        assert tr.ddp and tr.world_size == world
        per = BATCH // world
        stats = []
        for x, y in _data():
            stats.append(tr.step(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
        torch.save({"state": {k: v.clone() for k, v in m.state_dict().items()},
                    "mask_opt": tr.mask_optimizer.state_dict(), "keep": [s["keep"] for s in stats]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    init = tmp_path / "init"
    mp.spawn(_worker, args=(2, str(init), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)

    # identical on every rank, bit for bit: θ, u, and the mask optimizer's state
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["keep"] == r1["keep"]
    s0, s1 = r0["mask_opt"]["state"], r1["mask_opt"]["state"]
    assert s0.keys() == s1.keys() and s0
    for i in s0:
        for name in s0[i]:
            assert torch.equal(torch.as_tensor(s0[i][name]), torch.as_tensor(s1[i][name])), name

    # equal to one process on the combined batch
    m = _model()
    tr = _trainer(m, ddp=False)
    keeps = [tr.step(x, y)["keep"] for x, y in _data()]
    assert keeps == r0["keep"]
    for k, v in m.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-10, atol=1e-12, msg=lambda s: f"{k}: {s}")
    # and training moved things (the test is not vacuous)
    assert not torch.equal(m.u, _model().u)


def test_ddp_flag_without_process_group_is_an_error():
    m = _model()
    with pytest.raises(RuntimeError, match="torch.distributed"):
        _trainer(m, ddp=True)


@pytest.mark.slow
def test_torchrun_prune_cli(tmp_path):
    """``torchrun --nproc_per_node=2 -m s2h prune`` end to end (gloo, CPU, a ResNet with BatchNorm)."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "s2h", "prune",
           "--model", "resnet8", "--data", "digits", "--epochs", "2", "--batch-size", "32",
           "--max-train-samples", "128", "--max-test-samples", "64", "--out", str(out), "--no-progress",
           "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 processes" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs"] == 2 and s["steps"] == 2 * (128 // 32)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2]
    assert s["exported_matches_hard"]
    assert Path(out / "pruned.pt").is_file()
