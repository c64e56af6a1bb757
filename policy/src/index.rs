//! The lookup structures behind [`crate::PolicySnapshot`]: they turn "which rules could match
//! this flow?" into a few hash lookups instead of a scan of every policy.
//!
//! - [`IdIndex`] maps SPIFFE ID patterns to values: exact IDs in a hash map, `/*` prefixes in a
//!   hash map probed once per ancestor of the looked-up ID (only at the depths where prefixes
//!   exist), and `*` in a single slot. Used for selectors (which groups of rules apply to a
//!   workload) and for `from[].identity` (which rules name a source).
//! - [`IpIndex`] maps CIDRs to values: one hash map per address family keyed by
//!   (masked address, prefix length), probed once per prefix length in use.
//!
//! They only produce candidates; the evaluator checks every condition of each candidate, so an
//! index may over-approximate but never miss.
//!
//! The maps use [`FastHash`], not std's SipHash: hashing dominates a decision, and the keys
//! come from policies (written by operators), while flows only look up. A lookup key cannot
//! degrade a table, so the flooding resistance SipHash buys is not needed here.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use trellis_identity::SpiffeId;

use crate::pattern::SpiffePattern;

/// A multiply-rotate hash over 8-byte words (the "Fx" hash of rustc), several times faster
/// than SipHash on short keys like SPIFFE IDs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher {
    hash: u64,
}

const SEED: u64 = 0xf135_7aea_2e62_a9c5;

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ (rest.len() as u64) << 59);
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    /// The multiply leaves the best-mixed bits at the top; hashbrown indexes with the low ones.
    fn finish(&self) -> u64 {
        self.hash.rotate_left(26)
    }
}

pub(crate) type FastHash = BuildHasherDefault<FastHasher>;
pub(crate) type FastMap<K, V> = HashMap<K, V, FastHash>;

/// Which path depths (segment counts) have at least one prefix pattern.
#[derive(Debug, Default, Clone, Copy)]
struct DepthSet {
    /// Bit d is set for depth d < 63; bit 63 stands for every depth >= 63.
    bits: u64,
}

impl DepthSet {
    fn insert(&mut self, depth: usize) {
        self.bits |= 1 << depth.min(63);
    }

    fn contains(&self, depth: usize) -> bool {
        self.bits & (1 << depth.min(63)) != 0
    }

    fn is_empty(&self) -> bool {
        self.bits == 0
    }
}

/// Values keyed by SPIFFE ID pattern.
#[derive(Debug)]
pub(crate) struct IdIndex<V> {
    exact: FastMap<Box<str>, V>,
    prefix: FastMap<Box<str>, V>,
    depths: DepthSet,
    any: Option<V>,
}

impl<V> Default for IdIndex<V> {
    fn default() -> Self {
        IdIndex { exact: FastMap::default(), prefix: FastMap::default(), depths: DepthSet::default(), any: None }
    }
}

impl<V: Default> IdIndex<V> {
    /// The value for `pattern`, created empty on first use.
    pub(crate) fn entry(&mut self, pattern: &SpiffePattern) -> &mut V {
        match pattern {
            SpiffePattern::Any => self.any.get_or_insert_with(V::default),
            SpiffePattern::Exact(id) => self.exact.entry(id.as_str().into()).or_default(),
            SpiffePattern::Prefix(base) => {
                self.depths.insert(base.segments().count());
                self.prefix.entry(base.as_str().into()).or_default()
            }
        }
    }
}

impl<V> IdIndex<V> {
    /// Calls `f` with the value of every pattern that matches `id`.
    pub(crate) fn for_each_match<'s>(&'s self, id: &SpiffeId, mut f: impl FnMut(&'s V)) {
        if let Some(v) = self.exact.get(id.as_str()) {
            f(v);
        }
        if !self.depths.is_empty() {
            self.for_each_prefix(id, &mut f);
        }
        if let Some(v) = &self.any {
            f(v);
        }
    }

