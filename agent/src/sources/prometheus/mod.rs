//! Scraping local services that expose Prometheus metrics (`sources.prometheus`).
//!
//! Each static target is scraped on its own task every `scrape_interval`, within
//! `scrape_timeout`. A failed scrape (unreachable, timed out, an HTTP error, a body that does
//! not parse) sets the target's `up` to 0, is counted in
//! `periscope_scrape_failures_total{job,instance,reason}` and logged when the target's state
//! changes — it never stops the agent or the other targets.

pub mod parse;
pub mod scrape;

use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::ScrapeConfig;
use crate::pipeline::Pipeline;
use crate::signal::scrape::Scrape;
use crate::telemetry::{Drops, ScrapeMetrics};
use scrape::Target;

pub const KEY: &str = "sources.prometheus";

/// Builds the HTTP client every target shares.
pub fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(crate::exporters::tls::rustls_client_config(None, KEY).map_err(|e| e.to_string())?)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("periscope/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("{KEY}: HTTP client setup failed: {e}"))
}

/// Scrapes every static target until `stop` fires.
pub async fn run(
    config: ScrapeConfig,
    pipeline: Arc<Pipeline<Scrape>>,
    metrics: ScrapeMetrics,
    drops: Drops,
    stop: CancellationToken,
) -> Result<(), String> {
    let client = client()?;
    let mut tasks = tokio::task::JoinSet::new();
    for target_config in &config.static_targets {
        let mut target = Target::new(target_config, client.clone(), config.scrape_timeout);
        let pipeline = pipeline.clone();
        let metrics = metrics.clone();
        let drops = drops.clone();
        let stop = stop.clone();
        let interval = config.scrape_interval;
        tasks.spawn(async move {
            tracing::info!(job = %target.job, url = %target.url, ?interval, "scraping target");
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_up = true;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.cancelled() => break,
                }
                let scraped = tokio::select! {
                    scraped = target.scrape() => scraped,
                    _ = stop.cancelled() => break,
                };
                match &scraped.error {
                    Some(error) => {
                        metrics.failure(&target.job, &target.instance, error.reason());
                        if was_up {
                            tracing::warn!(job = %target.job, error = %error, "scrape failed; the target is down");
                        }
                        was_up = false;
                    }
                    None => {
                        if !was_up {
                            tracing::info!(job = %target.job, url = %target.url, "scrape succeeded; the target is up again");
                        }
                        was_up = true;
                    }
                }
                drops.add("series_limit", scraped.over_limit as u64);
                if let Err(e) = pipeline.send(scraped.scrape, interval).await {
                    tracing::warn!(job = %target.job, error = %e, "scraped samples dropped");
                    drops.add("queue_full", scraped.samples as u64);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
