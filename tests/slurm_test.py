"""The launcher's SLURM job arrays on a real one-node SLURM cluster (slurmctld, slurmd and
munge, as Debian packages them): finishing, stopping at a time limit's warning, at a
preemption and at a user's scancel, requeues and resumes; and a 2-process run by srun.

The cluster is this module's own: a config, state and munge key in a temporary
directory, its own ports, started as root and shut down after, also on failure. Every
scenario runs in its own sweep workdir, all at once on the one node (a fixture drives
them on threads); each test then checks one scenario's outcome. To interrupt a trainer
at a known step, a scenario freezes it (SIGSTOP) once it logged that step, makes SLURM
send what it sends, and lets it go on once SIGTERM is pending: the stop never races the
run's end.
"""

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO
from helpers import folder_flags
from helpers import free_port
from helpers import logged_train_rows
from launch import sweep

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('slurm')]

STEPS = (
  6  # Each run's num_train_steps (of a 10-step epoch of the toy folder; evaluated at the end).
)
STOP_AFTER = 2  # Interrupted trainers are frozen once they logged this step.
TIMEOUT = 600  # Seconds a scenario may take on 2 busy cores (their runs share them).
COMMANDS = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'scontrol', 'squeue', 'scancel')
ENDED = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY'}


def _missing() -> str | None:
  """Why no cluster can start here, or None."""
  if os.geteuid() != 0:
    return 'starting slurmd needs root'
  absent = [c for c in COMMANDS if not shutil.which(c, path=os.environ['PATH'] + ':/usr/sbin')]
  if absent:
    return f'no {", ".join(absent)}: apt-get install slurmctld slurmd slurm-client munge'
  return None


def _slurm_conf(root: str, host: str) -> str:
  """One node (this host, declared with 16 CPUs so that the scenarios run side by side
  on 2 real ones) and one `token`, a resource only the preemption scenario asks for:
  a 'high' job needing it preempts that scenario's 'low' job and no other."""
  return f"""\
ClusterName=alexnet_jax_test
SlurmctldHost={host}
# Job ids of their own: JAX's SLURM detection derives the coordinator's port from the job
# id, so two test clusters at once (two pytest runs or workers) must not share ids.
FirstJobId={1000 + os.getpid() % 100_000}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire s (default 120) before it starts again, and the
# scheduler looks at waiting jobs every sched_interval s (default 60).
AuthInfo=socket={root}/munge/socket,cred_expire=10
SchedulerParameters=sched_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
GresTypes=token
NodeName={host} CPUs=16 Gres=token:1 State=UNKNOWN
PartitionName=low Nodes={host} Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=120 OverSubscribe=NO State=UP
PartitionName=high Nodes={host} PriorityTier=2 PreemptMode=OFF OverSubscribe=NO State=UP
"""


def _slurm(env, *args, timeout=30) -> str:
  """A SLURM client command's output; raises on failure."""
  return subprocess.run(
    args, env=env, capture_output=True, text=True, timeout=timeout, check=True
  ).stdout


def _node_state(env) -> str | None:
  try:
    return _slurm(env, 'sinfo', '-h', '-o', '%t', '-p', 'low').strip()
  except subprocess.CalledProcessError:  # slurmctld still starting.
    return None


