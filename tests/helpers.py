"""Small builders the tests share: shrunk configs, meshes, states and saved checkpoints."""

import contextlib
import functools
import json
import os
import re
import shlex
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


def use_fashion_mnist_as_is(monkeypatch):
  """Under `tfds.testing.mock_data`, the fashion_mnist builder as it is (conftest's
  `fashion_mnist_as_is`; for fixtures wider than one test)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from alexnet_jax import datasets  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(
    datasets,
    'prepare_fashion_mnist',
    lambda data_dir, manual_dir: tfds.builder('fashion_mnist', data_dir=data_dir),
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


def import_torchvision():
  """torchvision, for the tests that take it as the reference, without Triton.

  torchvision.ops imports torch._dynamo, which loads Triton (the GPU compiler of torch's
  CUDA wheel) if installed; Triton's LLVM then crashes the process (a segfault) when
  TensorFlow's was loaded first, as in any test process that collected a module using
  tf.data. torch runs on CPU here, where Triton is never used: it is left unimportable.
  """
  sys.modules.setdefault('triton', None)  # `import triton` raises ImportError.
  import torchvision  # pylint: disable=g-import-not-at-top

  return torchvision


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


def run_module(module: str, *args, **env) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repo root, `env` added to the environment;
  output captured, bounded by TIMEOUT."""
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    check=False,
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def processes(num_processes, devices_each, args, log_dir, prefixes=None):
  """Starts a job of `num_processes` processes with `devices_each` CPU devices each
  (1 process: a plain single-process run); yields the Popens, kills them on exit.
  `prefixes[i]`, if given, is put before process i's command (e.g. `as_host`'s)."""
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
          [
            *(prefixes[i] if prefixes else []),
            sys.executable,
            '-m',
            'alexnet_jax.main',
            *args,
            *job,
          ],
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


def namespaces_permitted() -> bool:
  """Whether this user may give a process its own host name and mounts (`unshare`)."""
  try:
    return subprocess.run(['unshare', '--uts', '--mount', 'true'], check=False).returncode == 0
  except FileNotFoundError:  # No unshare.
    return False


def as_host(name: str, hosts_file, binds=()) -> list[str]:
  """An argv prefix that runs a command as on host `name`: its own UTS namespace (so
  `hostname` is `name`) and mount namespace, where `hosts_file` is /etc/hosts (it must
  map `name` to a loopback address: gloo resolves its own host's name) and each
  (source, target) of `binds` is bind-mounted (the host's own view of a file).
  Needs `namespaces_permitted()`."""
  mounts = [(hosts_file, '/etc/hosts'), *binds]
  setup = ' && '.join(
    [f'hostname {shlex.quote(name)}']
    + [f'mount --bind {shlex.quote(str(a))} {shlex.quote(str(b))}' for a, b in mounts]
  )
  return ['unshare', '--uts', '--mount', 'sh', '-c', f'{setup} && exec "$@"', 'sh']


# Host names whose crc32 is ≥ 2^31, which a 32-bit host id once wrapped (hosts_test).
HOSTS = ('gpu-node-017', 'node-b')


def hosts_file(tmp_path) -> str:
  """An /etc/hosts that maps `HOSTS` to 127.0.0.1 (gloo resolves its own host's name)."""
  path = tmp_path / 'hosts'
  path.write_text('127.0.0.1 localhost\n' + ''.join(f'127.0.0.1 {h}\n' for h in HOSTS))
  return str(path)


def wait_for(path, running, log_dir):
  """Until `path` exists; fails with the logs if a process ends or TIMEOUT passes first."""
  deadline = time.time() + TIMEOUT
  while not os.path.exists(path):
    assert time.time() < deadline and all(p.poll() is None for p in running), '\n'.join(
      log.read_text()[-3000:] for log in sorted(log_dir.iterdir())
    )
    time.sleep(0.2)


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


def tensorboard_steps(workdir, tag: str) -> list[int]:
  """The steps of `workdir`'s TensorBoard events that hold a value of `tag`, sorted."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return sorted(
    event.step
    for name in os.listdir(workdir)
    if name.startswith('events.out.tfevents')
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name))
    for value in event.summary.value
    if value.tag == tag
  )


def train_losses(log: str) -> dict[int, float]:
  """{step: train_loss} from a process's log (clu's logging writer)."""
  return {
    int(step): float(loss)
    for step, loss in re.findall(r'\] \[(\d+)\] .*train_loss=([-\d.e]+)', log)
  }


# --------------------------------------------------------------------------------------
# Separate jobs (not one JAX job) released at the same moment, as a sweep's or a SLURM
# array's tasks that start together.

# Prepended to `run_together`'s code: `start_together()` is its start line.
_START_TOGETHER = """
def start_together():
  import os, time
  sync = os.environ['TOGETHER_DIR']
  open(os.path.join(sync, 'ready' + os.environ['TOGETHER_INDEX']), 'w').close()
  deadline = time.monotonic() + float(os.environ['TOGETHER_TIMEOUT'])
  while not os.path.exists(os.path.join(sync, 'go')):
    if time.monotonic() > deadline:
      raise SystemExit('The test never said go.')
    time.sleep(0.005)
"""


def run_together(
  code: str, num_jobs: int, log_dir, args=(), timeout=TIMEOUT
) -> list[tuple[int, str]]:
  """Runs `python -c code INDEX *args` as `num_jobs` processes from the repo root,
  `tests/` importable. Each calls `start_together()` once set up (its imports, which
  take seconds, done); all are let go when all got there, so the code after it runs
  in every job within milliseconds. Returns each (exit code, output); fails the test
  if they do not finish within `timeout` s (and kills them)."""
  sync = os.path.join(log_dir, 'sync')
  os.makedirs(sync)
  env = {
    **os.environ,
    'PYTHONPATH': os.pathsep.join([REPO, os.path.join(REPO, 'tests')]),
    'TOGETHER_DIR': sync,
    'TOGETHER_TIMEOUT': str(timeout),
  }
  deadline = time.monotonic() + timeout
  running = []
  try:
    for i in range(num_jobs):
      with open(os.path.join(log_dir, f'job{i}.log'), 'w') as log:
        running.append(
          subprocess.Popen(
            [sys.executable, '-c', _START_TOGETHER + code, str(i), *map(str, args)],
            cwd=REPO,
            env={**env, 'TOGETHER_INDEX': str(i)},
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )
    while not all(os.path.exists(os.path.join(sync, f'ready{i}')) for i in range(num_jobs)):
      if time.monotonic() > deadline or any(p.poll() is not None for p in running):
        pytest.fail(f'Not every job reached start_together() (logs in {log_dir}).')
      time.sleep(0.01)
    open(os.path.join(sync, 'go'), 'w').close()
    codes = []
    for p in running:
      try:
        codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        pytest.fail(f'A job did not finish within {timeout} s (logs in {log_dir}).')
  finally:
    for p in running:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(code, open(os.path.join(log_dir, f'job{i}.log')).read()) for i, code in enumerate(codes)]


@contextlib.contextmanager
def optimised_compiles():
  """XLA's optimisations on inside, as in training (conftest turns them off for speed);
  conftest's setting restored after. The persistent compilation cache keys on them."""
  unoptimised = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', unoptimised)
