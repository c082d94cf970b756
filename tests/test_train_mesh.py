"""Drafter training on a mesh (jaxspec.train, mesh=): the 8 simulated CPU devices of conftest as
2 x 4 (data x tensor) and 8 x 1 meshes. The data set built on a mesh is the one-device set, the
loss curve is the one-device curve up to float summation order, and a run saved on one mesh
resumes on another (or on none) from exactly the saved state."""

import os
import shutil

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec import sharding
from jaxspec.train import data as data_lib
from jaxspec.train import trainer

# One worker runs this module's reference trainings (module fixtures) once: `--dist loadgroup`.
pytestmark = pytest.mark.xdist_group("train_mesh")

STEPS = 12
SETTINGS = dict(steps=STEPS, batch_size=8, seq_len=64, num_prompts=32, samples_per_prompt=1,
                eval_every=0, eval_prompts=4, eval_tokens=16, progress=False, lr=3e-3)
TOL = dict(rtol=2e-5, atol=2e-5)  # float summation order across shards


@pytest.fixture(scope="module")
def meshes():
  assert jax.device_count() == 8, "conftest gives 8 CPU devices"
  return {"2x4": sharding.make_mesh(data=2, tensor=4), "8x1": sharding.make_mesh(data=8),
          "4x2": sharding.make_mesh(data=4, tensor=2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return tmp_path_factory.mktemp("train_mesh")


def _train(model, kind, out_dir, mesh=None, **kw):
  """(drafter, the loss of every step)."""
  losses = []
  head = jaxspec.train.train_drafter(
      model, kind=kind, out_dir=str(out_dir), mesh=mesh,
      callback=lambda step, m: losses.append(m["loss"]), **{**SETTINGS, **kw})
  return head, np.asarray(losses)


def _with_data(runs, name):
  """A run folder holding the one-device run's training set (so every run sees the same
  batches; test_data_built_on_a_mesh_is_the_one_device_set checks they would anyway)."""
  if not os.path.exists(runs / name):
    shutil.copytree(runs / "one-eagle" / "data", runs / name / "data")
  return runs / name


@pytest.fixture(scope="module")
def one_device(stories, runs):
  out = {"eagle": _train(stories, "eagle", runs / "one-eagle")}
  out["distill"] = _train(stories, "distill", _with_data(runs, "one-distill"), layers=2)
  return out


@pytest.mark.parametrize("kind", ["eagle", "distill"])
def test_mesh_loss_curve_is_the_one_device_curve(stories, runs, meshes, one_device, kind):
  """Data parallel over 2 and tensor parallel over 4 (the EAGLE head is replicated; the
  distilled model's layers are split like the target's): the same losses and weights as one
  device, and the drafter comes back as ordinary one-device arrays that draft losslessly."""
  want_head, want = one_device[kind]
  head, got = _train(stories, kind, _with_data(runs, f"2x4-{kind}"), meshes["2x4"],
                     **({"layers": 2} if kind == "distill" else {}))
  assert len(got) == STEPS and want[-1] < want[0]
  np.testing.assert_allclose(got, want, **TOL)
  for a, b in zip(jax.tree.leaves(head.params), jax.tree.leaves(want_head.params)):
    assert len(a.devices()) == 1
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  drafter = (jaxspec.drafters.DraftModel(head, k=3) if kind == "distill"
             else jaxspec.drafters.Eagle(head, k=3))
  prompts = ["Once upon a time", "The little bird"]
  plain = jaxspec.generate(stories, prompts, max_new_tokens=16, stop_tokens=())
  spec = jaxspec.generate(stories, prompts, drafter=drafter, max_new_tokens=16, stop_tokens=())
  assert spec.tokens == plain.tokens


def test_data_built_on_a_mesh_is_the_one_device_set(stories, runs, meshes, one_device):
  """Generation and the feature pass run sharded (rows over "data", the target over
  "tensor"): the same tokens and, up to float order, the same features."""
  prompts = data_lib.encode_prompts(stories, None, SETTINGS["seq_len"] // 2)
  train, _ = data_lib.split_prompts(prompts, seed=0, n_train=SETTINGS["num_prompts"],
                                    n_eval=SETTINGS["eval_prompts"])
  ds = data_lib.build(stories, train, str(runs / "mesh-data"), seq_len=SETTINGS["seq_len"],
                      samples=1, temperature=1.0, seed=0, progress=False, mesh=meshes["2x4"])
  want = data_lib.build(stories, train, str(runs / "one-eagle" / "data"),
                        seq_len=SETTINGS["seq_len"], samples=1, temperature=1.0, seed=0,
                        progress=False)  # the cached one-device set
  np.testing.assert_array_equal(ds.tokens, want.tokens)
  np.testing.assert_array_equal(ds.lens, want.lens)
  np.testing.assert_allclose(np.asarray(ds.feats), np.asarray(want.feats), rtol=1e-4, atol=1e-4)
  assert not [f for f in os.listdir(runs / "mesh-data") if ".tmp" in f]


def test_resume_on_another_mesh(stories, runs, meshes, one_device):
  """Stopped at step 7 on a 2 x 4 mesh; the checkpoint restores bit for bit onto a 4 x 2 mesh
  and onto one device, and the run finishes on 8 x 1 on the one-device curve."""
  out = _with_data(runs, "moved")

  def stop_at_7(step, metrics):
    if step == 7:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    jaxspec.train.train_drafter(stories, kind="eagle", out_dir=str(out), mesh=meshes["2x4"],
                                callback=stop_at_7, **SETTINGS)
  # The saved state, read three ways.
  obj = trainer.objectives.make("eagle", stories, k=4)
  hyper = trainer.Hyper(steps=STEPS, lr=3e-3, warmup=1, weight_decay=0.01, clip=1.0)
  template = trainer._init_state(obj, hyper, stories, 0)
  ckpts = trainer._Checkpoints(str(out / trainer.STATE_DIR))
  assert ckpts.latest() == 7
  plain = ckpts.restore(7, template)
  for name in ("4x2", "8x1"):
    place = trainer.Placement(meshes[name])
    moved = ckpts.restore(7, template, place.state(template))
    assert int(moved.step) == 7
    for a, b, s in zip(jax.tree.leaves(moved), jax.tree.leaves(plain),
                       jax.tree.leaves(place.state(template))):
      assert a.sharding == s
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpts.close()
  # The run goes on from there on another mesh.
  head, rest = _train(stories, "eagle", out, meshes["8x1"])
  _, want = one_device["eagle"]
  np.testing.assert_allclose(rest, want[7:], **TOL)
  for a, b in zip(jax.tree.leaves(head.params), jax.tree.leaves(one_device["eagle"][0].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_mesh_errors(stories, runs, meshes):
  with pytest.raises(ValueError, match="batch_size=6 does not split over the mesh's 8 data "
                                       "shards; use a multiple of 8"):
    jaxspec.train.train_drafter(stories, kind="eagle", out_dir=str(runs / "x"), steps=1,
                                batch_size=6, mesh=meshes["8x1"])
  with pytest.raises(ValueError, match="mesh must be a \\('data', 'tensor'\\) mesh"):
    jaxspec.train.train_drafter(stories, kind="eagle", out_dir=str(runs / "x"), steps=1,
                                mesh="2x4")
  assert not os.path.exists(runs / "x")  # refused before anything was written


def test_two_processes_train_one_drafter(stories, tmp_path):
  """Two processes (4 CPU devices each, one 2 x 4 mesh) generate the data and train into one
  shared folder, as a pod's hosts do: both see the one-device loss curve, the folder holds
  one complete run, and the drafter loads."""
  import json
  import socket
  import subprocess
  import sys

  settings = dict(SETTINGS, steps=6, num_prompts=16, eval_prompts=2, eval_tokens=8)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  worker = os.path.join(os.path.dirname(__file__), "multiprocess_train_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), coordinator, str(tmp_path / "pod"),
                             json.dumps(settings)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  curves = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    curves.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]))
  _, want = _train(stories, "eagle", tmp_path / "one", **settings)
  np.testing.assert_allclose(curves[0], want, **TOL)
  np.testing.assert_allclose(curves[1], curves[0], rtol=0, atol=0)
  assert not [f for d, _, fs in os.walk(tmp_path / "pod") for f in fs if ".tmp" in f]
  head = jaxspec.drafters.EagleHead.load(tmp_path / "pod")
  assert head.meta["steps"] == 6
