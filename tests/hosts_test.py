"""Jobs across host names, one trainer per workdir, failures agreed by every process.

Processes get host names of their own (`unshare --uts`, as root; skipped where not
permitted) whose crc32 is ≥ 2^31, which a 32-bit host id once wrapped: `gpu-node-017`
and `node-b`. The arithmetic of thread counts and cgroup quotas is checked on
written-out masks and `cpu.max` files.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import input_pipeline
from alexnet_jax import sharding
from helpers import HOSTS
from helpers import REPO
from helpers import TIMEOUT
from helpers import as_host
from helpers import folder_flags
from helpers import free_port
from helpers import hosts_file
from helpers import namespaces_permitted
from helpers import processes
from helpers import save_checkpoint
from helpers import small_config
from helpers import wait_all

needs_namespaces = pytest.mark.skipif(
  not namespaces_permitted(), reason='unshare --uts --mount is not permitted here (needs root)'
)


def test_the_host_names_are_those_a_32_bit_id_wrapped():
  assert all(zlib.crc32(h.encode()) >= 2**31 for h in HOSTS)


# --------------------------------------------------------------------------------------
# Arithmetic.


def masks_of(num_cpus: int, *cpu_sets) -> np.ndarray:
  masks = np.zeros((len(cpu_sets), num_cpus), bool)
  for row, cpus in enumerate(cpu_sets):
    masks[row, list(cpus)] = True
  return masks


def test_processes_share_cores_on_the_same_host_with_overlapping_masks():
  hosts = [b'gpu-node-017', b'gpu-node-017', b'gpu-node-017', b'node-b', b'gpu-node-017']
  # 0 and 1 overlap on CPU 3; 2 is bound elsewhere; 3 is another host; 4 is unbound.
  masks = masks_of(16, range(0, 4), range(3, 8), range(8, 12), range(0, 16), range(0, 16))
  assert [input_pipeline._sharers(me, hosts, masks) for me in range(5)] == [3, 3, 2, 1, 4]


def write_cpu_max(root, **quotas):
  """`cpu.max` files under `root`: {relative dir ('' for root): contents}."""
  for relative, contents in quotas.items():
    directory = os.path.join(root, relative.replace('__', '/'))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'cpu.max'), 'w') as f:
      f.write(contents + '\n')


@pytest.mark.parametrize(
  'proc_cgroup,quotas,expected',
  [
    # 8 cores for the job; the step below it has no quota of its own.
    ('0::/job/step\n', {'': 'max 100000', 'job': '800000 100000', 'job__step': 'max 100000'}, 8),
    # The smallest on the way up: 1.5 cores round down to 1.
    ('0::/a/b\n', {'a': '150000 100000', 'a__b': '400000 100000'}, 1),
    # A period other than 100 ms; a quota below one core still allows one thread.
    ('0::/\n', {'': '200000 50000'}, 4),
    ('0::/c\n', {'c': '30000 100000'}, 1),
    ('0::/d\n', {'': 'max 100000', 'd': 'max 100000'}, None),  # No quota.
    ('0::/e\n', {}, None),  # No cpu.max: no cpu controller.
    ('4:memory:/x\n1:cpu:/\n', {'': '100000 100000'}, None),  # cgroup v1 only.
  ],
)
def test_cgroup_cpu_limit(tmp_path, proc_cgroup, quotas, expected):
  root = tmp_path / 'cgroup'
  root.mkdir()
  write_cpu_max(str(root), **quotas)
  (tmp_path / 'self').write_text(proc_cgroup)
  assert input_pipeline.cgroup_cpu_limit(str(tmp_path / 'self'), str(root)) == expected


def test_one_process_gets_its_cores_within_the_quota(monkeypatch):
  monkeypatch.setattr(input_pipeline, 'cgroup_cpu_limit', lambda: None)
  assert input_pipeline.decode_threads() == len(os.sched_getaffinity(0))
  monkeypatch.setattr(input_pipeline, 'cgroup_cpu_limit', lambda: 1)
  assert input_pipeline.decode_threads() == 1


@pytest.mark.parametrize(
  'error',
  [
    FileNotFoundError('/data/prepared/imagenet is not finished.'),
    config_lib.ConfigError('config.classes holds id 12.'),
    checkpoints.WorkdirInUse('runs/x is in use by another trainer: pid 7 on host node-b.'),
  ],
)
def test_a_failure_is_told_to_the_others_as_the_same_type_and_message(error):
  told = sharding._rebuilt(sharding._describe(error))
  assert type(told) is type(error) and str(told) == str(error)


def test_a_failure_of_a_type_not_built_from_a_message_is_told_as_a_runtime_error():
  error = UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'invalid start byte')
  told = sharding._rebuilt(sharding._describe(error))
  assert type(told) is RuntimeError
  assert str(told) == f'builtins.UnicodeDecodeError: {error}'
  long = sharding._rebuilt(sharding._describe(ValueError('é' * 5000)))
  assert type(long) is ValueError and 'é' * 2000 in str(long)


# --------------------------------------------------------------------------------------
# Real processes.


def run_scripts(code: str, prefixes) -> list[str]:
  """`python -c code ADDRESS INDEX` as one JAX job of len(prefixes) processes, process
  i behind `prefixes[i]`; returns their outputs, failing unless all exit 0 in time."""
  address = f'127.0.0.1:{free_port()}'
  env = {**os.environ, 'PYTHONPATH': REPO, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  running = [
    subprocess.Popen(
      [*prefix, sys.executable, '-c', code, address, str(i)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i, prefix in enumerate(prefixes)
  ]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in running]
  finally:
    for p in running:
      p.kill()
  assert [p.returncode for p in running] == [0] * len(running), outputs
  return outputs


_HOLD = """
import sys, time
from alexnet_jax import checkpoints
with checkpoints.workdir_lock(sys.argv[1]):
  print('holding', flush=True)
  time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_a_killed_trainers_lock_does_not_block_the_rerun(tmp_path):
  workdir = tmp_path / 'run'
  env = {**os.environ, 'PYTHONPATH': REPO}
  command = [sys.executable, '-c', _HOLD, str(workdir)]
  with subprocess.Popen([*command, str(TIMEOUT)], cwd=REPO, env=env) as killed:
    try:
      deadline = time.time() + TIMEOUT
      while not (workdir / checkpoints.HOLDER_FILE).exists():
        assert time.time() < deadline and killed.poll() is None
        time.sleep(0.1)
      killed.send_signal(signal.SIGKILL)
      killed.wait()
    finally:
      killed.kill()
  rerun = subprocess.run(
    [*command, '0'], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT
  )
  assert rerun.returncode == 0 and 'holding' in rerun.stdout, rerun.stderr[-3000:]


