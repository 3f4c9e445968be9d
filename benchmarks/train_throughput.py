"""Times the jitted AlexNet train step on synthetic batches: img/s, GFLOP/s, peak memory.

  python -m benchmarks.train_throughput --batch_size=64 --image_size=227
  python -m benchmarks.train_throughput ... --model=alexnet_bn  # config.model
  python -m benchmarks.train_throughput ... --optimizers=sgd,lars  # step time of each

`--optimizers` times the same step under each optimizer in turn, in one process on
the same batch, and prints each one's step time over the first's.

Needs no TensorFlow. FLOPs per step come from XLA's cost analysis of the compiled
step; the machine's peak is measured in the same run with a large matmul. The last
line is machine-readable: images_per_sec=… gflops_per_sec=… peak_fraction=…

`--top_ops=N` then traces a few steps with `jax.profiler` and prints where the step's
time goes: per kind of XLA operation (convolution, dot, fusion, ...) and the N
slowest single operations, in ms per step (CPU threads' busy time, so kinds running
side by side can add up to more than the step).
"""

import collections
import glob
import gzip
import json
import re
import resource
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 227, 'Input side in pixels.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Train steps per timed window.')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'Timed windows; the median is reported.')
_DTYPE = flags.DEFINE_string('dtype', None, "Compute dtype; default: the config's.")
_TOP_OPS = flags.DEFINE_integer('top_ops', 0, 'Profile and list the N slowest operations.')
_MODEL = flags.DEFINE_enum(
  'model', None, list(steps.MODELS), "config.model to time; default: the config's."
)
_OPTIMIZERS = flags.DEFINE_list(
  'optimizers',
  None,
  "config.optimizer values to time one after another (e.g. sgd,lars); default: the config's.",
)
config_flags.DEFINE_config_file('config', 'configs/imagenet.py', 'Model settings.')


def matmul_peak_gflops(dtype, n: int = 4096, repeats: int = 5) -> float:
  """Best GFLOP/s of an n×n×n matmul on the default device."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def peak_memory_gib() -> float:
  """Peak device memory (accelerators) or peak resident host memory (CPU), GiB."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.


def op_times(run_steps, num_steps: int) -> dict[str, float]:
  """{XLA operation name: ms per step} from a `jax.profiler` trace of `run_steps()`."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run_steps()
    [path] = glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  times = collections.Counter()
  for event in events:
    # XLA's operations, named as in the HLO (e.g. convolution.3, ynn_fusion.12); not
    # the Python frames ($...) and executor spans around them.
    if event.get('ph') == 'X' and re.fullmatch(r'[\w.-]+', event['name']):
      times[event['name']] += event['dur'] / 1e3 / num_steps  # µs in the trace.
  return times


def print_op_times(times: dict[str, float], top: int):
  kinds = collections.Counter()
  for name, ms in times.items():
    kinds[re.sub(r'[.\d]+$', '', name)] += ms
  print('ms per step by kind of operation:')
  for kind, ms in kinds.most_common(12):
    print(f'  {ms:8.2f}  {kind}')
  print(f'the {top} slowest operations, ms per step:')
  for name, ms in collections.Counter(times).most_common(top):
    print(f'  {ms:8.2f}  {name[:100]}')


def time_train_step(config, mesh, batch) -> dict:
  """Compiles and times `config`'s train step on `batch`: {'seconds': per-window step
  times, 'step_time': their median, 'flops': XLA's FLOPs per step, 'run_steps': a
  function running `--steps` more steps (for the profile)}."""
  tx = optimizers.create_optimizer(config, optax.constant_schedule(config.learning_rate))
  state = steps.create_train_state(config, tx, jax.random.key(0), mesh)
  train_step = steps.jit_train_step(
    mesh, steps.graphdefs(config)[0], state, tx, grad_accum_steps=config.grad_accum_steps
  )
  dropout_rng = jax.random.key(1)
  compiled = train_step.lower(state, batch, dropout_rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, _ = train_step(state, batch, dropout_rng)  # Warm-up.
  jax.block_until_ready(state)
  seconds = []
  for _ in range(_WINDOWS.value):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = train_step(state, batch, dropout_rng)
    jax.block_until_ready((state, metrics))
    seconds.append((time.perf_counter() - start) / _STEPS.value)

  def run_steps():
    nonlocal state
    for _ in range(_STEPS.value):
      state, _ = train_step(state, batch, dropout_rng)
    jax.block_until_ready(state)

  return {
    'seconds': seconds,
    'step_time': statistics.median(seconds),
    'flops': float(cost['flops']),
    'run_steps': run_steps,
  }


def main(argv):
  del argv
  config = flags.FLAGS.config
  config.batch_size = _BATCH_SIZE.value
  config.image_size = _IMAGE_SIZE.value
  if _DTYPE.value:
    config.dtype = _DTYPE.value
  if _MODEL.value:
    config.model = _MODEL.value
  mesh = sharding.create_mesh(config.mesh)
  rng = np.random.RandomState(0)
  batch = sharding.global_batch(
    mesh,
    {
      'image': rng.randn(config.batch_size, config.image_size, config.image_size, 3).astype(
        np.float32
      ),
      'label': rng.randint(0, config.num_classes, config.batch_size).astype(np.int32),
    },
  )
  timings = {}
  for optimizer in _OPTIMIZERS.value or [config.optimizer]:
    config.optimizer = optimizer
    timings[optimizer] = time_train_step(config, mesh, batch)
  peak = matmul_peak_gflops(jnp.dtype(config.dtype)) * len(jax.devices())
  first = next(iter(timings.values()))
  print(
    f'devices: {jax.device_count()} × {jax.devices()[0].device_kind}, mesh '
    f'{dict(mesh.shape)}, model {config.model}, batch {config.batch_size}, '
    f'{config.image_size} px, {config.dtype}, {config.grad_accum_steps} micro-batch(es)'
  )
  for optimizer, timing in timings.items():
    seconds = timing['seconds']
    print(
      f'optimizer {optimizer}: step {timing["step_time"] * 1e3:.1f} ms median of '
      f'{_WINDOWS.value}×{_STEPS.value} (windows {", ".join(f"{s * 1e3:.1f}" for s in seconds)}'
      f' ms), {timing["step_time"] / first["step_time"]:.3f}× the first; '
      f'{timing["flops"] / config.batch_size / 1e9:.2f} GFLOP per image (XLA cost analysis)'
    )
  print(f'matmul peak: {peak:.0f} GFLOP/s; peak memory: {peak_memory_gib():.2f} GiB')
  if _TOP_OPS.value:
    print_op_times(op_times(first['run_steps'], _STEPS.value), _TOP_OPS.value)
  images_per_sec = config.batch_size / first['step_time']
  gflops_per_sec = first['flops'] / first['step_time'] / 1e9
  print(
    f'images_per_sec={images_per_sec:.2f} gflops_per_sec={gflops_per_sec:.1f} '
    f'peak_fraction={gflops_per_sec / peak:.3f}'
  )


if __name__ == '__main__':
  app.run(main)
