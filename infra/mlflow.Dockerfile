# The MLflow tracking server of infra/docker-compose.yml: the official image plus the PostgreSQL
# driver (SQLAlchemy 2 maps postgresql:// to psycopg 3) and boto3 for the S3 (MinIO) artifact store.
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir "psycopg[binary]>=3.2,<4" "boto3>=1.34"
