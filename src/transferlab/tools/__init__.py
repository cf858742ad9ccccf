"""The `transferlab` command and the tools it runs outside the pipeline."""
