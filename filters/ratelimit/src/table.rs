//! The per-rule key table in Envoy shared data: bounded, exact across workers.
//!
//! Envoy never deletes shared-data entries, so one entry per client key would
//! grow without bound under a scan of client addresses. Instead each rule owns
//! a fixed table of `max_keys` slots, split into shards of at most
//! [`SLOTS_PER_SHARD`] slots; each shard is one shared-data entry holding
//! `(fingerprint, TAT)` pairs, updated with CAS. A key lives in the shard its
//! fingerprint picks, in its own slot or any slot whose TAT is in the past
//! (such a bucket is full again, the same as a fresh one, so reusing the slot
//! loses nothing). When every slot of the shard is live, the request is
//! charged to the rule's single overflow bucket: memory stays bounded and a
//! flood of new keys is still limited, as one group.
//!
//! Every shard is created at configure time ([`KeyTable::create`]); after
//! that, entries change only through CAS, so no update is lost to the
//! unconditional first write that Envoy's shared data has.

use mesh_shared::store::{ensure, update, Exhausted, SharedStore, Step};

use crate::gcra::{Decision, Gcra};

/// Slots per shared-data entry: 16 × 16 bytes = 256 bytes copied per request.
pub const SLOTS_PER_SHARD: u64 = 16;
const SLOT_BYTES: usize = 16;
const REMEMBERED_SLOT_BYTES: usize = 24;
/// CAS attempts before giving up on one request (then the filter fails open,
/// counted as `failed_open`). A conflict means another worker just wrote, so
/// attempts succeed quickly; the budget is large because giving up breaks
/// exactness: 64 was exhausted by 4 threads on one key in the core test.
const MAX_ATTEMPTS: u32 = 1024;
/// Fingerprint of the one key of an unkeyed rule and of the overflow bucket.
const SINGLE_KEY: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTable {
    prefix: String,
    max_keys: u64,
    shards: u64,
    /// 16 for GCRA buckets; 24 for remembered answers (8 bytes of payload).
    slot_bytes: usize,
}

/// What the table decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub decision: Decision,
    /// The key found no free slot and was charged to the overflow bucket.
    pub overflowed: bool,
    /// CAS conflicts seen (contention between workers).
    pub conflicts: u32,
}

impl KeyTable {
    /// `prefix` must be unique per rule and per limit parameters (see the config).
    pub fn new(prefix: String, max_keys: u64) -> KeyTable {
        let max_keys = max_keys.max(1);
        KeyTable {
            prefix,
            max_keys,
            shards: max_keys.div_ceil(SLOTS_PER_SHARD),
            slot_bytes: SLOT_BYTES,
        }
    }

    /// A table of remembered answers: `(fingerprint, until, 8 bytes)` per
    /// slot, a slot free once `until` has passed. No overflow bucket: a key
    /// that finds its shard full is simply not remembered (it asks again).
    pub fn remembered(prefix: String, max_keys: u64) -> KeyTable {
        KeyTable {
            slot_bytes: REMEMBERED_SLOT_BYTES,
            ..KeyTable::new(prefix, max_keys)
        }
    }

    pub fn max_keys(&self) -> u64 {
        self.max_keys
    }

    /// Slots of shard `i`: `max_keys` spread as evenly as possible, so the
    /// table holds exactly `max_keys` slots in all.
    fn capacity(&self, shard: u64) -> usize {
        let base = self.max_keys / self.shards;
        let extra = u64::from(shard < self.max_keys % self.shards);
        // At most SLOTS_PER_SHARD (16): fits any usize.
        (base + extra) as usize
    }

    fn shard_key(&self, shard: u64) -> String {
        format!("{}{shard}", self.prefix)
    }

    fn overflow_key(&self) -> String {
        format!("{}overflow", self.prefix)
    }

    /// Creates every shard and the overflow bucket if missing (configure time).
    pub fn create(&self, store: &dyn SharedStore) {
        for shard in 0..self.shards {
            ensure(
                store,
                &self.shard_key(shard),
                &vec![0; self.capacity(shard) * self.slot_bytes],
            );
        }
        if self.slot_bytes == SLOT_BYTES {
            ensure(store, &self.overflow_key(), &[0; SLOT_BYTES]);
        }
    }

