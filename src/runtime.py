"""TensorFlow with this project's start-up settings: `from runtime import tf`."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def __getattr__(name):
    if name == "tf":
        import tensorflow

        return tensorflow
    raise AttributeError(name)
