"""The `cgc-export` binary (installed as package `cgc_tf_export`)."""
