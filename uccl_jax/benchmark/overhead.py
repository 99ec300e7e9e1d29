"""The SBU+CKR overhead: uccl's step time over unimatch's (the paper's Table III: +29%).

Why a module of its own: on a shared machine two medians taken minutes apart
differ by more than the overhead, so the figure to quote is the interleaved
one measured here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from uccl_jax.benchmark import timing
from uccl_jax.benchmark.random_inputs import random_state_and_batch
from uccl_jax.benchmark.step_report import progress


def interleaved_overhead(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                         rounds: int, warmup: int = 1) -> dict[str, Any]:
  """The SBU+CKR overhead with unimatch and uccl steps timed in alternation.

  Why: timed one method after the other, the two medians see different
  minutes of a shared machine (on this project's 2-core CPU the drift between
  runs exceeds the overhead: docs/RESULTS.md section 3), which swamps an
  overhead of a few percent. Here both steps are compiled side by side and
  each round times one step of each, in the order AB then BA, so drift hits
  both alike. overhead_percent is the median over rounds of
  100 * (uccl / unimatch - 1); the per-method medians come along.
  """
  host_state, host_batch = random_state_and_batch(config)
  programs = {}
  for method in ('unimatch', 'uccl'):
    progress(f'overhead: compiling {method} for interleaved timing ...')
    compiled, state, batch, _ = timing.compiled_step(timing.method_config(config, method), devices,
                                                     host_state, host_batch)
    programs[method] = [compiled, state, batch]

  def one_step(method: str) -> float:
    compiled, state, batch = programs[method]
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    programs[method][1] = state
    return time.perf_counter() - start

  for _ in range(max(warmup, 1)):
    for method in programs:
      one_step(method)
  times: dict[str, list[float]] = {'unimatch': [], 'uccl': []}
  for index in range(rounds):
    for method in (('unimatch', 'uccl') if index % 2 == 0 else ('uccl', 'unimatch')):
      times[method].append(one_step(method))
  ratios = [b / a for a, b in zip(times['unimatch'], times['uccl'])]
  return {'rounds': rounds, 'unimatch_step_time_s': statistics.median(times['unimatch']),
          'uccl_step_time_s': statistics.median(times['uccl']),
          'overhead_percent': 100.0 * (statistics.median(ratios) - 1.0),
          'overhead_percent_quartiles': [100.0 * (q - 1.0) for q in _quartiles(ratios)],
          'anchors': str(config.unsup.anchors)}


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
  if len(values) < 2:
    return values[0], values[0]
  quartiles = statistics.quantiles(values, n=4)
  return quartiles[0], quartiles[2]


def overhead_percent(records: Sequence[dict[str, Any]]) -> float | None:
  """(uccl - unimatch) / unimatch step time in percent, when both were timed."""
  times = {r['method']: r['step_time_s'] for r in records}
  if times.get('uccl') and times.get('unimatch'):
    return 100.0 * (times['uccl'] - times['unimatch']) / times['unimatch']
  return None

