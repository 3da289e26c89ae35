"""The `cgc-prepare` binary (installed as package `cgc_tf_prepare`)."""
