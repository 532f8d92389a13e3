"""TensorBoard event files (scalars, images, hyperparameters) without TensorFlow.

What `tf.summary` writes, built from the `tensorboard` package's protos and record format:
scalars as float32 tensors under the "scalars" plugin, images as [width, height, PNG...]
string tensors under "images", the hyperparameters as one hparams-plugin summary. Importing
TensorFlow (what clu's SummaryWriter does) costs every process ~4 s of start-up, and
accelerator images often lack it; TensorBoard and `tf.compat.v1.train.summary_iterator`
read these files as they read TensorFlow's.
"""
import concurrent.futures
import os
import socket
import time

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from umd_jax import images


class Writer:
  """Appends events to LOGDIR/events.out.tfevents.<time>.<host>.<pid>.v2 from one background
  thread, so a slow filesystem does not stall training; a failed write raises at the next write
  or at `flush()` (a full disk ends the run with it)."""

  def __init__(self, logdir):
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"
    self._records = RecordWriter(self.path.open("wb"))
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="events")
    self._pending = []
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    def write(record):
      self._records.write(record)
      self._records.flush()  # an event is on disk once written: a killed run keeps its curves
    for future in [f for f in self._pending if f.done()]:  # finished writes: their error now, not at the end
      self._pending.remove(future)
      future.result()
    self._pending.append(self._thread.submit(write, event.SerializeToString()))

  def _summary(self, step: int, values) -> None:
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars) -> None:
    metadata = scalar_metadata.create_summary_metadata(display_name=None, description=None)
    self._summary(step, [summary_pb2.Summary.Value(tag=k, metadata=metadata,
                                                   tensor=tensor_util.make_tensor_proto(np.float32(v)))
                         for k, v in scalars.items()])

  def write_images(self, step: int, images_) -> None:
    """images_: {tag: (N, H, W, C) uint8}, C = 1 or 3."""
    metadata = image_metadata.create_summary_metadata(display_name=None, description=None)
    values = []
    for k, batch in images_.items():
      batch = np.asarray(batch)
      strings = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode()] + [images.png_bytes(x) for x in batch]
      values.append(summary_pb2.Summary.Value(tag=k, metadata=metadata,
                                              tensor=tensor_util.make_tensor_proto(strings, dtype=np.object_)))
    self._summary(step, values)

  def write_hparams(self, hparams) -> None:
    """hparams: {name: bool | int | float | str}, e.g. the flattened config."""
    self._write(event_pb2.Event(wall_time=time.time(), summary=hparams_summary.hparams_pb(dict(hparams))))

  def flush(self) -> None:
    pending, self._pending = self._pending, []
    for future in pending:
      future.result()  # raises the write's error, if any

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self._thread.shutdown()
      self._records.close()


class NullWriter:
  """The writer of the processes that do not write events (all but process 0): same calls, no files."""

  def write_scalars(self, step, scalars): pass
  def write_images(self, step, images_): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass
