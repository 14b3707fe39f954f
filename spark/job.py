"""The cryptotui metrics job: a standard PySpark Structured Streaming application.

Two streaming queries read Kafka and upsert into TimescaleDB:
- `trade_metrics`: the trade topic -> 1-minute windows of trade time per symbol
- `spread_metrics`: the bookTicker topic -> 30-second windows of receive time per symbol

Run it with `cryptotui stage run spark` (what the supervisor does), or directly:

    python -m spark.job [--available-now] [--query trade_metrics|spread_metrics]
    spark-submit --master spark://host:7077 spark/job.py

Settings come from the CRYPTOTUI_* environment like every other part of cryptotui. The Python files of
the `spark` package are shipped to the executors (addPyFile), so any master works; the executors need
pyspark, pyarrow and confluent-kafka installed. Exit codes: 0 stopped or done, 1 failed, 2 refused (an
other driver is running on the same checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # spark-submit spark/job.py: make the `spark` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spark.kafka_source import FORMAT, KafkaDataSource
from spark.metrics import Thresholds, spread_aggregates, trade_aggregates
from spark.progress import ProgressListener, emit_status, insert_progress
from spark.writer import Database, MetricsWriter

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

    from cryptotui.config import Settings

log = logging.getLogger("spark.job")

TRADE_QUERY = "trade_metrics"
SPREAD_QUERY = "spread_metrics"
QUERIES = (TRADE_QUERY, SPREAD_QUERY)
#: How long closing waits for the last progress events of stopped queries.
LISTENER_DRAIN_S = 3.0
ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
# How long a new driver waits for the JVM of a killed one to exit before killing it.
ORPHAN_WAIT_S = 15.0
# Settings the metrics need, applied after spark_conf: exact decimal products, and case-sensitive
# names (Binance's `t` is the trade id, `T` the trade time).
REQUIRED_CONF = {
    "spark.sql.decimalOperations.allowPrecisionLoss": "false",
    "spark.sql.caseSensitive": "true",
}


def is_local(master: str) -> bool:
    return master.startswith("local")


def launched_by_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands its gateway to the Python driver."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_conf(settings: Settings) -> dict[str, str]:
    """The Spark configuration: sized for a 2-core machine, everything overridable by spark_conf.

    Under spark-submit, its own --master and driver settings win (the JVM already runs with them)."""
    conf = {
        "spark.app.name": "cryptotui-metrics",
        "spark.executor.memory": settings.spark_executor_memory,
        "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
        "spark.default.parallelism": str(settings.spark_shuffle_partitions),
        "spark.ui.enabled": "true" if settings.spark_ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.streaming.stateStore.providerClass": ROCKSDB_PROVIDER,
        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled": "true",
        "spark.sql.streaming.noDataMicroBatches.enabled": "true",
        "spark.python.worker.reuse": "true",
        "spark.log.level": "WARN",
    }
    if not launched_by_spark_submit():
        conf["spark.master"] = settings.spark_master
        conf["spark.driver.memory"] = settings.spark_driver_memory
        # The Python of the workers: PySpark runs the data source planner on the driver and the reads on
        # the executors with the same interpreter path (default: this one).
        conf["spark.pyspark.python"] = python_executable(settings)
        if is_local(settings.spark_master):
            conf["spark.driver.host"] = "127.0.0.1"
            conf["spark.driver.bindAddress"] = "127.0.0.1"
    conf.update({str(key): str(value) for key, value in settings.spark_conf.items()})
    conf.update(REQUIRED_CONF)
    return conf


def python_executable(settings: Settings) -> str:
    """spark.pyspark.python from spark_conf, else PYSPARK_PYTHON, else this interpreter."""
    return settings.spark_conf.get("spark.pyspark.python") or os.environ.get("PYSPARK_PYTHON") or sys.executable


def prepare_environment(settings: Settings) -> None:
    """Environment the JVM and the Python workers inherit (before the session starts)."""
    if is_local(settings.spark_master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = python_executable(settings)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")


def build_session(settings: Settings) -> SparkSession:
    from pyspark.sql import SparkSession

    prepare_environment(settings)
    builder = SparkSession.builder
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    ship_code(spark, settings.paths.spark / "pyfiles")
    return spark


def package_zip(directory: Path) -> Path:
    """A zip of the `spark` package (what executors import to read Kafka), named by its content: runs of
    the same code share one file, and a file in use is never rewritten."""
    package = Path(__file__).resolve().parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(package.glob("*.py")):
            info = zipfile.ZipInfo(f"{package.name}/{path.name}", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    data = buffer.getvalue()
    target = directory / f"cryptotui_spark-{hashlib.sha256(data).hexdigest()[:16]}.zip"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


def ship_code(spark: SparkSession, directory: Path) -> None:
    """addPyFile the package, so a spark:// or k8s:// cluster's executors run the same code."""
    spark.sparkContext.addPyFile(str(package_zip(directory)))


