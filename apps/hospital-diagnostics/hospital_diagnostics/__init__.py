"""hospital-diagnostics: federated malignant-vs-benign diagnosis, a Flower app."""
