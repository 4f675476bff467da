"""Two gloo processes on CPU prune exactly like one process.

Bit-equality holds for the same intra-op thread count only (a CPU matrix product may
split its sums differently with more threads), so the workers and the reference in this
process all run with one thread.
"""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dass
from dass.run.distributed import Dist, set_current
from tiny import calib, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_thread():
    """The reference computation with the workers' thread count, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker(rank: int, world: int, port: int, arch: str, method: str, pattern: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_current(Dist(rank, world))
        model = tiny_model(arch)
        report = dass.prune(model, method, pattern, calibration=calib(8, 24), batch_size=2, progress=False)
        if rank == 0:
            torch.save({"state": model.state_dict(), "fallbacks": report.fallbacks}, out)
    finally:
        set_current(Dist())
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "arch,method,pattern",
    [
        ("llama", "dass", "2:4"),
        ("llama", "wanda", "0.5"),
        ("llama", "sparsegpt", "2:4"),
        ("mixtral", "dass", "4:8"),
    ],
)
def test_two_ranks_equal_one_process(tmp_path, arch, method, pattern):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), arch, method, pattern, out), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out)["state"]
    model = tiny_model(arch)
    with one_thread():
        dass.prune(model, method, pattern, calibration=calib(8, 24), batch_size=2, progress=False)
    want = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal((got[k] == 0), (want[k] == 0)), f"mask of {k} differs"
        assert torch.equal(got[k], want[k]), f"weights of {k} differ"


def test_shard_is_disjoint_and_complete():
    items = list(range(11))
    shards = [Dist(r, 3).shard(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items
    assert Dist().shard(items) == items


def _stream_worker(rank: int, world: int, port: int, src: str, out: str) -> None:
    from dass.run.streaming import prune_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_current(Dist(rank, world))
        prune_checkpoint(src, out, "sparsegpt", "2:4", calibration_ids=calib(8, 24), device="cpu", batch_size=2, progress=False)
    finally:
        set_current(Dist())
        dist.destroy_process_group()


def test_two_ranks_streaming_writes_the_single_process_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from dass.run.streaming import prune_checkpoint

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="40KB")
    with one_thread():
        prune_checkpoint(src, tmp_path / "one", "sparsegpt", "2:4", calibration_ids=calib(8, 24), device="cpu", batch_size=2, progress=False)
    mp.start_processes(_stream_worker, args=(2, _free_port(), str(src), str(tmp_path / "two")), nprocs=2, join=True, start_method="spawn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "two"]  # no rank's partial left
    one = {f.name: load_file(f) for f in (tmp_path / "one").glob("*.safetensors")}
    two = {f.name: load_file(f) for f in (tmp_path / "two").glob("*.safetensors")}
    assert one.keys() == two.keys()
    for f in one:
        for k in one[f]:
            assert torch.equal(one[f][k], two[f][k]), k
