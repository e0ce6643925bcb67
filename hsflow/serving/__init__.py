"""The saved model's doors, one answer for all: recommend (the function and the CLI), the MLflow pyfunc (pyfunc),
the REST service (serve), the review page (review + static/), and which registered model answers (registry).
Imports hsflow.models and below."""
