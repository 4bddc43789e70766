"""How coefficients are learned: calibration data, the Lightning learner and its callbacks,
FW-Merging, progressive (and streamed) block-by-block distillation, evaluation."""
