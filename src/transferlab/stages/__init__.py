"""The stages `dvc repro` runs (dvc.yaml): each a short `main` over the library."""
