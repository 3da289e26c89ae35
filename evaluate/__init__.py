"""The `cgc-evaluate` binary (installed as package `cgc_tf_evaluate`)."""
