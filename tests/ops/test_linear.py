"""ops.linear.project: one 2-D matmul over all leading axes, equal to the einsum it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.ops.linear import project


@pytest.mark.parametrize("contract, spec", [(1, "btd,dnh->btnh"), (2, "btnh,nhd->btd"),
                                            (1, "btd,dv->btv")])
def test_project_equals_einsum_in_value_and_gradient(contract, spec):
  rng = np.random.default_rng(0)
  lhs, rhs = spec.split("->")[0].split(",")
  sizes = dict(b=2, t=5, d=6, n=3, h=4, v=7)
  x = jnp.asarray(rng.normal(size=[sizes[c] for c in lhs]), jnp.float32)
  w = jnp.asarray(rng.normal(size=[sizes[c] for c in rhs]), jnp.float32)
  np.testing.assert_allclose(project(x, w, contract), jnp.einsum(spec, x, w), atol=1e-5)
  grads = [jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
           for f in (lambda x, w: project(x, w, contract),
                     lambda x, w: jnp.einsum(spec, x, w))]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_project_refuses_mismatched_axes():
  with pytest.raises(ValueError, match="disagree on the 2 contracted axes"):
    project(jnp.zeros((2, 3, 4)), jnp.zeros((4, 3, 5)), 2)
