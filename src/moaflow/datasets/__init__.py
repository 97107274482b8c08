"""Getting the published data: resumable, verified downloads and extractions (`download`), reading the
microscopy files (`images`), and the per-field tables every later stage reads (`tables`)."""
