# The Prefect worker of infra/docker-compose.yml, and the image of the Docker/Kubernetes work pools
# (infra/work-pools/): the project's code with its pinned environment (requirements.lock).
# Build context: the repository root (`docker build -f infra/worker.Dockerfile -t skinrisk-worker .`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    GX_ANALYTICS_ENABLED=False \
    DO_NOT_TRACK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock ./
RUN pip install uv && uv pip install --system -r requirements.lock

COPY . .
RUN uv pip install --system --no-deps -e .

CMD ["prefect", "worker", "start", "--pool", "skinrisk-process", "--with-healthcheck"]
