"""One training run: its stages (stages: data, features, fit, calibrate, test, save), test-period evaluation with
intervals (evaluation), MLflow logging of the run and the model (tracking), and the Hydra CLI (train).
Imports hsflow.serving and below (the logged model is the pyfunc)."""
