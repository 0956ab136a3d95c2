"""The short checks of plain NumPy calls agree with the full checks.

``plain_numpy_layout`` (and the NumPy branch of ``_checked_grad``) exist for speed: a large
call's Python runs right after passes that flushed the CPU's caches. They must accept a
subset of what the full checks accept, return what those return, and leave every error to
them (the error tests of ``test_functional.py`` run through them).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from anybn import functional
from anybn._checks import check_eps, check_feature_vector
from anybn._layout import layout_of, plain_numpy_layout
from anybn._namespace import namespace_of

REQUIRED = ("mean", "var")


def _full(x, axis, eps, vectors, required=REQUIRED):
    """What ``_validated`` returns (or raises) through the full checks alone."""
    for name in required:
        if vectors[name] is None:
            raise TypeError(f"f: {name} is required: expected an array of shape (C,), got None")
    xp = namespace_of("f", x=x, **vectors)
    layout = layout_of("f", xp, x, axis)
    for name, v in vectors.items():
        check_feature_vector("f", name, xp, v, layout.features, axis=layout.axis, shape=layout.shape,
                             dtype=x.dtype, required=name in required)
    return xp, layout, check_eps("f", eps)


def _vectors(c, dtype, weight=True):
    return {"mean": np.zeros(c, dtype), "var": np.ones(c, dtype),
            "weight": np.full(c, 2.0, dtype) if weight else None, "bias": None}


@pytest.mark.parametrize("shape, axis", [((8, 3), 1), ((8, 3), -1), ((8, 3), 0), ((2, 3, 4, 5), 1),
                                         ((2, 3, 4, 5), -1), ((2, 3, 4, 5), 2), ((5, 1), 1), ((0, 4), 1)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("weight", [True, False])
def test_short_checks_return_what_the_full_checks_return(shape, axis, dtype, weight):
    x = np.zeros(shape, dtype)
    vectors = _vectors(shape[axis], dtype, weight)
    layout = plain_numpy_layout(x, axis, vectors, REQUIRED)
    full = _full(x, axis, 1e-3, vectors)
    assert layout is not None and layout == full[1]
    assert (layout.outer, layout.features, layout.inner) == (
        math.prod(shape[:axis % len(shape)]), shape[axis], math.prod(shape[axis % len(shape) + 1:]))
    got = functional._validated("f", x, axis, 1e-3, REQUIRED, **vectors)
    assert got[0] is full[0] and got[1] == full[1] and got[2] == full[2]


def _refused():
    x = np.zeros((4, 3), np.float32)
    v = _vectors(3, np.float32)
    yield "masked x", np.ma.zeros((4, 3), np.float32), 1, v
    yield "integer x", np.zeros((4, 3), np.int64), 1, v
    yield "complex x", np.zeros((4, 3), np.complex64), 1, v
    yield "1-D x", np.zeros(3, np.float32), 0, v
    yield "NumPy integer axis", x, np.int64(1), v
    yield "bool axis", x, True, v
    yield "float axis", x, 1.0, v
    yield "axis out of range", x, 2, v
    yield "axis below range", x, -3, v
    yield "float64 vector, float32 x", x, 1, {**v, "weight": np.ones(3)}
    yield "vector of the wrong length", x, 1, {**v, "weight": np.ones(4, np.float32)}
    yield "2-D vector", x, 1, {**v, "weight": np.ones((3, 1), np.float32)}
    yield "list vector", x, 1, {**v, "weight": [1.0, 1.0, 1.0]}
    yield "masked vector", x, 1, {**v, "weight": np.ma.ones(3, np.float32)}
    yield "missing required vector", x, 1, {**v, "mean": None}


@pytest.mark.parametrize("what, x, axis, vectors", list(_refused()), ids=[c[0] for c in _refused()])
def test_short_checks_leave_everything_else_to_the_full_checks(what, x, axis, vectors):
    assert plain_numpy_layout(x, axis, vectors, REQUIRED) is None
    try:
        expected = _full(x, axis, 1e-3, vectors)
    except (TypeError, ValueError) as exc:  # the full checks' error, word for word
        with pytest.raises(type(exc), match=f"^{re.escape(str(exc))}$"):
            functional._validated("f", x, axis, 1e-3, REQUIRED, **vectors)
    else:  # valid, but not the common case: the full checks accept it
        got = functional._validated("f", x, axis, 1e-3, REQUIRED, **vectors)
        assert got[1] == expected[1]


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_bad_eps_skips_the_short_checks(eps):
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="f: eps must be"):
        functional._validated("f", x, 1, eps, **_vectors(3, np.float32))


def test_short_gradient_checks_leave_errors_to_the_full_checks():
    x = np.zeros((4, 3), np.float32)
    assert functional._checked_grad("f", np.ones((4, 3), np.float64), x) is namespace_of("f", x=x)
    with pytest.raises(ValueError, match=r"f: dy has shape \(3, 4\), expected \(4, 3\)"):
        functional._checked_grad("f", np.ones((3, 4), np.float32), x)
    with pytest.raises(TypeError, match="f: dy must have a real floating dtype"):
        functional._checked_grad("f", np.ones((4, 3), np.int32), x)
    with pytest.raises(TypeError, match="f: dy must be an array"):
        functional._checked_grad("f", None, x)
