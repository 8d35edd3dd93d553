"""The training method: its configuration, the step/epoch/stage loop and the continual run, DyLoRA's rank
sampling and cuts, the regularisers and baselines, checkpoints, the non-finite guard, compiled and
data-parallel training, and the metrics. Imports the layers and ``io``, nothing above them."""
