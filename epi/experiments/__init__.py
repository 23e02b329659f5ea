"""Experiments: a run's settings, the runner that turns them into a results record, and what it needs.

  profiles.py    ExperimentConfig (every run setting, validated), the profiles smoke … full, resolve,
                 the KEY=VALUE parser of `--set`
  runner.py      Run (one experiment in progress), run_experiment, run_grid (resumable, locked folders)
  base_build.py  pre-training `tiny-base` (the CPU stand-in for a pretrained LLM) into its cache
  general.py     general ability of a model: response loss on general pairs, KL to the start model
  collect.py     every finished run under a folder as one table (runs pooled only when settings match)
  real_cpu.py    the real-model experiment: sequential SFT of SmolLM2-135M on CPU (`python -m epi.real_cpu`)

Experiments drive methods over the training loop and read records with epi.analysis; nothing below
imports them.
"""
