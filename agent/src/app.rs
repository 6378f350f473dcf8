//! Builds every component from the config and runs them: exporters first, then pipelines,
//! then sources; shutdown runs in the reverse order within `shutdown_timeout`.
//!
//! Every listener is bound before anything starts, so a port in use is a clear start-up
//! error rather than a half-running agent.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{Config, ListenAddr};
use crate::exporters::prometheus::{self, Collectors};
use crate::exporters::{driver, jaeger, loki, remote_write, BuildError};
use crate::paths;
use crate::telemetry::exposition::Collect;
use crate::pipeline::enrich::NodeEnricher;
use crate::pipeline::{self, Pipeline};
use crate::signal::scrape::Scrape;
use crate::signal::{Logs, Metrics as MetricsData, Signal, Traces};
use crate::sources::files::{self, FileSource};
use crate::sources::host;
use crate::sources::otlp::{self, Intake};
use crate::sources::prometheus as prometheus_source;
use crate::telemetry::{Metrics, Readiness};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Files(#[from] files::BuildError),
}

async fn bind(key: &'static str, addr: ListenAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr.0).await.map_err(|source| StartError::Bind { key, addr: addr.0, source })
}

/// A running component task, watched so a failure is logged, counted and shown in /readyz.
struct Task {
    name: &'static str,
    handle: JoinHandle<()>,
}

fn supervise<F>(name: &'static str, metrics: &Metrics, readiness: &Readiness, future: F) -> Task
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let ready = readiness.register(name);
    metrics.task_started(name);
    let metrics = metrics.clone();
    let inner = tokio::spawn(future);
    ready.ready();
    let handle = tokio::spawn(async move {
        let failure = match inner.await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(join) if join.is_panic() => format!("panicked: {join}"),
            Err(join) => format!("stopped: {join}"),
        };
        tracing::error!(component = name, error = %failure, "component failed");
        metrics.task_failed(name);
        ready.failed(failure);
    });
    Task { name, handle }
}

