//! End-to-end acknowledgements: a source that must not lose data (file tailing) attaches an
//! [`Ack`] to what it sends; every consumer that takes the payload holds a clone; when the last
//! clone is gone the source hears whether every consumer delivered it.
//!
//! A consumer marks the ack failed when it lets go of data without delivering it for a reason
//! that a restart could fix (shutdown, retries exhausted); data the backend refused for good
//! (a permanent error, counted and logged) is acknowledged as delivered, since sending it
//! again would be refused again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What the source hears about one payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub token: u64,
    pub delivered: bool,
}

/// The source's end: hands out acks for its payloads.
#[derive(Clone)]
pub struct Acker {
    tx: mpsc::UnboundedSender<Acked>,
}

/// Where the source hears back, in the order the last holders let go.
pub type AckReceiver = mpsc::UnboundedReceiver<Acked>;

pub fn channel() -> (Acker, AckReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Acker { tx }, rx)
}

impl Acker {
    /// An ack for the payload the source calls `token`.
    pub fn ack(&self, token: u64) -> Ack {
        Ack {
            inner: Arc::new(Inner {
                token,
                failed: AtomicBool::new(false),
                silent: AtomicBool::new(false),
                tx: self.tx.clone(),
            }),
        }
    }
}

/// Travels with a payload; cloned for each consumer.
#[derive(Clone)]
pub struct Ack {
    inner: Arc<Inner>,
}

impl Ack {
    /// The payload was let go without being delivered.
    pub fn fail(&self) {
        self.inner.failed.store(true, Ordering::Relaxed);
    }

    /// The payload never entered the pipeline (the sender was told to try again): the
    /// source hears nothing for it.
    pub fn forget(self) {
        self.inner.silent.store(true, Ordering::Relaxed);
    }
}

struct Inner {
    token: u64,
    failed: AtomicBool,
    silent: AtomicBool,
    tx: mpsc::UnboundedSender<Acked>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.silent.load(Ordering::Relaxed) {
            return;
        }
        let delivered = !self.failed.load(Ordering::Relaxed);
        // The source may have stopped listening (shutdown); then nobody needs to know.
        let _ = self.tx.send(Acked { token: self.token, delivered });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_hears_once_the_last_holder_lets_go() {
        let (acker, mut rx) = channel();
        let ack = acker.ack(7);
        let other = ack.clone();
        drop(ack);
        assert!(rx.try_recv().is_err());
        drop(other);
        assert_eq!(rx.try_recv().unwrap(), Acked { token: 7, delivered: true });
    }

    #[test]
    fn one_failed_holder_fails_the_payload() {
        let (acker, mut rx) = channel();
        let ack = acker.ack(1);
        let other = ack.clone();
        other.fail();
        drop(other);
        drop(ack);
        assert_eq!(rx.try_recv().unwrap(), Acked { token: 1, delivered: false });
    }

    #[test]
    fn a_forgotten_ack_says_nothing() {
        let (acker, mut rx) = channel();
        acker.ack(3).forget();
        assert!(rx.try_recv().is_err());
    }
}
