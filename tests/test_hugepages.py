"""umd_jax/hugepages.py: when a process re-executes itself with glibc's huge-page tunable."""
import os
import subprocess
import sys

import pytest

from umd_jax import hugepages

GLIBC = ("glibc", "2.36")


def test_wanted_only_for_glibc_with_madvise_and_the_tunable_unset():
  assert hugepages.wanted({}, "madvise", GLIBC)
  assert hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
  assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC)  # the user's choice
  assert not hugepages.wanted({"UMD_JAX_HUGEPAGES": "0"}, "madvise", GLIBC)
  assert not hugepages.wanted({}, "always", GLIBC)   # the kernel already does it
  assert not hugepages.wanted({}, "never", GLIBC)
  assert not hugepages.wanted({}, "", GLIBC)
  assert not hugepages.wanted({}, "madvise", ("glibc", "2.34"))
  assert not hugepages.wanted({}, "madvise", ("", ""))  # musl, or unknown


def test_environment_appends_the_tunable_and_keeps_the_others():
  assert hugepages.environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_a_test_run_is_never_re_executed(monkeypatch):
  assert hugepages.embedded()  # pytest is imported here
  monkeypatch.setattr(hugepages, "wanted", lambda *a: True)
  monkeypatch.setattr(hugepages.os, "execve", lambda *a: pytest.fail("re-executed the test process"))
  hugepages.ensure()


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


@pytest.mark.skipif(not hugepages.wanted({}, hugepages.thp_mode(), __import__("platform").libc_ver()),
                    reason="this host's kernel or libc would not re-execute")
def test_a_process_re_executes_once_with_its_arguments():
  code = ("import os, sys; from umd_jax import hugepages; hugepages.ensure(); "
          "print(os.getpid(), sys.argv[1:], os.environ['GLIBC_TUNABLES'])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "UMD_JAX_HUGEPAGES")}
  out = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.split(" ", 1)[1].strip() == "['a', 'b'] glibc.malloc.hugetlb=1"
  off = subprocess.run([sys.executable, "-c", code.replace("os.environ['GLIBC_TUNABLES']", "os.environ.get('GLIBC_TUNABLES')")],
                       env={**env, "UMD_JAX_HUGEPAGES": "0"}, capture_output=True, text=True, check=True)
  assert off.stdout.strip().endswith("[] None")
