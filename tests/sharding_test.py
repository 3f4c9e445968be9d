"""Tests of the tower × data mesh against the single-device run (4 simulated CPUs)."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax._src import clusters
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_lib
from alexnet_jax import models
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import fashion_mnist
from helpers import mesh_of
from helpers import train_state


def setup(mesh, config=None):
  config = config or fashion_mnist.get_config()
  state, tx = train_state(config, mesh)
  train_graphdef, eval_graphdef = steps.graphdefs(config)
  normalization = (config.pixel_mean, config.pixel_std)
  train_fn = steps.jit_train_step(mesh, train_graphdef, state, tx, normalization)
  eval_fn = steps.jit_eval_step(mesh, eval_graphdef, state.params, normalization)
  return state, train_fn, eval_fn, eval_graphdef


def fixed_batch(n=8):
  """As the input pipeline gives it: uint8 pixels with their flips and lighting, which
  the step applies on the mesh (`augment.model_input`)."""
  rng = np.random.RandomState(0)
  return {
    'image': rng.randint(0, 256, (n, 67, 67, 3), np.uint8),
    'flip': rng.rand(n) < 0.5,
    'lighting': rng.randn(n, 3).astype(np.float32) * 10,
    'label': rng.randint(0, 10, n).astype(np.int32),
    'mask': np.ones(n, np.float32),
  }


def one_step(data, model):
  mesh = mesh_of(data, model)
  state, train_fn, eval_fn, _ = setup(mesh)
  batch = sharding.global_batch(mesh, fixed_batch())
  state, metrics = train_fn(state, batch, jax.random.key(1))
  return jax.device_get((state, metrics, eval_fn(state.params, batch)))


@pytest.fixture(scope='module')
def single_device_step():
  return one_step(1, 1)


@pytest.mark.parametrize('data, model', [(1, 2), (2, 2), (2, 1)])
@pytest.mark.slow
def test_sharded_step_equals_single_device(single_device_step, data, model):
  """Same loss, gradients (the first momentum) and parameters, dropout included."""
  state, metrics, evals = one_step(data, model)
  ref_state, ref_metrics, ref_evals = single_device_step
  assert float(metrics['loss']) == pytest.approx(float(ref_metrics['loss']), rel=1e-5)
  assert float(evals['loss']) == pytest.approx(float(ref_evals['loss']), rel=1e-5)
  momentum = lambda s: s.opt_state[-1].velocity  # -lr (grads + decay) after step 1.
  for got, want in ((state.params, ref_state.params), (momentum(state), momentum(ref_state))):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), got, want)
  assert not np.allclose(momentum(state)['fc6']['kernel'], 0)


def test_create_mesh_checks_the_device_count():
  with pytest.raises(config_lib.ConfigError, match='must equal the 4 devices'):
    sharding.create_mesh(ml_collections.ConfigDict({'data': 3, 'model': 2}))
  auto = sharding.create_mesh(ml_collections.ConfigDict({'data': None, 'model': None}))
  assert dict(auto.shape) == {'data': 2, 'model': 2}


def test_each_device_holds_its_own_tower():
  mesh = mesh_of(1, 2)
  state, _, _, _ = setup(mesh)
  params = state.params
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  on_device0 = sum(
    s.data.nbytes
    for x in jax.tree.leaves(params)
    for s in x.addressable_shards
    if s.device == mesh.devices.flat[0]
  )
  # Every layer but fc8 (4096×10 + 10 here) is split in two.
  assert on_device0 / total == pytest.approx(0.5, abs=0.01)
  kernel = params['conv2']['kernel']
  for shard in kernel.addressable_shards:
    tower = list(mesh.devices.flat).index(shard.device)
    assert shard.data.shape == (5, 5, 48, 128)
    np.testing.assert_array_equal(shard.data, kernel[..., tower * 128 : (tower + 1) * 128])


def test_partition_rules_cover_optimizer_state():
  mesh = mesh_of(1, 2)
  state, _, _, _ = setup(mesh)
  assert state.opt_state[-1].velocity['conv4']['kernel'].sharding.spec == P(
    None, None, None, 'model'
  )
  assert state.params['fc8']['kernel'].sharding.spec == P()


def collectives(hlo_text):
  ops = re.findall(
    r'= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|'
    r'collective-permute)(?:-start)?\(',
    hlo_text,
  )
  return {op: ops.count(op) for op in set(ops)}


def tower_local_hlo(mesh, fn, params, x):
  """Compiled HLO of `fn(params, x)` run per device with its tower's parameters."""
  specs = sharding.partition_specs(params)
  mapped = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(specs, P(None, None, None, 'model')),
    out_specs=P(None, None, None, 'model'),
  )
  return jax.jit(mapped).lower(params, x).compile().as_text()