    /// Remembers `extra` for key `fp` until `until` (the later of this and
    /// what is already there wins). A full shard: not remembered.
    pub fn remember(&self, store: &dyn SharedStore, fp: u64, until: u64, extra: [u8; 8], now: u64) {
        if self.slot_bytes != REMEMBERED_SLOT_BYTES {
            return;
        }
        let fp = fp.max(1);
        let shard = fp % self.shards;
        let size = self.capacity(shard) * self.slot_bytes;
        let width = self.slot_bytes;
        // Giving up after the attempt budget only costs a later call.
        let _ = update(store, &self.shard_key(shard), MAX_ATTEMPTS, |bytes| {
            let mut shard = match bytes {
                Some(b) if b.len() == size => b.to_vec(),
                _ => vec![0; size],
            };
            let mut own = None;
            let mut free = None;
            for (i, (slot_fp, slot_until)) in slots(&shard, width).enumerate() {
                if slot_fp == fp {
                    own = Some((i, slot_until));
                    break;
                }
                if free.is_none() && (slot_fp == 0 || slot_until <= now) {
                    free = Some(i);
                }
            }
            let index = match (own, free) {
                (Some((_, old)), _) if old >= until => return Step::Keep(()),
                (Some((i, _)), _) | (None, Some(i)) => i,
                (None, None) => return Step::Keep(()),
            };
            let offset = index * width;
            if let Some(slot) = shard.get_mut(offset..offset + REMEMBERED_SLOT_BYTES) {
                let (head, payload) = slot.split_at_mut(16);
                let (slot_fp, slot_until) = head.split_at_mut(8);
                slot_fp.copy_from_slice(&fp.to_le_bytes());
                slot_until.copy_from_slice(&until.to_le_bytes());
                payload.copy_from_slice(&extra);
            }
            Step::Write(shard, ())
        });
    }

    /// What was remembered for `fp`, if still in force at `now`: `(until, extra)`.
    pub fn recall(&self, store: &dyn SharedStore, fp: u64, now: u64) -> Option<(u64, [u8; 8])> {
        let fp = fp.max(1);
        let (bytes, _) = store.get(&self.shard_key(fp % self.shards))?;
        bytes
            .chunks_exact(self.slot_bytes)
            .find(|c| c.get(..8) == Some(&fp.to_le_bytes()[..]))
            .and_then(|c| {
                let until = u64::from_le_bytes(c.get(8..16)?.try_into().ok()?);
                let extra: [u8; 8] = c.get(16..24)?.try_into().ok()?;
                (until > now).then_some((until, extra))
            })
    }

    /// Admits or limits one request of the key with fingerprint `fp`.
    pub fn admit(
        &self,
        store: &dyn SharedStore,
        gcra: &Gcra,
        fp: u64,
        now: u64,
    ) -> Result<Admission, Exhausted> {
        // 0 marks an empty slot, so no real key may have it.
        let fp = fp.max(1);
        let shard = fp % self.shards;
        let capacity = self.capacity(shard);
        let (found, conflicts) = update(store, &self.shard_key(shard), MAX_ATTEMPTS, |bytes| {
            decide_in_shard(bytes, capacity, gcra, fp, now)
        })?;
        match found {
            Some(decision) => Ok(Admission {
                decision,
                overflowed: false,
                conflicts,
            }),
            None => {
                let (decision, more) = update(
                    store,
                    &self.overflow_key(),
                    MAX_ATTEMPTS,
                    |bytes| match decide_in_shard(bytes, 1, gcra, SINGLE_KEY, now) {
                        Step::Write(b, d) => Step::Write(b, d.unwrap_or(gcra.decide(None, now))),
                        Step::Keep(d) => Step::Keep(d.unwrap_or(gcra.decide(None, now))),
                    },
                )?;
                Ok(Admission {
                    decision,
                    overflowed: true,
                    conflicts: conflicts + more,
                })
            }
        }
    }

    /// Keys holding a live bucket (TAT after `now`), summed over the table.
    pub fn live_keys(&self, store: &dyn SharedStore, now: u64) -> u64 {
        (0..self.shards)
            .filter_map(|s| store.get(&self.shard_key(s)))
            .map(|(bytes, _)| {
                slots(&bytes, self.slot_bytes)
                    .filter(|(fp, tat)| *fp != 0 && *tat > now)
                    .count() as u64
            })
            .sum()
    }

    /// Slots stored, live or not (the memory bound).
    pub fn stored_slots(&self, store: &dyn SharedStore) -> u64 {
        (0..self.shards)
            .filter_map(|s| store.get(&self.shard_key(s)))
            .map(|(bytes, _)| (bytes.len() / self.slot_bytes) as u64)
            .sum()
    }
}

