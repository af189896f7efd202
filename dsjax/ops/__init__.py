"""Pure jnp math shared by the NNX modules, the kernels' references and the tests."""