@pytest.mark.slow
def test_collectives_only_where_the_towers_communicate():
  mesh = mesh_of(2, 2)
  state, train_fn, _, _ = setup(mesh)
  batch = sharding.global_batch(mesh, fixed_batch())
  step_ops = collectives(train_fn.lower(state, batch, jax.random.key(1)).compile().as_text())
  # Forward gathers for conv3, fc6, fc7, fc8 inputs; gradient sums over 'data'.
  assert step_ops.get('all-gather', 0) >= 4 and step_ops.get('all-reduce', 0) >= 1, step_ops

  model = nnx.eval_shape(lambda: steps.create_model(fashion_mnist.get_config(), nnx.Rngs(0)))
  params = state.params

  def conv4_conv5(p, x):
    m = nnx.merge(nnx.graphdef(model), p)
    return jnp.concatenate(m.conv5([jax.nn.relu(t) for t in m.conv4([x])]), -1)

  def conv1_conv2(p, images):
    m = nnx.merge(nnx.graphdef(model), p)
    return jnp.concatenate(m.conv2(m.conv1(images[..., :3])), -1)

  def conv3(p, x):
    m = nnx.merge(nnx.graphdef(model), p)
    from alexnet_jax import models  # pylint: disable=g-import-not-at-top

    return jnp.concatenate(m.conv3(models.gather_towers([x], 'model')), -1)

  assert collectives(tower_local_hlo(mesh, conv4_conv5, params, jnp.ones((2, 3, 3, 384)))) == {}
  assert collectives(tower_local_hlo(mesh, conv1_conv2, params, jnp.ones((2, 67, 67, 6)))) == {}
  assert 'all-gather' in collectives(tower_local_hlo(mesh, conv3, params, jnp.ones((2, 3, 3, 256))))


CAFFE_LRN = models.LRN_CONVENTIONS['caffe']


def lrn_and_gradient(lrn, x, g):
  """(lrn(x), the gradient of sum(lrn(x) * g) with respect to x), jitted."""

  def both(x):
    y, vjp = jax.vjp(lrn, x)
    return y, vjp(g)[0]

  return jax.device_get(jax.jit(both)(x))


@pytest.mark.parametrize('data, model', [(1, 2), (2, 2), (1, 4)])
def test_cross_tower_lrn_and_its_gradient_equal_one_device(data, model):
  """Caffe's LRN on a model-parallel mesh (`lrn_across_towers`: each tower sends its 2
  edge maps to its neighbours) and its gradient (the edge maps' gradients go back)
  equal one device's LRN over all maps, at activations where the window matters."""
  rng = np.random.RandomState(0)
  channels = 8 * model  # 8 maps a tower: each window reaches at most one neighbour.
  x = (np.maximum(rng.randn(4, 3, 3, channels), 0) * 100).astype(np.float32)  # ReLU'd.
  g = rng.randn(*x.shape).astype(np.float32)
  norm = lambda a: models.local_response_norm(a, k=CAFFE_LRN.k, alpha=CAFFE_LRN.alpha)
  want, want_grad = lrn_and_gradient(norm, x, g)
  spec = P('data', None, None, 'model')
  across = jax.shard_map(
    lambda a: models.lrn_across_towers(a, 'model', k=CAFFE_LRN.k, alpha=CAFFE_LRN.alpha),
    mesh=mesh_of(data, model),
    in_specs=spec,
    out_specs=spec,
  )
  got, got_grad = lrn_and_gradient(across, x, g)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
  # What crosses the boundary matters: each tower's LRN alone is far off.
  within = lambda a: jnp.concatenate([norm(t) for t in jnp.split(a, model, axis=-1)], -1)
  _, within_grad = lrn_and_gradient(within, x, g)
  edge = np.abs(got_grad - within_grad)[..., 6:10].max()
  assert edge > 100 * np.abs(got_grad - want_grad).max(), edge