/// `(fingerprint, time)` of each slot `width` bytes wide.
fn slots(bytes: &[u8], width: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
    bytes.chunks_exact(width).map(|c| {
        let word = |r: std::ops::Range<usize>| {
            c.get(r)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        (word(0..8), word(8..16))
    })
}

/// One CAS step: `Keep(None)` means the shard is full of other live keys.
fn decide_in_shard(
    bytes: Option<&[u8]>,
    capacity: usize,
    gcra: &Gcra,
    fp: u64,
    now: u64,
) -> Step<Option<Decision>> {
    let size = capacity * SLOT_BYTES;
    // A missing or foreign-sized entry (should not happen) is treated as empty.
    let mut shard = match bytes {
        Some(b) if b.len() == size => b.to_vec(),
        _ => vec![0; size],
    };
    let mut own = None;
    let mut free = None;
    for (i, (slot_fp, tat)) in slots(&shard, SLOT_BYTES).enumerate() {
        if slot_fp == fp {
            own = Some((i, tat));
            break;
        }
        if free.is_none() && (slot_fp == 0 || tat <= now) {
            free = Some(i);
        }
    }
    let (index, stored) = match (own, free) {
        (Some((i, tat)), _) => (i, Some(tat)),
        (None, Some(i)) => (i, None),
        (None, None) => return Step::Keep(None),
    };
    let decision = gcra.decide(stored, now);
    if !decision.allowed {
        // Limiting changes nothing, so no write (and no CAS race) is needed.
        return Step::Keep(Some(decision));
    }
    let offset = index * SLOT_BYTES;
    if let Some(slot) = shard.get_mut(offset..offset + SLOT_BYTES) {
        let (slot_fp, slot_tat) = slot.split_at_mut(8);
        slot_fp.copy_from_slice(&fp.to_le_bytes());
        slot_tat.copy_from_slice(&decision.tat.to_le_bytes());
    }
    Step::Write(shard, Some(decision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_shared::hash::hash64;
    use mesh_shared::store::MemoryStore;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    fn table(store: &MemoryStore, max_keys: u64) -> KeyTable {
        let t = KeyTable::new("rl.test.".into(), max_keys);
        t.create(store);
        t
    }

    #[test]
    fn capacity_adds_up_to_max_keys_exactly() {
        for max_keys in [1, 2, 15, 16, 17, 100, 1000, 100_001] {
            let store = MemoryStore::new();
            let t = table(&store, max_keys);
            assert_eq!(t.stored_slots(&store), max_keys);
        }
    }

    #[test]
    fn keys_have_independent_buckets() {
        let store = MemoryStore::new();
        let t = table(&store, 100);
        let g = Gcra::new(2, Duration::from_secs(60), 2);
        let now = 100 * SEC;
        let a = hash64(&[b"a"]);
        let b = hash64(&[b"b"]);
        let admit = |fp| t.admit(&store, &g, fp, now).unwrap().decision.allowed;
        assert!(admit(a) && admit(a) && !admit(a));
        assert!(admit(b) && admit(b) && !admit(b));
    }

    #[test]
    fn a_hundred_thousand_keys_never_exceed_max_keys() {
        let store = MemoryStore::new();
        let max_keys = 1000;
        let t = table(&store, max_keys);
        // One request per hour per key: every admitted key stays live.
        let g = Gcra::new(1, Duration::from_secs(3600), 1);
        let now = 100 * SEC;
        let mut overflowed = 0;
        for i in 0..100_000u32 {
            let adm = t
                .admit(&store, &g, hash64(&[&i.to_le_bytes()]), now)
                .unwrap();
            overflowed += u32::from(adm.overflowed);
        }
        assert!(t.live_keys(&store, now) <= max_keys);
        assert!(
            t.live_keys(&store, now) >= max_keys * 9 / 10,
            "the table should fill up"
        );
        assert_eq!(t.stored_slots(&store), max_keys);
        // Shards + overflow bucket: nothing else was created.
        assert_eq!(store.len() as u64, max_keys.div_ceil(SLOTS_PER_SHARD) + 1);
        assert!(overflowed > 90_000);
    }

    #[test]
    fn overflow_bucket_limits_keys_that_found_no_slot() {
        let store = MemoryStore::new();
        let t = table(&store, 1);
        let g = Gcra::new(1, Duration::from_secs(3600), 3);
        let now = 100 * SEC;
        let mut allowed = 0;
        for i in 0..100u32 {
            allowed += u32::from(
                t.admit(&store, &g, hash64(&[&i.to_le_bytes()]), now)
                    .unwrap()
                    .decision
                    .allowed,
            );
        }
        // 1 for the key in the only slot (it sent one request), and a burst of 3
        // shared by the 99 others.
        assert_eq!(allowed, 4);
    }

    #[test]
    fn expired_slots_are_reused() {
        let store = MemoryStore::new();
        let t = table(&store, 1);
        let g = Gcra::new(1, Duration::from_secs(1), 1);
        let a = t.admit(&store, &g, 11, 10 * SEC).unwrap();
        assert!(!a.overflowed);
        // After one second the first key's bucket is full again: its slot is free.
        let b = t.admit(&store, &g, 22, 11 * SEC).unwrap();
        assert!(!b.overflowed && b.decision.allowed);
    }

    #[test]
    fn exact_under_concurrent_workers() {
        let store = Arc::new(MemoryStore::new());
        let t = Arc::new(table(&store, 64));
        let g = Gcra::new(500, Duration::from_secs(3600), 500);
        let now = 100 * SEC;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (store, t) = (Arc::clone(&store), Arc::clone(&t));
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| t.admit(&*store, &g, 42, now).unwrap().decision.allowed)
                        .count()
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 500);
    }

    proptest! {
        #[test]
        fn live_keys_never_exceed_max_keys(
            max_keys in 1u64..64,
            keys in proptest::collection::vec((0u32..500, 0u64..3 * SEC), 1..300),
        ) {
            let store = MemoryStore::new();
            let t = table(&store, max_keys);
            let g = Gcra::new(1, Duration::from_secs(1), 2);
            let mut now = 1000 * SEC;
            for (key, gap) in keys {
                now += gap;
                t.admit(&store, &g, hash64(&[&key.to_le_bytes()]), now).unwrap();
                prop_assert!(t.live_keys(&store, now) <= max_keys);
            }
            prop_assert_eq!(t.stored_slots(&store), max_keys);
        }
    }
}
