"""Host memory in transparent huge pages: XLA:CPU's per-step buffers without 4 KiB page faults.

XLA:CPU allocates a compiled step's temporaries (`memory_analysis().temp_size_in_bytes`: GiBs at
ImageNet sizes) through malloc on every call, and glibc serves requests that large with a fresh
mmap, so the kernel zero-fills each 4 KiB page on first touch and unmaps it after the step. On a
2-core host, UMD-S/4 at 64 px, batch 64 took 2.45 million page faults and 4.3 s of system time per
9.4 s step (BENCHMARKS.md, "Host memory"). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc
ask for transparent huge pages (madvise), 2 MiB a fault: 10 thousand faults, 0.8 s, 7.3 s a step.
Nothing else changes: the same buffers, values and peak memory.

Tunables are read when a process starts, so `ensure()` re-executes the process once with the
tunable added. It does so only on Linux with glibc >= 2.35 and the kernel's THP mode `madvise` (with
`always` the kernel already backs large mappings with huge pages; with `never` the tunable does
nothing), when the tunable is not set yet, unless UMD_JAX_HUGEPAGES=0, and never in a notebook kernel,
an interactive interpreter or under pytest. Call it before anything
else (main.py and the benchmarks do): a re-executed process starts over, with the same pid,
arguments, environment and open files.
"""
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE) -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or "" if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def wanted(environ, mode: str, libc: tuple) -> bool:
  """Whether a process with this environment, THP mode and (libc name, version) should re-execute."""
  name, version = libc
  try:
    new_enough = name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    new_enough = False
  return (environ.get("UMD_JAX_HUGEPAGES", "1") != "0" and TUNABLE not in environ.get("GLIBC_TUNABLES", "")
          and mode == "madvise" and new_enough)


def environment(environ) -> dict:
  """`environ` with the tunable appended to GLIBC_TUNABLES (other tunables kept)."""
  current = environ.get("GLIBC_TUNABLES", "")
  return {**environ, "GLIBC_TUNABLES": (current + ":" if current else "") + f"{TUNABLE}=1"}


def embedded() -> bool:
  """Inside a notebook kernel, an interactive interpreter or a test run: never re-execute those."""
  return bool(sys.flags.interactive or hasattr(sys, "ps1") or {"ipykernel", "pytest"} & set(sys.modules))


def ensure() -> None:
  """Re-execute this process with glibc's huge-page tunable when it helps (see the module doc)."""
  if sys.platform != "linux" or not wanted(os.environ, thp_mode(), platform.libc_ver()) or embedded():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environment(os.environ))
