"""Working as a team: the tracking server with sign-in over PostgreSQL (server), copying a registered model to it
(push), the MLflow UI (ui) and sweep reports (report). Imports hsflow.training and below."""