def abstract_params():
  return jax.eval_shape(lambda: steps.init_params(fashion_mnist.get_config(), jax.random.key(0)))


def test_partition_rules_match_whole_paths():
  specs = sharding.partition_specs(abstract_params())
  assert specs['conv2']['kernel'] == P(None, None, None, 'model')
  assert specs['fc7']['bias'] == P('model') and specs['fc7']['kernel'] == P(None, 'model')
  assert specs['fc8']['kernel'] == P() and specs['fc8']['bias'] == P()


def test_a_renamed_layer_is_refused_not_silently_replicated():
  params = abstract_params()
  params['conv2x'] = params.pop('conv2')  # 'conv2x/kernel' no longer fullmatches.
  with pytest.raises(ValueError, match=r"No partition rule for \['conv2x/kernel'\]"):
    sharding.partition_specs(params)
  params = abstract_params()
  del params['fc8']
  with pytest.raises(
    ValueError,
    match=r"rule\(s\) \['\(\.\*/\)\?fc8/\(kernel\|bias\)'\] "
    'match no parameter',
  ):
    sharding.partition_specs(params)


def test_the_placement_overview_names_each_parameter_and_its_rule():
  lines = sharding.describe_partitioning(abstract_params()).splitlines()
  assert len(lines) == 16
  assert (
    "  conv2/kernel (5, 5, 48, 256) -> P(None, None, None, 'model')  "
    "(rule '(.*/)?conv[1-5]/kernel')"
  ) in lines
  assert "  fc8/bias (10,) -> P()  (rule '(.*/)?fc8/(kernel|bias)')" in lines


def test_joining_a_job_needs_its_whole_description(monkeypatch):
  monkeypatch.delenv('SLURM_NTASKS', raising=False)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  with pytest.raises(ValueError, match=r'is set, but not the process count and id: pass'):
    sharding.initialize_distributed()
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  with pytest.raises(ValueError, match=r'process_id=None\), or SLURM'):
    sharding.initialize_distributed('127.0.0.1:1234', 2, None)
  sharding.initialize_distributed()  # A single-process run: nothing to join.
  assert jax.process_count() == 1


def slurm_env(monkeypatch, variables):
  """Sets `variables` (None: unsets it) and unsets every other SLURM_ variable."""
  for name in [n for n in os.environ if n.startswith('SLURM_')]:
    monkeypatch.delenv(name)
  for name, value in variables.items():
    if value is None:
      monkeypatch.delenv(name, raising=False)
    else:
      monkeypatch.setenv(name, value)


# What srun gives task 1 of a 2-task step on two nodes of job 7.
SLURM_STEP = {
  'SLURM_JOB_ID': '7',
  'SLURM_NTASKS': '2',
  'SLURM_STEP_ID': '0',
  'SLURM_STEP_NUM_TASKS': '2',
  'SLURM_STEP_NODELIST': 'node[001-002]',
  'SLURM_STEP_TASKS_PER_NODE': '1(x2)',
  'SLURM_PROCID': '1',
  'SLURM_LOCALID': '0',
}


def record_initialize(monkeypatch, calls):
  """`jax.distributed.initialize` records what JAX's own detection makes of its
  arguments and the environment (coordinator, count, id, device ids), joining nothing."""

  def initialize(coordinator_address, num_processes, process_id, local_device_ids=None):
    calls.append(
      clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator_address, num_processes, process_id, local_device_ids, None, 300
      )
    )

  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)  # Keep this process's backend.


@pytest.mark.parametrize(
  'ntasks',
  [
    '2',
    '4',  # `srun --preserve-env -n 2` in a 4-task allocation: SLURM_NTASKS is the job's.
  ],
)
def test_a_slurm_job_step_of_several_tasks_joins_as_jax_detects_it(monkeypatch, ntasks):
  calls = []
  record_initialize(monkeypatch, calls)
  slurm_env(monkeypatch, {**SLURM_STEP, 'SLURM_NTASKS': ntasks, 'CUDA_VISIBLE_DEVICES': '0,1'})
  sharding.initialize_distributed()
  # Port: JAX's, from the job id (7 % 4096 + 61440); both of the node's GPUs.
  assert calls == [('node001:61447', 2, 1, [0, 1])]


