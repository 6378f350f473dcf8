//! Scraping local services that expose Prometheus metrics (`sources.prometheus`).

pub mod parse;
