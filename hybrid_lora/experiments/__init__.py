"""The experiments built on the trainer: the data domains, one run and its folder, the continual study,
summaries over seeds, plots and the GPU pool that runs them side by side."""
