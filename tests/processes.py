"""Child processes for the tests, with deadlines that detect a hang, not slowness.

A wait fails when the processes it watches used no CPU for HANG_SECONDS together (stuck in a
collective, a lock or a read), or ran past SLOWER times `idle_seconds` (what they take on an idle
2-core machine): a machine running another job of the suite's size beside it still passes, and a
hang still ends the test in minutes. Output goes to files, so no full pipe can stall a process.
"""
import contextlib
import os
import subprocess
import tempfile
import time

HANG_SECONDS = 180  # no CPU progress this long is a hang, however loaded the machine
SLOWER = 5          # ...and no run may take more than 5x its idle-machine time


def cpu_seconds(pids) -> float:
  """CPU time (user + system) the processes have used so far, from /proc (0 where unreadable)."""
  total = 0.0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
      pass
  return total


class Watch:
  """Progress of a group of processes: `check()` raises AssertionError on a hang or past the deadline."""

  def __init__(self, procs, idle_seconds: float, describe=lambda: ""):
    self.procs, self.idle_seconds, self.describe = list(procs), idle_seconds, describe
    self.start = self.last_progress = time.monotonic()
    self.last_cpu = 0.0

  def check(self) -> None:
    now, cpu = time.monotonic(), cpu_seconds([p.pid for p in self.procs])
    if cpu > self.last_cpu + 0.5:
      self.last_cpu, self.last_progress = cpu, now
    assert now - self.last_progress < HANG_SECONDS, (
        f"processes used no CPU for {HANG_SECONDS} s (a hang): " + self.describe())
    assert now - self.start < SLOWER * self.idle_seconds, (
        f"processes ran past {SLOWER}x their {self.idle_seconds} s: " + self.describe())


def wait_until(condition, procs, idle_seconds: float, describe=lambda: "") -> None:
  """Poll `condition()` until it holds; fails on a hang, past the deadline, or if a process exits first."""
  watch = Watch(procs, idle_seconds, describe)
  while not condition():
    assert all(p.poll() is None for p in procs), "a process ended before the condition held: " + describe()
    watch.check()
    time.sleep(0.05)


def wait(procs, idle_seconds: float, describe=lambda: "") -> None:
  """Wait for every process to exit (whatever its status), failing on a hang or past the deadline."""
  watch = Watch(procs, idle_seconds, describe)
  while any(p.poll() is None for p in procs):
    watch.check()
    time.sleep(0.1)


@contextlib.contextmanager
def started(command, logdir=None, tag="", **popen_kwargs):
  """Popen(command) with stdout / stderr to LOGDIR/out{tag}.txt and err{tag}.txt (`logdir`: a
  temporary folder by default); yields (process, read) where read("out" | "err") returns the
  output so far. Always reaped."""
  with contextlib.ExitStack() as stack:
    if logdir is None:
      logdir = stack.enter_context(tempfile.TemporaryDirectory())
    os.makedirs(logdir, exist_ok=True)
    paths = {k: os.path.join(logdir, f"{k}{tag}.txt") for k in ("out", "err")}
    out, err = (stack.enter_context(open(paths[k], "w")) for k in ("out", "err"))
    proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, **popen_kwargs)

    def read(kind):
      with open(paths[kind], errors="replace") as f:
        return f.read()
    try:
      yield proc, read
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()


def run(command, idle_seconds: float = 60, **popen_kwargs) -> subprocess.CompletedProcess:
  """subprocess.run(command, capture_output=True, text=True) with a hang deadline instead of a timeout."""
  with started(command, **popen_kwargs) as (proc, read):
    wait([proc], idle_seconds, lambda: read("err")[-2000:])
    return subprocess.CompletedProcess(command, proc.returncode, read("out"), read("err"))


@contextlib.contextmanager
def small_disk(path, size: str):
  """A tmpfs of `size` ("8m") mounted at `path` for the block (the test is skipped where mounting is
  not allowed); unmounted after."""
  import pytest  # noqa: PLC0415 - only the tests that mount need it
  path.mkdir(exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


def fill_disk(path, free_bytes: int) -> None:
  """Leave `free_bytes` free on the filesystem of `path` (a filler file in it)."""
  stat = os.statvfs(path)
  (path / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - free_bytes))