/// Runs the agent until `shutdown` completes, then shuts down gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let node_name = config.effective_node_name();

    // Bind everything first.
    let admin_listener = bind("server.listen", config.server.listen).await?;
    let grpc_listener = match config.sources.otlp.grpc {
        Some(addr) => Some(bind("sources.otlp.grpc", addr).await?),
        None => None,
    };
    let http_listener = match config.sources.otlp.http {
        Some(addr) => Some(bind("sources.otlp.http", addr).await?),
        None => None,
    };

    let prometheus_listener = match &config.exporters.prometheus {
        Some(prometheus) => Some((bind("exporters.prometheus.listen", prometheus.listen).await?, prometheus.max_series)),
        None => None,
    };

    let stop_admin = CancellationToken::new();
    let stop_sources = CancellationToken::new();
    let hard_stop = CancellationToken::new();

    // Execution paths: a processor on the traces pipeline, aggregates shared with the API.
    let mut paths_parts = None;
    if config.paths.enabled {
        let component = metrics.component(paths::KEY, Signal::Traces);
        let (handle, input) = pipeline::lossy_consumer::<Traces>(paths::QUEUE_SPANS, component.clone());
        let (shared, processor) = paths::build(&config.paths, metrics.paths(), component);
        paths_parts = Some((shared, handle, input, processor));
    }
    let shared_paths = paths_parts.as_ref().map(|(shared, ..)| shared.clone());

    let profiling = crate::profiling::Profiling::new(
        &config.sources.pprof.targets,
        crate::sources::prometheus::client().map_err(|message| BuildError::new("sources.pprof", message))?,
        config.server.max_profiles_per_minute,
    );
    let profiles = if config.sources.pprof.targets.iter().any(|t| !t.interval.is_zero()) {
        let dir = config.data_dir.join("profiles");
        let store = crate::profiling::store::ProfileStore::open(&dir, crate::profiling::KEPT_PROFILE_BYTES)
            .map_err(|e| BuildError::new("sources.pprof", format!("cannot open {}: {e}", dir.display())))?;
        Some(Arc::new(store))
    } else {
        None
    };
    let admin_router = admin::router(AdminState {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        paths: shared_paths.clone(),
        profiling: Some(profiling.clone()),
        profiles: profiles.clone(),
        access: admin::Access { token: config.server.auth_token.clone(), loopback: config.server.listen.0.ip().is_loopback() },
        node: node_name.clone(),
        started: std::time::Instant::now(),
    });
    let admin_task = {
        let stop = stop_admin.clone();
        supervise("server", &metrics, &readiness, async move {
            axum::serve(admin_listener, admin_router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .map_err(|e| e.to_string())
        })
    };

    // Exporters.
    let mut exporter_tasks = Vec::new();
    let mut trace_consumers = Vec::new();
    if let Some(jaeger_config) = &config.exporters.jaeger {
        let (exporter, settings) = jaeger::build(jaeger_config)?;
        let component = metrics.component("jaeger", Signal::Traces);
        let (handle, input) = pipeline::consumer::<Traces>(settings.queue_items, component.clone());
        tracing::info!(target_url = %exporter.target(), protocol = ?jaeger_config.protocol, "exporting traces to Jaeger");
        trace_consumers.push(handle);
        let hard_stop = hard_stop.clone();
        exporter_tasks.push(supervise(jaeger::KEY, &metrics, &readiness, async move {
            driver::run(exporter, driver::Concatenated, input, settings, component, hard_stop).await;
            Ok(())
        }));
    }
    let mut log_consumers = Vec::new();
    if let Some(loki_config) = &config.exporters.loki {
        let (exporter, encoder, settings) = loki::build(loki_config, metrics.responses("loki"))?;
        let component = metrics.component("loki", Signal::Logs);
        let (handle, input) = pipeline::consumer::<Logs>(settings.queue_items, component.clone());
        tracing::info!(target_url = %exporter.target(), encoding = ?loki_config.encoding, "exporting logs to Loki");
        log_consumers.push(handle);
        let hard_stop = hard_stop.clone();
        exporter_tasks.push(supervise(loki::KEY, &metrics, &readiness, async move {
            driver::run(exporter, encoder, input, settings, component, hard_stop).await;
            Ok(())
        }));
    }
    if let Some((_, handle, input, processor)) = paths_parts {
        tracing::info!(
            trace_timeout = ?config.paths.trace_timeout,
            max_traces_in_flight = config.paths.max_traces_in_flight,
            max_handlers = config.paths.max_handlers,
            "analysing execution paths"
        );
        trace_consumers.push(handle);
        let runtime = tokio::runtime::Handle::current();
        exporter_tasks.push(supervise(paths::KEY, &metrics, &readiness, async move {
            tokio::task::spawn_blocking(move || processor.run_blocking(input, runtime)).await.map_err(|e| e.to_string())
        }));
    }
    let mut pull_task = None;
    let mut metric_consumers = Vec::new();
    // Scrapes travel as Prometheus samples, in a pipeline of their own to the same exporters.
    let mut scrape_consumers = Vec::new();
    if let Some(rw_config) = &config.exporters.prometheus_remote_write {
        let writer = remote_write::build(rw_config, &config.data_dir, metrics.responses("prometheus_remote_write"))?;
        let component = metrics.component("prometheus_remote_write", Signal::Metrics);
        let (handle, input) = pipeline::consumer::<MetricsData>(prometheus::QUEUE_POINTS, component.clone());
        let (scrape_handle, scrapes) = pipeline::consumer::<Scrape>(prometheus::QUEUE_POINTS, component.clone());
        tracing::info!(target_url = %writer.target(), shards = rw_config.shards, "remote-writing metrics to Prometheus");
        metric_consumers.push(handle);
        scrape_consumers.push(scrape_handle);
        let hard_stop = hard_stop.clone();
        exporter_tasks.push(supervise(remote_write::KEY, &metrics, &readiness, async move {
            writer.run(input, scrapes, component, hard_stop).await;
            Ok(())
        }));
    }
    if let Some((listener, max_series)) = prometheus_listener {
        let mut collectors: Vec<Arc<dyn Collect>> = Vec::new();
        // Everything in the metrics pipeline, kept as Prometheus series.
        let component = metrics.component("prometheus", Signal::Metrics);
        let (handle, mut input) = pipeline::consumer::<MetricsData>(prometheus::QUEUE_POINTS, component.clone());
        let (scrape_handle, mut scrapes) = pipeline::consumer::<Scrape>(prometheus::QUEUE_POINTS, component.clone());
        metric_consumers.push(handle);
        scrape_consumers.push(scrape_handle);
        let store = Arc::new(prometheus::store::Store::new(max_series, metrics.drops("prometheus", Signal::Metrics)));
        collectors.push(store.clone());
        exporter_tasks.push(supervise("exporters.prometheus.store", &metrics, &readiness, async move {
            let (mut otlp_open, mut scrapes_open) = (true, true);
            while otlp_open || scrapes_open {
                tokio::select! {
                    delivery = input.recv(), if otlp_open => match delivery {
                        Some(delivery) => {
                            store.ingest(&delivery.data);
                            component.sent.inc_by(delivery.items as u64);
                        }
                        None => otlp_open = false,
                    },
                    delivery = scrapes.recv(), if scrapes_open => match delivery {
                        Some(delivery) => {
                            component.sent.inc_by(delivery.items as u64);
                            store.ingest_scrape(delivery.data.clone());
                        }
                        None => scrapes_open = false,
                    },
                }
            }
            Ok(())
        }));
        if let Some(paths) = &shared_paths {
            collectors.push(Arc::new(paths.clone()));
        }
        let stop = stop_admin.clone();
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "Prometheus exporter listening");
        pull_task = Some(supervise(prometheus::KEY, &metrics, &readiness, async move {
            prometheus::serve(listener, Collectors::new(collectors), async move { stop.cancelled().await }).await
        }));
    }

    // Pipelines.
    let enricher = NodeEnricher::for_environment(node_name.clone());
    let traces = Arc::new(Pipeline::new(enricher.clone(), trace_consumers, metrics.drops("pipeline", Signal::Traces)));
    let metrics_pipeline = Arc::new(Pipeline::<MetricsData>::new(enricher.clone(), metric_consumers, metrics.drops("pipeline", Signal::Metrics)));
    let scrape_pipeline = Arc::new(Pipeline::<Scrape>::new(enricher.clone(), scrape_consumers, metrics.drops("pipeline", Signal::Metrics)));
    let logs = Arc::new(Pipeline::<Logs>::new(enricher, log_consumers, metrics.drops("pipeline", Signal::Logs)));

    // Sources.
    let mut source_tasks = Vec::new();
    let max_request_size = config.sources.otlp.max_request_size.as_usize();
    // One cardinality guard for OTLP metrics from either receiver.
    let series_limit: Arc<dyn otlp::Guard<MetricsData>> =
        Arc::new(crate::pipeline::cardinality::SeriesLimit::new(config.sources.otlp.max_metric_series));
    if let Some(listener) = grpc_listener {
        let intakes = otlp::grpc::Intakes {
            traces: Intake::new(traces.clone(), metrics.receiver("otlp_grpc", Signal::Traces)),
            metrics: Intake::new(metrics_pipeline.clone(), metrics.receiver("otlp_grpc", Signal::Metrics))
                .guarded(series_limit.clone(), metrics.drops("otlp_grpc", Signal::Metrics)),
            logs: Intake::new(logs.clone(), metrics.receiver("otlp_grpc", Signal::Logs)),
        };
        let tls = config.sources.otlp.tls.clone();
        let stop = stop_sources.clone();
        tracing::info!(addr = %config.sources.otlp.grpc.map(|a| a.to_string()).unwrap_or_default(), "OTLP/gRPC receiver listening");
        source_tasks.push(supervise("sources.otlp.grpc", &metrics, &readiness, async move {
            otlp::grpc::serve(listener, intakes, max_request_size, tls.as_ref(), async move { stop.cancelled().await }).await
        }));
    }
    if let Some(listener) = http_listener {
        let router = otlp::http::router(
            Intake::new(traces.clone(), metrics.receiver("otlp_http", Signal::Traces)),
            Intake::new(metrics_pipeline.clone(), metrics.receiver("otlp_http", Signal::Metrics))
                .guarded(series_limit.clone(), metrics.drops("otlp_http", Signal::Metrics)),
            Intake::new(logs.clone(), metrics.receiver("otlp_http", Signal::Logs)),
            max_request_size,
        );
        let stop = stop_sources.clone();
        let tls = config.sources.otlp.tls.clone();
        tracing::info!(addr = %config.sources.otlp.http.map(|a| a.to_string()).unwrap_or_default(), "OTLP/HTTP receiver listening");
        source_tasks.push(supervise("sources.otlp.http", &metrics, &readiness, async move {
            otlp::http::serve(listener, router, tls.as_ref(), async move { stop.cancelled().await }).await
        }));
    }
    if config.sources.host_metrics.enabled {
        let host = host::HostMetrics::new(&config.sources.host_metrics.root, node_name.clone());
        let interval = config.sources.host_metrics.interval;
        let pipeline = metrics_pipeline.clone();
        let stop = stop_sources.clone();
        source_tasks.push(supervise(host::KEY, &metrics, &readiness, async move {
            host::run(host, interval, pipeline, stop).await
        }));
    }
    if !config.sources.prometheus.static_targets.is_empty() || config.sources.prometheus.kubernetes_pods {
        let scrape_config = config.sources.prometheus.clone();
        let node = node_name.clone();
        let pipeline = scrape_pipeline.clone();
        let stop = stop_sources.clone();
        let (scrape_metrics, drops) = (metrics.scrapes(), metrics.drops(prometheus_source::KEY, Signal::Metrics));
        source_tasks.push(supervise(prometheus_source::KEY, &metrics, &readiness, async move {
            prometheus_source::run(scrape_config, node, pipeline, scrape_metrics, drops, stop).await
        }));
    }
    if let Some(store) = profiles {
        let (profiling, node, stop) = (profiling.clone(), node_name.clone(), stop_sources.clone());
        source_tasks.push(supervise("sources.pprof", &metrics, &readiness, async move {
            profiling.continuous(store, node, stop).await;
            Ok(())
        }));
    }
    if !config.sources.logs.is_empty() {
        let source = FileSource::build(&config.sources.logs, &config.data_dir, metrics.files())?;
        if config.exporters.loki.is_none() {
            tracing::warn!("sources.logs is configured without exporters.loki: log entries are counted and dropped");
        }
        let pipeline = logs.clone();
        let stop = stop_sources.clone();
        let runtime = tokio::runtime::Handle::current();
        source_tasks.push(supervise(files::KEY, &metrics, &readiness, async move {
            tokio::task::spawn_blocking(move || source.run(pipeline, runtime, stop)).await.map_err(|e| e.to_string())
        }));
    }
    // From here on only the sources hold the pipelines: when they stop, the exporters' inputs close.
    drop((traces, metrics_pipeline, scrape_pipeline, logs));

    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %node_name,
        admin = %config.server.listen,
        "periscope started"
    );
    shutdown.await;

    // Shutdown: sources, then exporters (flushing), then the admin server.
    let deadline = Instant::now() + config.shutdown_timeout;
    tracing::info!(timeout = ?config.shutdown_timeout, "shutting down: flushing pipelines");
    readiness.stopping();
    stop_sources.cancel();
    for task in source_tasks {
        if tokio::time::timeout_at(deadline, task.handle).await.is_err() {
            tracing::warn!(component = task.name, "still stopping at the shutdown deadline");
        }
    }
    let mut pending = Vec::new();
    for task in exporter_tasks {
        let mut handle = task.handle;
        if tokio::time::timeout_at(deadline, &mut handle).await.is_err() {
            pending.push((task.name, handle));
        }
    }
    if !pending.is_empty() {
        // Out of time: what is still queued is dropped and counted with reason `shutdown`.
        hard_stop.cancel();
        for (name, handle) in pending {
            tracing::warn!(component = name, "shutdown deadline reached; dropping what is still queued");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), handle).await;
        }
    }
    stop_admin.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin_task.handle).await;
    if let Some(task) = pull_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), task.handle).await;
    }
    tracing::info!("periscope stopped");
    Ok(())
}