def register_source(spark: SparkSession) -> None:
    spark.dataSource.register(KafkaDataSource)


def read_topic(spark: SparkSession, settings: Settings, topic: str) -> DataFrame:
    """One topic as a streaming DataFrame with the Kafka source's columns (either implementation)."""
    from cryptotui.services.kafka import bootstrap_servers

    source = FORMAT if settings.spark_source == "python" else "kafka"
    reader = (
        spark.readStream.format(source)
        .option("kafka.bootstrap.servers", bootstrap_servers(settings))
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .option("maxOffsetsPerTrigger", str(settings.spark_max_rows_per_trigger))
    )
    if source == "kafka":
        reader = reader.option("failOnDataLoss", "false")
    try:
        return reader.load()
    except Exception as error:
        if source == "kafka" and "kafka" in str(error).lower():
            raise RuntimeError(
                "CRYPTOTUI_SPARK_SOURCE=kafka needs Spark's Kafka connector on the classpath "
                "(spark.jars.packages=org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version>); "
                "the default `python` source needs nothing"
            ) from error
        raise


def thresholds(settings: Settings) -> Thresholds:
    return Thresholds(
        volatility=dict(settings.volatility_thresholds),
        volatility_default_bps=settings.volatility_default_bps,
        spread_warning_factor=settings.spread_warning_factor,
    )


class MetricsJob:
    """The queries of one run on a SparkSession (the tests share one session between runs)."""

    def __init__(
        self,
        spark: SparkSession,
        settings: Settings,
        *,
        database_url: str | None = None,
        emit: Callable[[dict[str, Any]], None] = emit_status,
        checkpoint_dir: Path | None = None,
    ) -> None:
        from cryptotui.db.connection import database_url as settings_database_url

        self.spark = spark
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir or settings.checkpoint_dir)
        self.db = Database(database_url or settings_database_url(settings))
        self.writer = MetricsWriter(
            self.db, thresholds(settings), settings.volume_spike_windows, settings.volume_spike_factor
        )
        self.listener = ProgressListener(self._write_progress, emit)
        self.queries: list[StreamingQuery] = []

    def _write_progress(self, record: dict[str, Any]) -> None:
        self.db.run(lambda pool: insert_progress(pool, record), timeout=10)

    def start(self, names: Sequence[str] = QUERIES, available_now: bool = False) -> list[StreamingQuery]:
        register_source(self.spark)
        self.spark.streams.addListener(self.listener)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name == TRADE_QUERY:
                frame = trade_aggregates(
                    read_topic(self.spark, self.settings, self.settings.topic_trade), self.settings.spark_watermark_s
                )
                sink = self.writer.write_trades
            elif name == SPREAD_QUERY:
                frame = spread_aggregates(
                    read_topic(self.spark, self.settings, self.settings.topic_bookticker),
                    self.settings.spark_watermark_s,
                )
                sink = self.writer.write_spreads
            else:
                raise ValueError(f"unknown query {name!r}; queries: {', '.join(QUERIES)}")
            writer = (
                frame.writeStream.queryName(name)
                .outputMode("update")
                .option("checkpointLocation", str(self.checkpoint_dir / name))
                .foreachBatch(sink)
            )
            if available_now:
                writer = writer.trigger(availableNow=True)
            else:
                writer = writer.trigger(processingTime=f"{round(self.settings.spark_trigger_s * 1000)} milliseconds")
            self.queries.append(writer.start())
        return self.queries

    def failure(self) -> str | None:
        """The error of the first query that stopped with one."""
        for query in self.queries:
            if not query.isActive:
                error = query.exception()
                if error is not None:
                    return f"query {query.name} failed: {error}"
        return None

    def active(self) -> bool:
        return any(query.isActive for query in self.queries)

    def run_available_now(self, names: Sequence[str] = QUERIES) -> None:
        """Process everything in the topics now, then return (raises when a query failed)."""
        try:
            self.start(names, available_now=True)
            for query in self.queries:
                with contextlib.suppress(Exception):  # its failure is reported below
                    query.awaitTermination()
            error = self.failure()
        finally:
            self.close()
        if error:
            raise RuntimeError(error)

    def stop(self) -> None:
        for query in self.queries:
            with contextlib.suppress(Exception):
                query.stop()

    def close(self) -> None:
        self.stop()
        # Progress events arrive asynchronously: the last ones must be written before the pool closes.
        if not self.listener.wait_all_terminated(LISTENER_DRAIN_S):
            log.warning("the last progress events did not arrive within %.0f s", LISTENER_DRAIN_S)
        with contextlib.suppress(Exception):
            self.spark.streams.removeListener(self.listener)
        self.db.close()


