"""Every `dhara` command points JAX at its persistent compilation cache unless told not to."""

import os

from dhara_jax import compile_cache


def test_the_cache_is_on_by_default_and_the_user_s_settings_win():
  env = {}
  compile_cache.enable(env)
  assert env == {"JAX_COMPILATION_CACHE_DIR": os.path.expanduser("~/.cache/dhara/jax"),
                 "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 * 2**30)}
  env = {"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}
  compile_cache.enable(env)
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
  env = {"DHARA_COMPILE_CACHE": "0"}
  compile_cache.enable(env)
  assert env == {"DHARA_COMPILE_CACHE": "0"}