def _wait(condition, what: str, timeout: float = TIMEOUT, every: float = 0.2):
  deadline = time.monotonic() + timeout
  while not (value := condition()):
    if time.monotonic() > deadline:
      raise TimeoutError(f'Waited {timeout} s for {what}.')
    time.sleep(every)
  return value


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  """Starts munged, slurmctld and slurmd; yields the environment for SLURM's clients
  (and the jobs they submit); cancels every job and stops the daemons after."""
  reason = _missing()
  if reason:
    # CI installs SLURM (.ci/setup.sh): there, its absence is a failure.
    (pytest.fail if os.environ.get('CI') == 'true' else pytest.skip)(f'No SLURM cluster: {reason}.')
  root = str(tmp_path_factory.mktemp('slurm'))
  for name in ('munge', 'state', 'spool'):
    os.makedirs(os.path.join(root, name), mode=0o700)
  key = os.path.join(root, 'munge', 'munge.key')
  with open(key, 'wb') as f:
    f.write(os.urandom(1024))
  os.chmod(key, 0o600)
  conf = os.path.join(root, 'slurm.conf')
  with open(conf, 'w') as f:
    f.write(_slurm_conf(root, socket.gethostname().split('.')[0]))
  env = {
    **os.environ,
    'PATH': os.environ['PATH'] + ':/usr/sbin',
    'SLURM_CONF': conf,
    # A run's towers on 2 CPU devices, as one process of srun's 2-process job holds one.
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
  }
  munge = os.path.join(root, 'munge')
  daemons = [
    [
      'munged',
      '--foreground',
      '--force',
      f'--socket={munge}/socket',
      f'--key-file={key}',
      f'--pid-file={munge}/pid',
      f'--log-file={munge}/log',
      f'--seed-file={munge}/seed',
    ],
    ['slurmctld', '-D', '-f', conf],
    ['slurmd', '-D', '-f', conf],
  ]
  running = []
  try:
    for command in daemons:
      running.append(
        subprocess.Popen(
          command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root
        )
      )
      if command[0] == 'munged':
        _wait(lambda: os.path.exists(f'{munge}/socket'), 'munged', timeout=30)
    _wait(
      lambda: _node_state(env) == 'idle',
      'the node to be idle',
      timeout=60,
      every=0.5,
    )
    yield env
  finally:
    with contextlib.suppress(subprocess.SubprocessError, TimeoutError):
      _slurm(env, 'scancel', '--user=root')  # Jobs' processes would outlive slurmd.
      _wait(lambda: not _slurm(env, 'squeue', '-h').strip(), 'the jobs to end', timeout=60)
      _slurm(env, 'scontrol', 'shutdown')  # slurmctld and slurmd.
    for daemon in reversed(running):
      if daemon.args[0] == 'munged':
        daemon.terminate()
      try:
        daemon.wait(timeout=15)
      except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def job(env, task: str) -> dict[str, str]:
  """`scontrol show job`'s fields of `task`, e.g. {'JobState': 'RUNNING', 'Restarts': '0'}."""
  text = _slurm(env, 'scontrol', 'show', 'job', '-o', task)
  return dict(field.split('=', 1) for field in text.split() if '=' in field)


def ended(env, task: str) -> dict[str, str]:
  """Waits for `task` to end for good (requeues and restarts included); its fields."""
  return _wait(
    lambda: (info := job(env, task))['JobState'] in ENDED and info,
    f'job {task} to end',
    every=0.5,
  )


def submit(env, sweep_dir, *args) -> str:
  """`python -m launch.sweep --backend=slurm` on the toy folder: its array job's id."""
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.sweep',
      '--config=configs/fashion_mnist.py',
      f'--workdir={sweep_dir}',
      '--backend=slurm',
      '--slurm_gpus_per_node=0',
      *args,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return re.search(r'Submitted batch job (\d+)', result.stdout)[1]


def trainers(workdir) -> list[int]:
  """The pids of the `python -m alexnet_jax.main --workdir=<workdir>` processes."""
  pids = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    with contextlib.suppress(OSError):
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        argv = f.read().decode().split('\0')
      if argv[1:3] == ['-m', 'alexnet_jax.main'] and f'--workdir={workdir}' in argv:
        pids.append(int(pid))
  return pids