# --- one driver per checkpoint -----------------------------------------------------------------------
@contextlib.contextmanager
def checkpoint_lock(checkpoint_dir: Path) -> Iterator[bool]:
    """An exclusive lock on the checkpoint, held by the driver process (released when it dies)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir / ".driver.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reap_orphan_jvm(checkpoint_dir: Path) -> None:
    """Wait for (then kill) the JVM of a driver that was killed: it may still run a batch.

    A driver killed with SIGKILL leaves its JVM behind for a moment (it exits when its stdin closes,
    after its shutdown hooks); two JVMs writing one checkpoint would corrupt it.
    """
    import psutil

    try:
        recorded = json.loads((checkpoint_dir / "driver.json").read_text())
        process = psutil.Process(int(recorded["jvm_pid"]))
        if abs(process.create_time() - float(recorded["jvm_started"])) > 1:
            return  # the pid was reused
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return
    log.warning("the JVM of a previous driver (pid %d) still runs: waiting for it", process.pid)
    try:
        process.wait(ORPHAN_WAIT_S)
    except psutil.TimeoutExpired:
        log.warning("killing the JVM of the previous driver (pid %d)", process.pid)
        with contextlib.suppress(psutil.Error):
            process.kill()
            process.wait(5)
    except psutil.Error:
        pass


def record_driver(spark: SparkSession, checkpoint_dir: Path) -> None:
    import psutil

    jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())  # type: ignore[union-attr]
    info = {"python_pid": os.getpid(), "jvm_pid": jvm_pid, "jvm_started": psutil.Process(jvm_pid).create_time()}
    (checkpoint_dir / "driver.json").write_text(json.dumps(info))


# --- entry point -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spark.job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--available-now", action="store_true", help="process what the topics hold now, then exit")
    parser.add_argument(
        "--query", action="append", choices=QUERIES, help="run only this query (repeatable; default: all)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from cryptotui.config import SettingsError, load_settings

    args = parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(error, file=sys.stderr)
        return EXIT_FAILED
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    stop = threading.Event()
    session_up = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        if not session_up.is_set():
            # Still launching the JVM: nothing to save, leave at once (with the JVM being started).
            log.info("signal %d while starting: exiting", signum)
            kill_children()
            os._exit(EXIT_OK)
        log.info("signal %d: stopping the queries", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    checkpoint = Path(settings.checkpoint_dir)
    with checkpoint_lock(checkpoint) as locked:
        if not locked:
            log.error("another driver is running on the checkpoint %s", checkpoint)
            emit_status({"event": "failed", "error": f"another driver is running on {checkpoint}"})
            return EXIT_REFUSED
        reap_orphan_jvm(checkpoint)
        return _run(settings, args, stop, session_up, checkpoint)


def kill_children() -> None:
    """SIGKILL this process's descendants (the JVM being launched and what it started)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


def _run(
    settings: Settings, args: argparse.Namespace, stop: threading.Event, session_up: threading.Event, checkpoint: Path
) -> int:
    started = time.monotonic()
    emit_status({"event": "starting", "master": settings.spark_master, "pid": os.getpid()})
    spark = build_session(settings)
    session_up.set()
    job: MetricsJob | None = None
    try:
        record_driver(spark, checkpoint)
        session_s = time.monotonic() - started
        emit_status({"event": "session", "seconds": round(session_s, 3), "spark_version": spark.version})
        log.info("Spark %s session on %s in %.1f s", spark.version, settings.spark_master, session_s)
        if stop.is_set():
            return EXIT_OK
        job = MetricsJob(spark, settings, checkpoint_dir=checkpoint)
        job.start(args.query or QUERIES, available_now=args.available_now)
        emit_status({"event": "running", "queries": [query.name for query in job.queries]})
        while not stop.wait(0.5):
            error = job.failure()
            if error:
                log.error("%s", error)
                emit_status({"event": "failed", "error": error})
                return EXIT_FAILED
            if not job.active():
                log.info("all queries finished")
                break
        return EXIT_OK
    except Exception as error:
        log.exception("the Spark job failed")
        emit_status({"event": "failed", "error": f"{type(error).__name__}: {error}"})
        return EXIT_FAILED
    finally:
        emit_status({"event": "stopping"})
        if job is not None:
            job.close()
        with contextlib.suppress(Exception):
            spark.stop()
        emit_status({"event": "stopped", "seconds": round(time.monotonic() - started, 3)})


if __name__ == "__main__":
    sys.exit(main())
