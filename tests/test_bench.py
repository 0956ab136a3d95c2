"""``anybn.bench``: the cases time the right computation, the CLI reports what it measured.

No test here asserts a speed: speed is shown by the benchmarks, never by timed unit tests.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import reference_backward, reference_batch_norm

from anybn import _fast, cli
from anybn.bench import backends, cases, memory, shapes, timing
from anybn.bench import cli as bench_cli

TINY = ("16x5", "nchw:4x3x5x6", "nhwc:4x5x6x3")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _prepare_or_skip(*args, **kwargs) -> cases.Case:
    try:
        return cases.prepare(*args, **kwargs)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))


# ------------------------------------------------------------------------------ the cases


@pytest.mark.parametrize("op", shapes.ALL_OPS)
@pytest.mark.parametrize("shape", TINY)
@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_each_backend_computes_batch_norm(backend, shape, op):
    case = _prepare_or_skip(backend, shape, op, "float32")
    with case.environment():
        outputs = case.run()
    got = case.to_numpy(outputs)
    want = cases.expected(shape, op, "float32")
    assert len(got) == len(want) == (3 if op.startswith("backward") else 1)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = np.max(np.abs(w))
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * scale, err_msg=case.name)
    assert cases.check(case, outputs) <= cases.tolerance("float32")


@pytest.mark.parametrize("backend", ["numpy-fast", "numpy-generic", "naive", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_other_dtypes_within_their_tolerance(backend, dtype):
    case = _prepare_or_skip(backend, "nhwc:4x5x6x3", "train", dtype)
    assert case.to_numpy(case.run())[0].dtype == np.dtype(dtype)
    assert cases.check(case) <= cases.tolerance(dtype)


@pytest.mark.parametrize("shape", TINY)
def test_expected_matches_the_test_suite_reference(shape):
    s = shapes.parse_shape(shape)
    d = shapes.make_data(shape, "float32")
    (y,) = cases.expected(shape, "train")
    np.testing.assert_allclose(y, reference_batch_norm(d.x, s.axis, d.gamma, d.beta, shapes.EPS), rtol=1e-12)
    dx, dg, db = cases.expected(shape, "backward")
    want = reference_backward(d.x, d.dy, s.axis, d.gamma, shapes.EPS)
    for got, expected in zip((dx, dg, db), want):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    (ye,) = cases.expected(shape, "eval")
    np.testing.assert_allclose(ye, reference_batch_norm(d.x, s.axis, d.gamma, d.beta, shapes.EPS,
                                                        mean=d.running_mean, var=d.running_var), rtol=1e-12)


def test_check_catches_a_wrong_computation():
    case = cases.prepare("numpy-generic", "16x5", "train")
    y = case.run()[0]
    assert cases.check(case, (y * 1.001,)) > cases.tolerance("float32")
    with pytest.raises(AssertionError, match="output shape"):
        cases.check(case, (y[:-1],))


def test_numpy_backends_hold_their_fast_path_setting(monkeypatch):
    monkeypatch.setenv("ANYBN_FAST_PATHS", "1")
    generic = cases.prepare("numpy-generic", "16x5", "train")
    fast = cases.prepare("numpy-fast", "16x5", "train")
    assert generic.path == "generic"
    with generic.environment():
        assert os.environ["ANYBN_FAST_PATHS"] == "0" and not _fast.fast_paths_enabled()
    assert os.environ["ANYBN_FAST_PATHS"] == "1"  # restored
    d = shapes.make_data("16x5")
    served = _fast.select("train", np, d.x)  # what anybn itself picks for these arrays
    assert fast.path == ("generic" if served is None else served.name)


def test_torch_gets_channels_last_memory():
    pytest.importorskip("torch")
    import torch

    case = cases.prepare("torch", "nhwc:4x5x6x3", "train")
    y = case.run()[0]
    assert tuple(y.shape) == (4, 3, 5, 6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert case.to_numpy((y,))[0].shape == (4, 5, 6, 3)


def test_byte_counts():
    assert [shapes.traffic_bytes(op, 1000) for op in ("train", "eval", "backward")] == [3000, 2000, 5000]
    case = cases.prepare("naive", "nchw:4x3x5x6", "backward")
    assert case.nbytes == 4 * 3 * 5 * 6 * 4
    assert case.traffic == 5 * case.nbytes
    with timing.CopyTimer(1001, threads=2) as copy:
        assert copy.traffic == 2 * 1001
        copy._src[:] = np.arange(1001) % 251
        assert copy.timer(2)() > 0
        np.testing.assert_array_equal(copy._dst, copy._src)  # it copied all of it, both halves


def test_unavailable_backends_skip_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(cases.Unavailable, match="torch is not installed"):
        cases.prepare("torch", "16x5", "train")
    assert issubclass(cases.Unavailable, NotImplementedError)  # asv's skip
    with pytest.raises(cases.Unavailable, match="naive: written for"):
        cases.prepare("naive", "ncl:4x3x7", "train")
    with pytest.raises(cases.Unavailable, match="no float16"):
        cases.prepare("array_api_strict", "16x5", "train", "float16")
    report = bench_cli.measure(["16x5"], ["eval"], ["naive", "torch"], rounds=1, show_progress=False)
    assert [r["backend"] for r in report["results"]] == ["naive"]
    (skip,) = report["skipped"]
    assert (skip["backend"], skip["shape"], skip["op"]) == ("torch", "16x5", "eval")
    assert skip["reason"].startswith("torch is not installed")
    assert report["results"][0]["vs_torch"] is None


@pytest.mark.parametrize(
    "spec, dims, axis",
    [("4096x1024", (4096, 1024), 1), ("nchw:32x64x56x56", (32, 64, 56, 56), 1),
     ("nhwc:32x56x56x64", (32, 56, 56, 64), 3), ("NLC:2x7x3", (2, 7, 3), 2), ("4x3x5x6", (4, 3, 5, 6), 1)],
)
def test_parse_shape(spec, dims, axis):
    s = shapes.parse_shape(spec)
    assert (s.dims, s.axis, s.spec) == (dims, axis, spec)


@pytest.mark.parametrize(
    "spec, match",
    [("4096", "at least two"), ("4x0", "at least two"), ("nchw:4x3x5", "must name each"),
     ("nhcw:4x3x5x6", "second or last"), ("a x b", "sizes joined by 'x'")],
)
def test_parse_shape_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        shapes.parse_shape(spec)


def test_schedule_rotates_every_name_once_per_round():
    order = list(timing.schedule(["a", "b", "c"], 3))
    rounds = [order[i:i + 3] for i in range(0, 9, 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_training_forward_keeps_nothing_the_size_of_x():
    shape = "1024x64"
    nbytes = 1024 * 64 * 4
    for backend in ("numpy-fast", "numpy-generic"):
        peak, retained = memory.traced_memory(cases.prepare(backend, shape, "train"))
        assert nbytes <= retained < 1.05 * nbytes, backend  # y and O(C) vectors
        assert peak >= retained
    _, naive_retained = memory.traced_memory(cases.prepare("naive", shape, "train"))
    assert naive_retained >= 3 * nbytes  # out, and x-hat and x - mu in its cache


# -------------------------------------------------------------------------------- the CLI


def _run_json(capsys, *args: str) -> dict:
    assert cli.main(["bench", "--json", "--rounds", "2", *args]) == 0
    out = capsys.readouterr()
    return json.loads(out.out)


def test_cli_json_report(capsys):
    report = _run_json(capsys, "--shapes", "16x5,nhwc:4x5x6x3")
    assert set(report) >= {"anybn", "dtype", "rounds", "environment", "copies", "results", "skipped"}
    assert report["dtype"] == "float32" and report["rounds"] == 2
    assert [c["shape"] for c in report["copies"]] == ["16x5", "nhwc:4x5x6x3"]
    expected = {"numpy-fast", "numpy-generic", "naive"}
    expected |= {name for name, module in (("array_api_strict", "array_api_strict"), ("dask", "dask"),
                                           ("torch", "torch")) if _installed(module)}
    ran = {r["backend"] for r in report["results"]}
    assert ran >= expected
    skipped = {s["backend"] for s in report["skipped"]}
    assert ran | skipped == set(backends.BACKENDS) and not ran & skipped
    assert all(s["reason"] for s in report["skipped"])
    for r in report["results"]:
        assert set(r) >= {"shape", "op", "backend", "path", "median_ms", "gbps", "copy_fraction",
                          "vs_torch", "vs_torch_raw", "vs_torch_flag", "stability", "spread",
                          "max_error", "accurate", "samples_ms", "traffic_bytes"}
        assert r["stability"] in ("stable", "noisy")  # 2 rounds cannot be bimodal
        assert len(r["samples_ms"]) == 2 and r["median_ms"] > 0
        assert r["accurate"] and r["max_error"] <= 1e-4
        nbytes = int(np.prod(r["dims"])) * 4
        assert r["traffic_bytes"] == shapes.TRAFFIC[r["op"]] * nbytes
        assert r["gbps"] == pytest.approx(r["traffic_bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        if r["backend"] == "torch":
            assert r["vs_torch"] == pytest.approx(1.0)
    ops = {(r["shape"], r["op"]) for r in report["results"]}
    assert len(ops) == 2 * 3


def test_cli_options(capsys):
    report = _run_json(capsys, "--shapes", "8x3", "--dtype", "float64", "--backend", "naive,numpy-generic",
                       "--ops", "eval", "--threads", "1")
    assert report["dtype"] == "float64" and report["environment"]["threads"] == 1
    assert sorted((r["backend"], r["op"]) for r in report["results"]) == [("naive", "eval"), ("numpy-generic", "eval")]
    assert report["skipped"] == []


@pytest.mark.parametrize("args", [["--backend", "numpy,torch"], ["--ops", "forward"], ["--shapes", "nchw:4x3"],
                                  ["--rounds", "0"], ["--dtype", "int8"]])
def test_cli_rejects_bad_options(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_table_and_wrong_results(monkeypatch, capsys):
    monkeypatch.setattr(cases, "check", lambda case, outputs=None: 0.5 if case.backend == "numpy-generic" else 0.0)
    assert cli.main(["bench", "--shapes", "8x3", "--backend", "numpy-generic,naive,cupy", "--ops", "train",
                     "--rounds", "1"]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert any(line.split()[:2] == ["8x3", "copy"] for line in lines)
    generic = next(line for line in lines if "numpy-generic" in line)
    assert "! inaccurate" in generic
    assert "! inaccurate" not in next(line for line in lines if " naive " in line)
    if not _installed("cupy"):
        assert any(line.startswith("skipped cupy: cupy is not installed") for line in lines)
    assert "differs from the float64 reference: numpy-generic train 8x3" in out.err


_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


def _bench_subprocess(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    return subprocess.run([sys.executable, "-m", "anybn", "bench", "--json", "--shapes", "8x3",
                           "--rounds", "1", "--backend", "numpy-generic,naive", "--ops", "eval", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_stdout_is_only_json_and_malloc_hint_on_stderr():
    done = _bench_subprocess({})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # nothing but the JSON on stdout
    assert report["environment"]["malloc_thresholds"] is False
    assert "MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000" in done.stderr
    quiet = _bench_subprocess(_MALLOC)
    assert quiet.returncode == 0, quiet.stderr
    assert "MALLOC_MMAP_THRESHOLD_" not in quiet.stderr
    assert json.loads(quiet.stdout)["environment"]["malloc_thresholds"] is True


def test_no_progress_silences_stderr():
    # tqdm draws on stderr even when it is not a terminal: the bars show there without the flag
    shown = _bench_subprocess(_MALLOC)
    assert shown.returncode == 0, shown.stderr
    assert "preparing" in shown.stderr and "timing" in shown.stderr
    quiet = _bench_subprocess(_MALLOC, "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert [r["backend"] for r in json.loads(quiet.stdout)["results"]] == ["numpy-generic", "naive"]


def test_importing_the_bench_package_imports_no_backend():
    code = ("import sys, anybn.bench.cases, anybn.bench.cli, anybn.bench.plot, anybn.bench.timing, "
            "anybn.bench.memory; "
            "print(sorted(m for m in ('torch', 'dask', 'cupy', 'array_api_strict', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------- stability of samples


def test_stable_samples():
    got = timing.stability([1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 1.0])
    # sorted 0.98 0.99 1.0 1.0 1.01 1.02 1.03: quartiles at positions 1.5 and 4.5
    assert got.verdict == "stable" and got.slow == 0 and got.gap == 1.0
    assert got.spread == pytest.approx((1.015 - 0.995) / 1.0)


def test_noisy_samples():
    # no two neighbours 2x apart, but the middle half spreads (2.65 - 1.35) / 1.9 = 68% of the median
    got = timing.stability([2.4, 1.0, 3.5, 1.5, 1.2, 2.9, 1.9])
    assert got.verdict == "noisy"
    assert got.spread == pytest.approx(1.3 / 1.9)
    assert got.spread > timing.NOISY_SPREAD
    assert "noisy" in got.describe(7)


def test_bimodal_samples():
    # what PyTorch's 2-thread timings did here: ~0.02 ms, or a stall of ~8 ms or a multiple
    got = timing.stability([0.02, 8.0, 0.021, 16.1, 0.019, 8.05, 0.02])
    assert got.verdict == "bimodal"
    assert got.slow == 3 and got.gap == pytest.approx(8.0 / 0.021)
    assert got.describe(7) == "bimodal, 3 of 7 rounds 381x or more slower than the rest"
    # the slow group in the majority: the median is the stall itself
    assert timing.stability([8.0, 0.02, 8.1, 16.0, 0.021, 8.0, 7.9]).slow == 5
    # exactly 2x between groups of two or more is bimodal; just under is not
    assert timing.stability([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]).verdict == "bimodal"
    assert timing.stability([1.0, 1.0, 1.0, 1.0, 1.0, 1.9, 1.9]).verdict == "stable"


def test_single_outliers_are_not_modes():
    assert timing.stability([1.0, 1.0, 1.01, 0.99, 1.0, 1.0, 50.0]).verdict == "stable"
    assert timing.stability([0.01, 1.0, 1.01, 0.99, 1.0, 1.0, 1.02]).verdict == "stable"
    # three samples cannot hold two groups of two: a wide spread is noisy, not bimodal
    few = timing.stability([1.0, 100.0, 1.0])
    assert few.verdict == "noisy" and few.spread == pytest.approx((50.5 - 1.0) / 1.0)
    assert timing.stability([5.0]).verdict == "stable"


def test_stability_rejects_bad_samples():
    with pytest.raises(ValueError, match="no samples"):
        timing.stability([])
    with pytest.raises(ValueError, match="positive"):
        timing.stability([1.0, 0.0, 1.0])


def test_calibrate_ignores_a_stalled_probe():
    probes = iter([8e-3, 1e-5, 1e-5])  # the first probe stalled for 8 ms

    def timer(number: int):
        return lambda: next(probes)

    assert timing.calibrate(timer, min_sample=1e-3) == 100  # from the 10 us probe, not the stall
    slow = iter([0.06])
    assert timing.calibrate(lambda n: (lambda: next(slow)), min_sample=1e-3) == 1  # one probe: budget spent


def _planted_timer(samples: dict[str, list[float]]):
    """A Case.timer whose samples are ``samples[backend]``, cycled: each backend's rounds are
    one whole cycle of 7, whichever sample the calibration probes stopped at."""
    streams = {name: itertools.cycle(values) for name, values in samples.items()}

    def timer(self, number: int = 1):
        return lambda: next(streams[self.backend])

    return timer


def _planted_report(monkeypatch, samples: dict[str, list[float]]) -> dict:
    monkeypatch.setattr(cases.Case, "timer", _planted_timer(samples))
    return bench_cli.measure(["8x3"], ["eval"], list(samples), rounds=7, show_progress=False)


def test_bimodal_peer_gets_no_ratio(monkeypatch):
    pytest.importorskip("torch")
    report = _planted_report(monkeypatch, {
        "torch": [1e-5, 8e-3, 1e-5, 8e-3, 1e-5, 8e-3, 1.6e-2],  # 4 of 7 stalled: median 8 ms
        "naive": [2e-5] * 7,
    })
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["torch"]["stability"] == "bimodal" and rows["naive"]["stability"] == "stable"
    naive = rows["naive"]
    assert naive["vs_torch"] is None and naive["vs_torch_flag"] == "bimodal"
    assert naive["vs_torch_raw"] == pytest.approx(2e-5 / 8e-3)  # what used to be printed
    lines = bench_cli.table(report).splitlines()
    torch_line = next(line for line in lines if " torch " in line and "aten" in line)
    naive_line = next(line for line in lines if " naive " in line)
    assert "! bimodal" in torch_line and "bimodal" not in naive_line
    assert naive_line.split()[-1] == "\u2014" and "0.0025" not in naive_line
    assert any("torch eval 8x3: bimodal, 4 of 7 rounds" in line for line in lines)
    assert json.loads(json.dumps(report))["results"]  # still plain data


def test_noisy_row_gets_a_marked_ratio(monkeypatch):
    pytest.importorskip("torch")
    report = _planted_report(monkeypatch, {
        "torch": [1e-5] * 7,
        "naive": [2e-5] * 7,
        "numpy-generic": [2.4e-5, 1.0e-5, 3.5e-5, 1.5e-5, 1.2e-5, 2.9e-5, 1.9e-5],
    })
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["naive"]["vs_torch"] == pytest.approx(2.0) and rows["naive"]["vs_torch_flag"] is None
    noisy = rows["numpy-generic"]
    assert noisy["stability"] == "noisy" and noisy["vs_torch_flag"] == "noisy"
    assert noisy["vs_torch"] == pytest.approx(1.9)
    lines = bench_cli.table(report).splitlines()
    assert next(line for line in lines if " naive " in line).split()[-1] == "2"
    generic = next(line for line in lines if " numpy-generic " in line)
    assert generic.split()[-3:] == ["1.9?", "~", "noisy"]


# ------------------------------------------------------------------------------- the plot


def _report() -> dict:
    rows = []
    for shape in ("8x3", "nchw:2x3x4x4"):
        for op in ("train", "eval"):
            for backend, ms in (("torch", 2.0), ("numpy-fast", 1.0), ("naive", 4.0)):
                rows.append({"shape": shape, "op": op, "backend": backend, "median_ms": ms})
    return {"anybn": "0", "dtype": "float32", "rounds": 1, "environment": {"threads": 2}, "results": rows}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from anybn.bench import plot

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_report()))
    out = tmp_path / "bench.png"
    assert plot.main([str(path), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = _report()
    report["results"] = [r for r in report["results"] if r["backend"] != "torch"]
    with pytest.raises(ValueError, match="no 'torch' results"):
        plot.plot(report, tmp_path / "none.png")


def test_plot_leaves_out_bimodal_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from anybn.bench import plot

    report = _report()
    for r in report["results"]:
        if (r["shape"], r["op"]) == ("8x3", "train") and r["backend"] == "torch":
            r["stability"] = "bimodal"  # the baseline: every ratio of its group goes
        if (r["shape"], r["op"], r["backend"]) == ("8x3", "eval", "naive"):
            r["stability"] = "bimodal"
    ratio, left_out = plot.relative_times(report)
    assert left_out == 3
    assert ratio == {("eval", "8x3", "numpy-fast"): 0.5, ("train", "nchw:2x3x4x4", "numpy-fast"): 0.5,
                     ("train", "nchw:2x3x4x4", "naive"): 2.0, ("eval", "nchw:2x3x4x4", "numpy-fast"): 0.5,
                     ("eval", "nchw:2x3x4x4", "naive"): 2.0}
    plot.plot(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_shapes_span_64_kib_to_512_mib_in_float32_nchw():
    sizes = [int(np.prod(shapes.parse_shape(s).dims)) * 4 for s in shapes.SWEEP_SHAPES]
    assert sizes[0] == 64 << 10 and sizes[-1] == 512 << 20
    assert sizes == sorted(sizes) and all(b // a in (2, 4) for a, b in zip(sizes, sizes[1:]))
    assert all(shapes.parse_shape(s).axis == 1 for s in shapes.SWEEP_SHAPES)


def test_sweep_flag_measures_the_sweep_shapes_on_anybn_and_torch(monkeypatch, capsys):
    seen = {}

    def fake_measure(shape_specs, ops, backend_names, **kwargs):
        seen.update(shapes=list(shape_specs), backends=list(backend_names))
        return {"results": [], "copies": [], "skipped": []}

    monkeypatch.setattr(bench_cli, "measure", fake_measure)
    monkeypatch.setattr(bench_cli, "table", lambda report: "table")
    assert cli.main(["bench", "--sweep", "--no-progress"]) == 0
    assert seen == {"shapes": list(shapes.SWEEP_SHAPES), "backends": ["numpy-fast", "torch"]}


def test_sweep_plot_draws_times_and_bandwidth(tmp_path):
    pytest.importorskip("matplotlib")
    from anybn.bench import plot

    results, copies = [], []
    for spec in shapes.SWEEP_SHAPES[:3]:
        dims = shapes.parse_shape(spec).dims
        nbytes = int(np.prod(dims)) * 4
        copies.append({"nbytes": nbytes, "median_ms": nbytes / 1e7, "gbps": 20.0})
        for backend in ("numpy-fast", "torch"):
            for op, k in shapes.TRAFFIC.items():
                results.append({"op": op, "backend": backend, "dims": list(dims), "traffic_bytes": k * nbytes,
                                "median_ms": k * nbytes / 1e7, "gbps": 10.0})
    out = tmp_path / "sweep.png"
    plot.plot_sweep({"results": results, "copies": copies, "dtype": "float32"}, out)
    assert out.stat().st_size > 10_000
    (tmp_path / "r.json").write_text(json.dumps({"results": results, "copies": copies}))
    assert plot.main(["--sweep", str(tmp_path / "r.json"), str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_threads_table_and_arguments(monkeypatch, capsys):
    from anybn.bench import threads

    anybn = {"threads": [1, 2], "ms": {"1": {"s train": 2.0}, "2": {"s train": 1.0}}, "ratio": {"s train": 0.45}}
    torch = {"threads": [1, 2], "ms": {"1": {"s train": 4.0, "s copy": 1.0}, "2": {"s train": 2.5, "s copy": 0.7}},
             "ratio": {"s train": 0.6, "s copy": 0.75}}
    lines = threads.table(anybn, torch).splitlines()
    assert lines[0].split()[1:3] == ["anybn", "1t"]
    # the ratio column is the per-round median given, not the ratio of the medians
    assert lines[1].split()[2:] == ["2.000", "1.000", "0.45", "4.000", "2.500", "0.60", "0.40"]
    assert lines[2].split()[2:] == ["-", "-", "-", "1.000", "0.700", "0.75", "-"]
    with pytest.raises(ValueError, match="library must be 'anybn' or 'torch', got 'jax'"):
        threads.measure("jax")
    with pytest.raises(ValueError, match=r"threads must be at least two positive counts, got \[2\]"):
        threads.measure("anybn", (2,))
    assert threads.main(["nonsense"]) == 2


def test_threads_measure_alternates_thread_counts(monkeypatch):
    """One tiny shape: every op of both libraries gets a positive median on each thread
    count, the counts alternate within the rounds, and the ratio is the per-round median."""
    from anybn.bench import threads

    pytest.importorskip("torch")
    monkeypatch.setattr(threads, "SHAPES", (("8x3", (8, 3), 1), ("nhwc:2x2x2x3", (2, 2, 2, 3), -1)))
    monkeypatch.setattr(threads, "ROUNDS", 3)
    monkeypatch.setattr(threads, "CALLS", 1)
    monkeypatch.setenv("ANYBN_NUM_THREADS", "1")
    real = threads._set_threads
    for library in ("anybn", "torch"):
        order: list[int] = []

        def recording(lib, real=real, order=order):
            set_n = real(lib)
            return lambda n: (order.append(n), set_n(n))

        monkeypatch.setattr(threads, "_set_threads", recording)
        got = threads.measure(library)
        ops = ("train", "backward", "eval") + (("copy",) if library == "torch" else ())
        cases = {f"{s} {op}" for s in ("8x3", "nhwc:2x2x2x3") for op in ops}
        assert got["threads"] == [1, 2]
        assert set(got["ratio"]) == cases and set(got["ms"]) == {"1", "2"}
        for n in ("1", "2"):
            assert set(got["ms"][n]) == cases and all(v > 0 for v in got["ms"][n].values())
        assert all(v > 0 for v in got["ratio"].values())
        assert order == [1, 2, 2, 1, 1, 2] * 2  # per shape: rounds forwards, backwards, forwards


def test_separate_runs_each_backend_in_its_own_process():
    """--separate: one process per backend, the rows merged and the ratios to PyTorch redone."""
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-m", "anybn", "bench", "--separate", "--repeats", "2", "--backend",
                           "numpy-generic,torch", "--shapes", "8x3", "--ops", "train", "--rounds", "2", "--json",
                           "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["separate"] is True and report["repeats"] == 2
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"numpy-generic", "torch"}
    for row in rows.values():  # two processes each, 2 rounds each, pooled
        assert row["processes"] == 2 and len(row["samples_ms"]) == 4
        assert row["median_ms"] == pytest.approx(float(np.median(row["samples_ms"])))
    assert rows["torch"]["vs_torch_raw"] == 1.0
    assert rows["numpy-generic"]["vs_torch_raw"] == pytest.approx(
        rows["numpy-generic"]["median_ms"] / rows["torch"]["median_ms"])
    assert rows["numpy-generic"]["accurate"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relu_ops_keep_x_away_from_the_kink(dtype):
    """The fused ReLU ops' data puts no float64 BN output within 64 ulp of 0, and differs
    from make_data's only there (a flipped ReLU gradient is not an accuracy difference)."""
    shape = shapes.parse_shape("nhwc:8x30x30x16")
    d, d0 = shapes.op_data(shape, "backward_relu", dtype), shapes.make_data(shape, dtype)
    from anybn import testing

    z = testing.reference_train(d.x, d.gamma, d.beta, axis=shape.axis, eps=shapes.EPS)
    z_std = np.moveaxis(z, shape.axis, -1) / d.gamma.astype(np.float64)  # in units of the standardized x
    assert np.min(np.abs(z_std)) >= 60 * np.finfo(dtype).eps
    moved = d.x != d0.x
    assert moved.sum() < 1e-3 * d.x.size
    if dtype == "float32":  # 64 ulp of float64 is too narrow to hold any of 115,200 samples
        assert moved.sum() > 0
    assert shapes.op_data(shape, "backward", dtype) is d0


