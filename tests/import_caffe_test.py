"""Tests of the caffemodel reader and the bvlc_alexnet → AlexNet conversion against an
independent numpy forward pass of Caffe's deploy.prototxt."""

import dataclasses

from flax import nnx
import jax
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest
import tensorflow as tf

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import datasets
from alexnet_jax import import_caffe
from alexnet_jax import predict
from alexnet_jax import sharding
from alexnet_jax import steps
from configs import caffe_bvlc_alexnet
from configs import imagenet
from helpers import mesh_of
from alexnet_jax import models

# ---------------------------------------------------------------------------------
# Caffe's bvlc_alexnet forward pass (models/bvlc_alexnet/deploy.prototxt, TEST phase)
# in float64 numpy, NCHW, written from Caffe's layer sources, not from alexnet_jax.
# ---------------------------------------------------------------------------------

# deploy.prototxt: name → (num_output, in_channels / group, kernel, stride, pad, group).
CONV = {
  'conv1': (96, 3, 11, 4, 0, 1),
  'conv2': (256, 48, 5, 1, 2, 2),
  'conv3': (384, 256, 3, 1, 1, 1),
  'conv4': (384, 192, 3, 1, 1, 2),
  'conv5': (256, 192, 3, 1, 1, 2),
}
# One worker builds the module's 61M-weight fixture (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group('bvlc_alexnet')

FC = {'fc6': (4096, 256 * 6 * 6), 'fc7': (4096, 4096), 'fc8': (1000, 4096)}


