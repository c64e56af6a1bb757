//! Gives memory back to the system after a connection spike. A side task of the proxy,
//! beside admin and the control-plane link; the data path never waits for it.
//!
//! glibc keeps what a process freed in its heap for reuse, so a sidecar that once held
//! 10,000 connections stays at that resident size after they close (236 MiB where 10 MiB
//! would do) — which is what the pod's memory limit and the node's accounting see.
//! `malloc_trim` hands the free pages back. It walks the heap with the arena locked, so it
//! runs only after a real drop: at least [`MIN_CLOSED`] connections closed, at most half of
//! the high-water mark still open, and the count no longer falling (memory a closing
//! connection frees after the trim would stay), checked once per [`CHECK_EVERY`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::ProxyState;

/// How often the open-connection count is looked at (a gauge read; nothing else).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Fewer closed connections than this free too little (~10–20 KiB each) to be worth a trim.
pub const MIN_CLOSED: i64 = 256;

/// Whether the drop from `high_water` to `open` connections calls for a trim now, `before`
/// being the count one check earlier.
pub fn should_trim(high_water: i64, before: i64, open: i64) -> bool {
    high_water - open >= MIN_CLOSED && open <= high_water / 2 && open >= before
}

/// Watches the open-connection count until the proxy shuts down, trimming after each spike.
pub async fn trim_loop(state: Arc<ProxyState>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut high_water, mut before) = (0, 0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let open = state.metrics.open_connections_total();
        high_water = high_water.max(open);
        let trim = should_trim(high_water, before, open);
        before = open;
        if !trim {
            continue;
        }
        let started = Instant::now();
        // On a blocking thread: a large heap takes milliseconds to walk.
        let released = tokio::task::spawn_blocking(release_free_memory).await.unwrap_or(false);
        tracing::info!(
            connections.before = high_water,
            connections.now = open,
            released,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "connections closed: gave freed memory back to the system"
        );
        high_water = open;
    }
}

/// glibc's `malloc_trim(0)`: returns every whole free page of the heap to the kernel. True
/// if anything was released. Also what the control plane calls after a policy change.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc serializes it
    // with every other allocator call through the arena locks.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other C libraries (musl) have no `malloc_trim`; their allocators keep less to begin with.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_large_drop() {
        assert!(should_trim(10_000, 0, 0));
        assert!(should_trim(10_000, 5_000, 5_000));
        assert!(should_trim(512, 250, 256));
        // Not half gone.
        assert!(!should_trim(10_000, 5_001, 5_001));
        // Too few closed to matter.
        assert!(!should_trim(300, 100, 100));
        assert!(!should_trim(0, 0, 0));
        // Still closing: wait until the count stops falling.
        assert!(!should_trim(10_000, 2_000, 40));
    }

    /// Resident set size of this process, from /proc (bytes).
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: u64 = statm.split_whitespace().nth(1).expect("rss field").parse().expect("number");
        pages * 4096
    }

    /// The case it exists for: many small buffers freed while a few survive between them, so
    /// the heap's top cannot shrink and glibc alone keeps every freed page.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_between_live_allocations_goes_back_to_the_system() {
        const CHUNK: usize = 32 * 1024;
        let mut chunks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; CHUNK]).collect(); // 128 MiB
        let survivors: Vec<Vec<u8>> = chunks.iter_mut().step_by(16).map(std::mem::take).collect();
        drop(chunks);
        let before = rss();
        assert!(release_free_memory(), "malloc_trim released nothing");
        let after = rss();
        assert!(
            before.saturating_sub(after) >= 64 << 20,
            "RSS {} MiB -> {} MiB: expected ~120 MiB back",
            before >> 20,
            after >> 20
        );
        assert_eq!(survivors.iter().map(|c| c[CHUNK - 1] as usize).sum::<usize>() % 16, 0);
    }
}
