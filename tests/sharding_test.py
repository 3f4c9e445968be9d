"""Tests of the tower × data mesh against the single-device run (4 simulated CPUs)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_lib
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import fashion_mnist
from helpers import mesh_of
from helpers import train_state


def setup(mesh, config=None):
  config = config or fashion_mnist.get_config()
  state, tx = train_state(config, mesh)
  train_graphdef, eval_graphdef = steps.graphdefs(config)
  train_fn = steps.jit_train_step(mesh, train_graphdef, state, tx)
  eval_fn = steps.jit_eval_step(mesh, eval_graphdef, state.params)
  return state, train_fn, eval_fn, eval_graphdef


def fixed_batch(n=8):
  rng = np.random.RandomState(0)
  return {
    'image': rng.randn(n, 67, 67, 3).astype(np.float32),
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
  for name, value in {
    'SLURM_JOB_ID': '7',
    'SLURM_NTASKS': '2',
    'SLURM_STEP_TASKS_PER_NODE': tasks_per_node,
    'CUDA_VISIBLE_DEVICES': gpus,
  }.items():
    if value is None:
      monkeypatch.delenv(name, raising=False)
    else:
      monkeypatch.setenv(name, value)
  sharding.initialize_distributed()
  assert calls == [{'local_device_ids': expected}]
