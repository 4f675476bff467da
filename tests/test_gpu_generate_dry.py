"""benchmarks/gpu_generate.py --dry-run: the issue-22 GPU script end to end on the CPU with
tiny shapes (the 2:4 modules' reference path), so its plumbing is checked before a GPU
session spends minutes on it: the table's rows, and the greedy check on a pruned model."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"scope", "batch", "loop", "dense_tok_s", "sparse_tok_s", "dense_roofline", "sparse_roofline",
        "dense_peak_gb", "sparse_peak_gb"}


def _run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_generate.py"), "--dry-run", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "gen.json"
    res = _run("--out", str(out), "--batches", "1,2")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["scope"], r["batch"]) for r in rows} == {("mlp", 1), ("mlp", 2), ("all", 1), ("all", 2)}
    assert all(KEYS <= set(r) for r in rows)
    # the default loop: the fast one (dass.infer.decode_loop), dense and 2:4 alike, one graph a step
    assert all(r["loop"].startswith("fast loop") and "torch.compile" in r["loop"] and r["dense_loop"] == r["loop"]
               and r["graph_breaks"] == 0 for r in rows), [r["loop"] for r in rows]
    assert data["skipped"] == []
    # scope all stores fewer weight bytes than scope mlp, which stores fewer than dense
    by = {(r["scope"], r["batch"]): r for r in rows}
    assert by[("all", 1)]["sparse_weights_stored_gb"] < by[("mlp", 1)]["sparse_weights_stored_gb"] \
        < by[("mlp", 1)]["dense_weights_stored_gb"]
    assert "scope batch" in res.stdout


def test_dry_run_compiled_loop_still_runs(tmp_path):
    """--loop compiled: generate()'s own compiled loop, as before the fast loop existed."""
    out = tmp_path / "gen.json"
    res = _run("--out", str(out), "--batches", "1", "--scopes", "mlp", "--loop", "compiled")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["scope"], r["batch"]) for r in rows] == [("mlp", 1)]
    assert rows[0]["loop"].startswith("generate() static cache, torch.compile") and rows[0]["graph_breaks"] == 0


def test_dry_run_budget_skips_rows_and_says_so(tmp_path):
    out = tmp_path / "gen.json"
    res = _run("--out", str(out), "--budget-s", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["skipped"] and all("time box" in s for s in data["skipped"])


def test_dry_run_greedy_check(tmp_path):
    out = tmp_path / "greedy.json"
    res = _run("--check-greedy", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["replaced"] > 0 and len(data["prompts"]) == 2
    for p in data["prompts"]:
        for loop in ("eager", "compiled", "fast"):
            assert "error" not in p[loop], p[loop]
            # the same tokens are likely (exact decompression, one thread) but not promised by
            # a CPU GEMM of another width; a divergence must come with its explanation
            e = p[loop]
            assert (e["same"] and e["first_divergence"] is None) or ("why" in e and e["first_divergence"] >= 0)


def test_dry_run_stacked_qkv(tmp_path):
    """--fuse-qkv: every attention's 2:4 q, k, v become one product, and the compiled step
    still has no graph break."""
    out = tmp_path / "gen.json"
    res = _run("--out", str(out), "--batches", "1", "--fuse-qkv")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["accelerate"]["all"]["fused_qkv"] == 2 and data["accelerate"]["mlp"]["fused_qkv"] == 0
    assert all(r["graph_breaks"] == 0 for r in data["rows"])
