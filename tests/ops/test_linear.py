"""ops.linear.project: one 2-D matmul over all leading axes, equal to the einsum it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.ops.linear import FEW_ROWS, OutMajor, project


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


@pytest.mark.parametrize("rows", [3, FEW_ROWS + 5])  # the transposed product, and x . t^T
@pytest.mark.parametrize("contract, spec", [(1, "btd,dnh->btnh"), (2, "btnh,nhd->btd")])
def test_out_major_weight_projects_like_the_input_major_one(rows, contract, spec):
  rng = np.random.default_rng(1)
  lhs, rhs = spec.split("->")[0].split(",")
  sizes = dict(b=1, t=rows, d=6, n=3, h=4)
  x = jnp.asarray(rng.normal(size=[sizes[c] for c in lhs]), jnp.float32)
  w = jnp.asarray(rng.normal(size=[sizes[c] for c in rhs]), jnp.float32)
  out_major = OutMajor.from_in_major(w, 0, contract)
  # Output axes first, input axes last: element (f..., k...) of t is element (k..., f...) of w.
  assert out_major.t.shape == w.shape[contract:] + w.shape[:contract]
  np.testing.assert_array_equal(out_major.in_major(), w)
  np.testing.assert_allclose(jax.jit(project, static_argnums=2)(x, out_major, contract),
                             jnp.einsum(spec, x, w), atol=1e-5)


def test_out_major_keeps_batch_axes_in_front_and_reads_like_a_parameter():
  w = jnp.arange(2 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 5)  # [E, K, F]
  out_major = OutMajor.from_in_major(w, 1, 1)
  np.testing.assert_array_equal(out_major.t, jnp.swapaxes(w, 1, 2))
  assert out_major[...] is out_major
  assert out_major.astype(jnp.bfloat16).t.dtype == jnp.bfloat16
  leaves, treedef = jax.tree.flatten(out_major)
  assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves).batch == 1
  with pytest.raises(TypeError, match="in_major"):
    out_major[0]
  with pytest.raises(ValueError, match="batch"):
    project(jnp.zeros((4, 3)), out_major)
  with pytest.raises(ValueError, match="disagree on the 1 contracted axes"):
    project(jnp.zeros((4, 7)), OutMajor.from_in_major(jnp.zeros((3, 5)), 0, 1))
