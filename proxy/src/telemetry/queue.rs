//! The bounded hand-off between the data path and the telemetry thread.
//!
//! A push takes an uncontended lock and moves the record in, or — when the queue is full —
//! drops it and counts it: the data path never waits and never wakes anything. The
//! telemetry thread swaps the whole buffer out on its own clock ([`Queue::take`]) and hands
//! its emptied buffer back, so in the steady state nothing is allocated or freed across
//! threads. (A channel that wakes its receiver per record, and records boxed on one thread
//! and freed on the other, each cost more under load than building the spans.)

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;

use super::record::FlowRecord;

pub type Item = FlowRecord;

#[derive(Debug)]
pub struct Queue {
    items: Mutex<Vec<Item>>,
    capacity: usize,
    dropped: Counter,
}

impl Queue {
    pub fn new(capacity: usize, dropped: Counter) -> Arc<Queue> {
        let capacity = capacity.max(1);
        Arc::new(Queue { items: Mutex::new(Vec::with_capacity(capacity.min(4096))), capacity, dropped })
    }

    /// Never waits on the consumer: a full queue drops the record and counts it.
    pub fn push(&self, item: Item) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if items.len() < self.capacity {
            items.push(item);
            return;
        }
        drop(items);
        self.dropped.inc();
    }

    /// Moves everything queued into `out` (which should be empty: its buffer is handed
    /// back to the producers, so neither side reallocates in the steady state).
    pub fn take(&self, out: &mut Vec<Item>) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if out.is_empty() {
            std::mem::swap(&mut *items, out);
        } else {
            out.append(&mut items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = Counter::default();
        let q = Queue::new(2, dropped.clone());
        let rec = crate::telemetry::tests::sample_record();
        for _ in 0..5 {
            q.push(rec.clone());
        }
        assert_eq!(dropped.get(), 3);
        let mut out = Vec::new();
        q.take(&mut out);
        assert_eq!(out.len(), 2);
        q.push(rec);
        assert_eq!(dropped.get(), 3, "taking makes room again");
    }
}
