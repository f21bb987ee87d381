"""Turn EEG recordings into LaBraM inputs."""
from data_prep.preprocess import Recording, preprocess, read_recording, to_model_input, windows

__all__ = ["Recording", "preprocess", "read_recording", "to_model_input", "windows"]
