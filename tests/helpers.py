"""Small builders the tests share: shrunk configs, meshes, states and saved checkpoints."""

import os

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from alexnet_jax import optimizers
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides) -> ml_collections.ConfigDict:
  """The Fashion-MNIST config shrunk for mock data (64 examples): batch 8, 6 steps."""
  config = fashion_mnist.get_config()
  config.update(batch_size=8, eval_batch_size=8, shuffle_buffer=64, num_train_steps=6,
                log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3,
                keep_checkpoints=5)
  config.update_from_flattened_dict(overrides)
  return config


def mesh_of(data: int, model: int) -> jax.sharding.Mesh:
  """A (data, model) mesh over the first data × model of the simulated CPU devices."""
  return sharding.create_mesh(ml_collections.ConfigDict({'data': data, 'model': model}),
                              devices=jax.devices()[:data * model])


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
