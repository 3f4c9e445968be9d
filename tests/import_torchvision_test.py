"""Tests of the torchvision AlexNet importer against torchvision itself: its own
`alexnet()` with seeded random weights, its forward pass and its ImageNet transforms."""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image
import torch

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import evaluate
from alexnet_jax import features
from alexnet_jax import import_torchvision
from alexnet_jax import predict
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import imagenet
from configs import torchvision_alexnet
import helpers
from helpers import mesh_of

torchvision = helpers.import_torchvision()
transforms = torchvision.transforms

# One worker builds the module's 61M-weight fixtures (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('torchvision_alexnet')

NUM_CLASSES = 10
# torchvision/transforms/_presets.py ImageClassification(crop_size=224), written out.
TORCHVISION_EVAL = transforms.Compose(
  [
    transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  ]
)


def seeded_torchvision_alexnet() -> torch.nn.Module:
  """torchvision's AlexNet, 10 classes, eval mode; He-normal weights (so activations keep
  their scale through the layers and every layer moves the logits) and N(0, 0.1) biases."""
  torch.manual_seed(0)
  net = torchvision.models.alexnet(num_classes=NUM_CLASSES)
  for layer in net.modules():
    if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
      torch.nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')
      torch.nn.init.normal_(layer.bias, std=0.1)
  return net.eval()