@pytest.mark.slow
@needs_namespaces
def test_data_bad_on_one_process_stops_both_with_its_message(toy_image_folder, tmp_path):
  """Process 1 runs on a host (node-b) whose copy of the train images is text files
  named .png; process 0's is sound. Both stop, with the same last line, instead of
  process 0 waiting in a collective until JAX gives up."""
  bad = tmp_path / 'bad_train'
  shutil.copytree(os.path.join(toy_image_folder, 'train'), bad)
  for path in bad.rglob('*.png'):
    path.write_text('not an image')
  log_dir = tmp_path / 'logs'
  log_dir.mkdir()
  args = [f'--workdir={tmp_path / "run"}', '--noplots', *folder_flags(toy_image_folder)]
  prefixes = [
    [],
    as_host(HOSTS[1], hosts_file(tmp_path), [(bad, os.path.join(toy_image_folder, 'train'))]),
  ]
  with processes(2, 1, args, log_dir, prefixes=prefixes) as running:
    codes = wait_all(running, timeout=TIMEOUT // 2)
  logs = [(log_dir / f'process{i}.log').read_text() for i in range(2)]
  last = [log.strip().splitlines()[-1] for log in logs]
  assert codes == [1, 1], '\n'.join(log[-3000:] for log in logs)
  assert last[0] == last[1], last
  assert last[0].startswith('ValueError: None of the first 1000 images of image_folder train')
  assert 'Process 1 of 2 failed; stopping with it.' in logs[0]


_ON_TWO_HOSTS = """
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from alexnet_jax import checkpoints, config_lib, input_pipeline, sharding
print('threads', input_pipeline.decode_threads(), flush=True)
config = config_lib.load(WORKDIR)
try:
  checkpoints.restore_params(config, WORKDIR, sharding.create_mesh(config.mesh))
except FileNotFoundError as e:
  print(f'FileNotFoundError: {e}', flush=True)
"""


@pytest.mark.slow
@needs_namespaces
def test_a_job_on_two_hosts(tmp_path):
  """Processes on hosts gpu-node-017 and node-b share no cores, so each decodes on all
  of its own (the 32-bit host id matched no process to itself here and divided by
  zero). node-b's view of the workdir has no checkpoint (no shared filesystem) where
  process 0 picks step 4: both raise the same error, before Orbax's restore, where
  process 0 would wait in its closing barrier."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = small_config()
  config_lib.save(config, str(workdir))
  save_checkpoint(config, str(workdir), 4)
  empty = tmp_path / 'empty'
  empty.mkdir()
  hosts = hosts_file(tmp_path)
  prefixes = [
    as_host(HOSTS[0], hosts),
    as_host(HOSTS[1], hosts, [(empty, workdir / 'checkpoints')]),
  ]
  outputs = run_scripts(_ON_TWO_HOSTS.replace('WORKDIR', repr(str(workdir))), prefixes)
  cores = len(os.sched_getaffinity(0))
  assert [re.findall(r'^threads (\d+)$', out, re.M) for out in outputs] == [[str(cores)]] * 2
  expected = (
    f'FileNotFoundError: Checkpoint 4 of {workdir / "checkpoints"} is missing on host '
    f'{HOSTS[1]} (process 1): the workdir must be on a filesystem every host sees.'
  )
  assert [re.findall('^FileNotFoundError: .*$', out, re.M) for out in outputs] == [[expected]] * 2
