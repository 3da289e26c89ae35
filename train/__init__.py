"""The `cgc-train` binary (installed as package `cgc_tf_train`); see `main.py`."""
