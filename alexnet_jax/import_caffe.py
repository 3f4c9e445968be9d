"""Reads BVLC Caffe's `bvlc_alexnet.caffemodel` without Caffe (a caffe.proto subset built
at import) and converts its blobs into `AlexNet(lrn='caffe')` parameters, shapes checked.

  python -m alexnet_jax.import_caffe --caffemodel=bvlc_alexnet.caffemodel --workdir=DIR
"""

import os
import sys
from typing import Any

from absl import app
from absl import flags
from flax import nnx
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message
from google.protobuf import message_factory
import ml_collections
from ml_collections import config_flags
import numpy as np

from alexnet_jax import checkpoints
from alexnet_jax import config_lib
from alexnet_jax import layouts
from alexnet_jax import models

# deploy.prototxt's parameter layers, in order: two blobs each, weights and bias.
LAYERS = models.LAYERS
_CONV_LAYERS = LAYERS[:5]
# The config values under which the converted weights compute bvlc_alexnet's function
# (configs/caffe_bvlc_alexnet.py takes them from here). Any other value gives other
# logits from the same weights, so `import_caffemodel` refuses it.
CAFFE_CONVENTIONS = {
  'model': 'alexnet',
  # deploy.prototxt norm1/norm2: LRN across channels, local_size 5, alpha 1e-4 (divided
  # by local_size, lrn_layer.cpp), beta 0.75, k 1; one GPU: across all maps.
  'lrn': 'caffe',
  # examples/imagenet/create_imagenet.sh: convert_imageset --resize_height=256
  # --resize_width=256 warps each image to 256×256; train_val.prototxt crop_size 227.
  'resize': 'square',
  'resize_size': 256,
  'image_size': 227,
  # Pixels on the 0-255 scale minus the per-channel averages of
  # ilsvrc_2012_mean.binaryproto (R, G, B); no `scale` in transform_param.
  'pixel_mean': (122.67892, 116.66877, 104.00699),
  'pixel_std': (1.0, 1.0, 1.0),
}


def _caffe_proto_subset() -> dict[str, type[message.Message]]:
  """The message classes of caffe.proto (package caffe, proto2) this module reads.

  Field numbers and types are copied from BVLC/caffe src/caffe/proto/caffe.proto
  (master, 9b89154): BlobShape and BlobProto whole; of LayerParameter,
  V1LayerParameter and NetParameter only the fields read here. A parser keeps the
  fields left out (bottom, top, *_param, blobs_lr, ...) as unknown fields.
  """
  f = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(
    name='alexnet_jax/caffe_subset.proto', package='caffe', syntax='proto2'
  )

  def add(message_name, *fields):
    """fields: (name, number, type[, 'repeated' | 'packed'][, message type name])."""
    msg = proto.message_type.add(name=message_name)
    for name, number, kind, *rest in fields:
      field = msg.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL)
      if 'repeated' in rest or 'packed' in rest:
        field.label = f.LABEL_REPEATED
      if 'packed' in rest:
        field.options.packed = True
      if kind == f.TYPE_MESSAGE:
        field.type_name = '.caffe.' + rest[-1]

  add('BlobShape', ('dim', 1, f.TYPE_INT64, 'packed'))
  add(
    'BlobProto',
    ('shape', 7, f.TYPE_MESSAGE, 'BlobShape'),
    ('data', 5, f.TYPE_FLOAT, 'packed'),
    ('diff', 6, f.TYPE_FLOAT, 'packed'),
    ('double_data', 8, f.TYPE_DOUBLE, 'packed'),
    ('double_diff', 9, f.TYPE_DOUBLE, 'packed'),
    # The deprecated 4-D shape (num, channels, height, width) of pre-2015 models.
    ('num', 1, f.TYPE_INT32),
    ('channels', 2, f.TYPE_INT32),
    ('height', 3, f.TYPE_INT32),
    ('width', 4, f.TYPE_INT32),
  )
  add(
    'LayerParameter',
    ('name', 1, f.TYPE_STRING),
    ('type', 2, f.TYPE_STRING),
    ('blobs', 7, f.TYPE_MESSAGE, 'repeated', 'BlobProto'),
  )
  # caffe.proto declares `type` as enum LayerType; int32 has the same wire format and,
  # unlike a partial enum, keeps values this subset does not name.
  add(
    'V1LayerParameter',
    ('name', 4, f.TYPE_STRING),
    ('type', 5, f.TYPE_INT32),
    ('blobs', 6, f.TYPE_MESSAGE, 'repeated', 'BlobProto'),
  )
  add(
    'NetParameter',
    ('name', 1, f.TYPE_STRING),
    # The V1 field, deprecated in 2015 but what 2014 models such as bvlc_alexnet use.
    ('layers', 2, f.TYPE_MESSAGE, 'repeated', 'V1LayerParameter'),
    ('layer', 100, f.TYPE_MESSAGE, 'repeated', 'LayerParameter'),
  )
  # A pool of its own: no clash with a real caffe_pb2 imported by the same program.
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  classes = message_factory.GetMessageClassesForFiles([proto.name], pool)
  return {name.removeprefix('caffe.'): cls for name, cls in classes.items()}


