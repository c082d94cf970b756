"""One process of the two-process training test in test_train_mesh.py (4 CPU devices each):
both train one drafter on a 2 x 4 mesh into the same folder, as the hosts of a pod would on a
shared filesystem."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

import jaxspec  # noqa: E402
from jaxspec import sharding  # noqa: E402

process_id, coordinator, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
settings = json.loads(sys.argv[4])
sharding.initialize(coordinator, 2, process_id)
assert jax.device_count() == 8 and jax.local_device_count() == 4
model = jaxspec.load_model("stories260K", progress=False)
losses = []
jaxspec.train.train_drafter(model, kind="eagle", out_dir=out_dir,
                            mesh=sharding.make_mesh(data=2, tensor=4),
                            callback=lambda step, m: losses.append(m["loss"]), **settings)
print("RESULT " + json.dumps(losses), flush=True)