def torch_logits(net, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(torch.from_numpy(np.array(images_nhwc)).permute(0, 3, 1, 2)).numpy()


def torch_fc7(net, images_nhwc: np.ndarray) -> np.ndarray:
  """classifier[:6]: fc7 after its ReLU (eval mode: the dropouts are the identity)."""
  with torch.no_grad():
    x = net.avgpool(net.features(torch.from_numpy(np.array(images_nhwc)).permute(0, 3, 1, 2)))
    return net.classifier[:6](torch.flatten(x, 1)).numpy()


def assert_close(got, want, rtol=2e-5):
  """Equal within float32 rounding, relative to the largest value."""
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.fixture(scope='module')
def net():
  return seeded_torchvision_alexnet()


@pytest.fixture(scope='module')
def converted(net):
  """(the state dict as `read_state_dict` gives it, its `torchvision_to_params`)."""
  state_dict = {name: t.numpy() for name, t in net.state_dict().items()}
  return state_dict, import_torchvision.torchvision_to_params(state_dict)


@pytest.fixture(scope='module')
def imported(tmp_path_factory, toy_image_folder, net):
  """torchvision's AlexNet saved with `torch.save(state_dict)` and imported into a
  workdir whose config reads the 10-class toy image folder."""
  root = tmp_path_factory.mktemp('torchvision')
  path = str(root / 'alexnet.pth')
  torch.save(net.state_dict(), path)
  config = torchvision_alexnet.get_config()
  config.update(
    dataset='image_folder',
    manual_dir=toy_image_folder,
    test_split='val',
    num_classes=NUM_CLASSES,
    eval_batch_size=8,
  )
  workdir = str(root / 'run')
  summary = import_torchvision.import_state_dict(path, workdir, config)
  return {'net': net, 'path': path, 'config': config, 'workdir': workdir, 'summary': summary}


def images(size, n=2, seed=1):
  """Normalised inputs of the scale torchvision's transforms give (about N(0, 1))."""
  return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def test_converted_params_compute_torchvisions_forward(net, converted):
  """torchvision's weights in `AlexNetOWT` give its logits at 224 px, on one device."""
  config = torchvision_alexnet.get_config()
  config.num_classes = NUM_CLASSES
  x = images(224)
  logits = steps.eval_apply(mesh_of(1, 1), steps.graphdefs(config)[1], converted[1])(
    converted[1], x
  )
  want = torch_logits(net, x)
  assert_close(logits, want)
  assert np.abs(want).max() > 1  # Logits that the weights move, not only the biases.


@pytest.mark.slow
def test_imported_logits_are_torchvisions_forward(imported):
  """The import, restored from its workdir, computes torchvision's logits at 224 px."""
  assert imported['summary']['parameters'] == 61_100_840 - 4096 * 990 - 990  # 10 classes.
  config = config_lib.load(imported['workdir'])
  assert (config.model, config.image_size, config.num_classes) == ('alexnet_owt', 224, 10)
  mesh = mesh_of(1, 1)
  params, step = checkpoints.restore_params(config, imported['workdir'], mesh)
  assert step == 0
  x = images(224)
  logits = steps.eval_apply(mesh, steps.graphdefs(config)[1], params)(params, x)
  assert_close(logits, torch_logits(imported['net'], x))


@pytest.mark.slow
def test_other_image_size_on_the_2x2_mesh_is_torchvisions(imported):
  """At 160 px (4×4 maps spread over 6×6 by the adaptive pool's overlapping bins), with
  the batch and every layer's maps split over the 2×2 mesh."""
  config = imported['config'].copy_and_resolve_references()
  config.image_size = 160
  mesh = mesh_of(2, 2)
  params, _ = checkpoints.restore_params(config, imported['workdir'], mesh)
  x = images(160, n=4)
  logits = steps.eval_apply(mesh, steps.graphdefs(config)[1], params)(
    params, sharding.global_batch(mesh, {'image': x})['image']
  )
  assert_close(logits, torch_logits(imported['net'], x))


def write_photo(path, shape=(200, 300, 3), seed=2):
  """A PNG with smooth structure (an upsampled random picture plus noise)."""
  rng = np.random.RandomState(seed)
  base = rng.randint(0, 256, (shape[0] // 10, shape[1] // 10, 3)).astype(np.uint8)
  pixels = np.asarray(Image.fromarray(base).resize((shape[1], shape[0]), Image.BILINEAR))
  pixels = np.clip(pixels + rng.randint(-20, 20, shape), 0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(path)
  return str(path)


@pytest.mark.parametrize('shape', [(200, 300, 3), (600, 450, 3)])
def test_eval_view_is_torchvisions_transform(tmp_path, shape):
  """configs/torchvision_alexnet.py's test view of a file (shorter side up or down to
  256, centre 224, mean and std) is torchvision's preset within one pixel level (the
  resized image is rounded to uint8 here, kept in float there)."""
  path = write_photo(tmp_path / 'photo.png', shape)
  ours = predict.load_image(path, torchvision_alexnet.get_config())
  theirs = TORCHVISION_EVAL(Image.open(path).convert('RGB')).permute(1, 2, 0).numpy()
  levels = np.abs(ours - theirs) * np.array([0.229, 0.224, 0.225]) * 255
  assert levels.max() <= 1.0 + 1e-3 and levels.mean() < 0.5


@pytest.mark.slow
def test_predict_and_features_of_a_file_are_torchvisions(imported, tmp_path, one_device):
  """predict's top-5 and features' fc7 of an image file are torchvision's on its view."""
  path = write_photo(tmp_path / 'photo.png')
  config = config_lib.for_workdir(imported['workdir'], None)
  pixels = predict.load_image(path, config)[None]
  [top5] = predict.predict_files(config, imported['workdir'], [path])
  probs = torch.softmax(torch.from_numpy(torch_logits(imported['net'], pixels)), -1).numpy()[0]
  assert [name for name, _ in top5] == [f'class{i}' for i in np.argsort(-probs)[:5]]
  np.testing.assert_allclose([p for _, p in top5], np.sort(probs)[::-1][:5], rtol=1e-4, atol=1e-6)

  mesh = sharding.create_mesh(config.mesh)
  params, _ = checkpoints.restore_params(config, imported['workdir'], mesh)
  fc7 = features.file_features(config, mesh, params, 'fc7', [path])
  assert_close(fc7, torch_fc7(imported['net'], pixels))


@pytest.mark.slow
def test_eval_of_the_imported_workdir_is_torchvisions(imported, one_device):
  """`--mode=eval`'s evaluation of the toy folder's 37 test images: torchvision's loss
  and top-1 on the same views."""
  config = config_lib.for_workdir(imported['workdir'], None)
  result = evaluate.evaluate_checkpoint(config, imported['workdir'])
  root = os.path.join(imported['config'].manual_dir, 'val')
  paths, labels = [], []
  for label, name in enumerate(sorted(os.listdir(root))):
    for file in sorted(os.listdir(os.path.join(root, name))):
      paths.append(os.path.join(root, name, file))
      labels.append(label)
  assert result['n_examples'] == len(paths) == helpers.NUM_FOLDER_TEST_IMAGES
  logits = torch.from_numpy(
    torch_logits(imported['net'], np.stack([predict.load_image(p, config) for p in paths]))
  )
  labels = torch.tensor(labels)
  loss = float(torch.nn.functional.cross_entropy(logits, labels))
  top1 = float((logits.argmax(-1) == labels).float().mean())
  assert result['loss'] == pytest.approx(loss, rel=1e-4)
  assert result['top1'] == pytest.approx(top1)


@pytest.mark.slow
def test_init_from_the_imported_workdir_copies_every_layer_but_a_new_fc8(imported, converted):
  """A fine-tune on 5 classes starts from the imported conv1-fc7; fc8 from config.init."""
  config = imported['config'].copy_and_resolve_references()
  config.update(num_classes=5, init_from=imported['workdir'])
  # A new run's initial parameters; zeros, as drawing 57M numbers would cost seconds.
  shapes = jax.eval_shape(lambda: steps.init_params(config, jax.random.key(3)))
  initial = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params, step = checkpoints.init_from(config, initial, mesh_of(1, 1))
  assert step == 0
  for layer in ('conv1', 'conv5', 'fc6', 'fc7'):
    np.testing.assert_array_equal(params[layer]['kernel'], converted[1][layer]['kernel'])
  assert params['fc8']['kernel'] is initial['fc8']['kernel']


def test_conversion_follows_pytorchs_layouts(converted):
  """Conv kernels OIHW → HWIO, Linear (out, in) → (in, out), fc6's rows from
  torchvision's (c, h, w) flatten to the model's (h, w, c)."""
  state_dict, params = converted
  conv2 = state_dict['features.3.weight']  # (192, 64, 5, 5).
  np.testing.assert_array_equal(params['conv2']['kernel'][1, 2, 3, 4], conv2[4, 3, 1, 2])
  fc6 = state_dict['classifier.1.weight']  # (4096, 256 · 6 · 6), inputs (c, h, w).
  c, h, w, out = 7, 2, 5, 11
  np.testing.assert_array_equal(
    params['fc6']['kernel'][(h * 6 + w) * 256 + c, out], fc6[out, c * 36 + h * 6 + w]
  )
  np.testing.assert_array_equal(params['fc8']['kernel'], state_dict['classifier.6.weight'].T)


def test_errors_are_one_line_and_nothing_is_written(converted, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config.model='alexnet' \(torchvision: 'alexnet_owt'\); "
    r'config.image_size=227 \(torchvision: 224\); config.pixel_mean=',
  ):
    import_torchvision.import_state_dict('absent.pth', str(workdir), imagenet.get_config())
  with pytest.raises(FileNotFoundError, match='absent.pth does not exist'):
    import_torchvision.read_state_dict(tmp_path / 'absent.pth')
  (tmp_path / 'junk.pth').write_bytes(b'not a zip or a pickle')
  with pytest.raises(ValueError, match='junk.pth is not a PyTorch state dict'):
    import_torchvision.read_state_dict(tmp_path / 'junk.pth')
  torch.save({'step': 3}, tmp_path / 'counter.pth')
  with pytest.raises(ValueError, match=r'counter.pth is not a PyTorch state dict \(a dict of'):
    import_torchvision.read_state_dict(tmp_path / 'counter.pth')
  state_dict = converted[0]
  renamed = {k.replace('classifier.6', 'classifier.7'): v for k, v in state_dict.items()}
  with pytest.raises(
    ValueError,
    match=r'missing: classifier.6.bias, classifier.6.weight; unexpected: classifier.7.bias',
  ):
    import_torchvision.torchvision_to_params(renamed)
  wrong = dict(state_dict, **{'features.3.weight': np.zeros((192, 96, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r'features.3.weight: expected shape \(192, 64, 5, 5\)'):
    import_torchvision.torchvision_to_params(wrong)
  assert not workdir.exists()
  monkeypatch.setitem(sys.modules, 'torch', None)  # As if not installed.
  with pytest.raises(ImportError, match=r'pip install -r requirements-bench.txt'):
    import_torchvision.read_state_dict(tmp_path / 'junk.pth')


@pytest.mark.slow
def test_an_import_needs_a_new_workdir_and_the_files_class_count(imported, tmp_path):
  path = imported['path']
  with pytest.raises(ValueError, match=r'10 classes \(classifier.6\) .* --config.num_classes=10'):
    import_torchvision.import_state_dict(
      path, str(tmp_path / 'run'), torchvision_alexnet.get_config()
    )
  assert not (tmp_path / 'run').exists()
  with pytest.raises(ValueError, match='is not empty: import into a new --workdir'):
    import_torchvision.import_state_dict(path, imported['workdir'], imported['config'])


@pytest.mark.slow
def test_the_command_writes_a_workdir_and_says_so(imported, tmp_path):
  workdir = tmp_path / 'cli'
  result = helpers.run_module(
    'alexnet_jax.import_torchvision',
    f'--state_dict={imported["path"]}',
    f'--workdir={workdir}',
    '--config.num_classes=10',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Wrote 57,044,810 parameters (10 classes) to {workdir}' in result.stdout
  assert checkpoints.has_checkpoint(str(workdir))
  result = helpers.run_module(
    'alexnet_jax.import_torchvision', f'--state_dict={imported["path"]}', f'--workdir={workdir}'
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('ValueError: ')
