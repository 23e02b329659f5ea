"""Training: the one loop every method runs, its data schedule, checkpoints and device placement.

  loop.py         train_steps + the Plugin protocol, TrainConfig (AdamW), LoopState, seeding
  data.py         training / evaluation records per task and the step-keyed batch schedule
  checkpoints.py  save / safely read / restore a run in progress (weights_only loads only)
  device.py       device and precision choice, autocast of train-mode forwards, the fp16 GradScaler

Training builds on the engine (an EvolvingIsolation is passed in, never built here), tasks and models.
"""
