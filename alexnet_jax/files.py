"""Files that other jobs read: written whole or not at all, read tolerantly.

A kill (even `kill -9`) at any moment leaves either the old file or the new one, never
half of one; a JSON-lines file torn by a kill during an append loses only that line.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from absl import logging


@contextlib.contextmanager
def replaced(path: str, mode: str = 'w') -> Iterator[IO]:
  """Yields a file (`mode` 'w' or 'wb') that replaces `path` atomically once the block
  ends without an error: a temporary file in the same directory (created if missing),
  flushed to disk, then `os.replace` (atomic on POSIX). On an error it is removed and
  `path` is left as it was.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(
    mode, dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp', delete=False
  ) as f:
    try:
      yield f
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      os.unlink(f.name)
      raise
  os.chmod(f.name, 0o644)  # NamedTemporaryFile's 0o600 would hide it from other users.
  os.replace(f.name, path)


def write_text(path: str, text: str):
  """Replaces `path` by `text` atomically (`replaced`)."""
  with replaced(path) as f:
    f.write(text)


def write_json(path: str, value: Any, **dump_kwargs):
  """`write_text` of `json.dumps(value, indent=2, **dump_kwargs)`."""
  write_text(path, json.dumps(value, indent=2, **dump_kwargs) + '\n')


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The JSON objects of a JSON-lines file, one per line, in file order.

  A line that does not parse (the last one, torn by a kill during an append) is
  skipped with a warning naming the file and line, so that one lost line never
  loses the rest of a run's history.

  Raises:
    FileNotFoundError: if `path` does not exist.
  """
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if isinstance(row, dict):
        rows.append(row)
      else:
        logging.warning(
          'Skipping line %d of %s, cut short (a killed write?): %r', number, path, line
        )
  return rows
