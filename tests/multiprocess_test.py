"""Real multi-process JAX jobs on this machine: processes on 127.0.0.1, CPU devices, gloo.

Each test starts `python -m alexnet_jax.main` processes as a user would on several
hosts (`--coordinator_address --num_processes --process_id`), bounds their time and
kills them on failure. The data are a small image folder (no dataset to build).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import evaluate
from alexnet_jax import train
from helpers import HOSTS
from helpers import NUM_FOLDER_TEST_IMAGES as NUM_TEST_IMAGES
from helpers import REPO
from helpers import TIMEOUT
from helpers import as_host
from helpers import folder_flags
from helpers import free_port
from helpers import hosts_file
from helpers import logged_train_rows
from helpers import namespaces_permitted
from helpers import on_devices
from helpers import processes
from helpers import run
from helpers import run_module
from helpers import train_losses
from helpers import wait_all
from helpers import wait_for

pytestmark = pytest.mark.slow  # Every test starts several trainers.


def read_json(path):
  with open(path) as f:
    return json.load(f)


def logged_losses(workdir) -> dict[int, float]:
  return {row['step']: row['train_loss'] for row in logged_train_rows(workdir)}


def test_two_processes_train_alike_and_evaluate_as_one(toy_image_folder, tmp_path, monkeypatch):
  """2 processes × 1 device, mesh (data 1, model 2): each holds one tower of the same
  rows. Same step and metrics in both logs, and as one process with the towers on two
  devices; every test image counted once; plots drawn without leaving process 1
  waiting. Checkpoints restore across layouts: one process's on a 2 × 2 job of two
  processes (`--mode=eval`), the two processes' on one device.

  Where namespaces are permitted the job runs on host gpu-node-017 (a 32-bit host id
  divided by zero there): its processes share its cores. Its workdir is held for the
  job: a second trainer started on it meanwhile exits at once naming process 0."""
  workdir = tmp_path / 'run'
  args = [f'--workdir={workdir}', *folder_flags(toy_image_folder)]
  log_dir = tmp_path / 'logs'
  log_dir.mkdir()
  on_host = namespaces_permitted()
  host = HOSTS[0] if on_host else socket.gethostname()
  prefixes = [as_host(host, hosts_file(tmp_path))] * 2 if on_host else None
  with processes(2, 1, args, log_dir, prefixes=prefixes) as job:
    wait_for(workdir / checkpoints.HOLDER_FILE, job, log_dir)
    for p in job:  # Held still: the second trainer meets the job mid-run, not its end.
      os.kill(p.pid, signal.SIGSTOP)
    try:
      second = run_module('alexnet_jax.main', *args)
    finally:
      for p in job:
        os.kill(p.pid, signal.SIGCONT)
    codes = wait_all(job)
  logs = [(log_dir / f'process{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  last_line = second.stderr.strip().splitlines()[-1]
  assert second.returncode == 1 and re.fullmatch(
    rf'WorkdirInUse: {workdir} is in use by another trainer: pid {job[0].pid} on host '
    rf'{host}, started \S+ \(lock {workdir / checkpoints.LOCK_FILE}\)\. Wait for it '
    r'to end or stop it, or use another --workdir\.',
    last_line,
  ), second.stderr[-3000:]
  assert 'Decode threads' not in second.stderr  # Refused before reading any data.
  assert not (workdir / checkpoints.HOLDER_FILE).exists()
  threads = max(1, len(os.sched_getaffinity(0)) // 2)
  for log in logs:
    assert f'Decode threads: {threads} (' in log
    assert f'shared by 2 process(es) of this job on host {host})' in log

  assert "mesh {'data': 1, 'model': 2} over 2 process(es)" in logs[0]
  assert 'per process 8 (1 part(s) of the data)' in logs[0]  # Replicas: identical rows.
  losses = [train_losses(log) for log in logs]
  assert sorted(losses[0]) == [1, 2, 3, 4]
  assert losses[0] == losses[1]
  results = read_json(workdir / 'results.json')
  assert results['step'] == 4 and results['n_test_examples'] == NUM_TEST_IMAGES
  assert (workdir / 'plots' / 'confusion_matrix.png').exists()
  # The same run in this one process, towers on two of its devices.
  on_devices(monkeypatch, 2)
  config = config_lib.for_workdir(str(workdir), None, {})
  in_process = train.train_and_evaluate(config, str(tmp_path / 'in_process'))
  expected = logged_losses(tmp_path / 'in_process')
  assert list(expected) == [1, 2, 3, 4]
  assert logged_losses(workdir) == pytest.approx(expected, rel=1e-5)
  assert results['test_loss'] == pytest.approx(in_process['test_loss'], rel=1e-5)

  # Checkpoints across layouts. One process's checkpoint evaluated by a 2 × 2 job (2
  # parts of the test split) = that run's own last evaluation:
  run(2, 2, [f'--workdir={tmp_path / "in_process"}', '--mode=eval'], tmp_path / 'eval2')
  two_processes = read_json(tmp_path / 'in_process' / 'eval_4.json')
  assert two_processes['n_examples'] == NUM_TEST_IMAGES
  assert two_processes['loss'] == pytest.approx(in_process['test_loss'], abs=1e-5)
  assert two_processes['top1'] == pytest.approx(in_process['test_top1'], abs=1e-5)
  # and the 2 processes' checkpoint evaluated here on one device = theirs.
  on_devices(monkeypatch, 1)
  config = config_lib.for_workdir(str(workdir), None, {'mesh.data': 1, 'mesh.model': 1})
  one_process = evaluate.evaluate_checkpoint(config, str(workdir))
  assert one_process['n_examples'] == NUM_TEST_IMAGES
  assert one_process['loss'] == pytest.approx(results['test_loss'], abs=1e-5)
  assert one_process['top1'] == pytest.approx(results['test_top1'], abs=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_step(toy_image_folder, tmp_path):
  """2 processes × 2 devices, mesh 2 × 2 (each process feeds half of every batch).
  SIGTERM to process 1 alone: both checkpoint the same step and exit 75; the rerun, on
  one process, restores that checkpoint and finishes."""
  workdir = tmp_path / 'run'
  args = [f'--workdir={workdir}', '--noplots', *folder_flags(toy_image_folder, num_train_steps=12)]
  log_dir = tmp_path / 'logs'
  os.makedirs(log_dir)
  with processes(2, 2, args, log_dir) as running:
    deadline = time.time() + TIMEOUT
    while '] [2] ' not in (log_dir / 'process1.log').read_text():
      assert time.time() < deadline and all(p.poll() is None for p in running), (
        log_dir / 'process1.log'
      ).read_text()[-3000:]
      time.sleep(0.2)
    running[1].send_signal(signal.SIGTERM)
    codes = wait_all(running)
  logs = [(log_dir / f'process{i}.log').read_text() for i in range(2)]
  assert codes == [os.EX_TEMPFAIL] * 2, '\n'.join(log[-3000:] for log in logs)
  stopped = [
    int(re.search(r'Stopped on request \(SIGTERM\) after step (\d+)', log)[1]) for log in logs
  ]
  assert stopped[0] == stopped[1] < 12
  assert 'per process 4 (2 part(s) of the data)' in logs[0]
  losses = [train_losses(log) for log in logs]
  assert losses[0] == losses[1] and max(losses[0]) == stopped[0]
  assert str(stopped[0]) in os.listdir(workdir / 'checkpoints')
  assert not (workdir / 'results.json').exists()

  [log] = run(1, 4, args, tmp_path / 'rerun')
  assert f'Resumed from step {stopped[0]}' in log
  assert read_json(workdir / 'results.json')['step'] == 12
  assert [row['step'] for row in logged_train_rows(workdir)] == list(range(1, 13))


def test_a_dataset_process_0_cannot_prepare_stops_every_process(tmp_path):
  """Process 0 prepares the data first; when it cannot, the others hear so at once
  (no one waits at a barrier until the coordination service gives up) and stop with
  its message."""
  args = [f'--workdir={tmp_path / "run"}', *folder_flags(tmp_path / 'missing')]
  log_dir = tmp_path / 'logs'
  os.makedirs(log_dir)
  with processes(2, 1, args, log_dir) as running:
    codes = wait_all(running, timeout=TIMEOUT // 2)
  logs = [(log_dir / f'process{i}.log').read_text() for i in range(2)]
  assert codes == [1, 1], '\n'.join(log[-3000:] for log in logs)
  message = 'FileNotFoundError: dataset=image_folder needs --config.manual_dir=DIR'
  assert [log.strip().splitlines()[-1].startswith(message) for log in logs] == [True, True]
  assert logs[0].strip().splitlines()[-1] == logs[1].strip().splitlines()[-1]


_AGREE_ON_A_STEP = """
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from alexnet_jax import checkpoints

class Listing:  # The directory as each process sees it while step 9 is finalised.
  def latest_step(self):
    return {0: 9, 1: 6}[jax.process_index()]

print('step', checkpoints.latest_step(Listing()))
"""


def test_every_process_restores_the_step_process_0_sees(tmp_path):
  """While a checkpoint is being finalised or pruned, processes listing the directory
  can see different latest steps; all take process 0's."""
  port = free_port()
  running = [
    subprocess.Popen(
      [sys.executable, '-c', _AGREE_ON_A_STEP, f'127.0.0.1:{port}', str(i)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in running]
  finally:
    for p in running:
      p.kill()
  assert [p.returncode for p in running] == [0, 0], outputs
  assert [re.findall(r'^step \w+$', out, re.M) for out in outputs] == [['step 9']] * 2, outputs
