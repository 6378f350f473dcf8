//! Scraping local services that expose Prometheus metrics (`sources.prometheus`).
//!
//! Each static target is scraped on its own task every `scrape_interval`, within
//! `scrape_timeout`. A failed scrape (unreachable, timed out, an HTTP error, a body that does
//! not parse) sets the target's `up` to 0, is counted in
//! `periscope_scrape_failures_total{job,instance,reason}` and logged when the target's state
//! changes — it never stops the agent or the other targets.

pub mod kubernetes;
pub mod parse;
pub mod scrape;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::{ScrapeConfig, StaticTarget};
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

/// Scrapes every static target, and with `kubernetes_pods` the annotated pods of this node
/// (listed again every `scrape_interval`), until `stop` fires.
pub async fn run(
    config: ScrapeConfig,
    node_name: String,
    pipeline: Arc<Pipeline<Scrape>>,
    metrics: ScrapeMetrics,
    drops: Drops,
    stop: CancellationToken,
) -> Result<(), String> {
    let client = client()?;
    let mut scrapers = Scrapers { running: HashMap::new(), tasks: tokio::task::JoinSet::new(), client, config: config.clone(), pipeline, metrics: metrics.clone(), drops, stop: stop.clone() };
    for target in &config.static_targets {
        scrapers.start(target, false);
    }
    if config.kubernetes_pods {
        match kubernetes::Api::in_cluster() {
            Ok(api) => {
                tracing::info!(api = %api.url(), node = %node_name, "discovering annotated pods of this node");
                let mut failing = false;
                loop {
                    match api.targets(&node_name).await {
                        Ok(targets) => {
                            if failing {
                                tracing::info!(api = %api.url(), "pod discovery works again");
                            }
                            failing = false;
                            scrapers.discovered(&targets);
                        }
                        Err(e) => {
                            metrics.failure(kubernetes::JOB, api.url(), "discovery");
                            if !failing {
                                tracing::warn!(error = %e, "pod discovery failed; the pods found before are still scraped");
                            }
                            failing = true;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(config.scrape_interval) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "sources.prometheus.kubernetes_pods: no pod discovery"),
        }
    }
    while scrapers.tasks.join_next().await.is_some() {}
    Ok(())
}

/// The scrape tasks, by target.
struct Scrapers {
    /// Discovered targets only (static ones run until the agent stops).
    running: HashMap<String, CancellationToken>,
    tasks: tokio::task::JoinSet<()>,
    client: reqwest::Client,
    config: ScrapeConfig,
    pipeline: Arc<Pipeline<Scrape>>,
    metrics: ScrapeMetrics,
    drops: Drops,
    stop: CancellationToken,
}

fn key_of(target: &StaticTarget) -> String {
    format!("{}|{}|{:?}", target.job, target.url, target.labels)
}

impl Scrapers {
    /// Starts discovered targets that are new and retires those that are gone.
    fn discovered(&mut self, targets: &[StaticTarget]) {
        let keys: HashSet<String> = targets.iter().map(key_of).collect();
        self.running.retain(|key, retire| {
            let keep = keys.contains(key);
            if !keep {
                retire.cancel();
            }
            keep
        });
        for target in targets {
            if !self.running.contains_key(&key_of(target)) {
                let retire = self.start(target, true);
                self.running.insert(key_of(target), retire);
            }
        }
    }

    /// Starts scraping a target; returns what retires it.
    fn start(&mut self, config: &StaticTarget, discovered: bool) -> CancellationToken {
        let mut target = Target::new(config, self.client.clone(), self.config.scrape_timeout, self.config.max_series_per_target);
        let (pipeline, metrics, drops, stop) = (self.pipeline.clone(), self.metrics.clone(), self.drops.clone(), self.stop.clone());
        let retire = CancellationToken::new();
        let retired = retire.clone();
        let interval = self.config.scrape_interval;
        self.tasks.spawn(async move {
            tracing::info!(job = %target.job, url = %target.url, ?interval, discovered, "scraping target");
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_up = true;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.cancelled() => return,
                    _ = retired.cancelled() => break,
                }
                let scraped = tokio::select! {
                    scraped = target.scrape() => scraped,
                    _ = stop.cancelled() => return,
                    _ = retired.cancelled() => break,
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
            // The target is gone (its pod ended): its series end too.
            tracing::info!(job = %target.job, url = %target.url, "target gone; its series are marked stale");
            if let Some(last) = target.retire() {
                let items = last.stale_count();
                if pipeline.send(last, interval).await.is_err() {
                    drops.add("queue_full", items as u64);
                }
            }
        });
        retire
    }
}
