"""After training: cross-validated evaluation and conformal prediction sets (`evaluate`), image-based
profiling with NSC/NSCB (`profiling`, the registry of feature normalisations) and occlusion maps
(`interpretation`)."""
