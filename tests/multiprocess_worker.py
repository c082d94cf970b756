"""One process of the two-process test in test_sharded_generate.py (4 CPU devices each)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import drafters, sharding, trees  # noqa: E402

process_id, coordinator = int(sys.argv[1]), sys.argv[2]
sharding.initialize(coordinator, 2, process_id)
assert jax.device_count() == 8 and jax.local_device_count() == 4
model = jaxspec.load_model("stories260K", progress=False)
mesh = sharding.make_mesh(data=2, tensor=4)
prompts = json.loads(sys.argv[3])
out = {}
for name, d in [("chain", drafters.EarlyExit(layers=3, k=3)),
                ("tree", drafters.EarlyExit(layers=3, tree=trees.Static.from_branching((2, 2))))]:
  out[name] = jaxspec.generate(model, prompts, drafter=d, max_new_tokens=16, stop_tokens=(),
                               mesh=mesh).tokens
print("RESULT " + json.dumps(out), flush=True)
