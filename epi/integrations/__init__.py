"""Integrations: the suite's engine inside other people's training code, and the runs that check it there.

  hf.py            EPICallback / EPITrainerMixin for the Hugging Face Trainer, TaskCollator, task_blocks
                   (public path: epi.hf)
  recipe.py        the Trainer recipe of notebook 07 and examples/train_hf.py: precision, arguments, run_method
  memory.py        the GPU memory plan per method (which methods fit, at what micro-batch)
  method_store.py  each method's results and engine state saved at once, reloaded on a rerun
  distributed.py   the DDP / FSDP2 experiment entry point (`torchrun ... -m epi.distributed`)

Integrations build on the engine, the training loop and the tasks; the CLI and notebooks use them.
"""
