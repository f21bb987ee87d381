"""Preprocessed EEG windows on disk (ArrayRecord shards) and the grain pipelines that read them."""
