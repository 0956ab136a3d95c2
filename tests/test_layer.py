"""The stateful layer: running statistics, modes, state dicts, Keras weights, errors."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from reference import make_data, reference_backward, reference_batch_norm, reference_moments

import anybn


def _layer(backend, c, **kwargs):
    return anybn.BatchNorm(c, xp=backend.module, device=backend.device, dtype="float64", **kwargs)


def test_defaults_are_numpy_float32():
    layer = anybn.BatchNorm(3)
    for a in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (3,)
    np.testing.assert_array_equal(layer.weight, np.ones(3))
    np.testing.assert_array_equal(layer.bias, np.zeros(3))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert layer.training and layer.num_batches_tracked == 0


def test_parameters_live_on_the_requested_backend(backend):
    layer = _layer(backend, 4)
    for a in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
        assert array_api_compat.array_namespace(a) is backend.xp
        assert a.dtype == backend.dtype("float64")
        assert array_api_compat.device(a) == array_api_compat.device(backend.asarray(np.zeros(1)))


@pytest.mark.parametrize("momentum", [0.1, 0.3, None, 0.0, 1.0])
def test_running_statistics_follow_pytorch_update_rule(backend, momentum):
    shape, axis, steps = (6, 3, 4), 1, 3
    layer = _layer(backend, 3, momentum=momentum)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(1, steps + 1):
        x0 = make_data(shape, mean=step, std=1.0 + step, seed=step)
        layer(backend.asarray(x0))
        mean, var = reference_moments(x0, axis)
        m = x0.size // 3
        f = 1.0 / step if momentum is None else momentum
        rm = (1 - f) * rm + f * mean
        rv = (1 - f) * rv + f * var * m / (m - 1)  # unbiased in the running variance
    np.testing.assert_allclose(backend.to_numpy(layer.running_mean), rm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), rv, rtol=1e-12)
    assert layer.num_batches_tracked == steps


def test_eval_uses_running_statistics_and_does_not_update(backend):
    layer = _layer(backend, 3)
    layer(backend.asarray(make_data((8, 3), mean=1.0, seed=1)))
    rm, rv = backend.to_numpy(layer.running_mean), backend.to_numpy(layer.running_var)
    x0 = make_data((5, 3), mean=-2.0, seed=2)
    y = layer.eval()(backend.asarray(x0))
    np.testing.assert_allclose(backend.to_numpy(y), reference_batch_norm(x0, 1, mean=rm, var=rv), rtol=1e-12)
    np.testing.assert_array_equal(backend.to_numpy(layer.running_mean), rm)
    assert layer.num_batches_tracked == 1
    assert layer.train() is layer and layer.training


def test_without_running_stats_eval_uses_the_batch(backend):
    layer = _layer(backend, 3, track_running_stats=False).eval()
    assert layer.running_mean is None and layer.running_var is None
    x0 = make_data((7, 3, 2), mean=3.0, seed=3)
    y = layer(backend.asarray(x0))
    np.testing.assert_allclose(backend.to_numpy(y), reference_batch_norm(x0, 1), rtol=1e-12)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_backward_sets_parameter_gradients(backend):
    layer = _layer(backend, 3, axis=-1)
    x0, dy0 = make_data((4, 5, 3), mean=1.0, seed=4), make_data((4, 5, 3), seed=5)
    layer(backend.asarray(x0))
    dx = layer.backward(backend.asarray(dy0))
    rdx, rdw, rdb = reference_backward(x0, dy0, -1, np.ones(3))
    np.testing.assert_allclose(backend.to_numpy(dx), rdx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(layer.grad_weight), rdw, rtol=1e-10)
    np.testing.assert_allclose(backend.to_numpy(layer.grad_bias), rdb, rtol=1e-10)


def test_eval_backward_treats_statistics_as_constants(backend):
    layer = _layer(backend, 2)
    layer.load_state_dict(
        {
            "weight": np.array([2.0, -1.0]),
            "bias": np.array([0.5, 0.0]),
            "running_mean": np.array([1.0, -1.0]),
            "running_var": np.array([4.0, 0.25]),
            "num_batches_tracked": 3,
        }
    )
    x0, dy0 = make_data((6, 2), seed=6), make_data((6, 2), seed=7)
    layer.eval()(backend.asarray(x0))
    dx = layer.backward(backend.asarray(dy0))
    invstd = 1 / np.sqrt(np.array([4.0, 0.25]) + 1e-5)
    np.testing.assert_allclose(backend.to_numpy(dx), dy0 * np.array([2.0, -1.0]) * invstd, rtol=1e-12)
    xhat = (x0 - np.array([1.0, -1.0])) * invstd
    np.testing.assert_allclose(backend.to_numpy(layer.grad_weight), (dy0 * xhat).sum(0), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(layer.grad_bias), dy0.sum(0), rtol=1e-12)


def test_state_dict_round_trip_and_no_aliasing(backend):
    layer = _layer(backend, 3)
    layer(backend.asarray(make_data((8, 3), mean=2.0, seed=8)))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert int(state["num_batches_tracked"]) == 1
    snapshot = {k: backend.to_numpy(v) for k, v in state.items()}
    layer(backend.asarray(make_data((8, 3), mean=5.0, seed=9)))  # must not write into `state`
    for k, v in state.items():
        np.testing.assert_array_equal(backend.to_numpy(v), snapshot[k])
    other = _layer(backend, 3)
    other.load_state_dict(state)
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(backend.to_numpy(getattr(other, k)), snapshot[k])
    assert other.num_batches_tracked == 1


def test_load_state_dict_copies_numpy_input():
    state = {"weight": np.full(2, 3.0), "bias": np.zeros(2), "running_mean": np.zeros(2),
             "running_var": np.ones(2), "num_batches_tracked": np.array(7)}
    layer = anybn.BatchNorm(2)
    layer.load_state_dict(state)
    state["weight"][0] = -1.0
    assert layer.weight[0] == 3.0 and layer.weight.dtype == np.float32
    assert layer.num_batches_tracked == 7


@pytest.mark.parametrize(
    "state, message",
    [
        ({"weight": np.ones(3)}, r"missing \['bias', 'num_batches_tracked', 'running_mean', 'running_var'\]"),
        ({"weight": np.ones(3), "bias": np.ones(3), "running_mean": np.ones(3), "running_var": np.ones(3),
          "num_batches_tracked": 0, "gamma": np.ones(3)}, r"unexpected \['gamma'\]"),
        ({"weight": np.ones(4), "bias": np.ones(3), "running_mean": np.ones(3), "running_var": np.ones(3),
          "num_batches_tracked": 0}, r"weight has shape \(4,\), expected \(3,\)"),
        ({"weight": np.ones(3), "bias": np.ones(3), "running_mean": np.ones(3), "running_var": np.ones(3),
          "num_batches_tracked": -2}, r"num_batches_tracked must be >= 0"),
    ],
)
def test_bad_state_dict_is_rejected_and_changes_nothing(state, message):
    layer = anybn.BatchNorm(3)
    before = {k: np.array(v) for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        layer.load_state_dict(state)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_from_keras_converts_momentum_and_names():
    rng = np.random.default_rng(10)
    gamma, beta = rng.uniform(0.5, 2.0, 4), rng.normal(size=4)
    mm, mv = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    layer = anybn.BatchNorm.from_keras(
        {"gamma": gamma, "beta": beta, "moving_mean": mm, "moving_variance": mv}, momentum=0.9, dtype="float64"
    )
    assert layer.momentum == pytest.approx(0.1) and layer.eps == 1e-3 and layer.axis == -1
    x0 = rng.normal(size=(2, 3, 4))
    # Keras's inference formula, written out
    expected = gamma * (x0 - mm) / np.sqrt(mv + 1e-3) + beta
    np.testing.assert_allclose(layer.eval()(x0), expected, rtol=1e-12)
    as_list = anybn.BatchNorm.from_keras([gamma, beta, mm, mv], dtype="float64")
    assert as_list.momentum == pytest.approx(0.01)
    np.testing.assert_array_equal(as_list.running_var, mv)


def test_keras_weights_without_gamma_and_beta():
    layer = anybn.BatchNorm.from_keras({"moving_mean": np.ones(2), "moving_variance": np.full(2, 4.0)})
    np.testing.assert_array_equal(layer.weight, np.ones(2))
    np.testing.assert_array_equal(layer.bias, np.zeros(2))
    with pytest.raises(ValueError, match="expected keys .*got \\['moving_mean'\\]"):
        layer.load_keras_weights({"moving_mean": np.ones(2)})
    with pytest.raises(ValueError, match="a weight list needs 4 arrays"):
        anybn.BatchNorm.from_keras([np.ones(2), np.ones(2)])
    with pytest.raises(ValueError, match=r"moving_mean must have shape \(C,\), got \(2, 2\)"):
        anybn.BatchNorm.from_keras({"moving_mean": np.ones((2, 2)), "moving_variance": np.ones(2)})


def test_estimate_population_fills_running_statistics(backend):
    batches0 = [make_data((5, 3, 2), mean=i, std=1 + i, seed=20 + i) for i in range(4)]
    layer = _layer(backend, 3)
    weight_before = backend.to_numpy(layer.weight)
    assert layer.estimate_population(backend.asarray(b) for b in batches0) is layer
    m = 10  # values per feature in each batch
    means = np.stack([reference_moments(b, 1)[0] for b in batches0])
    variances = np.stack([reference_moments(b, 1)[1] for b in batches0])
    np.testing.assert_allclose(backend.to_numpy(layer.running_mean), means.mean(0), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), m / (m - 1) * variances.mean(0), rtol=1e-12)
    layer.estimate_population([backend.asarray(b) for b in batches0], method="pooled")
    everything = np.concatenate(batches0, axis=0)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), everything.var(axis=(0, 2), ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(backend.to_numpy(layer.weight), weight_before)
    assert layer.num_batches_tracked == 0


def test_layer_handles_float16_input_with_float32_parameters(backend):
    if not backend.float16:
        pytest.skip(f"{backend.name} has no float16")
    layer = anybn.BatchNorm(3, xp=backend.module, device=backend.device)
    x0 = make_data((16, 3, 4), mean=1.0, seed=30).astype(np.float16)
    y = layer(backend.asarray(x0, "float16"))
    assert y.dtype == backend.dtype("float16")
    assert layer.running_mean.dtype == backend.dtype("float32")
    np.testing.assert_allclose(backend.to_numpy(y), reference_batch_norm(x0, 1), rtol=2e-3, atol=2e-3)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_momentum_outside_unit_interval_is_rejected(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None"):
        anybn.BatchNorm(3, momentum=momentum)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"eps": 0.0}, ValueError, "eps must be > 0, got 0.0"),
    ({"eps": "1e-5"}, TypeError, "eps must be a float"),
    ({"axis": "1"}, TypeError, "axis must be an int"),
    ({"dtype": "int32"}, TypeError, "dtype must be a real floating dtype"),
    ({"xp": object()}, TypeError, "xp must be an array library module"),
])
def test_bad_constructor_arguments_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        anybn.BatchNorm(3, **kwargs)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        anybn.BatchNorm(0)


def test_feature_count_must_match_num_features():
    layer = anybn.BatchNorm(4)
    with pytest.raises(ValueError, match=r"x has 3 features along axis 1 \(x.shape = \(8, 3\)\), expected num_features = 4"):
        layer(np.ones((8, 3), dtype=np.float32))
    assert layer.num_batches_tracked == 0


def test_input_from_another_library_is_rejected():
    torch = pytest.importorskip("torch")
    layer = anybn.BatchNorm(3)
    with pytest.raises(TypeError, match="x is a torch array but the parameters are .*numpy"):
        layer(torch.ones(4, 3))


def test_backward_before_forward_is_rejected():
    with pytest.raises(ValueError, match="no forward pass to differentiate"):
        anybn.BatchNorm(3).backward(np.ones((4, 3), dtype=np.float32))


def test_training_failure_leaves_state_unchanged():
    layer = anybn.BatchNorm(3)
    with pytest.raises(ValueError, match="expected more than 1 value per feature"):
        layer(np.ones((1, 3), dtype=np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_var, np.ones(3))


def test_estimate_population_errors():
    with pytest.raises(ValueError, match="batches is empty"):
        anybn.BatchNorm(3).estimate_population([])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        anybn.BatchNorm(3, track_running_stats=False).estimate_population([np.ones((4, 3))])
    with pytest.raises(ValueError, match="method must be 'paper' or 'pooled'"):
        anybn.BatchNorm(3).estimate_population([np.ones((4, 3))], method="mean")


def test_inputs_are_not_modified_by_the_layer():
    x0 = make_data((6, 3), seed=40).astype(np.float32)
    x = x0.copy()
    layer = anybn.BatchNorm(3)
    layer(x)
    layer.backward(x)
    layer.eval()(x)
    np.testing.assert_array_equal(x, x0)


def test_state_dict_with_live_torch_parameters_loads():
    """torch's state_dict(keep_vars=True) holds Parameters that require grad."""
    torch = pytest.importorskip("torch")
    torch_bn = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        torch_bn.weight.copy_(torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64))
    layer = anybn.BatchNorm(3, dtype="float64")
    layer.load_state_dict(torch_bn.state_dict(keep_vars=True))
    assert isinstance(layer.weight, np.ndarray)
    np.testing.assert_array_equal(layer.weight, [1.5, -2.0, 0.5])


def test_unconvertible_state_value_names_the_key():
    layer = anybn.BatchNorm(2)
    state = {"weight": object(), "bias": np.zeros(2), "running_mean": np.zeros(2),
             "running_var": np.ones(2), "num_batches_tracked": 0}
    with pytest.raises(TypeError, match="weight must be a real numeric array, got dtype object"):
        layer.load_state_dict(state)


def test_non_array_input_is_rejected():
    with pytest.raises(TypeError, match=r"BatchNorm: x must be an array of an array-API library \(numpy, .*\), got list"):
        anybn.BatchNorm(2)([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="PopulationStats.update: x must be an array of an array-API library"):
        anybn.PopulationStats(2).update([[1.0, 2.0]])