_PROTO = _caffe_proto_subset()
BlobShape = _PROTO['BlobShape']
BlobProto = _PROTO['BlobProto']
LayerParameter = _PROTO['LayerParameter']
V1LayerParameter = _PROTO['V1LayerParameter']
NetParameter = _PROTO['NetParameter']
_DATA_FIELD = BlobProto.DESCRIPTOR.fields_by_name['data'].number


def _blob_array(blob: message.Message, layer: str, path: str) -> np.ndarray:
  """One BlobProto as float32, shaped and validated the way Caffe's Blob::FromProto
  (src/caffe/blob.cpp) reads it: the legacy 4-D fields win when any is set, and
  double_data, when present, replaces data."""
  if any(blob.HasField(f) for f in ('num', 'channels', 'height', 'width')):
    shape = (blob.num, blob.channels, blob.height, blob.width)
  else:
    shape = tuple(blob.shape.dim)
  values = blob.double_data if len(blob.double_data) else blob.data
  if len(values) != np.prod(shape, dtype=np.int64):
    raise ValueError(
      f'{path}: a blob of layer {layer!r} has {len(values)} values for its shape {shape}.'
    )
  return np.array(values, np.float32).reshape(shape)


def read_caffemodel(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
  """The trained blobs of a binary `.caffemodel` (a serialized caffe.NetParameter).

  Reads both the `layer` field (100, LayerParameter, Caffe since 2015) and the
  deprecated V1 `layers` field (2, V1LayerParameter) that bvlc_alexnet uses. Blobs
  keep their stored shape, nothing squeezed: a V1 InnerProduct's weights are legacy
  4-D `(1, 1, out, in)` and its bias `(1, 1, 1, out)`; conv weights are
  `(out, in / group, kh, kw)`. V0 models (before 2014) nest their layers in
  V1LayerParameter's `layer` field (1), which is not read: they hold no layer here.

  Args:
    path: the file.

  Returns:
    Layer name → its blobs (weights first, then bias) as float32 arrays, for the
    layers that have blobs, in file order.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming `path`, if it does not parse as a NetParameter, holds no layer
      with blobs or the same layer name twice, or a blob's data length is not its
      shape's size.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    content = f.read()
  net = NetParameter()
  try:
    net.ParseFromString(content)
  except message.DecodeError as e:
    raise ValueError(f'{path} is not a caffemodel (binary NetParameter): {e}') from e
  blobs = {}
  for layer in [*net.layer, *net.layers]:
    if not layer.blobs:
      continue
    if layer.name in blobs:
      raise ValueError(f'{path}: two layers named {layer.name!r} have blobs.')
    blobs[layer.name] = [_blob_array(b, layer.name, path) for b in layer.blobs]
  if not blobs:
    raise ValueError(f'{path} is not a caffemodel: no layer has blobs.')
  return blobs


def _packed_floats(field_number: int, array: np.ndarray) -> bytes:
  """A packed `repeated float` field's wire bytes (tag, length, little-endian floats):
  merging them is 20× faster than extending the repeated field from a list."""

  def varint(n):
    out = bytearray()
    while n > 0x7F:
      out.append(n & 0x7F | 0x80)
      n >>= 7
    return bytes(out + bytes([n]))

  raw = np.ascontiguousarray(array, '<f4').tobytes()
  return varint(field_number << 3 | 2) + varint(len(raw)) + raw


def write_caffemodel(
  path: str | os.PathLike,
  blobs: dict[str, list[np.ndarray]],
  *,
  v1: bool = True,
  legacy_shape: bool = False,
) -> None:
  """Writes `blobs` (layer name → arrays) as a binary caffemodel; for tests.

  Args:
    path: the file to write.
    blobs: as `read_caffemodel` returns; arrays are stored as float32.
    v1: store the layers in the V1 `layers` field (as bvlc_alexnet does), else in
      `layer`.
    legacy_shape: store shapes as num/channels/height/width, left-padded with 1s to
      4-D (as bvlc_alexnet does), else as `BlobShape`.

  Raises:
    ValueError: for `legacy_shape` and an array of more than 4 dimensions.
  """
  net = NetParameter()
  for name, arrays in blobs.items():
    layer = net.layers.add(name=name) if v1 else net.layer.add(name=name)
    for array in arrays:
      blob = layer.blobs.add()
      if legacy_shape:
        if array.ndim > 4:
          raise ValueError(f'Legacy blob shapes are 4-D; {name} has {array.shape}.')
        shape = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = shape
      else:
        blob.shape.dim.extend(array.shape)
      blob.MergeFromString(_packed_floats(_DATA_FIELD, array))
  with open(path, 'wb') as f:
    f.write(net.SerializeToString())


def _caffe_shape(name: str, array: np.ndarray, expected: tuple[int, ...], what: str) -> np.ndarray:
  """`array` as `expected` (Caffe's layout), dropping leading 1s of legacy 4-D blobs.

  Raises:
    ValueError: naming the layer, the expected and the found shape.
  """
  extra = array.ndim - len(expected)
  if extra >= 0 and all(d == 1 for d in array.shape[:extra]):
    if array.shape[extra:] == expected:
      return array.reshape(expected)
  raise ValueError(f'{name} {what}: expected Caffe shape {expected}, found {array.shape}.')


def caffe_to_params(
  blobs: dict[str, list[np.ndarray]], *, image_size: int = 227
) -> dict[str, dict[str, np.ndarray]]:
  """bvlc_alexnet's blobs as `AlexNet(num_classes, image_size=..., lrn='caffe')` params.

  Conversions, from Caffe's conventions (base_conv_layer.cpp, inner_product_layer.cpp,
  deploy.prototxt) to `models.AlexNet`'s:
    * conv weights `(out, in / group, kh, kw)` → HWIO `(kh, kw, in / group, out)`.
      conv2/4/5 are `group: 2`: Caffe's output maps `[:out // 2]` (group 0) read input
      maps `[:in // 2]`, which is `TowerConv`'s tower-local layout, so a transpose is all.
    * conv1's input channels reversed: Caffe's data layer feeds BGR (OpenCV's order,
      `channel_swap (2,1,0)` in the examples), the model takes RGB.
    * InnerProduct weights `(out, in)` (`transpose: false`, the default) → `(in, out)`.
    * fc6's inputs permuted: Caffe flattens pool5 `(C, H, W)` in (c, h, w) order, the
      model's `reshape` of NHWC in (h, w, c) order.
    * legacy 4-D blobs (`(1, 1, out, in)`, `(1, 1, 1, out)`) lose their leading 1s.
  fc8 may have any number of classes (its weights' row count). Layers other than
  `LAYERS` are ignored.

  The model then takes what deploy.prototxt's `data` takes (10×3×227×227, BGR, pixels
  on the 0-255 scale minus the ImageNet mean; python/caffe/imagenet/ilsvrc_2012_mean.npy,
  whose per-channel averages are B 104.01, G 116.67, R 122.68), but as RGB NHWC, and
  gives fc8's logits (deploy.prototxt's `prob` is their softmax). Caffe rounds pooled
  sizes up and `models.max_pool` down; they agree when every pooled map has an odd
  side, as at 227 px (55, 27, 13), the size bvlc_alexnet was trained at. Only
  bvlc_alexnet's order ReLU → LRN → pool fits the model: bvlc_reference_caffenet has
  the same layer names and shapes but pools before its LRN, so its weights convert
  without error yet the model would not compute CaffeNet.

  Args:
    blobs: as `read_caffemodel` returns: layer name → [weights, bias].
    image_size: the model's input side in pixels; fixes fc6's input size (227: 9216).

  Returns:
    `{'conv1': {'kernel': ..., 'bias': ...}, ..., 'fc8': {...}}`, float32 numpy arrays
    of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`'s shapes, ready for
    `nnx.replace_by_pure_dict`.

  Raises:
    ValueError: if a layer of `LAYERS` is missing (naming it and the layers present),
      has other than two blobs, or a blob's shape is not the model's (naming the
      layer, the expected and the found shape); or `image_size` is below 67.
  """
  missing = [name for name in LAYERS if name not in blobs]
  if missing:
    raise ValueError(
      f'bvlc_alexnet layer(s) missing: {", ".join(missing)}; the blobs '
      f'hold: {", ".join(blobs) or "no layer"}.'
    )
  for name in LAYERS:
    if len(blobs[name]) != 2:
      raise ValueError(f'{name}: expected 2 blobs (weights, bias), found {len(blobs[name])}.')
  fc8_weights = blobs['fc8'][0]
  if fc8_weights.ndim < 2:
    raise ValueError(
      f'fc8 weights: expected Caffe shape (classes, 4096), found {fc8_weights.shape}.'
    )
  model = nnx.eval_shape(
    lambda: models.AlexNet(
      fc8_weights.shape[-2], image_size=image_size, lrn='caffe', rngs=nnx.Rngs(0)
    )
  )
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  params = {}
  for name in LAYERS:
    kernel_shape = target[name]['kernel'].shape
    if name in _CONV_LAYERS:
      h, w, i, o = kernel_shape
      weights = _caffe_shape(name, blobs[name][0], (o, i, h, w), 'weights')
      if name == 'conv1':
        weights = weights[:, ::-1]  # BGR → RGB.
      kernel = layouts.conv_kernel(weights)
    else:
      fan_in, fan_out = kernel_shape
      weights = _caffe_shape(name, blobs[name][0], (fan_out, fan_in), 'weights')
      kernel = layouts.dense_kernel(
        weights, models.pool5_size(image_size) if name == 'fc6' else None
      )
    bias = _caffe_shape(name, blobs[name][1], target[name]['bias'].shape, 'bias')
    params[name] = {'kernel': kernel, 'bias': np.ascontiguousarray(bias, np.float32)}
  return params


def check_caffe_conventions(config: ml_collections.ConfigDict):
  """Refuses a config under which bvlc_alexnet's weights compute another function.

  Raises:
    config_lib.ConfigError: naming each key of `CAFFE_CONVENTIONS` that differs.
  """
  layouts.check_conventions(
    config, CAFFE_CONVENTIONS, 'bvlc_alexnet', 'configs/caffe_bvlc_alexnet.py'
  )


def import_caffemodel(
  caffemodel: str, workdir: str, config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """Writes `caffemodel`'s weights as checkpoint 0 of `workdir`, with `config.json`.

  `--mode=eval`, `alexnet_jax.predict` and `alexnet_jax.plots` then read `workdir`
  like a trained run's (the checkpoint holds the parameters only: no optimizer
  state to resume training from).

  Returns:
    {'workdir', 'num_classes', 'parameters'}.

  The workdir is written whole or not at all: built in a sibling temporary
  directory, then renamed, so a killed import leaves no config.json without its
  checkpoint.

  Raises:
    FileNotFoundError: if `caffemodel` does not exist.
    config_lib.ConfigError: if `config` differs from `CAFFE_CONVENTIONS` (naming
      each key), before anything is read.
    ValueError: for a file that is not a bvlc_alexnet caffemodel, an fc8 whose class
      count differs from `config.num_classes`, or a workdir that is not empty.
  """
  check_caffe_conventions(config)
  checkpoints.check_import_workdir(workdir)
  params = caffe_to_params(read_caffemodel(caffemodel), image_size=config.image_size)
  num_classes = params['fc8']['bias'].shape[0]
  if num_classes != config.num_classes:
    raise ValueError(
      f'{caffemodel} has {num_classes} classes (fc8) but config.num_classes={config.num_classes}.'
    )
  workdir = checkpoints.write_imported_workdir(workdir, params, config)
  return {
    'workdir': workdir,
    'num_classes': num_classes,
    'parameters': sum(x.size for p in params.values() for x in p.values()),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  try:
    config_lib.validate(config)
    summary = import_caffemodel(flags.FLAGS.caffemodel, flags.FLAGS.workdir, config)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'{type(e).__name__}: {e}')
  print(
    f'Wrote {summary["parameters"]:,} parameters ({summary["num_classes"]} classes) '
    f'to {summary["workdir"]}; evaluate with: python -m alexnet_jax.main --mode=eval '
    f'--workdir={summary["workdir"]} --config.manual_dir=IMAGENET_TARS'
  )


if __name__ == '__main__':
  flags.DEFINE_string('caffemodel', None, 'bvlc_alexnet.caffemodel.', required=True)
  flags.DEFINE_string(
    'workdir', None, 'Where to write the checkpoint and config.json.', required=True
  )
  config_flags.DEFINE_config_file(
    'config',
    'configs/caffe_bvlc_alexnet.py',
    "Caffe's network and preprocessing.",
    lock_config=True,
  )
  app.run(main)
