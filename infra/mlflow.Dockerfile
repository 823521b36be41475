# The MLflow tracking server of docker-compose.yml: MLflow with the PostgreSQL driver (psycopg2)
# for the backend store and boto3 for the S3-compatible artifact store (MinIO). Built rather than
# pip-installed in the container's command, so a restart starts in seconds and offline.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true

# The same range as the project's dependency, so the server is never older than its clients' major.
RUN pip install 'mlflow>=3.1,<4' psycopg2-binary boto3 \
    && useradd --create-home --uid 1000 mlflow

USER mlflow
EXPOSE 5000