def caffe_conv(x, weights, bias, stride, pad, group):
  """ConvolutionLayer: cross-correlation, output side (H + 2 pad - k) // stride + 1
  (conv_layer.cpp), im2col then one GEMM per group (base_conv_layer.cpp)."""
  out_channels, group_in, k, _ = weights.shape
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  # [N, C, OH, OW, k, k] → rows (n, oh, ow), columns (c, kh, kw) as Caffe's im2col.
  patches = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
  n, _, oh, ow = patches.shape[:4]
  outputs = []
  for g in range(group):
    cols = patches[:, g * group_in : (g + 1) * group_in].transpose(0, 2, 3, 1, 4, 5)
    w = weights[g * out_channels // group : (g + 1) * out_channels // group]
    outputs.append(cols.reshape(n * oh * ow, -1) @ w.reshape(len(w), -1).T)
  y = np.concatenate(outputs, axis=1).reshape(n, oh, ow, out_channels)
  return y.transpose(0, 3, 1, 2) + bias[None, :, None, None]


def caffe_lrn(a, local_size=5, alpha=1e-4, beta=0.75, k=1.0, groups=1):
  """LRNLayer ACROSS_CHANNELS (lrn_layer.cpp CrossChannelForward_cpu): scale = k +
  alpha / local_size * sum of a² over local_size channels centred on c, zero-padded,
  over all channels of the blob; out = a * scale^-beta. groups > 1 splits the
  channels first (a two-GPU reading, not Caffe's) to test the tower boundary."""
  outs = []
  for part in np.split(a, groups, axis=1):
    r = local_size // 2
    padded = np.pad(part**2, ((0, 0), (r, r), (0, 0), (0, 0)))
    window = sum(padded[:, i : i + part.shape[1]] for i in range(local_size))
    outs.append(part * (k + alpha / local_size * window) ** -beta)
  return np.concatenate(outs, axis=1)


def caffe_max_pool(x, kernel=3, stride=2):
  """PoolingLayer MAX (pooling_layer.cpp): pooled side ceil((H - k) / s) + 1."""
  side = x.shape[2]
  pooled = int(np.ceil((side - kernel) / stride)) + 1
  # Rounding up adds a clipped window only when (H - k) is not a multiple of s.
  assert pooled == (side - kernel) // stride + 1, side
  windows = sliding_window_view(x, (kernel, kernel), axis=(2, 3))
  windows = windows[:, :, ::stride, ::stride]
  return windows.max(axis=(4, 5))


def caffe_alexnet(images_bgr, weights, lrn_groups=1):
  """deploy.prototxt's logits (fc8, before `prob`) and LRN inputs.

  Args:
    images_bgr: float64 [N, 3, 227, 227], BGR, mean-subtracted.
    weights: name → (weights, bias) in Caffe's shapes, float64.
    lrn_groups: 1 for Caffe; 2 keeps each LRN window within a tower's channels.

  Returns:
    (logits [N, 1000], {'norm1': relu1 output, 'norm2': relu2 output}).
  """

  def conv_relu(x, name):
    _, _, _, stride, pad, group = CONV[name]
    return np.maximum(caffe_conv(x, *weights[name], stride, pad, group), 0)

  lrn_inputs = {}
  x = images_bgr
  for conv, norm in (('conv1', 'norm1'), ('conv2', 'norm2')):
    x = lrn_inputs[norm] = conv_relu(x, conv)  # relu1/relu2 are in-place on the conv top.
    x = caffe_max_pool(caffe_lrn(x, groups=lrn_groups))  # normN → poolN.
  x = caffe_max_pool(conv_relu(conv_relu(conv_relu(x, 'conv3'), 'conv4'), 'conv5'))
  x = x.reshape(len(x), -1)  # fc6 (InnerProduct) flattens (c, h, w).
  for name in ('fc6', 'fc7'):
    w, b = weights[name]
    x = np.maximum(x @ w.T + b, 0)  # drop6/drop7 are the identity in TEST.
  w, b = weights['fc8']
  return x @ w.T + b, lrn_inputs


# Weight standard deviations: conv1's and conv2's make the ReLU outputs' rms ~100 and
# so alpha/n * sum(a²) at the LRNs of order 1 (median ~0.7, asserted below): k = 1 vs
# 2, alpha vs alpha/n and the tower boundary all move the logits. The later layers'
# keep the activations' rms ~15-20 and the logits O(10), and the biases small enough
# that every layer's output depends on its input, not mostly on its bias.
WEIGHT_STD = {
  'conv1': 0.1,
  'conv2': 0.04,
  'conv3': 0.01,
  'conv4': 0.03,
  'conv5': 0.03,
  'fc6': 0.01,
  'fc7': 0.02,
  'fc8': 0.003,
}
BIAS_STD = {
  'conv1': 10,
  'conv2': 10,
  'conv3': 3,
  'conv4': 3,
  'conv5': 3,
  'fc6': 1,
  'fc7': 1,
  'fc8': 0.3,
}


def random_bvlc_weights(seed=0):
  """bvlc_alexnet-shaped random weights, float32, in Caffe's (unsqueezed) shapes.

  Uniform on 256 symmetric levels (random bytes, mean 0) rescaled to WEIGHT_STD:
  drawing 61M normals would cost 3 s of the test's time; biases are normal.
  """
  rng = np.random.RandomState(seed)
  shapes = {name: (out, group_in, k, k) for name, (out, group_in, k, *_) in CONV.items()}
  shapes.update(FC)
  weights = {}
  for name, shape in shapes.items():
    levels = np.frombuffer(rng.bytes(np.prod(shape)), np.int8).reshape(shape)
    scale = np.float32(WEIGHT_STD[name] / np.sqrt((256**2 - 1) / 12))
    weights[name] = [
      (levels.astype(np.float32) + np.float32(0.5)) * scale,
      (rng.randn(shape[0]) * BIAS_STD[name]).astype(np.float32),
    ]
  return weights


def alexnet_with(params, lrn):
  """`models.AlexNet(1000, image_size=227, lrn=lrn)` in eval mode holding `params`."""
  abstract = nnx.eval_shape(lambda: models.AlexNet(1000, image_size=227, lrn=lrn, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def relative_error(logits, reference):
  """The largest difference from the float64 reference, over its largest |logit|."""
  return float(np.abs(np.asarray(logits, np.float64) - reference).max() / np.abs(reference).max())


# float32 rounding, as README states it: measured 8e-7 on one device, 2.3e-6 on the
# 2 × 2 mesh (one image per device); the numpy reference run in float32 is 6e-7 off.
TOLERANCE = 5e-6
# What another LRN convention costs: 1.7e-2 (Caffe's constants within towers), 0.4.
FAR = 1e-2


@pytest.fixture(scope='module')
def bvlc(tmp_path_factory):
  """Random bvlc_alexnet weights written as a V1, legacy-shaped caffemodel like the
  2014 original, read back and converted; two images and Caffe's reference logits."""
  weights = random_bvlc_weights()
  path = tmp_path_factory.mktemp('caffe') / 'bvlc_alexnet.caffemodel'
  import_caffe.write_caffemodel(path, weights, v1=True, legacy_shape=True)
  blobs = import_caffe.read_caffemodel(path)
  params = import_caffe.caffe_to_params(blobs)
  # RGB NHWC, mean-subtracted pixel values; Caffe gets the same pixels as BGR NCHW.
  images = np.random.RandomState(1).uniform(-128, 128, (2, 227, 227, 3))
  images = images.astype(np.float32)
  images_bgr = images[..., ::-1].transpose(0, 3, 1, 2).astype(np.float64)
  weights64 = {name: [a.astype(np.float64) for a in arrays] for name, arrays in weights.items()}
  logits, lrn_inputs = caffe_alexnet(images_bgr, weights64)
  return dict(
    weights=weights,
    blobs=blobs,
    params=params,
    images=images,
    images_bgr=images_bgr,
    weights64=weights64,
    logits=logits,
    lrn_inputs=lrn_inputs,
  )


@pytest.mark.slow
def test_read_keeps_the_stored_legacy_shapes(bvlc):
  blobs, weights = bvlc['blobs'], bvlc['weights']
  assert list(blobs) == list(weights)
  assert [a.shape for a in blobs['fc6']] == [(1, 1, 4096, 9216), (1, 1, 1, 4096)]
  assert [a.shape for a in blobs['conv2']] == [(256, 48, 5, 5), (1, 1, 1, 256)]
  for name, (w, b) in weights.items():
    assert blobs[name][0].dtype == blobs[name][1].dtype == np.float32
    assert np.array_equal(blobs[name][0].reshape(w.shape), w), name
    assert np.array_equal(blobs[name][1].ravel(), b), name


@pytest.mark.slow
def test_lrn_inputs_make_the_normalization_matter(bvlc):
  """alpha/n * window sum of a² is of order 1 at both LRNs, so k, alpha's scaling and
  the window's extent all change the output."""
  for name, a in bvlc['lrn_inputs'].items():
    padded = np.pad(a**2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    term = 1e-4 / 5 * sum(padded[:, i : i + a.shape[1]] for i in range(5))
    assert 0.5 < np.median(term) < 5, (name, np.median(term))


@pytest.mark.slow
def test_converted_params_reproduce_caffe_logits(bvlc):
  logits = alexnet_with(bvlc['params'], 'caffe')(bvlc['images'])
  assert logits.shape == (2, 1000)
  assert 1 < np.abs(bvlc['logits']).max() < 100
  assert relative_error(logits, bvlc['logits']) < TOLERANCE


@pytest.mark.slow
def test_other_lrn_conventions_give_other_logits(bvlc):
  """The comparison sees the LRN convention: cuda-convnet's (k = 2, within towers) and
  Caffe's constants with the window kept within each tower both miss by far."""
  params, images, reference = bvlc['params'], bvlc['images'], bvlc['logits']
  cuda_convnet = alexnet_with(params, 'cuda-convnet')(images)
  assert relative_error(cuda_convnet, reference) > FAR
  model = alexnet_with(params, 'caffe')
  model.lrn = dataclasses.replace(model.lrn, across_towers=False)
  within_towers = model(images)
  assert relative_error(within_towers, reference) > FAR
  # ... and is what the reference computes with its LRN split at the tower boundary.
  split_reference, _ = caffe_alexnet(bvlc['images_bgr'], bvlc['weights64'], lrn_groups=2)
  assert relative_error(within_towers, split_reference) < TOLERANCE


@pytest.mark.slow
def test_params_have_the_model_shapes_and_load(bvlc):
  params = bvlc['params']
  abstract = nnx.eval_shape(lambda: models.AlexNet(1000, lrn='caffe', rngs=nnx.Rngs(0)))
  expected = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
    lambda x: (x.shape, x.dtype), expected
  )
  # conv1 takes RGB: its input channel 0 is Caffe's channel 2 (red in BGR).
  np.testing.assert_array_equal(
    params['conv1']['kernel'][:, :, 0, :], bvlc['weights']['conv1'][0][:, 2].transpose(1, 2, 0)
  )
  # fc6's row for pool5 (h, w, c) = (1, 2, 3) is Caffe's column c * 36 + h * 6 + w.
  np.testing.assert_array_equal(
    params['fc6']['kernel'][(1 * 6 + 2) * 256 + 3], bvlc['weights']['fc6'][0][:, 3 * 36 + 1 * 6 + 2]
  )


def small_bvlc_blobs(num_classes=10):
  """bvlc_alexnet's layers for 67 px (pool5 1×1, so fc6 has 256 inputs): only conv1
  and fc8 random, the rest zeros (cheap), in Caffe's shapes."""
  rng = np.random.RandomState(3)
  shapes = {name: (out, group_in, k, k) for name, (out, group_in, k, *_) in CONV.items()}
  shapes.update(fc6=(4096, 256), fc7=(4096, 4096), fc8=(num_classes, 4096))
  blobs = {
    name: [np.zeros(shape, np.float32), np.zeros(shape[0], np.float32)]
    for name, shape in shapes.items()
  }
  for name in ('conv1', 'fc8'):
    blobs[name] = [
      rng.randn(*shapes[name]).astype(np.float32),
      rng.randn(shapes[name][0]).astype(np.float32),
    ]
  return blobs


def test_fc8_of_any_class_count_and_other_image_sizes():
  blobs = small_bvlc_blobs(num_classes=10)
  params = import_caffe.caffe_to_params(blobs, image_size=67)
  np.testing.assert_array_equal(params['fc8']['kernel'], blobs['fc8'][0].T)
  np.testing.assert_array_equal(params['fc8']['bias'], blobs['fc8'][1])
  model = nnx.eval_shape(lambda: models.AlexNet(10, image_size=67, lrn='caffe', rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  assert model.fc8.kernel.shape == (4096, 10)
  assert model.fc6.kernel.shape == (256, 4096)
  np.testing.assert_array_equal(
    model.conv1.kernel[...], blobs['conv1'][0][:, ::-1].transpose(2, 3, 1, 0)
  )


@pytest.mark.parametrize('v1, legacy_shape', [(False, False), (False, True), (True, False)])
def test_round_trip_of_both_layer_fields_and_shape_encodings(tmp_path, v1, legacy_shape):
  rng = np.random.RandomState(4)
  blobs = {'conv': [rng.randn(4, 3, 2, 2), rng.randn(4)], 'ip': [rng.randn(5, 7)]}
  blobs = {name: [a.astype(np.float32) for a in arrays] for name, arrays in blobs.items()}
  path = tmp_path / 'net.caffemodel'
  import_caffe.write_caffemodel(path, blobs, v1=v1, legacy_shape=legacy_shape)
  read = import_caffe.read_caffemodel(str(path))
  assert list(read) == ['conv', 'ip']
  net = import_caffe.NetParameter.FromString(path.read_bytes())
  assert (len(net.layers), len(net.layer)) == ((2, 0) if v1 else (0, 2))
  expected_shapes = (
    ([(4, 3, 2, 2), (1, 1, 1, 4)], [(1, 1, 5, 7)])
    if legacy_shape
    else ([(4, 3, 2, 2), (4,)], [(5, 7)])
  )
  for (name, arrays), shapes in zip(blobs.items(), expected_shapes, strict=True):
    assert [a.shape for a in read[name]] == shapes
    for array, back in zip(arrays, read[name], strict=True):
      np.testing.assert_array_equal(back.reshape(array.shape), array)


def _varint(n):
  out = bytearray()
  while n > 0x7F:
    out.append(n & 0x7F | 0x80)
    n >>= 7
  return bytes(out + bytes([n]))


def _field(number, value):
  """One field's wire bytes: an int as a varint, bytes length-delimited."""
  if isinstance(value, int):
    return _varint(number << 3) + _varint(value)
  return _varint(number << 3 | 2) + _varint(len(value)) + value


def test_reads_hand_encoded_caffe_messages_and_skips_unknown_fields(tmp_path):
  """Wire bytes written from caffe.proto's field numbers, without this module's
  descriptors: a V1 layer and a new layer, with fields the subset leaves out."""
  floats = lambda *v: np.asarray(v, '<f4').tobytes()
  v1_blob = (
    _field(1, 1)
    + _field(2, 1)
    + _field(3, 2)
    + _field(4, 3)  # num..width
    + _field(5, floats(*range(6)))
  )  # data, packed.
  v1_layer = (
    _field(2, b'data')
    + _field(3, b'conv1')  # bottom, top.
    + _field(4, b'conv1')
    + _field(5, 4)  # name, type CONVOLUTION.
    + _field(6, v1_blob)  # blobs.
    + _field(10, _field(1, 96))
  )  # convolution_param { num_output }.
  blob = (
    _field(7, _field(1, _varint(2) + _varint(3)))  # shape { dim: packed }.
    + _field(8, np.asarray([0.5] * 6, '<f8').tobytes())
  )  # double_data.
  layer = (
    _field(1, b'fc')
    + _field(2, b'InnerProduct')
    + _field(3, b'x')
    + _field(7, blob)
    + _field(117, _field(1, 2))
  )  # inner_product_param.
  net = (
    _field(1, b'AlexNet')
    + _field(4, 10)  # name, input_dim.
    + _field(2, v1_layer)
    + _field(2, _field(4, b'relu1'))  # a layer without blobs.
    + _field(100, layer)
  )
  path = tmp_path / 'hand.caffemodel'
  path.write_bytes(net)
  blobs = import_caffe.read_caffemodel(path)
  assert list(blobs) == ['fc', 'conv1']  # `layer` first, then V1 `layers`.
  np.testing.assert_array_equal(blobs['conv1'][0], np.arange(6).reshape(1, 1, 2, 3))
  np.testing.assert_array_equal(blobs['fc'][0], np.full((2, 3), 0.5, np.float32))


def test_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    import_caffe.read_caffemodel(tmp_path / 'absent.caffemodel')
  for name, content in [
    ('random.bin', np.random.RandomState(5).bytes(1000)),
    ('deploy.prototxt', b'name: "AlexNet"\nlayer { name: "data" }\n'),
    ('empty.caffemodel', b''),
  ]:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=name):
      import_caffe.read_caffemodel(path)
  blob = import_caffe.BlobProto(data=[1.0, 2.0, 3.0])
  blob.shape.dim.extend([2, 2])
  net = import_caffe.NetParameter()
  net.layer.add(name='conv1').blobs.append(blob)
  path = tmp_path / 'short.caffemodel'
  path.write_bytes(net.SerializeToString())
  with pytest.raises(ValueError, match=r'conv1.* 3 values for its shape \(2, 2\)'):
    import_caffe.read_caffemodel(path)


def test_conversion_errors():
  blobs = small_bvlc_blobs()
  with pytest.raises(ValueError, match='missing: fc8; the blobs hold: conv1, .*fc7'):
    import_caffe.caffe_to_params({k: v for k, v in blobs.items() if k != 'fc8'}, image_size=67)
  # conv2 without `group: 2` (every output map reading all 96 inputs).
  ungrouped = [np.zeros((256, 96, 5, 5), np.float32), blobs['conv2'][1]]
  with pytest.raises(
    ValueError,
    match=r'conv2 weights: expected Caffe shape '
    r'\(256, 48, 5, 5\), found \(256, 96, 5, 5\)',
  ):
    import_caffe.caffe_to_params(dict(blobs, conv2=ungrouped), image_size=67)
  # 67 px weights in a 227 px model: fc6 expects 9216 inputs.
  with pytest.raises(ValueError, match=r'fc6 weights: .*\(4096, 9216\), found \(4096, 256\)'):
    import_caffe.caffe_to_params(blobs, image_size=227)
  with pytest.raises(ValueError, match='fc7: expected 2 blobs'):
    import_caffe.caffe_to_params(dict(blobs, fc7=blobs['fc7'][:1]), image_size=67)


@pytest.mark.slow
def test_imported_workdir_on_the_tower_mesh_and_predict(bvlc, tmp_path):
  """`import_caffemodel` writes a workdir whose checkpoint, restored onto the 2 × 2 mesh
  (Caffe's LRN then crosses between devices), gives Caffe's logits; predict names
  ImageNet synsets from TFDS's metadata, without the ImageNet tars."""
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  import_caffe.write_caffemodel(path, bvlc['weights'], v1=True, legacy_shape=True)
  config = caffe_bvlc_alexnet.get_config()
  config.data_dir = str(tmp_path / 'tfds')  # Empty: no ImageNet here.
  workdir = str(tmp_path / 'run')
  summary = import_caffe.import_caffemodel(str(path), workdir, config)
  assert summary['parameters'] == 60_965_224 and summary['num_classes'] == 1000
  assert config_lib.load(workdir).lrn == 'caffe'

  mesh = mesh_of(2, 2)
  params, step = checkpoints.restore_params(config, workdir, mesh)
  assert step == 0
  logits_fn = steps.eval_apply(mesh, steps.graphdefs(config)[1], params)
  logits = logits_fn(params, sharding.global_batch(mesh, {'image': bvlc['images']})['image'])
  assert relative_error(logits, bvlc['logits']) < TOLERANCE

  image = tmp_path / 'photo.png'
  tf.io.write_file(
    str(image), tf.io.encode_png(np.random.RandomState(2).randint(0, 256, (200, 300, 3), np.uint8))
  )
  [top5] = predict.predict_files(config_lib.for_workdir(workdir, None), workdir, [str(image)])
  pixels = predict.load_image(str(image), config)[None].repeat(2, axis=0)
  probs = np.asarray(
    jax.nn.softmax(logits_fn(params, sharding.global_batch(mesh, {'image': pixels})['image']))
  )[0]
  names = datasets.class_names(config)
  assert [name for name, _ in top5] == [names[i] for i in np.argsort(-probs)[:5]]
  assert all(name.startswith('n') and len(name) == 9 for name, _ in top5)  # Synsets.
  np.testing.assert_allclose([p for _, p in top5], np.sort(probs)[::-1][:5], rtol=1e-4)
  with pytest.raises(ValueError, match='import into a new'):
    import_caffe.import_caffemodel(str(path), workdir, config)


def test_import_refuses_other_conventions_naming_each_key(tmp_path):
  """configs/imagenet.py (cuda-convnet2's LRN, shorter-side resize, the paper's mean)
  would make bvlc_alexnet's weights compute another function: refused before the file
  is read, nothing written."""
  workdir = tmp_path / 'run'
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config.lrn='cuda-convnet' \(bvlc_alexnet: 'caffe'\); config.resize='shorter_side' "
    r"\(bvlc_alexnet: 'square'\); config.pixel_mean=\(123.68, 116.78, 103.94\)",
  ):
    import_caffe.import_caffemodel(
      str(tmp_path / 'missing.caffemodel'), str(workdir), imagenet.get_config()
    )
  assert not workdir.exists()
  # Caffe's conventions as Caffe's files state them (deploy.prototxt, create_imagenet.sh).
  config = caffe_bvlc_alexnet.get_config()
  assert (config.lrn, config.resize, config.resize_size, config.image_size) == (
    'caffe',
    'square',
    256,
    227,
  )
