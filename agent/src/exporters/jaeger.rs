//! The Jaeger exporter: OTLP to Jaeger's collector, which ingests OTLP natively on
//! :4317 (gRPC) and :4318 (HTTP).

use super::driver::ExportSettings;
use super::otlp::{OtlpClientConfig, OtlpExporter};
use super::BuildError;
use crate::config::JaegerConfig;
use crate::signal::Traces;

pub const KEY: &str = "exporters.jaeger";

pub fn build(config: &JaegerConfig) -> Result<(OtlpExporter<Traces>, ExportSettings), BuildError> {
    let exporter = OtlpExporter::new(&OtlpClientConfig {
        key: KEY,
        endpoint: &config.endpoint,
        protocol: config.protocol,
        headers: &config.headers,
        compression: config.compression,
        timeout: config.timeout,
        tls: config.tls.as_ref(),
    })?;
    let settings = ExportSettings {
        max_batch_items: config.batch.max_spans,
        max_batch_bytes: usize::MAX,
        batch_timeout: config.batch.timeout,
        queue_items: config.queue.max_spans,
        concurrency: config.concurrency,
        request_timeout: config.timeout,
        retry: config.retry.clone(),
    };
    Ok((exporter, settings))
}