def test_pooled_rows_take_the_statistics_of_all_their_samples():
    rows = [
        {"shape": "s", "op": "train", "backend": "a", "median_ms": 1.0, "min_ms": 1.0, "samples_ms": [1.0, 1.0, 1.1],
         "max_error": 1e-7, "accurate": True},
        {"shape": "s", "op": "train", "backend": "a", "median_ms": 3.0, "min_ms": 3.0, "samples_ms": [3.0, 3.0, 3.1],
         "max_error": 2e-7, "accurate": True},
        {"shape": "s", "op": "train", "backend": "b", "median_ms": 2.0, "min_ms": 2.0, "samples_ms": [2.0, 2.0],
         "max_error": 0.0, "accurate": True},
    ]
    pooled = {r["backend"]: r for r in bench_cli._pooled(rows, ("shape", "op", "backend"))}
    a = pooled["a"]
    assert a["processes"] == 2 and a["process_medians_ms"] == [1.0, 3.0]
    assert a["median_ms"] == pytest.approx(2.05) and a["min_ms"] == 1.0 and a["max_error"] == 2e-7
    assert a["stability"] == "bimodal"  # two processes 3x apart: the drift shows
    assert pooled["b"]["processes"] == 1 and pooled["b"]["median_ms"] == 2.0


