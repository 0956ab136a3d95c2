"""The renorm experiment of the demo: what holds across its three seeds, on the bundled digits.

At 1,000 steps (a third of the default run; ~15 s on 2 idle cores) every seed gave, with
running-statistics inference: BN on i.i.d. batches 0.967-0.978, BN on 2-class batches
0.669-0.758, batch renorm on the same 2-class batches 0.891-0.925 (docs/renorm.md has the
full runs). The test asserts the orderings seed by seed, with margins well inside those gaps.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed: pip install '.[demo]'")

from anybn import cli  # noqa: E402
from anybn.demo.data import load_digits  # noqa: E402
from anybn.demo.renorm import SETTINGS, RenormConfig, run_renorm_experiment  # noqa: E402


@pytest.fixture(scope="module")
def results():
    return run_renorm_experiment(load_digits(), RenormConfig(steps=1000))


def test_renorm_beats_bn_on_non_iid_batches_for_every_seed(results):
    acc = results["accuracy"]
    for seed, (bn, renorm) in enumerate(zip(acc["bn_noniid"], acc["renorm_noniid"])):
        assert renorm > bn + 0.03, (seed, bn, renorm)


def test_non_iid_batches_hurt_bn_for_every_seed(results):
    acc = results["accuracy"]
    for seed, (iid, noniid) in enumerate(zip(acc["bn_iid"], acc["bn_noniid"])):
        assert iid > noniid + 0.1, (seed, iid, noniid)
        assert iid > 0.9


def test_results_schema(results):
    assert set(results["accuracy"]) == set(SETTINGS)
    assert all(len(v) == 3 for v in results["accuracy"].values())
    assert results["config"]["seeds"] == [0, 1, 2]
    json.dumps(results)  # serializable


def test_cli_writes_results_and_figure(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["demo", "--experiment", "renorm", "--steps", "20", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "renorm" and results["config"]["steps"] == 20
    assert (out / "renorm.png").stat().st_size > 1000


def test_schedule_scaled_to_the_run():
    config = RenormConfig(steps=1000)
    assert config.limits(0) == (1.0, 0.0)
    assert config.limits(50) == (1.0, 0.0)
    assert config.limits(300) == (3.0, 5.0)
    with pytest.raises(ValueError, match="classes_per_batch=7 must divide batch_size=60"):
        RenormConfig(classes_per_batch=7)
