# The project's image: the Prefect worker, the Prefect server and the model server of
# infra/docker-compose.yml all run it, so client and server versions always match.
# It installs the way `make install` does (tests/infra/test_infra_files.py holds the two together):
# torch first, pinned, then the project in editable mode, without the test extra.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    GX_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true

WORKDIR /app

# torch first, pinned: pip then finds it satisfied instead of resolving a newer build.
# Its own layer, so a change to the code does not download it again.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY . /app
RUN pip install -e '.' \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /app/transfer-runs \
    && chown -R app /app/transfer-runs

# Flow runs write under output_dir (transfer-runs/, relative to /app); compose mounts a volume here.
USER app
CMD ["transfer-pipeline", "--help"]