@pytest.mark.parametrize(
  'shell',
  [
    {},  # `salloc -n 2`'s shell.
    {'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'},  # An sbatch script's may have these.
  ],
)
def test_a_slurm_allocation_without_srun_runs_one_process_and_says_why(monkeypatch, caplog, shell):
  calls = []
  record_initialize(monkeypatch, calls)
  allocation = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': 'node[001-002]'}
  slurm_env(monkeypatch, {**allocation, **shell})
  with caplog.at_level('WARNING'):
    sharding.initialize_distributed()
  assert calls == []  # It would wait for peers that never come.
  assert (
    'SLURM job 7 has 2 tasks, but this process was not started by srun (no job step): '
    'running as a single process. Use `srun` to run 2 processes.'
  ) in caplog.text


def test_a_one_task_srun_step_runs_one_process_quietly(monkeypatch, caplog):
  calls = []
  record_initialize(monkeypatch, calls)
  # `srun --preserve-env -n 1` in a 2-task allocation.
  slurm_env(monkeypatch, {**SLURM_STEP, 'SLURM_STEP_NUM_TASKS': '1', 'SLURM_PROCID': '0'})
  with caplog.at_level('WARNING'):
    sharding.initialize_distributed()
  assert calls == []
  assert 'srun' not in caplog.text


@pytest.mark.parametrize(
  'tasks_per_node, gpus, expected',
  [
    ('1(x2)', '0,1,2,3', [0, 1, 2, 3]),  # One task per node: all of the node's GPUs.
    ('1', '2,3', [0, 1]),  # CUDA numbers the visible GPUs from 0.
    ('4(x2)', '0,1,2,3', None),  # One task per GPU: JAX's own choice (SLURM_LOCALID).
    ('1(x2)', None, None),  # No GPUs given (CPU hosts).
  ],
)
def test_slurm_with_one_task_per_node_gives_each_process_its_nodes_gpus(
  monkeypatch, tasks_per_node, gpus, expected
):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append(k))
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)  # Keep this process's backend.
  slurm_env(
    monkeypatch,
    {**SLURM_STEP, 'SLURM_STEP_TASKS_PER_NODE': tasks_per_node, 'CUDA_VISIBLE_DEVICES': gpus},
  )
  sharding.initialize_distributed()
  assert calls == [{'local_device_ids': expected}]


@pytest.mark.slow  # Two steps compiled, one on the 2×2 mesh: ~30 s on 2 idle cores.
def test_accumulated_step_on_a_mesh_equals_the_whole_batch_on_one_device():
  """grad_accum_steps=2 on the 2×2 mesh (2 micro-batches of 2 rows per device) makes
  the update of the whole batch of 8 on one device (dropout off: micro-batches draw
  their own masks), with the whole batch's metrics."""
  config = fashion_mnist.get_config()
  config.dropout_rate = 0.0
  normalization = (config.pixel_mean, config.pixel_std)
  results = {}
  for data, model, accum in ((1, 1, 1), (2, 2, 2)):
    mesh = mesh_of(data, model)
    state, tx = train_state(config, mesh)
    train_fn = steps.jit_train_step(
      mesh, steps.graphdefs(config)[0], state, tx, normalization, grad_accum_steps=accum
    )
    state, metrics = train_fn(state, sharding.global_batch(mesh, fixed_batch()), jax.random.key(1))
    results[accum] = jax.device_get((state, metrics))
  (state, metrics), (ref_state, ref_metrics) = results[2], results[1]
  for key in ('loss', 'top1', 'top5'):
    assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5), key
  momentum = lambda s: s.opt_state[-1].velocity  # -lr (grads + decay) after step 1.
  leaves = (jax.tree.leaves(momentum(state)), jax.tree.leaves(momentum(ref_state)))
  for got, want in zip(*leaves, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert not np.allclose(momentum(state)['fc6']['kernel'], 0)