def test_repeats_needs_separate(capsys):
    assert cli.main(["bench", "--repeats", "2", "--shapes", "8x3", "--backend", "numpy-generic"]) == 2
    assert "--repeats needs --separate" in capsys.readouterr().err


def test_spin_replaces_the_passive_wait_policy_in_one_process(capsys):
    """--spin N: the one-process mode lets the OpenMP workers spin N rounds (GOMP_SPINCOUNT)
    instead of sleeping (OMP_WAIT_POLICY=PASSIVE); not with --separate, which leaves both alone."""
    assert bench_cli._wait_settings(None) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert bench_cli._wait_settings(10000) == {"GOMP_SPINCOUNT": "10000"}
    assert cli.main(["bench", "--separate", "--spin", "10000", "--shapes", "8x3", "--backend", "numpy-generic"]) == 2
    assert "--spin is for the one-process mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--spin", "0"])
    assert "error" in capsys.readouterr().err
    # in a fresh process (libgomp reads the variables when it loads): recorded in the report
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-m", "anybn", "bench", "--spin", "10000", "--json", "--no-progress",
                           "--rounds", "2", "--shapes", "8x3", "--ops", "eval", "--backend", "numpy-fast"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["environment"]["gomp_spincount"] == "10000"
    assert report["environment"]["omp_wait_policy"] is None
    assert "GOMP_SPINCOUNT=10000, " in bench_cli.table(report).splitlines()[0]
