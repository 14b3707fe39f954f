"""The services the pipeline needs: PostgreSQL/TimescaleDB, the Kafka broker, Grafana."""
