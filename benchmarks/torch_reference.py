"""The same AlexNet train step in PyTorch, timed like `train_throughput.py`, side by side.

  pip install -r requirements-bench.txt
  python -m benchmarks.torch_reference --batch_size=64 --image_size=227
  python -m benchmarks.torch_reference --config=configs/fashion_mnist.py --num_classes=10 \
      --batch_size=128 --image_size=67 [--rounds=2]

Each round times alexnet_jax's step (`train_throughput.py` in a subprocess, same batch,
size, classes and dtype), then PyTorch in every `--variants` configuration: 'eager',
'compile' (`torch.compile`, inductor) and 'compile_channels_last'; and prints the ratio
of JAX to the best of them. The PyTorch model: grouped convolutions (groups=2) for the
towers, LRN in the default 'cuda-convnet' convention (PyTorch's `LocalResponseNorm`
divides alpha by the size, as cuda-convnet2: alpha=1e-4, k=2), SGD momentum 0.9,
weight decay 5e-4. The last line is machine-readable: jax_images_per_sec=…
best_torch_images_per_sec=… jax_over_best_torch=…
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def alexnet(num_classes: int, image_size: int) -> nn.Module:
  lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
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


VARIANTS = {
  'eager': {'torch_compile': False, 'channels_last': False},
  'compile': {'torch_compile': True, 'channels_last': False},
  'compile_channels_last': {'torch_compile': True, 'channels_last': True},
}


def time_torch(args, *, torch_compile: bool, channels_last: bool) -> float:
  """img/s of the PyTorch step (median of `--windows` windows, after a warm-up)."""
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = alexnet(args.num_classes, args.image_size).to(device)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  if torch_compile:
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
  step()
  seconds = []
  for _ in range(args.windows):
    start = time.perf_counter()
    for _ in range(args.steps):
      loss = step()
    loss.item()  # Waits for the device.
    seconds.append((time.perf_counter() - start) / args.steps)
  return args.batch_size / statistics.median(seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=227)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=1, help='JAX, then every variant, N times.')
  parser.add_argument('--variants', default=','.join(VARIANTS), help='PyTorch configurations.')
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
  args = parser.parse_args()
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  print(
    f'torch {torch.__version__} on {device} ({torch.get_num_threads()} threads), '
    f'batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, amp={args.amp}'
  )
  for round_index in range(args.rounds):
    jax_line = time_jax(args)
    jax_images_per_sec = float(dict(f.split('=') for f in jax_line.split())['images_per_sec'])
    torch_images_per_sec = {}
    for name in args.variants.split(','):
      torch_images_per_sec[name] = time_torch(args, **VARIANTS[name])
      print(f'round {round_index + 1}: torch {name}: {torch_images_per_sec[name]:.2f} img/s')
    best = max(torch_images_per_sec, key=torch_images_per_sec.get)
    print(
      f'round {round_index + 1}: alexnet_jax {jax_images_per_sec:.2f} img/s, best torch '
      f'({best}) {torch_images_per_sec[best]:.2f} img/s'
    )
  print(
    f'jax_images_per_sec={jax_images_per_sec:.2f} '
    f'best_torch_images_per_sec={torch_images_per_sec[best]:.2f} '
    f'jax_over_best_torch={jax_images_per_sec / torch_images_per_sec[best]:.3f}'
  )


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
