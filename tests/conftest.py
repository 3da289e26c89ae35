"""Shared pytest setup: quiet TensorFlow, TensorFlow Keras backend, slow marker."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (multi-process, training runs)")
