"""Training: one DCFF run, and the pieces it is made of.

  train        train_and_evaluate: the loop (fuse, train, evaluate, checkpoint, export, resume)
  run_config   config.json: saved with the first checkpoint, checked when a run resumes
  steps        the train state, the jitted train and eval steps, data-parallel placement
  optim        the published SGD (coupled weight decay) and its schedules
  logs         train-metric windows, epoch lines, TensorBoard scalars
  checkpoints  orbax: save, resume from the newest readable checkpoint, agree across processes
  preemption   stop cleanly on SIGTERM or Ctrl-C
  report       end-of-run plots

`python -m dcff_jax.main` is the command line; dcff_jax.steps, .optim and .train re-export
their names for code written against the former layout.
"""
