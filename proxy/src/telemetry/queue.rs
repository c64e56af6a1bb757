//! The bounded hand-off between the data path and the telemetry thread.
//!
//! A push takes an uncontended lock and moves the record in, or — when the queue is full —
//! drops it and counts it: the data path never waits and never wakes anything. The
//! telemetry thread swaps the whole buffer out on its own clock ([`Queue::take`]) and hands
//! its emptied buffer back, so in the steady state nothing is allocated or freed across
//! threads. (A channel that wakes its receiver per record, and records boxed on one thread
//! and freed on the other, each cost more under load than building the spans.)
//!
//! Denied and failed flows are always exported (DESIGN §7), so a full queue makes room for
//! one by dropping an allowed flow's record instead; only a queue full of them drops one.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;

use super::record::FlowRecord;

pub type Item = FlowRecord;

#[derive(Debug)]
pub struct Queue {
    queued: Mutex<Queued>,
    capacity: usize,
    dropped: Counter,
}

#[derive(Debug, Default)]
struct Queued {
    items: Vec<Item>,
    /// How many of `items` must be exported (`FlowRecord::must_export`): while fewer than all,
    /// a full queue still has an allowed flow to give up for a denial.
    must: usize,
}

impl Queue {
    pub fn new(capacity: usize, dropped: Counter) -> Arc<Queue> {
        let capacity = capacity.max(1);
        let queued = Queued { items: Vec::with_capacity(capacity.min(4096)), must: 0 };
        Arc::new(Queue { queued: Mutex::new(queued), capacity, dropped })
    }

    /// Never waits on the consumer: a full queue drops a record and counts it — an allowed
    /// flow's if it holds one, so a denial is dropped only when every queued record is one.
    pub fn push(&self, item: Item) {
        let must = item.must_export();
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if q.items.len() < self.capacity {
            q.must += usize::from(must);
            q.items.push(item);
            return;
        }
        if must && q.must < q.items.len() {
            // Full, so this runs only under overload; allowed flows are most of a full
            // queue, so the scan from the newest end is short.
            if let Some(slot) = q.items.iter_mut().rev().find(|i| !i.must_export()) {
                *slot = item;
                q.must += 1;
            }
        }
        drop(q);
        self.dropped.inc();
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves everything queued into `out` (which should be empty: its buffer is handed
    /// back to the producers, so neither side reallocates in the steady state).
    pub fn take(&self, out: &mut Vec<Item>) {
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        q.must = 0;
        if out.is_empty() {
            std::mem::swap(&mut q.items, out);
        } else {
            out.append(&mut q.items);
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

    #[test]
    fn a_full_queue_gives_up_an_allowed_flow_for_a_denial() {
        use crate::telemetry::Verdict;
        let dropped = Counter::default();
        let q = Queue::new(3, dropped.clone());
        let mut allowed = crate::telemetry::tests::sample_record();
        allowed.verdict = Verdict::Forwarded;
        assert!(!allowed.must_export());
        let denied = |n: u64| {
            let mut r = allowed.clone();
            r.verdict = Verdict::Handshake { label: "no_certificate", message: format!("denied {n}") };
            r
        };
        q.push(allowed.clone());
        q.push(denied(0));
        q.push(allowed.clone());
        q.push(denied(1));
        q.push(allowed.clone());
        assert_eq!(dropped.get(), 2, "an allowed flow for denial 1, then the new allowed flow");
        q.push(denied(2));
        assert_eq!(dropped.get(), 3);
        q.push(denied(3));
        assert_eq!(dropped.get(), 4, "full of denials: the new one is dropped");
        let mut out = Vec::new();
        q.take(&mut out);
        let mut kept: Vec<_> = out
            .iter()
            .map(|r| match &r.verdict {
                Verdict::Handshake { message, .. } => message.as_str(),
                _ => "allowed",
            })
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, ["denied 0", "denied 1", "denied 2"], "in any order: spans carry their times");
        q.push(allowed.clone());
        q.push(denied(4));
        q.push(allowed.clone());
        q.push(denied(5));
        assert_eq!(dropped.get(), 5, "taking forgets the old count of denials");
    }
}
