"""Training: the run's state (:mod:`.state`), its output folder (:mod:`.run_folder`), the epoch loop
(:mod:`.loop`), one epoch of steps (:mod:`.step`) and the weights' moving average (:mod:`.ema`)."""
