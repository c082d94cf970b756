"""`when`: a conditional that updates its operand in place.

A `lax.cond` branch may not write its operands in place, so XLA copies every operand a branch
updates (a KV cache written inside a branch is copied whole on every call). A while loop's carry
is updated in place; `when` is a while loop of zero or one trips."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def when(pred: jax.Array, fn: Callable[[T], T], x: T) -> T:
  """fn(x) if pred else x, for a scalar bool `pred`; fn must return x's structure and types."""
  def body(c):
    return jnp.zeros_like(c[0]), fn(c[1])
  return jax.lax.while_loop(lambda c: c[0], body, (jnp.asarray(pred), x))[1]
