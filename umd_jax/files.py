"""Output files written whole: to a temporary name beside the target, then renamed over it, so a
failed or interrupted run never leaves a half-written file and never destroys the last good one
before the new one is complete. Paths may be local or remote (etils epath)."""
import io
import os

import numpy as np
from etils import epath


def write_bytes(path, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(path)  # atomic on a local filesystem; a copy-then-delete on object stores


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode())


def write_npz(path, **arrays) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())
