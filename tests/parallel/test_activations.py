"""dsjax.parallel.activations: logical activation axes -> mesh axes, and constraints that
apply only under a context mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

from dsjax.parallel.activations import LOGITS, TOKENS, activation_spec, constrain, under_mesh


def _mesh(**sizes):
  names = ("data", "fsdp", "expert", "tensor")
  return AbstractMesh(tuple(sizes.get(n, 1) for n in names), names)


def test_batch_splits_over_every_batch_axis_that_divides_it():
  mesh = _mesh(data=2, fsdp=4, expert=2, tensor=2)
  assert activation_spec(TOKENS, (16, 128, 64), mesh) == P(("data", "fsdp", "expert"), None,
                                                           None)
  assert activation_spec(LOGITS, (16, 128, 256), mesh) == P(("data", "fsdp", "expert"), None,
                                                            "tensor")


def test_axes_of_size_one_or_not_dividing_are_left_out():
  # data has size 1 (left out); 12 rows are not divisible by fsdp x expert = 8: replicated.
  mesh = _mesh(fsdp=4, expert=2, tensor=2)
  assert activation_spec(TOKENS, (8, 4, 4), mesh) == P(("fsdp", "expert"), None, None)
  assert activation_spec(TOKENS, (12, 4, 4), mesh) == P(None, None, None)
  assert activation_spec(LOGITS, (8, 4, 255), mesh) == P(("fsdp", "expert"), None, None)
  assert activation_spec(TOKENS, (8, 4, 4), _mesh(fsdp=8)) == P("fsdp", None, None)


def test_constrain_is_the_identity_without_a_mesh_and_shards_under_one():
  x = jnp.arange(8 * 4 * 2, dtype=jnp.float32).reshape(8, 4, 2)
  assert constrain(x, TOKENS) is x
  devices = np.array(jax.devices()[:1])
  mesh = jax.sharding.Mesh(devices.reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"))
  f = jax.jit(under_mesh(lambda a: constrain(a * 2, TOKENS), mesh))
  np.testing.assert_array_equal(f(x), x * 2)
  assert "sharding" in f.lower(x).as_text()  # the constraint is in the program
