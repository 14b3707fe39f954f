"""The Spark metrics job of cryptotui: `python -m spark.job` (see docs/spark.md).

job.py builds the streaming queries, kafka_source.py reads Kafka (Python Data Source API), metrics.py
holds the aggregations and the finishing arithmetic, writer.py the foreachBatch upserts, progress.py the
listener that writes spark_progress.
"""