    /// Probes each strict ancestor of `id` (`spiffe://td`, `spiffe://td/a`, ... ) whose depth
    /// has prefixes.
    fn for_each_prefix<'s>(&'s self, id: &SpiffeId, f: &mut impl FnMut(&'s V)) {
        let uri = id.as_str();
        let path_start = uri.len() - id.path().len();
        for (depth, (slash, _)) in uri[path_start..].match_indices('/').enumerate() {
            if self.depths.contains(depth)
                && let Some(v) = self.prefix.get(&uri[..path_start + slash])
            {
                f(v);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty() && self.any.is_none()
    }
}

/// Values keyed by CIDR, found by address.
#[derive(Debug, Default)]
pub(crate) struct IpIndex<V> {
    v4: FastMap<(u32, u8), V>,
    v4_lens: Vec<u8>,
    v6: FastMap<(u128, u8), V>,
    v6_lens: Vec<u8>,
}

impl<V: Default> IpIndex<V> {
    /// The value for `net` (canonical: IPv4-mapped CIDRs already turned into IPv4).
    pub(crate) fn entry(&mut self, net: IpNetwork) -> &mut V {
        let len = net.prefix();
        match net.network() {
            IpAddr::V4(a) => {
                insert_len(&mut self.v4_lens, len);
                self.v4.entry((u32::from(a), len)).or_default()
            }
            IpAddr::V6(a) => {
                insert_len(&mut self.v6_lens, len);
                self.v6.entry((u128::from(a), len)).or_default()
            }
        }
    }
}

fn insert_len(lens: &mut Vec<u8>, len: u8) {
    if let Err(at) = lens.binary_search(&len) {
        lens.insert(at, len);
    }
}

impl<V> IpIndex<V> {
    /// Calls `f` with the value of every CIDR containing `ip` (which must be canonical).
    pub(crate) fn for_each_match<'s>(&'s self, ip: IpAddr, mut f: impl FnMut(&'s V)) {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for &len in &self.v4_lens {
                    let masked = if len == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(len))) };
                    if let Some(v) = self.v4.get(&(masked, len)) {
                        f(v);
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for &len in &self.v6_lens {
                    let masked = if len == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(len))) };
                    if let Some(v) = self.v6.get(&(masked, len)) {
                        f(v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(index: &IdIndex<Vec<u32>>, id: &str) -> Vec<u32> {
        let mut out = Vec::new();
        index.for_each_match(&SpiffeId::parse(id).unwrap(), |v| out.extend(v));
        out.sort_unstable();
        out
    }

    #[test]
    fn id_index_finds_exact_prefix_and_any() {
        let mut index: IdIndex<Vec<u32>> = IdIndex::default();
        let mut add = |p: &str, v: u32| index.entry(&SpiffePattern::parse(p).unwrap()).push(v);
        add("spiffe://td/ns/shop/sa/api", 1);
        add("spiffe://td/ns/shop/*", 2);
        add("spiffe://td/*", 3);
        add("*", 4);
        add("spiffe://td/ns/shopping/*", 5);
        add("spiffe://td/ns/shop/sa/api/*", 6);
        assert_eq!(collect(&index, "spiffe://td/ns/shop/sa/api"), [1, 2, 3, 4]);
        assert_eq!(collect(&index, "spiffe://td/ns/shop"), [3, 4]);
        assert_eq!(collect(&index, "spiffe://td/ns/shopping/sa/x"), [3, 4, 5]);
        assert_eq!(collect(&index, "spiffe://td"), [4]);
        assert_eq!(collect(&index, "spiffe://other/ns/shop/sa/api"), [4]);
        assert_eq!(collect(&index, "spiffe://td/ns/shop/sa/api/x/y"), [2, 3, 4, 6]);
    }

    /// hashbrown picks the bucket from the low bits and a tag from the top 7: both must spread
    /// keys that differ only in their last characters.
    #[test]
    fn fast_hash_spreads_similar_keys() {
        use std::hash::BuildHasher;
        let n = 1 << 16;
        let mut low = vec![0u32; n];
        let mut top = [0u32; 128];
        for i in 0..n {
            let h = FastHash::default().hash_one(format!("spiffe://cluster.local/ns/team{}/sa/client{i}", i % 100));
            low[(h as usize) & (n - 1)] += 1;
            top[(h >> 57) as usize] += 1;
        }
        assert!(low.iter().max().copied().unwrap_or(0) <= 12, "bucket clustering");
        let (min, max) = (top.iter().min().copied().unwrap_or(0), top.iter().max().copied().unwrap_or(0));
        assert!(max < 2 * min, "tag skew: {min}..{max}");
    }

    #[test]
    fn ip_index_finds_every_containing_cidr() {
        let mut index: IpIndex<Vec<u32>> = IpIndex::default();
        for (i, net) in
            ["10.0.0.0/8", "10.1.0.0/16", "0.0.0.0/0", "10.1.2.3/32", "2001:db8::/32", "::/0"].iter().enumerate()
        {
            index.entry(net.parse().unwrap()).push(i as u32);
        }
        let find = |ip: &str| {
            let mut out: Vec<u32> = Vec::new();
            index.for_each_match(ip.parse().unwrap(), |v| out.extend(v));
            out.sort_unstable();
            out
        };
        assert_eq!(find("10.1.2.3"), [0, 1, 2, 3]);
        assert_eq!(find("10.2.0.1"), [0, 2]);
        assert_eq!(find("192.168.0.1"), [2]);
        assert_eq!(find("2001:db8::1"), [4, 5]);
        assert_eq!(find("2001:db9::1"), [5]);
    }
}
