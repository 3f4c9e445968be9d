"""Small builders the tests share: shrunk configs, meshes, states and saved checkpoints."""

import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240  # Seconds a command may take on 2 busy cores before it counts as hung.


def small_config(**overrides) -> ml_collections.ConfigDict:
  """The Fashion-MNIST config shrunk for mock data (64 examples): batch 8, 6 steps."""
  config = fashion_mnist.get_config()
  config.update(
    batch_size=8,
    eval_batch_size=8,
    shuffle_buffer=64,
    num_train_steps=6,
    log_every_steps=1,
    eval_every_steps=3,
    checkpoint_every_steps=3,
    keep_checkpoints=5,
    eval_crops=1,
  )
  config.update_from_flattened_dict(overrides)
  return config


def mesh_of(data: int, model: int) -> jax.sharding.Mesh:
  """A (data, model) mesh over the first data × model of the simulated CPU devices."""
  return sharding.create_mesh(
    ml_collections.ConfigDict({'data': data, 'model': model}), devices=jax.devices()[: data * model]
  )


_CREATE_MESH = sharding.create_mesh


def on_devices(monkeypatch, n: int):
  """Makes training and evaluation in this process use the first `n` of its devices."""
  monkeypatch.setattr(
    sharding, 'create_mesh', functools.partial(_CREATE_MESH, devices=jax.devices()[:n])
  )


def train_state(config, mesh, seed: int = 0, learning_rate: float = 0.01):
  """(initial TrainState on `mesh`, its optimizer with a constant rate)."""
  tx = optimizers.create_optimizer(config, optax.constant_schedule(learning_rate))
  return steps.create_train_state(config, tx, jax.random.key(seed), mesh), tx


def save_checkpoint(config, workdir: str, step: int, seed: int = 5):
  """Saves an untrained state as checkpoint `step` of `workdir`; returns its params."""
  state, _ = train_state(config, mesh_of(1, 1), seed)
  state = state.replace(step=state.step + step)
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    manager.save(step, args=ocp.args.StandardSave(state))
  return jax.device_get(state.params)


NUM_FOLDER_TEST_IMAGES = 37  # Not a multiple of any batch: the last batches are padded.


def write_image_folder(root) -> list[str]:
  """train/ (80 images) and val/ (37) of 10 classes of 28×28 grey PNGs whose brightness
  depends on the class; returns the `--config.KEY=VALUE` flags that train on it."""
  rng = np.random.RandomState(0)
  for split, counts in (('train', [8] * 10), ('val', [3] * 3 + [4] * 7)):
    for label, count in enumerate(counts):
      os.makedirs(os.path.join(root, split, f'class{label}'))
      for i in range(count):
        pixels = (rng.rand(28, 28) * 60 + label * 19).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, f'class{label}', f'{i}.png'))
  return folder_flags(root)


def folder_flags(root, **overrides) -> list[str]:
  """Command-line flags of the Fashion-MNIST config on `write_image_folder`'s data."""
  flags = {
    'dataset': 'image_folder',
    'manual_dir': root,
    'test_split': 'val',
    'num_classes': 10,
    'batch_size': 8,
    'eval_batch_size': 8,
    'shuffle_buffer': 80,
    'num_train_steps': 4,
    'log_every_steps': 1,
    'checkpoint_every_steps': 100,
    'eval_crops': 1,
    **overrides,
  }
  return [
    '--config=configs/fashion_mnist.py',
    *(f'--config.{key}={value}' for key, value in flags.items()),
  ]


# --------------------------------------------------------------------------------------
# `python -m alexnet_jax.main` as separate processes, as a user (or a cluster) runs it.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def processes(num_processes, devices_each, args, log_dir):
  """Starts a job of `num_processes` processes with `devices_each` CPU devices each
  (1 process: a plain single-process run); yields the Popens, kills them on exit."""
  port = free_port()
  env = {
    **os.environ,
    'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',  # Fast compiles.
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_each}',
  }
  running = []
  try:
    for i in range(num_processes):
      job = (
        [
          f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={num_processes}',
          f'--process_id={i}',
        ]
        if num_processes > 1
        else []
      )
      log = open(os.path.join(log_dir, f'process{i}.log'), 'w')  # pylint: disable=consider-using-with
      running.append(
        subprocess.Popen(
          [sys.executable, '-m', 'alexnet_jax.main', *args, *job],
          cwd=REPO,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
          text=True,
        )
      )
      log.close()
    yield running
  finally:
    for p in running:
      if p.poll() is None:
        p.kill()
        p.wait()


def wait_all(running, timeout=TIMEOUT) -> list[int]:
  deadline = time.time() + timeout
  codes = []
  for p in running:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      pytest.fail(f'A process did not finish within {timeout} s.')
  return codes


def run(num_processes, devices_each, args, log_dir) -> list[str]:
  """Runs a job to its end; returns every process's log. Fails unless all exit 0."""
  os.makedirs(log_dir, exist_ok=True)
  with processes(num_processes, devices_each, args, log_dir) as running:
    codes = wait_all(running)
  logs = [open(os.path.join(log_dir, f'process{i}.log')).read() for i in range(num_processes)]
  assert codes == [0] * num_processes, '\n'.join(log[-3000:] for log in logs)
  return logs


def logged_train_rows(workdir) -> list[dict]:
  """The train rows of a run's metrics.jsonl, in file order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [row for row in map(json.loads, f) if 'train_loss' in row]


def train_losses(log: str) -> dict[int, float]:
  """{step: train_loss} from a process's log (clu's logging writer)."""
  return {
    int(step): float(loss)
    for step, loss in re.findall(r'\] \[(\d+)\] .*train_loss=([-\d.e]+)', log)
  }
