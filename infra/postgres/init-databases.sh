#!/bin/sh
# Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d):
# one database each for MLflow's tracking/registry store and Prefect's API.
set -eu
for db in "${MLFLOW_DB:-skinrisk_mlflow}" "${PREFECT_DB:-skinrisk_prefect}"; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE \"$db\""
done
# Prefect's migrations use pg_trgm for its search indexes.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${PREFECT_DB:-skinrisk_prefect}" \
    -c "CREATE EXTENSION IF NOT EXISTS pg_trgm"
