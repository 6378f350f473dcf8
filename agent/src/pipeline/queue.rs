//! A queue bounded in items (spans, data points, log records), not in messages.
//!
//! A request of 10 spans and one of 10 000 weigh what they hold. Space is reserved before
//! data enters and travels with it as a [`Permit`] until the consumer is done (delivered,
//! or dropped and counted), so what the queue bounds is everything the consumer holds,
//! including batches under retry. Reservations larger than the whole queue are clamped to
//! its capacity: a single huge request waits for an empty queue instead of never fitting.

use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Queue {
    slots: Arc<Semaphore>,
    capacity: usize,
    length: Gauge,
}

/// Reserved space for `items`; released when dropped.
pub struct Permit {
    _slots: OwnedSemaphorePermit,
    reserved: u32,
    length: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.length.dec_by(i64::from(self.reserved));
    }
}

impl Queue {
    /// A queue of `capacity` items whose current length is published on `length`.
    pub fn new(capacity: usize, length: Gauge, capacity_gauge: &Gauge) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize / 2);
        capacity_gauge.set(capacity as i64);
        Queue { slots: Arc::new(Semaphore::new(capacity)), capacity, length }
    }

    fn weight(&self, items: usize) -> u32 {
        // Empty payloads still take one slot so that an unbounded stream of them is bounded too.
        items.clamp(1, self.capacity) as u32
    }

    fn permit(&self, slots: OwnedSemaphorePermit, reserved: u32) -> Permit {
        self.length.inc_by(i64::from(reserved));
        Permit { _slots: slots, reserved, length: self.length.clone() }
    }

    /// Reserves space without waiting.
    pub fn try_reserve(&self, items: usize) -> Option<Permit> {
        let n = self.weight(items);
        let slots = self.slots.clone().try_acquire_many_owned(n).ok()?;
        Some(self.permit(slots, n))
    }

    /// Reserves space, waiting at most `wait` for it.
    pub async fn reserve(&self, items: usize, wait: Duration) -> Option<Permit> {
        if let Some(permit) = self.try_reserve(items) {
            return Some(permit);
        }
        let n = self.weight(items);
        let slots = tokio::time::timeout(wait, self.slots.clone().acquire_many_owned(n))
            .await
            .ok()?
            .ok()?;
        Some(self.permit(slots, n))
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize) -> (Queue, Gauge) {
        let length = Gauge::default();
        (Queue::new(capacity, length.clone(), &Gauge::default()), length)
    }

    #[test]
    fn space_is_bounded_by_items_and_released_on_drop() {
        let (queue, length) = queue(10);
        let a = queue.try_reserve(6).unwrap();
        assert!(queue.try_reserve(5).is_none());
        let b = queue.try_reserve(4).unwrap();
        assert_eq!(length.get(), 10);
        drop(a);
        assert_eq!(length.get(), 4);
        assert!(queue.try_reserve(6).is_some());
        drop(b);
        assert_eq!(length.get(), 0);
    }

    #[test]
    fn oversized_reservation_waits_for_an_empty_queue() {
        let (queue, _) = queue(10);
        let small = queue.try_reserve(1).unwrap();
        assert!(queue.try_reserve(50).is_none());
        drop(small);
        assert!(queue.try_reserve(50).is_some());
    }

    #[tokio::test]
    async fn reserve_gives_up_after_the_wait() {
        let (queue, _) = queue(2);
        let _held = queue.try_reserve(2).unwrap();
        assert!(queue.reserve(1, Duration::from_millis(5)).await.is_none());
    }
}
