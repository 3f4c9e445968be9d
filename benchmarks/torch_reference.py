"""The same AlexNet train step in PyTorch, timed like `train_throughput.py`, for comparison.

  pip install -r requirements-bench.txt
  python -m benchmarks.torch_reference --batch_size=64 --image_size=227 [--compile]
  python -m benchmarks.torch_reference --config=configs/fashion_mnist.py --num_classes=10 \
      --batch_size=128 --image_size=67

Grouped convolutions (groups=2) for the towers, LRN with PyTorch's alpha convention
(alpha * size, see `models.local_response_norm`), SGD momentum 0.9, weight decay 5e-4.
In the same run it times alexnet_jax's step (`train_throughput.py` in a subprocess,
same batch, size, classes and dtype) unless `--no_jax`. The last line is
machine-readable: images_per_sec=… [jax_images_per_sec=… jax_over_torch=…]
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def alexnet(num_classes: int, image_size: int) -> nn.Module:
  lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
  pool = lambda: nn.MaxPool2d(3, 2)
  side = (image_size - 11) // 4 + 1
  for _ in range(3):
    side = (side - 3) // 2 + 1
  return nn.Sequential(
    nn.Conv2d(3, 96, 11, stride=4),
    nn.ReLU(),
    lrn(),
    pool(),
    nn.Conv2d(96, 256, 5, padding=2, groups=2),
    nn.ReLU(),
    lrn(),
    pool(),
    nn.Conv2d(256, 384, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(384, 384, 3, padding=1, groups=2),
    nn.ReLU(),
    nn.Conv2d(384, 256, 3, padding=1, groups=2),
    nn.ReLU(),
    pool(),
    nn.Flatten(),
    nn.Linear(256 * side * side, 4096),
    nn.ReLU(),
    nn.Dropout(0.5),
    nn.Linear(4096, 4096),
    nn.ReLU(),
    nn.Dropout(0.5),
    nn.Linear(4096, num_classes),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=227)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--compile', action='store_true', help='torch.compile the model.')
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument(
    '--amp',
    action='store_true',
    help='bfloat16 autocast (fp32 weights); JAX then runs dtype=bfloat16.',
  )
  parser.add_argument(
    '--config',
    default='configs/imagenet.py',
    help='alexnet_jax config for the JAX side (its classes are overridden).',
  )
  parser.add_argument('--no_jax', action='store_true', help='Time PyTorch only.')
  args = parser.parse_args()
  jax_line = '' if args.no_jax else time_jax(args)

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = alexnet(args.num_classes, args.image_size).to(device)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  if args.compile:
    model = torch.compile(model)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(
    memory_format=memory_format
  )
  labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16, enabled=args.amp):
      logits = model(images)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    return loss

  step()  # Warm-up (and compilation).
  seconds = []
  for _ in range(args.windows):
    start = time.perf_counter()
    for _ in range(args.steps):
      loss = step()
    loss.item()  # Waits for the device.
    seconds.append((time.perf_counter() - start) / args.steps)
  step_time = statistics.median(seconds)
  images_per_sec = args.batch_size / step_time
  print(
    f'torch {torch.__version__} on {device} ({torch.get_num_threads()} threads), '
    f'batch {args.batch_size}, {args.image_size} px, compile={args.compile}, '
    f'channels_last={args.channels_last}, amp={args.amp}: {step_time * 1e3:.1f} ms per step'
  )
  if jax_line:
    jax_images_per_sec = float(dict(f.split('=') for f in jax_line.split())['images_per_sec'])
    jax_line = (
      f' jax_images_per_sec={jax_images_per_sec:.2f}'
      f' jax_over_torch={jax_images_per_sec / images_per_sec:.3f}'
    )
  print(f'images_per_sec={images_per_sec:.2f}{jax_line}')


def time_jax(args) -> str:
  """Last line of `train_throughput` run with the same settings in a subprocess."""
  command = [
    sys.executable,
    '-m',
    'benchmarks.train_throughput',
    f'--config={args.config}',
    f'--config.num_classes={args.num_classes}',
    f'--batch_size={args.batch_size}',
    f'--image_size={args.image_size}',
    f'--steps={args.steps}',
    f'--windows={args.windows}',
    f'--dtype={"bfloat16" if args.amp else "float32"}',
  ]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    sys.exit(f'{" ".join(command)} failed:\n{result.stderr}')
  print(result.stdout, end='')
  return result.stdout.strip().splitlines()[-1]


if __name__ == '__main__':
  main()
