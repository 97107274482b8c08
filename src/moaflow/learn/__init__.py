"""Training: the architecture registry (`architectures`: add a network there), model construction
(`models`), hyper-parameter presets (`presets`), batches from the crop store (`feeder`), cross-validation
folds (`folds`) and the resumable training job (`train`)."""
