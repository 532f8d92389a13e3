"""Test set-up: 8 fake CPU devices (set before JAX is imported) and tiny configs."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# JAX's "disable most optimizations" (LLVM at -O0, no expensive passes), here and in the processes
# the tests start: most test programs are compiled for a few calls, so compiling, not running, is
# most of their time. The last bits can move: since the head-major attention the same-seed state
# differs bitwise between the two levels (observed; which op was not looked into), so
# test_same_seed takes the `optimized` fixture, as do the tests whose time is running programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# glibc's malloc makes up to 8 arenas per core for XLA's threads, and memory freed in one is not
# reused by another: 2 arenas cut a process's peak by ~20% at the same speed (the FID and sampling
# tests: 2.07 -> 1.69 GB). The variable reaches the processes the tests start; this one is set below.
os.environ.setdefault("MALLOC_ARENA_MAX", "2")

import ctypes  # noqa: E402
import gc  # noqa: E402
import tempfile  # noqa: E402

try:
  _LIBC = ctypes.CDLL("libc.so.6")
  _LIBC.mallopt(-8, int(os.environ["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX, before XLA starts its threads
except (OSError, AttributeError, ValueError):  # not glibc (macOS, musl)
  _LIBC = None

import jax  # noqa: E402
import pytest  # noqa: E402

# Several tests compile the same tiny step (resume, preemption): share compiled programs.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "umd_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from configs import common  # noqa: E402


def tiny_config(method: str = "umd", **overrides):
  """A config that compiles and runs in seconds on CPU: Mu/2 on the 8×8 digits."""
  c = common.base_config(method)
  c.batch_size = 16
  c.total_steps = 4
  c.log_every = 2
  c.checkpoint_every = 2
  c.image_every = 1000
  c.data.name = "digits"
  c.data.eval_split = "test"
  c.data.image_size = 8
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.crop_area_min = 1.0
  c.data.flip = False
  c.data.num_workers = 0
  c.model.variant = "Mu/2"
  c.model.scan_layers = False
  c.optim.base_lr = 2e-3
  if method == "diffmae":  # a decoder as small as the Mu encoder (width 32)
    c.diffmae.decoder_width, c.diffmae.decoder_depth, c.diffmae.decoder_heads = 32, 2, 2
  return with_values(common.finalize(c), overrides)


def with_values(c, values: dict):
  """`c` with each dotted key of `values` set (a locked config stays locked: keys must exist)."""
  for key, value in values.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def optimized():
  """XLA's full optimizations for a test that runs its programs for minutes (see above)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def one_device():
  return jax.devices()[:1]


# --- two speeds: `make test` runs everything (CI); `make test-fast` (-m "not slow") the unit tests ---
# Whole modules that start processes (the CLI, 2-process runs, the reproduction script) and the
# end-to-end tests of otherwise fast modules are "slow".
SLOW_MODULES = {"test_distributed", "test_bad_inputs", "test_loop", "test_main", "test_reproduce", "test_multihost",
                "test_workdir", "test_same_seed"}
# ...and the end-to-end tests of otherwise fast modules (from `pytest --durations=0`: >= 4 s each).
SLOW_TESTS = {
    "test_a_converted_dit_fine_tunes_into_a_classifier",
    "test_a_full_disk_ends_a_run_with_the_error_as_its_last_line",
    "test_a_full_disk_in_generate_and_probe_is_one_line_and_leaves_the_last_set",
    "test_a_damaged_init_from_is_refused_before_the_workdir_exists",
    "test_a_non_finite_loss_stops_without_saving",
    "test_classify_end_to_end_results_and_exact_resume",
    "test_clips_pretrain_probe_and_classify_end_to_end",
    "test_clip_sampling_and_inpainting_end_to_end",
    "test_a_folder_of_videos_pretrains_and_classifies_with_several_views",
    "test_a_clip_config_on_an_image_checkpoint_is_one_line_naming_the_frames",
    "test_the_video_experiment_runs_every_stage_and_resumes",
    "test_classify_reads_unread_parameters_back_unchanged",
    "test_class_conditional_fine_tuning_from_an_unconditional_sit",
    "test_colab_notebook_runs_top_to_bottom",
    "test_damaged_checkpoint_is_named_and_the_previous_one_is_used",
    "test_demo_lowers_the_loss",
    "test_features_identical_on_one_and_eight_devices",
    "test_fid_during_generation_with_local_weights",
    "test_fid_evaluator_inside_finetuning",
    "test_fine_tuning_the_demo_beats_its_linear_probe",
    "test_finetune_starts_from_pretrained_weights_with_a_new_label_embedding",
    "test_flipped_bytes_in_the_arrays_fall_back_to_the_previous_step",
    "test_gradient_accumulation_equals_the_full_batch_update",
    "test_gradient_accumulation_on_one_device_same_update_less_memory_and_checks",
    "test_latent_run_end_to_end",
    "test_pretrain_probe_and_inpaint_end_to_end",
    "test_probe_names_the_step_it_read_and_caches_by_every_setting",
    "test_remat_lowers_temporary_memory",
    "test_resuming_past_a_damaged_step_from_the_command_line_is_quiet",
    "test_resuming_with_a_different_model_lists_the_parameters_and_moves_nothing",
    "test_resuming_with_another_objective_schedule_or_optimizer_is_refused",
    "test_sigterm_during_generate_leaves_the_previous_set_whole",
    "test_sigterm_saves_and_returns_then_resume_finishes",
    "test_sit_on_the_umd_network_trains_samples_probes_and_counts_its_flops",
    "test_sit_trains_samples_with_every_sampler_and_probes",
    "test_skip_policy_drops_bad_updates_then_stops_after_max_skips",
    "test_train_step_rows_are_consistent",
    "test_xla_options_split_from_config_overrides_and_reach_the_compiler",
}


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: processes, multi-process and end-to-end runs (skipped by make test-fast)")


# `make test` runs the modules on 2 workers (pytest-xdist, `--dist loadfile`: a module's fixtures are
# built once), handing each free worker the next module of this order: the longest first (CPU
# seconds of a cold run), so no long module starts last while the other worker idles.
LONGEST_FIRST = ["test_distributed", "test_classify", "test_train", "test_reproduce", "test_generate", "test_latent",
                 "test_diffmae", "test_checkpoint", "test_probe", "test_bad_inputs", "test_bench", "test_main",
                 "test_dit", "test_sit", "test_lpips", "test_loop", "test_model"]


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _module(item) in SLOW_MODULES or item.originalname in SLOW_TESTS:
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: a module's own order is kept


def _module(item) -> str:
  return item.module.__name__.rsplit(".", 1)[-1]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop each module's compiled programs when it ends (they stay in the on-disk compile cache):
  the suite's memory is that of one module at a time, not the sum of all of them."""
  yield
  jax.clear_caches()
  gc.collect()
  _trim_heap()


@pytest.fixture(autouse=True)
def _trim_heap_after_each_test():
  """Hand the heap a test freed back to the system: glibc keeps it otherwise, and a worker idles at
  its last peak beside the other worker's (the FID tests: 1.27 GB between tests, 0.58 GB trimmed)."""
  yield
  _trim_heap()


def _trim_heap():
  if _LIBC is not None:
    _LIBC.malloc_trim(0)