def _status(pid: int) -> dict[str, str]:
  """/proc/PID/status's fields; {'State': 'X'} for a process that is gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return dict(line.split(':\t', 1) for line in f.read().splitlines() if ':\t' in line)
  except FileNotFoundError:
    return {'State': 'X (gone)'}


def interrupt(output: str, workdir: str, send):
  """Once the trainer of `workdir` logged step STOP_AFTER (in `output`), freezes it,
  calls `send()` (which makes SLURM send SIGTERM) and lets it go on once SIGTERM is
  pending (or SLURM has let it go on itself, with SIGCONT, or killed it: the scenario's
  outcome then says so)."""

  def reached():
    with contextlib.suppress(FileNotFoundError), open(output) as f:
      return f'] [{STOP_AFTER}] ' in f.read()

  _wait(reached, f'step {STOP_AFTER} in {output}')
  [pid] = trainers(workdir)
  os.kill(pid, signal.SIGSTOP)
  try:
    _wait(lambda: _status(pid)['State'].startswith('T'), 'the trainer to stop', timeout=30)
    send()
    _wait(
      lambda: (s := _status(pid))['State'][0] != 'T' or int(s['ShdPnd'], 16) & 1 << 14,
      'SIGTERM to reach the trainer',
      timeout=60,
    )
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGCONT)


def scenarios(env, root, data) -> dict[str, object]:
  """Each scenario's function (run on its own thread, returning what its test checks)."""
  flags = folder_flags(data, num_train_steps=STEPS)[1:]  # Without --config.

  def array(name, *sbatch, seeds='[0]', **overrides):
    sweep_dir = os.path.join(root, name)
    extra = [f'--config.{k}={v}' for k, v in overrides.items()]
    job_id = submit(
      env,
      sweep_dir,
      f'--sweep=config.seed={seeds}',
      *flags,
      *extra,
      *(f'--sbatch={o}' for o in sbatch),
    )
    return sweep_dir, job_id

  def outcome(sweep_dir, job_id, task=0):
    info = ended(env, f'{job_id}_{task}')
    with open(os.path.join(sweep_dir, 'slurm', f'{job_id}_{task}.out')) as f:
      return info, f.read()

  def finishes():
    sweep_dir, job_id = array('finishes', seeds='[0,1]')
    return [outcome(sweep_dir, job_id, task) for task in (0, 1)], sweep_dir

  def interrupted(name, send, *sbatch):
    sweep_dir, job_id = array(name, *sbatch)
    task = f'{job_id}_0'
    output = os.path.join(sweep_dir, 'slurm', f'{task}.out')
    interrupt(output, os.path.join(sweep_dir, 'seed=0'), lambda: send(task))
    return (*outcome(sweep_dir, job_id), os.path.join(sweep_dir, 'seed=0'))

  def preempt(unused_task):
    _slurm(env, 'sbatch', '--partition=high', '--gres=token:1', '--output=/dev/null', '--wrap=true')

  def fails():
    sweep_dir, job_id = array('fails', manual_dir=os.path.join(root, 'missing'))
    return outcome(sweep_dir, job_id)

  def by_srun():
    workdir = os.path.join(root, 'srun', 'run')
    result = subprocess.run(
      [
        'srun',
        '--ntasks=2',
        sys.executable,
        '-m',
        'alexnet_jax.main',
        f'--workdir={workdir}',
        '--noplots',
        *folder_flags(data, num_train_steps=STEPS),
      ],
      cwd=REPO,
      env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'},
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
      check=False,
    )
    return result, workdir

  return {
    'finishes': finishes,
    'batch_shell': lambda: interrupted(
      'batch_shell', lambda t: _slurm(env, 'scancel', '--batch', '--signal=TERM', t)
    ),
    'steps': lambda: interrupted('steps', lambda t: _slurm(env, 'scancel', '--signal=TERM', t)),
    'preemption': lambda: interrupted('preemption', preempt, 'gres=token:1'),
    'scancel': lambda: interrupted('scancel', lambda t: _slurm(env, 'scancel', t)),
    'fails': fails,
    'srun': by_srun,
  }


@pytest.fixture(scope='module')
def outcomes(cluster, toy_image_folder, tmp_path_factory):
  """Every scenario started at once; {name: its future}."""
  root = str(tmp_path_factory.mktemp('sweeps'))
  todo = scenarios(cluster, root, toy_image_folder)
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(todo)) as pool:
    yield {name: pool.submit(run) for name, run in todo.items()}


def result(outcomes, name):
  return outcomes[name].result(timeout=TIMEOUT)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def losses(workdir) -> dict[int, float]:
  return {row['step']: row['train_loss'] for row in logged_train_rows(workdir)}


@pytest.fixture(scope='module')
def reference(outcomes):
  """The uninterrupted run of seed 0 (of the finishing array): its workdir."""
  _, sweep_dir = result(outcomes, 'finishes')
  return os.path.join(sweep_dir, 'seed=0')


def test_an_array_of_two_runs_finishes(outcomes):
  tasks, sweep_dir = result(outcomes, 'finishes')
  for seed, (info, output) in enumerate(tasks):
    assert (info['JobState'], info['Restarts'], info['ExitCode']) == ('COMPLETED', '0', '0:0'), (
      output[-3000:]
    )
    results = read_json(os.path.join(sweep_dir, f'seed={seed}', 'results.json'))
    assert results['step'] == STEPS
    assert list(losses(os.path.join(sweep_dir, f'seed={seed}'))) == list(range(1, STEPS + 1))
  runs = [os.path.join(sweep_dir, f'seed={seed}') for seed in (0, 1)]
  assert losses(runs[0]) != losses(runs[1])  # Two runs, not one twice.


def check_stopped_requeued_and_resumed(outcome, reference):
  """The trainer checkpointed the step it reached and exited; the task was requeued
  once, resumed from that step, and finished as the uninterrupted run did."""
  info, output, workdir = outcome
  assert (info['JobState'], info['Restarts'], info['ExitCode']) == ('COMPLETED', '1', '0:0'), (
    output[-3000:]
  )
  stopped = int(re.search(r'Stopped on request \(SIGTERM\) after step (\d+)', output)[1])
  assert STOP_AFTER <= stopped < STEPS
  assert f'Resumed from step {stopped}' in output
  assert 'Killed' not in output and 'forcing job termination' not in output
  assert list(losses(workdir)) == list(range(1, STEPS + 1))  # Each step once.
  assert losses(workdir) == pytest.approx(losses(reference), rel=1e-5)
  results, expected = (
    read_json(os.path.join(workdir, 'results.json')),
    read_json(os.path.join(reference, 'results.json')),
  )
  for key in ('step', 'test_loss', 'test_top1', 'test_top5', 'n_test_examples'):
    assert results[key] == pytest.approx(expected[key], rel=1e-5), key


