"""Synchronized BN under ``shard_map`` on 4 host CPU devices; writes OUT/jax.npz.

XLA_FLAGS must give 4 host devices before jax is imported: the test runs this script in a
fresh interpreter with it set.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    import anybn
    from anybn.distributed import JaxComm

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    devices = jax.devices("cpu")
    assert len(devices) == 4, f"expected 4 host CPU devices, got {len(devices)}"
    mesh = Mesh(np.array(devices), ("i",))
    rng = np.random.default_rng(5)
    x = 3.0 + 2.0 * rng.standard_normal((8, 3, 5))
    dy = rng.standard_normal((8, 3, 5))
    w, b = 1.0 + 0.3 * rng.standard_normal(3), 0.5 * rng.standard_normal(3)
    comm = JaxComm("i")

    def step(xs, dys, w, b):
        y, saved = anybn.batch_norm_train(xs, w, b, comm=comm)
        dx, dw, db = anybn.batch_norm_backward(dys, saved)
        rm, rv = anybn.update_running_stats(jnp.zeros(3), jnp.ones(3), saved)
        return y, dx, dw[None], db[None], rm[None], rv[None]

    fn = jax.jit(shard_map(step, mesh=mesh, in_specs=(P("i"), P("i"), P(), P()),
                           out_specs=(P("i"), P("i"), P("i"), P("i"), P("i"), P("i"))))
    y, dx, dw, db, rm, rv = fn(jnp.asarray(x), jnp.asarray(dy), jnp.asarray(w), jnp.asarray(b))
    # float32 at mean/std = 1e4 (x64 on: the merge runs in float64)
    xb = (1e4 + rng.standard_normal((16, 5))).astype(np.float32)
    big = jax.jit(shard_map(lambda xs: anybn.batch_norm_train(xs, comm=comm)[0], mesh=mesh,
                            in_specs=P("i"), out_specs=P("i")))(jnp.asarray(xb))
    # a bad weight: raised while tracing, on every rank alike
    try:
        jax.jit(shard_map(lambda xs: anybn.batch_norm_train(xs, jnp.ones(4), comm=comm)[0], mesh=mesh,
                          in_specs=P("i"), out_specs=P("i")))(jnp.asarray(x))
        error = "none"
    except (TypeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    np.savez(sys.argv[1] + "/jax.npz", x=x, dy=dy, w=w, b=b, y=np.asarray(y), dx=np.asarray(dx),
             dw=np.asarray(dw), db=np.asarray(db), rm=np.asarray(rm), rv=np.asarray(rv), xb=xb,
             big=np.asarray(big), error=error)


if __name__ == "__main__":
    main()
