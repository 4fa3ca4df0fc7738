"""What methods compute once per model and reuse: the calibration cache (`calibration`) and the versioned
checkpoints, offline training data and progress bar shared by the learned methods (`training`).
"""
