-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d), as POSTGRES_USER.
-- POSTGRES_DB creates the Prefect database; MLflow gets its own, owned by that same user.
CREATE DATABASE mlflow;
