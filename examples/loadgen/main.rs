//! `loadgen`: steady load on the example `checkout` service.
//!
//! ```text
//! loadgen [--target URL] [--rate N] [--requests N | --seconds S]
//! ```
//! Sends `--rate` requests per second (20 by default) to `--target`
//! (`http://127.0.0.1:8080`): three in four are `POST /api/checkout` (one in ten of them with a
//! payment that is declined), the rest `GET /api/cart/{id}`. It stops after `--requests`
//! requests or `--seconds` seconds (60 by default) and prints what it sent and how it was
//! answered, one `key=value` per line:
//! `requests=`, `checkouts_created=`, `checkouts_declined=`, `carts=`, `failed=`.

use std::time::Duration;

fn usage() -> ! {
    eprintln!("usage: loadgen [--target URL] [--rate N] [--requests N | --seconds S]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let (mut target, mut rate, mut requests, mut seconds) = ("http://127.0.0.1:8080".to_owned(), 20u32, None, 60u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--target" => target = value.trim_end_matches('/').to_owned(),
            "--rate" => rate = value.parse().ok().filter(|r| *r > 0).unwrap_or_else(|| usage()),
            "--requests" => requests = Some(value.parse::<u64>().unwrap_or_else(|_| usage())),
            "--seconds" => seconds = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let total = requests.unwrap_or(u64::from(rate) * seconds);
    // Plain HTTP only; the TLS provider is there because the client library insists on one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_else(|e| panic!("an HTTP client: {e}"));
    let mut rng = fastrand::Rng::with_seed(42);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        ticker.tick().await;
        let checkout = rng.u8(0..4) != 0;
        let declined = checkout && rng.u8(0..10) == 0;
        let (client, target) = (client.clone(), target.clone());
        let items = rng.u32(1..12);
        tasks.spawn(async move {
            let answer = if checkout {
                let payment = if declined { "declined" } else if i % 3 == 0 { "paypal" } else { "card" };
                client
                    .post(format!("{target}/api/checkout"))
                    .body(format!("{{\"payment\":\"{payment}\",\"items\":{items}}}"))
                    .send()
                    .await
            } else {
                client.get(format!("{target}/api/cart/{}", i % 100)).send().await
            };
            match answer.map(|r| r.status().as_u16()) {
                Ok(201) => "checkouts_created",
                Ok(402) => "checkouts_declined",
                Ok(200) => "carts",
                _ => "failed",
            }
        });
    }
    let mut counts = std::collections::BTreeMap::from([("checkouts_created", 0u64), ("checkouts_declined", 0), ("carts", 0), ("failed", 0)]);
    while let Some(outcome) = tasks.join_next().await {
        *counts.entry(outcome.unwrap_or("failed")).or_default() += 1;
    }
    println!("requests={total}");
    for (key, n) in counts {
        println!("{key}={n}");
    }
}
