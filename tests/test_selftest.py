"""python -m engine.selftest, run in-process on a few ops: a passing run reports every
op x backend x dtype x direction, and a wrong result, an exception or a missing device fail it."""
import dataclasses
import json

import pytest
import torch

from engine import backends, selftest

CPU = torch.device("cpu")


def rows_by_key(rows):
    return {(r["op"], r["backend"], r["dtype"], r["direction"]): r for r in rows}


def run(argv, capsys, tmp_path):
    """main's exit status, its printed output and the rows of its JSON file."""
    path = tmp_path / "selftest.json"
    status = selftest.main(["--device", "cpu", "--json", str(path), *argv])
    return status, capsys.readouterr().out, json.loads(path.read_text())["rows"]


def test_quick_run_checks_every_backend_dtype_and_direction(capsys, tmp_path):
    status, out, rows = run(["--quick", "--ops", "layer_norm,attention_with_kv_cache"], capsys, tmp_path)
    assert status == 0, out
    names = selftest.runnable_backends(CPU)
    assert {"cpu", "reference"} <= set(names)
    expected = {("layer_norm", b, d, direction) for b in names for d in ("float32", "bfloat16", "float16")
                for direction in ("fwd", "bwd")}
    # the decode step has no backward
    expected |= {("attention_with_kv_cache", b, d, "fwd") for b in names for d in ("float32", "bfloat16", "float16")}
    assert set(rows_by_key(rows)) == expected
    for row in rows:
        assert row["status"] == "ok" and 0 <= row["max_error"] <= row["allowed"], row
        assert row["shape"] in ("2x9x100", "2x4x2x64x64")  # --quick: the small shapes only
    assert "selftest passed" in out.splitlines()[-1]
    for line in ("torch: " + torch.__version__, "cpu: available", "op ", "layer_norm "):
        assert line in out


def _replace_forward(monkeypatch, op, backend, forward):
    implementation = backends.implementation(op, backend)
    monkeypatch.setitem(backends._registry[op], backend, dataclasses.replace(implementation, forward=forward))
    return implementation.forward


def test_a_wrong_result_fails_its_rows_and_only_those(monkeypatch, capsys, tmp_path):
    def off_by_one(*args, **kwargs):  # the first element of y is 1 too large
        y, *rest = original(*args, **kwargs)
        y = y.clone()
        y.view(-1)[0] += 1
        return (y, *rest)

    original = _replace_forward(monkeypatch, "layer_norm", "cpu", off_by_one)
    status, out, rows = run(["--quick", "--ops", "layer_norm"], capsys, tmp_path)
    assert status == 1
    by_key = rows_by_key(rows)
    for dtype in ("float32", "bfloat16", "float16"):
        wrong = by_key[("layer_norm", "cpu", dtype, "fwd")]
        assert wrong["status"].startswith("FAIL: error") and wrong["max_error"] > wrong["allowed"], wrong
        assert wrong["worst"] == "y"
        assert by_key[("layer_norm", "cpu", dtype, "bwd")]["status"] == "ok"
        assert by_key[("layer_norm", "reference", dtype, "fwd")]["status"] == "ok"
    assert "selftest FAILED: " in out and "failures:" in out


def test_an_exception_is_a_failed_row_and_the_run_goes_on(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    _replace_forward(monkeypatch, "gelu", "cpu", broken)
    status, out, rows = run(["--quick", "--ops", "gelu,rms_norm"], capsys, tmp_path)
    assert status == 1
    failed = [r for r in rows if r["status"] != "ok"]
    assert {(r["op"], r["backend"], r["direction"]) for r in failed} == {("gelu", "cpu", "fwd")}
    assert all(r["status"] == "FAIL: RuntimeError: kernel exploded" for r in failed)
    assert any(r["op"] == "rms_norm" and r["backend"] == "cpu" and r["status"] == "ok" for r in rows)


def test_dropout_is_reproducible_and_matches_the_reference_mask(capsys, tmp_path):
    status, out, rows = run(["--ops", "sdpa_dropout"], capsys, tmp_path)
    assert status == 0, out
    assert {(r["backend"], r["direction"]) for r in rows} == {(b, d) for b in selftest.runnable_backends(CPU)
                                                             for d in ("fwd", "bwd")}


def test_irreproducible_dropout_fails(monkeypatch, capsys, tmp_path):
    """A backend right on its first dropout call that changes its stream on the next calls: the
    second run with the same torch seed differs from the first."""
    calls = []

    def drifting(q, k, v, mask, causal, scale, dropout_p, seed, return_dropout_mask):
        calls.append(seed)
        return original(q, k, v, mask, causal, scale, dropout_p, seed + len(calls) - 1, return_dropout_mask)

    original = _replace_forward(monkeypatch, "attention", "cpu", drifting)
    status, out, rows = run(["--ops", "sdpa_dropout"], capsys, tmp_path)
    assert status == 1 and len(calls) == 2
    failed = {(r["backend"], r["direction"]): r["status"] for r in rows if r["status"] != "ok"}
    assert set(failed) == {("cpu", "fwd"), ("cpu", "bwd")}, failed
    assert all(status.startswith("FAIL: not reproducible with the same seed") for status in failed.values())


def test_worker_processes_give_the_same_rows(capsys, tmp_path):
    _, _, in_process = run(["--quick", "--ops", "gelu,rms_norm"], capsys, tmp_path)
    status, out, in_workers = run(["--quick", "--ops", "gelu,rms_norm", "--jobs", "2"], capsys, tmp_path)
    assert status == 0, out
    assert "2 processes" in out
    assert sorted(rows_by_key(in_workers)) == sorted(rows_by_key(in_process))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_cuda_without_a_gpu_fails(capsys, tmp_path):
    path = tmp_path / "selftest.json"
    assert selftest.main(["--device", "cuda", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["rows"]
    assert [r["op"] for r in rows] == ["device"] and "no GPU" in rows[0]["status"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a backend that cannot run here")
def test_a_named_backend_that_cannot_run_gives_failed_rows(capsys, tmp_path):
    """What a worker process does when a backend the parent saw does not run in it."""
    status, out, rows = run(["--quick", "--ops", "gelu", "--backends", "reference,cuda"], capsys, tmp_path)
    assert status == 1
    cuda_rows = [r for r in rows if r["backend"] == "cuda"]
    assert len(cuda_rows) == 3  # one failed forward row per dtype; nothing is dropped
    assert all(r["status"].startswith("FAIL: BackendError") for r in cuda_rows), cuda_rows
    assert all(r["status"] == "ok" for r in rows if r["backend"] == "reference")