def test_sigterm_to_the_batch_shell_stops_requeues_and_resumes(outcomes, reference):
  """What `--signal=B:TERM@120` sends 120 s before the time limit."""
  check_stopped_requeued_and_resumed(result(outcomes, 'batch_shell'), reference)


def test_sigterm_to_the_job_steps_stops_requeues_and_resumes(outcomes, reference):
  """What `--signal=TERM@N` (without B:) sends."""
  check_stopped_requeued_and_resumed(result(outcomes, 'steps'), reference)


def test_a_preemption_stops_requeues_and_resumes(outcomes, reference):
  """A 'high' job that needs the token the 'low' task holds: SLURM signals the task's
  steps (not its batch shell), and would requeue it only after GraceTime."""
  check_stopped_requeued_and_resumed(result(outcomes, 'preemption'), reference)


def test_a_run_that_fails_is_not_requeued(outcomes):
  info, output = result(outcomes, 'fails')
  assert (info['JobState'], info['Restarts'], info['ExitCode']) == ('FAILED', '0', '1:0'), output[
    -3000:
  ]
  assert 'FileNotFoundError' in output and 'requeuing' not in output


def test_a_users_scancel_ends_the_task_for_good(outcomes):
  info, output, workdir = result(outcomes, 'scancel')
  assert (info['JobState'], info['Restarts']) == ('CANCELLED', '0'), output[-3000:]
  # The trainer stopped as on any SIGTERM (checkpointed), and the task was not rerun.
  assert 'Stopped on request (SIGTERM)' in output and 'requeuing' not in output
  assert not os.path.exists(os.path.join(workdir, 'results.json'))


def test_srun_starts_a_two_process_job_that_trains_as_one_process(outcomes, reference):
  """`srun --ntasks=2`: alexnet_jax.main joins the processes from SLURM's variables;
  each holds one tower (1 CPU device each), as the 1-process reference does on 2."""
  completed, workdir = result(outcomes, 'srun')
  # On a crash, the Python stacks before faulthandler's long list of modules.
  crash = completed.stderr.find('Fatal Python error')
  shown = completed.stderr[crash : crash + 6000] if crash >= 0 else completed.stderr[-6000:]
  assert completed.returncode == 0, shown
  log = completed.stdout + completed.stderr
  assert "mesh {'data': 1, 'model': 2} over 2 process(es)" in log
  assert losses(workdir) == pytest.approx(losses(reference), rel=1e-5)
  results = read_json(os.path.join(workdir, 'results.json'))
  assert results['test_loss'] == pytest.approx(
    read_json(os.path.join(reference, 'results.json'))['test_loss'], rel=1e-5
  )


def test_sigterm_before_the_trainer_starts_requeues_without_starting_it(cluster, tmp_path):
  """SIGTERM to the batch shell before it has started srun (sent here by a DEBUG trap
  of the first run only): the command does not run, the task is requeued, and the
  rerun runs it."""
  [run] = sweep.expand([{}], str(tmp_path))
  ran = tmp_path / 'ran'
  script = sweep.slurm_script(
    [run],
    [['bash', '-c', f'echo "$SLURM_RESTART_COUNT" >> {ran}']],
    job_name='early',
    log_dir=str(tmp_path),
    gpus_per_node=0,
  )
  sigterm_first_run = (
    'if (( ${SLURM_RESTART_COUNT:-0} == 0 )); then set -T; trap \'if [[ $BASH_COMMAND == "cd "* ]]; '
    "then trap - DEBUG; kill -TERM $$; fi' DEBUG; fi"
  )
  script = script.replace('set -uo pipefail\n', f'set -uo pipefail\n{sigterm_first_run}\n', 1)
  (tmp_path / 'early.sbatch').write_text(script)
  job_id = _slurm(cluster, 'sbatch', '--parsable', str(tmp_path / 'early.sbatch')).strip()
  info = ended(cluster, f'{job_id}_0')
  assert (info['JobState'], info['Restarts']) == ('COMPLETED', '1')
  assert ran.read_text() == '1\n'  # Run once, by the rerun.
