"""dass.infer.kernels.capture: cuBLAS workspaces are cleared around every dass capture, also
when the capture fails (no GPU needed: torch.cuda.graph and the clearing are replaced)."""

import contextlib

import pytest
import torch

from dass.infer.kernels import capture


@pytest.fixture
def calls(monkeypatch):
    log: list[str] = []

    @contextlib.contextmanager
    def fake_graph(g, **kw):
        log.append(f"enter {sorted(kw)}")
        yield
        log.append("exit")

    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(capture, "clear_cublas_workspaces", lambda: log.append("clear"))
    return log


def test_cleared_before_and_after(calls):
    with capture.graph_capture(object(), pool="p"):
        calls.append("body")
    assert calls == ["clear", "enter ['pool']", "body", "exit", "clear"]


def test_cleared_after_a_failed_capture(calls):
    with pytest.raises(RuntimeError, match="boom"):
        with capture.graph_capture(object()):
            raise RuntimeError("boom")
    assert calls[0] == "clear" and calls[-1] == "clear"


def test_every_dass_capture_uses_the_guard():
    """Each module of dass.infer that captures graphs goes through graph_capture."""
    import inspect

    from dass.infer import bench_timing, decode_graphs, graphs
    from dass.infer.kernels import tune

    for mod in (tune, bench_timing, decode_graphs, graphs):
        src = inspect.getsource(mod)
        assert "graph_capture(" in src and "torch.cuda.graph(" not in src, mod.__name__


def test_clear_is_safe_without_cuda():
    capture.clear_cublas_workspaces()  # CPU build: nothing to clear, must not raise
