"""Sub-commands of the `specvlm` command line (see `specvlm_hf.cli`)."""
